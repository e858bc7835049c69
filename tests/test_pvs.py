"""The PV table is consistent: unique names, EPICS limits, every kind well formed."""

from __future__ import annotations

from psss_ioc.ioc import pvs


def test_names_unique_and_short() -> None:
    names = [pv.name for pv in pvs.TABLE]
    assert len(names) == len(set(names))
    prefix = "SARFE10-PSSS059"
    for pv in pvs.TABLE:
        assert len(pvs.full_name(prefix, pv)) <= 60
        assert len(pv.desc) <= 40


def test_issue_names_present() -> None:
    required = [
        "START", "STOP", "STATUS", "MESSAGE", "INPUT_STREAM", "INPUT_MODE", "SPC_ROI_YMIN",
        "SPC_ROI_YMAX", "SPECTRUM_X", "BACKGROUND_FILE", "AVG_N", "FIT_ENABLE", "SPECTRUM_Y",
        "SPECTRUM_CENTER", "SPECTRUM_FWHM", "SPECTRUM_AMPLITUDE", "SPECTRUM_COM",
        "SPECTRUM_STD", "SPECTRUM_FIT", "FIT_STATUS", "PULSE_ID", "SPECTRUM_AVG_Y",
        "SPECTRUM_AVG_CENTER", "SPECTRUM_AVG_FWHM", "BACKGROUND_STATUS", "IMAGE_WIDTH",
        "IMAGE_HEIGHT", "RATE", "N_PROCESSED", "N_LOST", "N_ERRORS", "N_OUT_DROPPED",
        "PROC_TIME",
    ]
    missing = [n for n in required if n not in pvs.BY_NAME]
    assert not missing


def test_settings_autosaved_and_writable() -> None:
    for name in ["SPC_ROI_YMIN", "SPC_ROI_YMAX", "SPECTRUM_X", "BACKGROUND_FILE", "AVG_N",
                 "FIT_ENABLE"]:
        pv = pvs.BY_NAME[name]
        assert pv.autosave and pv.writable
    assert all(pv.writable for pv in pvs.AUTOSAVED)


def test_results_are_timestamped_inputs() -> None:
    for pv in pvs.TABLE:
        if pv.timestamped:
            assert not pv.writable


def test_pva_group_has_one_trigger() -> None:
    triggers = [pv for pv in pvs.TABLE if pv.group_trigger]
    assert [pv.name for pv in triggers] == ["SPECTRUM_Y"]
    fields = {pv.group_field for pv in pvs.TABLE if pv.group_field}
    assert {"spectrum", "center", "fwhm", "pulse_id"} <= fields


def test_markdown_table_lists_every_pv() -> None:
    text = pvs.markdown_table()
    for pv in pvs.TABLE:
        assert f"`<prefix>:{pv.name}`" in text


def test_analog_records_have_units_precision_and_display_limits() -> None:
    for pv in pvs.TABLE:
        if pv.kind in (pvs.Kind.AI, pvs.Kind.AO):
            assert pv.egu and pv.prec is not None, pv.name
            assert pv.low is not None and pv.high is not None and pv.low < pv.high, pv.name


def test_access_groups_by_kind() -> None:
    """Settings in SETTINGS (their value from the listed hosts), all else in RESULTS."""
    for pv in pvs.TABLE:
        assert pv.asg == (pvs.SETTINGS_ASG if pv.writable else pvs.RESULTS_ASG), pv.name
    assert len({pvs.SETTINGS_ASG, pvs.RESULTS_ASG, pvs.LOCKED_ASG, "DEFAULT"}) == 4
