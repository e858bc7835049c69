"""The Phoebus operator screen: up to date with the PV table, well-formed, and every PV it names
served by a live IOC."""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from iochelpers import BIN, EPICS_ENV, IocProcess

from psss_ioc.cli.main import main
from psss_ioc.generate import screens
from psss_ioc.ioc import pvs

MACRO_PV = re.compile(r"^\$\(P\):([A-Z0-9_]+)$")


def committed() -> str:
    return screens.SCREEN_PATH.read_text(encoding="utf-8")


def all_pv_names(root: ET.Element) -> list[str]:
    """PV names of widgets, of their write actions and of the plot traces."""
    names = [e.text or "" for e in root.iter("pv_name")]
    for trace in root.iter("trace"):
        names += [trace.findtext("x_pv") or "", trace.findtext("y_pv") or ""]
    return names


def test_committed_screen_is_regenerated_byte_for_byte() -> None:
    assert screens.render().encode() == screens.SCREEN_PATH.read_bytes(), (
        "psss_ioc/opi/psss.bob is out of date with the PV table: run `psss-ioc screens`")


def test_check_option_passes_on_committed_file_and_fails_on_a_stale_one(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["screens", "--check"])
    assert ok.exit_code == 0, ok.output
    stale = tmp_path / "psss.bob"
    stale.write_text(committed().replace(pvs.SPECTRUM_FWHM.name, "SPECTRUM_WIDTH"))
    bad = runner.invoke(main, ["screens", "--check", "--output", str(stale)])
    assert bad.exit_code == 1
    assert "out of date" in bad.output
    written = runner.invoke(main, ["screens", "--output", str(stale)])
    assert written.exit_code == 0, written.output
    assert stale.read_text(encoding="utf-8") == committed()


def test_prefix_option_only_changes_the_macro_default(tmp_path: Path) -> None:
    out = tmp_path / "demo.bob"
    result = CliRunner().invoke(main, ["screens", "--output", str(out), "--prefix", "PSSS-DEMO"])
    assert result.exit_code == 0, result.output
    root = ET.parse(out).getroot()
    assert root.findtext("macros/P") == "PSSS-DEMO"
    assert all_pv_names(root) == all_pv_names(ET.fromstring(committed()))


def test_well_formed_phoebus_display() -> None:
    root = ET.fromstring(committed())
    assert root.tag == "display"
    assert root.attrib == {"version": "2.0.0"}
    assert root.findtext("macros/P") == screens.DEFAULT_PREFIX
    width, height = int(root.findtext("width") or 0), int(root.findtext("height") or 0)
    assert width >= 1000 and height >= 600
    widgets = list(root.iter("widget"))
    assert widgets
    for widget in widgets:
        kind = widget.get("type")
        assert kind in screens.WIDGET_VERSIONS, kind
        assert widget.get("version") == screens.WIDGET_VERSIONS[kind]
        for tag in ("name", "x", "y", "width", "height"):
            assert widget.findtext(tag), f"{kind} widget without {tag}"
    # top-level widgets lie inside the display
    for widget in root.findall("widget"):
        x, y = int(widget.findtext("x") or 0), int(widget.findtext("y") or 0)
        assert x + int(widget.findtext("width") or 0) <= width
        assert y + int(widget.findtext("height") or 0) <= height


def test_children_fit_inside_their_group() -> None:
    root = ET.fromstring(committed())
    for group in root.iter("widget"):
        if group.get("type") != "group":
            continue
        gw, gh = int(group.findtext("width") or 0), int(group.findtext("height") or 0)
        for child in group.findall("widget"):
            right = int(child.findtext("x") or 0) + int(child.findtext("width") or 0)
            bottom = int(child.findtext("y") or 0) + int(child.findtext("height") or 0)
            assert right <= gw - 8, (group.findtext("name"), child.findtext("name"))
            assert bottom <= gh - screens.GROUP_TOP, (group.findtext("name"),
                                                      child.findtext("name"))


def test_every_pv_uses_the_prefix_macro_and_a_table_entry() -> None:
    root = ET.fromstring(committed())
    names = all_pv_names(root)
    assert len(names) > 30
    for name in names:
        match = MACRO_PV.match(name)
        assert match, f"{name!r} does not use $(P):<NAME>"
        assert match.group(1) in pvs.BY_NAME, f"{name!r} is not in the PV table"
    assert {MACRO_PV.match(n).group(1) for n in names} == {  # type: ignore[union-attr]
        pv.name for pv in screens.screen_pvs()}


def test_screen_has_what_the_control_room_needs() -> None:
    root = ET.fromstring(committed())
    by_type: dict[str, set[str]] = {}
    for widget in root.iter("widget"):
        if (name := widget.findtext("pv_name")) is not None:
            by_type.setdefault(widget.get("type") or "", set()).add(name)
    p = screens.pv_name
    assert p(pvs.STATUS) in by_type["multi_state_led"]
    readouts = by_type["textupdate"]
    for pv in (pvs.STATUS, pvs.MESSAGE, pvs.BACKGROUND_STATUS, pvs.FIT_STATUS, pvs.RATE,
               pvs.N_PROCESSED, pvs.N_LOST, pvs.N_ERRORS, pvs.SPECTRUM_CENTER,
               pvs.SPECTRUM_FWHM):
        assert p(pv) in readouts, pv.name
    for pv in (pvs.INPUT_STREAM, pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX, pvs.BACKGROUND_FILE):
        assert p(pv) in by_type["textentry"], pv.name
    assert {p(pvs.START), p(pvs.STOP)} <= by_type["action_button"]
    for button in root.iter("widget"):
        if button.get("type") == "action_button":
            action = button.find("actions/action")
            assert action is not None and action.get("type") == "write_pv"
            assert action.findtext("value") == "1"
    # centre and FWHM: large, with units
    for widget in root.iter("widget"):
        if widget.findtext("pv_name") in (p(pvs.SPECTRUM_CENTER), p(pvs.SPECTRUM_FWHM)):
            font = widget.find("font/font")
            assert font is not None and float(font.get("size") or 0) >= 30
            assert widget.findtext("show_units") == "true"
    # one plot: spectrum, fit and average over the energy axis in force
    (plot,) = [w for w in root.iter("widget") if w.get("type") == "xyplot"]
    traces = plot.findall("traces/trace")
    assert [t.findtext("y_pv") for t in traces] == [
        p(pvs.SPECTRUM_Y), p(pvs.SPECTRUM_FIT), p(pvs.SPECTRUM_AVG_Y)]
    assert {t.findtext("x_pv") for t in traces} == {p(pvs.SPECTRUM_AXIS)}
    assert plot.findtext("x_axis/title") == f"Energy ({pvs.SPECTRUM_AXIS.egu})"


def test_status_led_has_a_colour_for_every_state() -> None:
    colours = screens.state_colors(pvs.STATUS)
    assert [label for _, label, _ in colours] == [label for label, _ in pvs.STATUS.options]
    by_label = {label: colour for _, label, colour in colours}
    assert by_label[pvs.STATE_LABELS[pvs.State.STOPPED]] == screens.GREY
    assert by_label[pvs.STATE_LABELS[pvs.State.PROCESSING]] == screens.GREEN
    assert by_label[pvs.STATE_LABELS[pvs.State.ERROR]] == screens.RED


# ------------------------------------------------------------------------------ live IOC
PREFIX = f"TST-PSSS-SCR{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IocProcess]:
    log = tmp_path_factory.mktemp("screens") / "ioc.log"
    proc = IocProcess(PREFIX, ["--output-port", "0", "--no-pva"], EPICS_ENV, log)
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.log()


def test_every_pv_on_the_screen_exists_on_a_live_ioc(ioc: IocProcess) -> None:
    root = ET.fromstring(committed())
    names = sorted({n.replace("$(P)", PREFIX) for n in all_pv_names(root)})
    # one caget for all of them: it connects to each, prints each value, fails on any missing
    # (8 s: a first search in an IOC's first seconds took over 3 s on the loaded test machine)
    out = subprocess.run([str(BIN / "caget"), "-w", "8", *names], capture_output=True,
                         text=True, timeout=40, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "not found" not in out.stdout + out.stderr
    printed = {line.split()[0] for line in out.stdout.splitlines()
               if line and not line.startswith("Warning")}
    assert printed == set(names)
