"""The Phoebus operator screen (``psss_ioc/opi/psss.bob``), generated from the PV table.

Which widget shows which PV, and where, is data in this module (`SCREEN`), keyed by the entries
of `pvs`; the writer below turns it into Display Builder XML (``<display version="2.0.0">``).
Every PV is written ``$(P):<NAME>``; the display defines ``P`` (default: the production prefix),
and an operator opens it for another IOC with the macro, e.g. ``phoebus -resource
'file:psss.bob?P=PSSS-DEMO'``.

Why a small writer of our own (xml.etree) and not a library:

- pvi (DLS) builds its own layout from its Device model (rows of label + widget in grids) and
  has no XY plot with overlaid traces nor absolute positions; it would also bring pydantic,
  lxml, ruamel.yaml, typer and jinja2 into the package.
- phoebusgen has every widget needed, but its output depends on files in the user's
  ``~/.phoebusgen`` (colours, fonts, widget versions), it reports misuse by printing and
  carrying on, and it formats through minidom. The committed screen must regenerate byte for
  byte on any machine (a test checks it), which wants none of that.
- The part of the format used here is small and stable: label, rectangle, group, textupdate,
  textentry, combo, multi_state_led, action_button and xyplot.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import click

from psss_ioc.generate.generated import write_or_check
from psss_ioc.ioc import pvs
from psss_ioc.ioc.config import DEFAULT_PREFIX
from psss_ioc.ioc.pvs import PV, Kind

SCREEN_PATH = Path(__file__).resolve().parents[1] / "opi" / "psss.bob"
MACRO = "P"
PREFIX = f"$({MACRO})"

# Widget versions as Phoebus 4.7 writes them.
WIDGET_VERSIONS = {
    "label": "2.0.0", "rectangle": "2.0.0", "group": "3.0.0", "textupdate": "2.0.0",
    "textentry": "3.0.0", "combo": "2.0.0", "multi_state_led": "2.0.0",
    "action_button": "3.0.0", "xyplot": "3.0.0",
}

# Phoebus FormatOption values
FORMAT_DECIMAL = 1
FORMAT_STRING = 6  # long strings are char waveforms: show them as text


@dataclass(frozen=True)
class Color:
    name: str
    red: int
    green: int
    blue: int


GREY = Color("Off", 150, 150, 150)
GREEN = Color("OK", 0, 190, 0)
ORANGE = Color("MINOR", 255, 128, 0)
RED = Color("MAJOR", 255, 0, 0)
MAGENTA = Color("INVALID", 255, 0, 255)
BLUE = Color("Blue", 0, 0, 255)
DARK_GREEN = Color("Dark Green", 0, 120, 0)
WHITE = Color("Background", 255, 255, 255)
HEADER = Color("Header_Background", 47, 79, 111)
HEADER_TEXT = Color("Header_ForeGround", 255, 255, 255)
START_BG = Color("Start", 180, 230, 180)
STOP_BG = Color("Stop", 240, 170, 170)

SEVERITY_COLORS = {pvs.NO_ALARM: GREEN, pvs.MINOR: ORANGE, pvs.MAJOR: RED,
                   pvs.INVALID: MAGENTA}
# States whose severity colour would mislead: "Stopped" has no alarm but is not "OK" green.
STATE_COLORS = {pvs.STATE_LABELS[pvs.State.STOPPED]: GREY}


@dataclass(frozen=True)
class Font:
    name: str
    style: str
    size: float


DEFAULT_FONT = Font("Default", "REGULAR", 14.0)
BOLD_FONT = Font("Default Bold", "BOLD", 14.0)
HEADER_FONT = Font("Header 1", "BOLD", 22.0)
BIG_FONT = Font("Big readout", "BOLD", 34.0)


class Show(Enum):
    """How one PV is shown."""

    READ = "textupdate"
    ENTRY = "textentry"
    CHOICE = "combo"  # items from the PV's enum strings
    STATE = "multi_state_led"  # LED with one colour per state, and the state's text
    BIG = "big"  # large readout with units, for the numbers operators watch
    BUTTON = "action_button"  # writes 1


@dataclass(frozen=True)
class Item:
    pv: PV
    show: Show
    width: int
    text: str = ""  # button text
    background: Color | None = None  # button colour


@dataclass(frozen=True)
class Row:
    label: str
    items: tuple[Item, ...]
    height: int = 28


@dataclass(frozen=True)
class Section:
    title: str
    x: int
    y: int
    width: int
    rows: tuple[Row, ...]
    label_width: int = 130

    @property
    def height(self) -> int:
        return GROUP_TOP + sum(r.height + ROW_GAP for r in self.rows) + GROUP_BOTTOM


@dataclass(frozen=True)
class Trace:
    pv: PV
    name: str
    color: Color
    line_width: int = 1
    line_style: int = 0  # 0 solid, 1 dashed


@dataclass(frozen=True)
class Plot:
    title: str
    x: int
    y: int
    width: int
    height: int
    x_pv: PV
    x_title: str
    y_title: str
    traces: tuple[Trace, ...]


@dataclass(frozen=True)
class Screen:
    title: str
    width: int
    sections: tuple[Section, ...]
    plot: Plot

    @property
    def height(self) -> int:
        bottoms = [s.y + s.height for s in self.sections] + [self.plot.y + self.plot.height]
        return max(bottoms) + MARGIN


MARGIN = 10
ROW_GAP = 6
ITEM_GAP = 8
GROUP_TOP = 22  # a titled group's children start below its title
GROUP_BOTTOM = 12
HEADER_HEIGHT = 50
LEFT, LEFT_WIDTH = MARGIN, 450
RIGHT = LEFT + LEFT_WIDTH + MARGIN
RIGHT_WIDTH = 860
TOP = HEADER_HEIGHT + MARGIN


def _stack(*sections: Section) -> tuple[Section, ...]:
    """Place sections of one column under each other (each keeps its x and width)."""
    placed: list[Section] = []
    y = sections[0].y
    for s in sections:
        placed.append(Section(s.title, s.x, y, s.width, s.rows, s.label_width))
        y += s.height + MARGIN
    return tuple(placed)


def _r(label: str, *items: Item, height: int = 28) -> Row:
    return Row(label, items, height)


_LEFT_COLUMN = _stack(
    Section("Control", LEFT, TOP, LEFT_WIDTH, (
        _r("State", Item(pvs.STATUS, Show.STATE, 280)),
        _r("Message", Item(pvs.MESSAGE, Show.READ, 290), height=48),
        _r("Processing", Item(pvs.START, Show.BUTTON, 140, "Start", START_BG),
           Item(pvs.STOP, Show.BUTTON, 140, "Stop", STOP_BG), height=34),
        _r("Input stream", Item(pvs.INPUT_STREAM, Show.ENTRY, 290)),
        _r("Input mode", Item(pvs.INPUT_MODE, Show.CHOICE, 120)),
    )),
    Section("Region of interest (rows; entry | in force)", LEFT, 0, LEFT_WIDTH, (
        _r("First row", Item(pvs.SPC_ROI_YMIN, Show.ENTRY, 140),
           Item(pvs.ROI_YMIN_RBV, Show.READ, 140)),
        _r("End row", Item(pvs.SPC_ROI_YMAX, Show.ENTRY, 140),
           Item(pvs.ROI_YMAX_RBV, Show.READ, 140)),
        _r("ROI status", Item(pvs.ROI_STATUS, Show.READ, 290)),
        _r("Image W x H", Item(pvs.IMAGE_WIDTH, Show.READ, 140),
           Item(pvs.IMAGE_HEIGHT, Show.READ, 140)),
    )),
    Section("Background", LEFT, 0, LEFT_WIDTH, (
        _r("File", Item(pvs.BACKGROUND_FILE, Show.ENTRY, 290)),
        _r("Status", Item(pvs.BACKGROUND_STATUS, Show.READ, 290)),
    )),
    Section("Processing settings", LEFT, 0, LEFT_WIDTH, (
        _r("Gaussian fit", Item(pvs.FIT_ENABLE, Show.CHOICE, 140)),
        _r("Fit min. SNR", Item(pvs.FIT_MIN_SNR, Show.ENTRY, 140)),
        _r("Average shots", Item(pvs.AVG_N, Show.ENTRY, 140)),
        _r("Energy axis", Item(pvs.AXIS_STATUS, Show.READ, 290)),
        _r("Autosave", Item(pvs.AUTOSAVE_STATUS, Show.READ, 290)),
    )),
)

_PLOT = Plot(
    "Spectrum", RIGHT, TOP, RIGHT_WIDTH, 420,
    # SPECTRUM_AXIS is the axis in force for SPECTRUM_Y: always as long as the spectrum, and
    # the column index while SPECTRUM_X (the axis an operator sets) is empty.
    x_pv=pvs.SPECTRUM_AXIS, x_title=f"Energy ({pvs.SPECTRUM_AXIS.egu})",
    y_title="Intensity (ROI rows summed)",
    traces=(
        Trace(pvs.SPECTRUM_Y, "Spectrum", BLUE),
        Trace(pvs.SPECTRUM_FIT, "Gaussian fit", RED, line_width=2),
        Trace(pvs.SPECTRUM_AVG_Y, "Average", DARK_GREEN, line_width=2, line_style=1),
    ),
)

_RESULTS_TOP = _PLOT.y + _PLOT.height + MARGIN
_RESULTS_WIDTH = 520

_RIGHT_COLUMN = (
    Section("Result", RIGHT, _RESULTS_TOP, _RESULTS_WIDTH, (
        _r("Centre", Item(pvs.SPECTRUM_CENTER, Show.BIG, 330), height=52),
        _r("FWHM", Item(pvs.SPECTRUM_FWHM, Show.BIG, 330), height=52),
        _r("Fit status", Item(pvs.FIT_STATUS, Show.READ, 180)),
        _r("Average centre", Item(pvs.SPECTRUM_AVG_CENTER, Show.READ, 180)),
        _r("Average FWHM", Item(pvs.SPECTRUM_AVG_FWHM, Show.READ, 180)),
        _r("Pulse ID", Item(pvs.PULSE_ID, Show.READ, 180)),
    ), label_width=140),
    Section("Statistics", RIGHT + _RESULTS_WIDTH + MARGIN, _RESULTS_TOP,
            RIGHT_WIDTH - _RESULTS_WIDTH - MARGIN, (
                _r("Rate", Item(pvs.RATE, Show.READ, 150)),
                _r("Processed", Item(pvs.N_PROCESSED, Show.READ, 150)),
                _r("Lost", Item(pvs.N_LOST, Show.READ, 150)),
                _r("Errors", Item(pvs.N_ERRORS, Show.READ, 150)),
                _r("Output dropped", Item(pvs.N_OUT_DROPPED, Show.READ, 150)),
                _r("Processing time", Item(pvs.PROC_TIME, Show.READ, 150)),
            ), label_width=140),
)

SCREEN = Screen("PSSS spectrometer", RIGHT + RIGHT_WIDTH + MARGIN,
                _LEFT_COLUMN + _RIGHT_COLUMN, _PLOT)


# ------------------------------------------------------------------------------ writer
def pv_name(pv: PV) -> str:
    return pvs.full_name(PREFIX, pv)


def _sub(parent: ET.Element, tag: str, text: object = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = str(text).lower() if isinstance(text, bool) else str(text)
    return element


def _color(parent: ET.Element, tag: str, color: Color) -> None:
    _sub(_sub(parent, tag), "color", name=color.name, red=str(color.red),
         green=str(color.green), blue=str(color.blue))


def _font(parent: ET.Element, font: Font, tag: str = "font") -> None:
    _sub(_sub(parent, tag), "font", name=font.name, family="Liberation Sans",
         style=font.style, size=f"{font.size:.1f}")


def _widget(parent: ET.Element, kind: str, name: str, x: int, y: int, width: int,
            height: int) -> ET.Element:
    widget = _sub(parent, "widget", type=kind, version=WIDGET_VERSIONS[kind])
    _sub(widget, "name", name)
    for tag, value in (("x", x), ("y", y), ("width", width), ("height", height)):
        _sub(widget, tag, value)
    return widget


def _label(parent: ET.Element, text: str, x: int, y: int, width: int, height: int,
           font: Font = DEFAULT_FONT) -> None:
    label = _widget(parent, "label", f"Label {text}", x, y, width, height)
    _sub(label, "text", text)
    _font(label, font)
    _sub(label, "vertical_alignment", 1)


def _pv_widget(parent: ET.Element, kind: str, pv: PV, x: int, y: int, width: int,
               height: int, suffix: str = "") -> ET.Element:
    widget = _widget(parent, kind, pv.name + suffix, x, y, width, height)
    _sub(widget, "pv_name", pv_name(pv))
    _sub(widget, "tooltip", f"{pv.desc}\n$(pv_name)")
    return widget


def _text_format(widget: ET.Element, pv: PV) -> None:
    """Long strings as text, integers without decimals, EGU shown where there is one."""
    if pv.kind in (Kind.LONG_STRING_IN, Kind.LONG_STRING_OUT):
        _sub(widget, "format", FORMAT_STRING)
    elif pv.kind in (Kind.LONG_IN, Kind.LONG_OUT, Kind.INT64_IN):
        _sub(widget, "format", FORMAT_DECIMAL)
        _sub(widget, "precision", 0)
    _sub(widget, "show_units", bool(pv.egu))


def _read(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    widget = _pv_widget(parent, "textupdate", item.pv, x, y, item.width, height)
    _text_format(widget, item.pv)
    _sub(widget, "vertical_alignment", 1)
    if item.pv.kind == Kind.LONG_STRING_IN:
        _sub(widget, "wrap_words", True)


def _big(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    widget = _pv_widget(parent, "textupdate", item.pv, x, y, item.width, height)
    _font(widget, BIG_FONT)
    _text_format(widget, item.pv)
    _sub(widget, "horizontal_alignment", 2)
    _sub(widget, "vertical_alignment", 1)


def _entry(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    widget = _pv_widget(parent, "textentry", item.pv, x, y, item.width, height)
    _text_format(widget, item.pv)


def _choice(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    widget = _pv_widget(parent, "combo", item.pv, x, y, item.width, height)
    _sub(widget, "items_from_pv", True)


def _button(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    widget = _pv_widget(parent, "action_button", item.pv, x, y, item.width, height)
    _sub(widget, "text", item.text)
    _font(widget, BOLD_FONT)
    if item.background is not None:
        _color(widget, "background_color", item.background)
    action = _sub(_sub(widget, "actions"), "action", type="write_pv")
    _sub(action, "pv_name", pv_name(item.pv))
    _sub(action, "value", 1)
    _sub(action, "description", item.text)


def state_colors(pv: PV) -> list[tuple[int, str, Color]]:
    """(value, label, colour) of each state of an mbb record, colour from its severity."""
    return [(value, label, STATE_COLORS.get(label, SEVERITY_COLORS[severity]))
            for value, (label, severity) in enumerate(pv.options)]


def _state(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    led = _pv_widget(parent, "multi_state_led", item.pv, x, y, height, height, " LED")
    states = _sub(led, "states")
    for value, label, color in state_colors(item.pv):
        state = _sub(states, "state")
        _sub(state, "value", value)
        _sub(state, "label", label)
        _color(state, "color", color)
    _sub(led, "square", False)
    text = _pv_widget(parent, "textupdate", item.pv, x + height + ITEM_GAP, y,
                      item.width - height - ITEM_GAP, height)
    _font(text, BOLD_FONT)
    _sub(text, "vertical_alignment", 1)


_DRAW = {Show.READ: _read, Show.BIG: _big, Show.ENTRY: _entry, Show.CHOICE: _choice,
         Show.BUTTON: _button, Show.STATE: _state}


def _section(parent: ET.Element, section: Section) -> None:
    group = _widget(parent, "group", section.title, section.x, section.y, section.width,
                    section.height)
    _font(group, BOLD_FONT)
    y = 0
    for row in section.rows:
        _label(group, row.label, 0, y, section.label_width, row.height)
        x = section.label_width + ITEM_GAP
        for item in row.items:
            _DRAW[item.show](group, item, x, y, row.height)
            x += item.width + ITEM_GAP
        y += row.height + ROW_GAP


def _axis_fonts(axis: ET.Element) -> None:
    _font(axis, BOLD_FONT, "title_font")
    _font(axis, DEFAULT_FONT, "scale_font")


def _plot(parent: ET.Element, plot: Plot) -> None:
    widget = _widget(parent, "xyplot", plot.title, plot.x, plot.y, plot.width, plot.height)
    _sub(widget, "title", plot.title)
    _font(widget, BOLD_FONT, "title_font")
    _sub(widget, "show_toolbar", True)
    _sub(widget, "show_legend", True)
    x_axis = _sub(widget, "x_axis")
    _sub(x_axis, "title", plot.x_title)
    _sub(x_axis, "autoscale", True)
    _sub(x_axis, "show_grid", True)
    _axis_fonts(x_axis)
    y_axis = _sub(_sub(widget, "y_axes"), "y_axis")
    _sub(y_axis, "title", plot.y_title)
    _sub(y_axis, "autoscale", True)
    _sub(y_axis, "show_grid", True)
    _axis_fonts(y_axis)
    traces = _sub(widget, "traces")
    for t in plot.traces:
        trace = _sub(traces, "trace")
        _sub(trace, "name", t.name)
        _sub(trace, "x_pv", pv_name(plot.x_pv))
        _sub(trace, "y_pv", pv_name(t.pv))
        _sub(trace, "err_pv", "")
        _sub(trace, "axis", 0)
        _sub(trace, "trace_type", 1)  # line
        _color(trace, "color", t.color)
        _sub(trace, "line_width", t.line_width)
        _sub(trace, "line_style", t.line_style)
        _sub(trace, "point_type", 0)
        _sub(trace, "point_size", 4)
        _sub(trace, "visible", True)


def build(screen: Screen = SCREEN, prefix: str = DEFAULT_PREFIX) -> ET.Element:
    """The display as an XML tree; `prefix` is the default of the P macro."""
    display = ET.Element("display", version="2.0.0")
    _sub(display, "name", screen.title)
    _sub(_sub(display, "macros"), MACRO, prefix)
    _sub(display, "width", screen.width)
    _sub(display, "height", screen.height)
    _color(display, "background_color", WHITE)
    header = _widget(display, "rectangle", "Header", 0, 0, screen.width, HEADER_HEIGHT)
    _sub(header, "line_width", 0)
    _color(header, "background_color", HEADER)
    title = _widget(display, "label", "Title", MARGIN, 0, screen.width - 2 * MARGIN,
                    HEADER_HEIGHT)
    _sub(title, "text", f"{screen.title}   {PREFIX}")
    _font(title, HEADER_FONT)
    _color(title, "foreground_color", HEADER_TEXT)
    _sub(title, "vertical_alignment", 1)
    for section in screen.sections:
        _section(display, section)
    _plot(display, screen.plot)
    return display


def render(screen: Screen = SCREEN, prefix: str = DEFAULT_PREFIX) -> str:
    """The .bob file's text: indented XML, UTF-8 declaration, one trailing newline."""
    root = build(screen, prefix)
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def screen_pvs(screen: Screen = SCREEN) -> list[PV]:
    """Every PV the screen shows, in screen order, once each."""
    found: dict[str, PV] = {}
    for section in screen.sections:
        for row in section.rows:
            for item in row.items:
                found.setdefault(item.pv.name, item.pv)
    for pv in (screen.plot.x_pv, *(t.pv for t in screen.plot.traces)):
        found.setdefault(pv.name, pv)
    return list(found.values())


@click.command("screens")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"File to write [default: the packaged {SCREEN_PATH.name}].")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 if the file differs from what the PV table gives.")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="Default value of the P macro (the record prefix) in the display.")
def screens_command(output: Path | None, check: bool, prefix: str) -> None:
    """Generate the Phoebus operator screen (.bob) from the PV table."""
    write_or_check(output or SCREEN_PATH, render(prefix=prefix), "screens", check,
                   output is not None)
