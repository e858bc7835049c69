"""The Phoebus operator screen: up to date with the PV table, well-formed, made of widgets and
properties Phoebus's display model defines, laid out without overlaps, showing what an
operator needs, and every PV it names served by a live IOC."""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import softioc
from click.testing import CliRunner
from iochelpers import BIN, EPICS_ENV, IocProcess

from psss_ioc.cli.main import main
from psss_ioc.generate import screens
from psss_ioc.ioc import pvs

# $(P):<NAME> or $(P):<NAME>.<FIELD>; iocStats names have a colon (IOC:IOC_CPU_LOAD)
MACRO_PV = re.compile(r"^\$\(P\):([A-Z0-9_:]+?)(?:\.([A-Z]+))?$")
# PV-name elements of widgets (pv_name also in actions, markers, rules), traces and ROIs
PV_TAGS = ("pv_name", "x_pv", "y_pv", "width_pv", "height_pv")
SCREEN_RECORDS = pvs.BY_NAME | {pv.name: pv for pv in screens.IOC_STATS_PVS}

# ---------------------------------------------------------------- Phoebus's display model
# Property (XML element) names each widget type defines, from the Display Builder model of
# Phoebus (github.com/ControlSystemStudio/phoebus, app/display/model/src/main/java/org/
# csstudio/display/builder/model/), read with the search tool: each widget's
# defineProperties() and the descriptors it uses (properties/CommonWidgetProperties.java,
# widgets/plots/PlotWidgetProperties.java). Only names this screen may write are listed.
_MODEL = "app/display/model/src/main/java/org/csstudio/display/builder/model/"
WIDGET = {"name", "class", "x", "y", "width", "height", "actions", "rules", "scripts"}  # Widget
VISIBLE = WIDGET | {"visible", "tooltip"}  # widgets/VisibleWidget.java
PV_WIDGET = VISIBLE | {"pv_name", "border_alarm_sensitive"}  # widgets/PVWidget.java
PROPERTIES: dict[str, tuple[str, set[str]]] = {
    "label": ("widgets/LabelWidget.java", VISIBLE | {
        "text", "font", "foreground_color", "background_color", "transparent",
        "horizontal_alignment", "vertical_alignment", "rotation_step", "auto_size",
        "wrap_words"}),
    "rectangle": ("widgets/RectangleWidget.java", VISIBLE | {
        "line_width", "line_color", "line_style", "background_color", "transparent",
        "corner_width", "corner_height"}),
    "group": ("widgets/GroupWidget.java", VISIBLE | {
        "style", "font", "foreground_color", "background_color", "transparent",
        "widget"}),  # children: <widget> elements
    "textupdate": ("widgets/TextUpdateWidget.java", PV_WIDGET | {
        "font", "foreground_color", "background_color", "transparent", "format", "precision",
        "show_units", "horizontal_alignment", "vertical_alignment", "wrap_words",
        "rotation_step", "interactive"}),
    "textentry": ("widgets/TextEntryWidget.java", PV_WIDGET | {
        "font", "foreground_color", "background_color", "format", "precision", "show_units",
        "enabled", "wrap_words", "multi_line"}),
    "combo": ("widgets/ComboWidget.java", PV_WIDGET | {
        "font", "foreground_color", "background_color", "items", "items_from_pv", "editable",
        "enabled", "confirm_dialog", "confirm_message", "password"}),
    "multi_state_led": ("widgets/MultiStateLEDWidget.java, BaseLEDWidget.java", PV_WIDGET | {
        "states", "fallback_label", "fallback_color", "font", "foreground_color",
        "line_color", "square"}),
    "action_button": ("widgets/ActionButtonWidget.java (extends PVWidget)", PV_WIDGET | {
        "text", "font", "foreground_color", "background_color", "transparent",
        "rotation_step", "enabled", "confirm_dialog", "confirm_message", "password"}),
    # the properties both the older (PVWidget-based) and the current (ScaledPVWidget-based)
    # ProgressBarWidget define
    "progressbar": ("widgets/ProgressBarWidget.java", PV_WIDGET | {
        "fill_color", "limits_from_pv", "minimum", "maximum", "horizontal"}),
    "xyplot": ("widgets/plots/XYPlotWidget.java (extends VisibleWidget)", VISIBLE | {
        "foreground_color", "background_color", "title", "title_font", "show_toolbar",
        "show_legend", "x_axis", "y_axes", "traces", "marker"}),
    "image": ("widgets/plots/ImageWidget.java (extends PVWidget)", PV_WIDGET | {
        "background_color", "foreground_color", "show_toolbar", "color_map", "color_bar",
        "x_axis", "y_axis", "data_width", "data_height", "interpolation", "color_mode",
        "unsigned", "autoscale", "log_scale", "minimum", "maximum", "cursor_info_pv", "x_pv",
        "y_pv", "cursor_crosshair", "rois"}),
}
# Elements of structured properties: (path from the widget, source, allowed names)
PLOT_AXIS = {"title", "autoscale", "log_scale", "minimum", "maximum", "show_grid", "title_font",
             "scale_font", "visible"}  # PlotWidgetProperties.AxisWidgetProperty
IMAGE_AXIS = {"visible", "title", "minimum", "maximum", "title_font",
              "scale_font"}  # ImageWidget.AxisWidgetProperty
STRUCTURES: dict[str, dict[str, tuple[str, set[str]]]] = {
    "xyplot": {
        "x_axis": ("PlotWidgetProperties.AxisWidgetProperty", PLOT_AXIS),
        "y_axes/y_axis": ("PlotWidgetProperties.AxisWidgetProperty", PLOT_AXIS),
        "traces/trace": ("PlotWidgetProperties.TraceWidgetProperty", {
            "name", "x_pv", "y_pv", "err_pv", "axis", "trace_type", "color", "line_width",
            "line_style", "point_type", "point_size", "visible"}),
        # array "marker" of structures "marker" (ArrayWidgetProperty writes each element
        # under the element's own name)
        "marker/marker": ("XYPlotWidget.MarkerProperty", {
            "color", "pv_name", "interactive", "visible"}),
    },
    "image": {
        "x_axis": ("ImageWidget.AxisWidgetProperty", IMAGE_AXIS),
        "y_axis": ("ImageWidget.AxisWidgetProperty", IMAGE_AXIS),
        "rois/roi": ("ImageWidget.ROIWidgetProperty", {
            "name", "color", "visible", "interactive", "x_pv", "y_pv", "width_pv",
            "height_pv", "file"}),
    },
    "multi_state_led": {
        "states/state": ("MultiStateLEDWidget.StateWidgetProperty", {"value", "label",
                                                                     "color"}),
    },
    "action_button": {
        "actions/action": ("write_pv action (pv_name, value, description)", {
            "pv_name", "value", "description"}),
    },
}
DISPLAY = {"name", "macros", "width", "height", "background_color", "widget"}


def committed() -> str:
    return screens.SCREEN_PATH.read_text(encoding="utf-8")


def all_pv_names(root: ET.Element) -> list[str]:
    """Every PV name in the display: widgets, their actions, rules, plot traces and markers,
    image ROIs."""
    return [e.text or "" for tag in PV_TAGS for e in root.iter(tag)]


def ioc_pv_names(root: ET.Element) -> list[str]:
    """The PV names an IOC serves (all but Phoebus's own formula PVs)."""
    return [n for n in all_pv_names(root) if n != screens.ROI_X_PV]


def widgets_named(root: ET.Element) -> dict[str, ET.Element]:
    return {w.findtext("name") or "": w for w in root.iter("widget")}


def box(widget: ET.Element) -> tuple[int, int, int, int]:
    return tuple(int(widget.findtext(t) or 0)  # type: ignore[return-value]
                 for t in ("x", "y", "width", "height"))


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
    assert 1000 <= width <= 1920 and 600 <= height <= 1080  # one full-HD monitor
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
        x, y, w, h = box(widget)
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, widget.findtext("name")


def test_widget_types_and_properties_are_the_ones_phoebus_defines() -> None:
    root = ET.fromstring(committed())
    assert {child.tag for child in root} <= DISPLAY
    assert set(screens.WIDGET_VERSIONS) == set(PROPERTIES)
    for widget in root.iter("widget"):
        kind = widget.get("type") or ""
        source, allowed = PROPERTIES[kind]
        unknown = {child.tag for child in widget} - allowed
        assert not unknown, f"{kind} ({_MODEL}{source}) has no property {unknown}"
        for path, (structure, elements) in STRUCTURES.get(kind, {}).items():
            for element in widget.findall(path):
                unknown = {child.tag for child in element} - elements
                assert not unknown, f"{kind} {path} ({structure}) has no {unknown}"


def test_rules_use_the_rule_format_and_set_properties_of_their_widget() -> None:
    """RulesWidgetProperty's XML: <rule name prop_id out_exp><exp bool_exp><expression>
    ...<pv_name>; prop_id a property of the widget, or an element of one ("x_axis.title")."""
    root = ET.fromstring(committed())
    rules = 0
    for widget in root.iter("widget"):
        kind = widget.get("type") or ""
        for rule in widget.findall("rules/rule"):
            rules += 1
            assert set(rule.attrib) == {"name", "prop_id", "out_exp"}
            assert rule.get("out_exp") == "true"
            top, _, element = (rule.get("prop_id") or "").partition(".")
            assert top in PROPERTIES[kind][1], (kind, top)
            if element:
                (_, allowed), = [v for k, v in STRUCTURES[kind].items() if k == top]
                assert element in allowed, (kind, rule.get("prop_id"))
            exps = rule.findall("exp")
            assert exps and all(e.get("bool_exp") and e.findtext("expression") for e in exps)
            assert {c.tag for c in rule} == {"exp", "pv_name"}
            assert len(rule.findall("pv_name")) == 1
    assert rules == 5  # image: 4 size rules; spectrum: the x-axis title


def test_children_fit_inside_their_group() -> None:
    root = ET.fromstring(committed())
    for group in root.iter("widget"):
        if group.get("type") != "group":
            continue
        _, _, gw, gh = box(group)
        for child in group.findall("widget"):
            x, y, w, h = box(child)
            assert x >= 0 and y >= 0, (group.findtext("name"), child.findtext("name"))
            assert x + w <= gw - 8, (group.findtext("name"), child.findtext("name"))
            assert y + h <= gh - screens.GROUP_TOP, (group.findtext("name"),
                                                    child.findtext("name"))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_no_two_widgets_overlap() -> None:
    """Siblings (top-level widgets, children of one group) do not cover each other; the
    header's title label lies on its background rectangle on purpose."""
    root = ET.fromstring(committed())
    parents = [root] + [w for w in root.iter("widget") if w.get("type") == "group"]
    for parent in parents:
        children = [w for w in parent.findall("widget")
                    if w.findtext("name") not in ("Header", "Title")]
        for i, a in enumerate(children):
            for b in children[i + 1:]:
                assert not _overlap(box(a), box(b)), (a.findtext("name"), b.findtext("name"))


def test_every_pv_uses_the_prefix_macro_and_a_record_of_the_ioc() -> None:
    root = ET.fromstring(committed())
    names = ioc_pv_names(root)
    assert len(names) > 60
    assert all_pv_names(root).count(screens.ROI_X_PV) == 1  # the ROI's x: column 0
    for name in names:
        match = MACRO_PV.match(name)
        assert match, f"{name!r} does not use $(P):<NAME>"
        assert match.group(1) in SCREEN_RECORDS, f"{name!r} is not a record of the IOC"
        assert match.group(2) in (None, "EGU"), name
    assert {MACRO_PV.match(n).group(1) for n in names} == {  # type: ignore[union-attr]
        pv.name for pv in screens.screen_pvs()}


def test_iocstats_records_on_the_screen_are_ones_softioc_loads() -> None:
    """softioc.devIocStats loads iocAdmin's ioc.template with IOCNAME=<prefix>:IOC."""
    template = Path(softioc.__file__).parent / "iocStats" / "iocAdmin" / "Db" / "ioc.template"
    records = set(re.findall(r'record\(\s*\w+\s*,\s*"\$\(IOCNAME\):(\w+)"', template.read_text()))
    assert {"IOC_CPU_LOAD", "SYS_CPU_LOAD", "MEM_USED", "MEM_FREE"} <= records
    for pv in screens.IOC_STATS_PVS:
        prefix, _, record = pv.name.partition(":")
        assert prefix == pvs.IOC_STATS and record in records, pv.name


def _by_type(root: ET.Element) -> dict[str, set[str]]:
    by_type: dict[str, set[str]] = {}
    for widget in root.iter("widget"):
        if (name := widget.findtext("pv_name")) is not None:
            by_type.setdefault(widget.get("type") or "", set()).add(name)
    return by_type


def _group_of(root: ET.Element, pv_name: str, kind: str) -> str:
    (group,) = [g.findtext("name") for g in root.iter("widget") if g.get("type") == "group"
                for w in g.findall("widget")
                if w.get("type") == kind and w.findtext("pv_name") == pv_name]
    return group or ""


def test_screen_has_what_the_control_room_needs() -> None:
    root = ET.fromstring(committed())
    by_type = _by_type(root)
    p = screens.pv_name
    assert p(pvs.STATUS) in by_type["multi_state_led"]
    assert p(pvs.ROI_STATUS) in by_type["multi_state_led"]  # ROI alarm in view
    readouts = by_type["textupdate"]
    for pv in (pvs.STATUS, pvs.MESSAGE, pvs.BACKGROUND_STATUS, pvs.FIT_STATUS, pvs.RATE,
               pvs.N_PROCESSED, pvs.N_LOST, pvs.N_ERRORS, pvs.PROC_TIME, pvs.SPECTRUM_CENTER,
               pvs.SPECTRUM_FWHM, pvs.FIT_CHI2, pvs.SPECTRUM_COM, pvs.SPECTRUM_STD,
               pvs.N_SATURATED, pvs.BACKGROUND_PROGRESS, pvs.AXIS_STATUS, *screens.IOC_STATS_PVS):
        assert p(pv) in readouts, pv.name
    for pv in (pvs.INPUT_STREAM, pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX, pvs.BACKGROUND_FILE,
               pvs.BACKGROUND_N, pvs.SATURATION_LEVEL, pvs.IMAGE_BIN, pvs.IMAGE_RATE,
               pvs.AXIS_C0, pvs.AXIS_C1, pvs.AXIS_C2, pvs.AVG_N, pvs.FIT_MIN_SNR):
        assert p(pv) in by_type["textentry"], pv.name
    assert p(pvs.AXIS_MODE) in by_type["combo"]
    assert {p(pvs.START), p(pvs.STOP), p(pvs.ROI_SUGGEST),
            p(pvs.BACKGROUND_ACQUIRE)} <= by_type["action_button"]
    assert by_type["progressbar"] == {p(pvs.BACKGROUND_PROGRESS)}
    for button in root.iter("widget"):
        if button.get("type") == "action_button":
            action = button.find("actions/action")
            assert action is not None and action.get("type") == "write_pv"
            assert action.findtext("pv_name") == button.findtext("pv_name")
            assert action.findtext("value") == "1"
    # ROI suggestion next to the ROI entries; acquisition with its frame count and progress
    roi_group = _group_of(root, p(pvs.SPC_ROI_YMIN), "textentry")
    assert _group_of(root, p(pvs.ROI_SUGGEST), "action_button") == roi_group
    assert _group_of(root, p(pvs.ROI_STATUS), "multi_state_led") == roi_group
    background = _group_of(root, p(pvs.BACKGROUND_ACQUIRE), "action_button")
    assert _group_of(root, p(pvs.BACKGROUND_N), "textentry") == background
    assert _group_of(root, p(pvs.BACKGROUND_PROGRESS), "progressbar") == background
    axis = _group_of(root, p(pvs.AXIS_MODE), "combo")
    assert {_group_of(root, p(pv), "textentry") for pv in
            (pvs.AXIS_C0, pvs.AXIS_C1, pvs.AXIS_C2)} == {axis}
    # centre and FWHM: large, with units
    for widget in root.iter("widget"):
        if widget.findtext("pv_name") in (p(pvs.SPECTRUM_CENTER), p(pvs.SPECTRUM_FWHM)):
            font = widget.find("font/font")
            assert font is not None and float(font.get("size") or 0) >= 30
            assert widget.findtext("show_units") == "true"


def test_alarmed_readouts_have_an_alarm_border_and_progress_a_bar() -> None:
    root = ET.fromstring(committed())
    alarmed = {screens.pv_name(pv) for pv in pvs.TABLE if pv.alarms}
    shown = [w for w in root.iter("widget")
             if w.get("type") == "textupdate" and w.findtext("pv_name") in alarmed]
    assert {w.findtext("pv_name") for w in shown} >= {
        screens.pv_name(pv) for pv in (pvs.N_SATURATED, pvs.RATE, pvs.N_LOST, pvs.N_ERRORS)}
    assert all(w.findtext("border_alarm_sensitive") == "true" for w in shown)
    # the acquisition's progress: a bar over 0..100 %
    (bar,) = [w for w in root.iter("widget") if w.get("type") == "progressbar"]
    assert float(bar.findtext("minimum") or -1) == pvs.BACKGROUND_PROGRESS.low == 0
    assert float(bar.findtext("maximum") or -1) == pvs.BACKGROUND_PROGRESS.high == 100
    assert bar.findtext("limits_from_pv") == "false"


def test_spectrum_plot_shows_fit_and_average_with_the_axis_title_of_its_unit() -> None:
    root = ET.fromstring(committed())
    p = screens.pv_name
    plot = widgets_named(root)["Spectrum"]
    traces = plot.findall("traces/trace")
    assert [t.findtext("y_pv") for t in traces] == [
        p(pvs.SPECTRUM_Y), p(pvs.SPECTRUM_FIT), p(pvs.SPECTRUM_AVG_Y)]
    assert {t.findtext("x_pv") for t in traces} == {p(pvs.SPECTRUM_AXIS)}
    assert plot.findtext("x_axis/title") == f"Energy ({pvs.SPECTRUM_AXIS.egu})"
    (rule,) = plot.findall("rules/rule")
    assert rule.get("prop_id") == "x_axis.title"
    assert rule.findtext("pv_name") == p(pvs.SPECTRUM_AXIS, "EGU")
    cases = [(e.get("bool_exp"), e.findtext("expression")) for e in rule.findall("exp")]
    assert cases == [('pvStr0 == "px"', '"Column index (px)"'),
                     ('pvStr0 != ""', '"Energy (" + pvStr0 + ")"')]


def test_profile_plot_marks_the_rows_of_the_roi_in_force() -> None:
    root = ET.fromstring(committed())
    p = screens.pv_name
    (plot,) = [w for w in root.iter("widget")
               if w.get("type") == "xyplot" and w.findtext("name") != "Spectrum"]
    (trace,) = plot.findall("traces/trace")
    assert (trace.findtext("x_pv"), trace.findtext("y_pv")) == (p(pvs.PROFILE_X),
                                                                p(pvs.PROFILE_Y))
    markers = plot.findall("marker/marker")
    assert [m.findtext("pv_name") for m in markers] == [p(pvs.ROI_YMIN_RBV),
                                                        p(pvs.ROI_YMAX_RBV)]
    assert all(m.findtext("interactive") == "false" for m in markers)


def test_image_takes_its_size_from_the_binned_size_records_and_draws_the_roi() -> None:
    root = ET.fromstring(committed())
    p = screens.pv_name
    (image,) = [w for w in root.iter("widget") if w.get("type") == "image"]
    assert image.findtext("pv_name") == p(pvs.IMAGE)
    # until the size records are read: the camera's frame binned 8 x 8 (IMAGE_BIN's default)
    assert pvs.IMAGE_BIN.initial == 8
    width, height = 2560 // 8, 2016 // 8
    assert (image.findtext("data_width"), image.findtext("data_height")) == (str(width),
                                                                             str(height))
    # axes in binned pixels, row 0 at the top: the ROI's coordinates
    assert [image.findtext(f"x_axis/{t}") for t in ("minimum", "maximum")] == ["0", str(width)]
    assert [image.findtext(f"y_axis/{t}") for t in ("minimum", "maximum")] == [str(height), "0"]
    rules = {r.get("prop_id"): r for r in image.findall("rules/rule")}
    size_of = {"data_width": pvs.IMAGE_WIDTH_BINNED, "data_height": pvs.IMAGE_HEIGHT_BINNED,
               "x_axis.maximum": pvs.IMAGE_WIDTH_BINNED,
               "y_axis.minimum": pvs.IMAGE_HEIGHT_BINNED}
    assert set(rules) == set(size_of)
    for prop_id, pv in size_of.items():
        assert rules[prop_id].findtext("pv_name") == p(pv)
        (exp,) = rules[prop_id].findall("exp")
        assert (exp.get("bool_exp"), exp.findtext("expression")) == ("pvInt0 > 0", "pvInt0")
    (roi,) = image.findall("rois/roi")
    assert [roi.findtext(t) for t in ("x_pv", "y_pv", "width_pv", "height_pv")] == [
        screens.ROI_X_PV, p(pvs.IMAGE_ROI_Y), p(pvs.IMAGE_WIDTH_BINNED),
        p(pvs.IMAGE_ROI_HEIGHT)]
    assert roi.findtext("interactive") == "false"  # drawn from read-only records


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
    names = sorted({n.replace("$(P)", PREFIX) for n in ioc_pv_names(root)})
    # one caget for all of them: it connects to each, prints each value, fails on any missing
    # (8 s: a first search in an IOC's first seconds took over 3 s on the loaded test machine)
    out = subprocess.run([str(BIN / "caget"), "-w", "8", *names], capture_output=True,
                         text=True, timeout=40, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "not found" not in out.stdout + out.stderr
    printed = {line.split()[0] for line in out.stdout.splitlines()
               if line and not line.startswith("Warning")}
    assert printed == set(names)
