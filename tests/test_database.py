"""db/psss.template: generated from the PV table by softioc, up to date, and saying what the
table says (DESC, EGU, PREC, limits, access group, autosave)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from psss_ioc.cli.main import main
from psss_ioc.generate.database import DB_PATH
from psss_ioc.ioc import pvs
from psss_ioc.ioc.pvs import Kind

RECORD = re.compile(r'^record\((\w+), "([^"]+)"\)\n\{\n(.*?)^\}', re.M | re.S)
FIELD = re.compile(r'field\((\w+),\s*"([^"]*)"\)')
INFO = re.compile(r'info\(([\w:]+),\s*"([^"]*)"\)')

RECORD_TYPES = {
    Kind.AI: "ai", Kind.AO: "ao", Kind.LONG_IN: "longin", Kind.LONG_OUT: "longout",
    Kind.INT64_IN: "int64in", Kind.BOOL_OUT: "bo", Kind.MBB_IN: "mbbi", Kind.MBB_OUT: "mbbo",
    Kind.ACTION: "bo", Kind.WAVEFORM_IN: "waveform", Kind.WAVEFORM_OUT: "waveform",
    Kind.LONG_STRING_IN: "waveform", Kind.LONG_STRING_OUT: "waveform",
}


def parse(text: str) -> dict[str, tuple[str, dict[str, str], dict[str, str]]]:
    """name -> (record type, fields, string info tags)."""
    return {name: (rtype, dict(FIELD.findall(body)), dict(INFO.findall(body)))
            for rtype, name, body in RECORD.findall(text)}


@pytest.fixture(scope="module")
def records() -> dict[str, tuple[str, dict[str, str], dict[str, str]]]:
    return parse(DB_PATH.read_text(encoding="utf-8"))


def test_committed_database_is_up_to_date(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["db", "--check"])
    assert result.exit_code == 0, result.output
    stale = tmp_path / "psss.template"
    stale.write_text(DB_PATH.read_text(encoding="utf-8").replace("AVG_N", "AVERAGE_N"))
    result = runner.invoke(main, ["db", "--check", "--output", str(stale)])
    assert result.exit_code == 1
    assert "out of date" in result.output


def test_one_record_per_table_entry_with_its_type(
    records: dict[str, tuple[str, dict[str, str], dict[str, str]]],
) -> None:
    assert set(records) == {f"$(P):{pv.name}" for pv in pvs.TABLE}
    for pv in pvs.TABLE:
        assert records[f"$(P):{pv.name}"][0] == RECORD_TYPES[pv.kind], pv.name


def test_fields_say_what_the_table_says(
    records: dict[str, tuple[str, dict[str, str], dict[str, str]]],
) -> None:
    for pv in pvs.TABLE:
        _, fields, info = records[f"$(P):{pv.name}"]
        assert fields["DESC"] == pv.desc
        assert fields.get("EGU", "") == pv.egu, pv.name
        if pv.prec is not None and pv.kind in (Kind.AI, Kind.AO, Kind.WAVEFORM_IN,
                                               Kind.WAVEFORM_OUT):
            assert int(fields["PREC"]) == pv.prec, pv.name
        if pv.kind in (Kind.AI, Kind.AO, Kind.LONG_OUT) and pv.high is not None:
            # display limits; a put out of range is refused by the IOC, never clamped
            assert float(fields["HOPR"]) == pv.high, pv.name
            assert float(fields["LOPR"]) == pv.low, pv.name
            assert "DRVH" not in fields and "DRVL" not in fields, pv.name
        if pv.nelm is not None:
            assert int(fields["NELM"]) == pv.nelm, pv.name
        # settings: their value from the listed hosts; everything else: no client writes
        assert fields["ASG"] == (pvs.SETTINGS_ASG if pv.writable else pvs.RESULTS_ASG), pv.name
        if pv.kind in (Kind.AI, Kind.AO):  # every analog record: units, precision, limits
            assert fields["EGU"] and "PREC" in fields, pv.name
            assert float(fields["LOPR"]) < float(fields["HOPR"]), pv.name
        for limit, value, severity in pv.alarms:
            assert float(fields[limit]) == value, pv.name
            assert fields[pvs.ALARM_FIELDS[limit]] == severity, pv.name
        if pv.kind == Kind.MBB_IN:
            assert fields["UNSV"] == pvs.INVALID, pv.name
        assert ("autosaveFields" in info) == pv.autosave, pv.name
        if pv.timestamped:  # the frame's timestamp: set by the head, copied along the chain
            chain = pvs.chain_of(pv)
            linked = chain is not None and pv != chain[0]  # processed by the one before it
            if linked:
                head = pvs.FRAME_CHAIN[0]
                assert fields["TSEL"] == f"$(P):{head.name}.TIME", pv.name
            else:
                assert fields["TSE"] == "-2", pv.name
        for value, (label, _) in enumerate(pv.options):
            if pv.kind in (Kind.MBB_IN, Kind.MBB_OUT):
                prefix = ("ZR", "ON", "TW", "TH", "FR", "FV", "SX", "SV")[value]
                assert fields[f"{prefix}ST"] == label, pv.name


def test_pva_group_members_are_tagged() -> None:
    text = DB_PATH.read_text(encoding="utf-8")
    grouped = [pv for pv in pvs.TABLE if pv.group_field]
    assert text.count("info(Q:group") == len(grouped)
    for pv in grouped:
        assert f'"{pv.group_field}"' in text, pv.name


def test_frame_chain_links_every_result_record_once_in_order(
    records: dict[str, tuple[str, dict[str, str], dict[str, str]]],
) -> None:
    chain = pvs.FRAME_CHAIN
    for pv, next_pv in itertools.pairwise(chain):
        assert records[f"$(P):{pv.name}"][1]["FLNK"] == f"$(P):{next_pv.name}"
    for pv in chain:  # processed by the publisher (head) and forward links, nothing else
        _, fields, _ = records[f"$(P):{pv.name}"]
        assert fields.get("SCAN", "Passive") == "Passive", pv.name
        assert "DTYP" not in fields, pv.name  # plain soft record: no Python per frame
    assert "FLNK" not in records[f"$(P):{chain[-1].name}"][1]
    assert chain[-1] == pvs.SPECTRUM_Y  # last: its post triggers the PVA group snapshot
    # (the axis and the view are stamped with their frame too, but written on their own)
    assert set(chain) == {pv for pv in pvs.TABLE if pv.timestamped} - {
        pvs.SPECTRUM_AXIS, pvs.PROFILE_X, pvs.PROFILE_Y, pvs.IMAGE}
    stats = pvs.STATS_CHAIN
    for pv, next_pv in itertools.pairwise(stats):
        assert records[f"$(P):{pv.name}"][1]["FLNK"] == f"$(P):{next_pv.name}"
    for pv in stats:  # stamped when written: no TSE/TSEL tricks
        _, fields, _ = records[f"$(P):{pv.name}"]
        assert "DTYP" not in fields and "TSEL" not in fields and "TSE" not in fields, pv.name


def test_health_records_alarm_and_the_file_says_it_needs_psss_ioc(
    records: dict[str, tuple[str, dict[str, str], dict[str, str]]],
) -> None:
    """A control room can alarm on them; a plain softIoc cannot load the file (and it says so:
    the Python device support exists only in a psss-ioc process)."""
    def fields(pv: pvs.PV) -> dict[str, str]:
        return records[f"$(P):{pv.name}"][1]

    assert fields(pvs.RATE)["LSV"] == pvs.MINOR and float(fields(pvs.RATE)["LOW"]) > 0
    assert fields(pvs.N_ERRORS)["HSV"] == pvs.MINOR and fields(pvs.N_ERRORS)["HHSV"] == pvs.MAJOR
    assert fields(pvs.N_LOST)["HSV"] == pvs.MINOR
    severities = {fields(pvs.STATUS).get(f"{s}SV") for s in ("ON", "TW", "TH", "FR", "FV")}
    assert {pvs.MINOR, pvs.MAJOR} <= severities
    text = DB_PATH.read_text(encoding="utf-8")
    assert 'DTYP, "Python' in text
    assert "NOT loadable by a plain softIoc" in text.split("record(", 1)[0]
