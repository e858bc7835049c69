"""The Phoebus operator screen (``psss_ioc/opi/psss.bob``), generated from the PV table.

Which widget shows which PV, and where, is data in this module (`SCREEN`), keyed by the entries
of `pvs`; the writer below turns it into Display Builder XML (``<display version="2.0.0">``).
Every PV is written ``$(P):<NAME>``; the display defines ``P`` (default: the production prefix),
and an operator opens it for another IOC with the macro, e.g. ``phoebus -resource
'file:psss.bob?P=PSSS-DEMO'``.

What the operator sees: the camera image (binned, background removed) with the ROI drawn on
it, the row profile with the ROI rows marked, the spectrum with its fit and running average,
the results and fit quality, health (rates, counters, the IOC's CPU and memory), and every
setting: ROI (with "suggest from the profile"), background (file, or acquired from the camera
with progress), energy axis (external or polynomial), fit, averaging, saturation, image view.

Why a small writer of our own (xml.etree) and not a library:

- pvi (DLS) builds its own layout from its Device model (rows of label + widget in grids) and
  has no XY plot with overlaid traces nor absolute positions; it would also bring pydantic,
  lxml, ruamel.yaml, typer and jinja2 into the package.
- phoebusgen has every widget needed, but its output depends on files in the user's
  ``~/.phoebusgen`` (colours, fonts, widget versions), it reports misuse by printing and
  carrying on, and it formats through minidom. The committed screen must regenerate byte for
  byte on any machine (a test checks it), which wants none of that.
- The part of the format used here is small and stable: label, rectangle, group, textupdate,
  textentry, combo, multi_state_led, action_button, progressbar, xyplot and image, plus rules.
  Every widget type and property name written here was checked against Phoebus's display
  model (``app/display/model``); tests/test_screens.py holds that list with its sources.

Sizes the Image widget cannot take from a Channel Access waveform (it has no shape) come from
the IOC's size records through rules: ``data_width``/``data_height`` and the axis ranges follow
IMAGE_WIDTH_BINNED/IMAGE_HEIGHT_BINNED, so the image's axes count binned pixels from the top
left corner, the unit of IMAGE_ROI_Y/IMAGE_ROI_HEIGHT that place the ROI on it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
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

# Widget versions as Phoebus 4.7 writes them (image and progressbar: the base version 2.0.0,
# Widget.BASE_WIDGET_VERSION; neither overrides getVersion()).
WIDGET_VERSIONS = {
    "label": "2.0.0", "rectangle": "2.0.0", "group": "3.0.0", "textupdate": "2.0.0",
    "textentry": "3.0.0", "combo": "2.0.0", "multi_state_led": "2.0.0",
    "action_button": "3.0.0", "xyplot": "3.0.0", "progressbar": "2.0.0", "image": "2.0.0",
}

# Phoebus FormatOption values (org.phoebus.ui.vtype.FormatOption, by ordinal)
FORMAT_DECIMAL = 1
FORMAT_ENGINEERING = 3  # exponent a multiple of 3: memory in bytes
FORMAT_STRING = 6  # long strings are char waveforms: show them as text

# The ROI's left edge on the image: column 0, always. The Image widget takes every ROI
# coordinate from a PV; a Phoebus formula PV ("eq" type) with a constant gives the 0.
ROI_X_PV = "eq://0"


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
ACTION_BG = Color("Action", 190, 210, 240)
PROGRESS = Color("Progress", 60, 160, 255)
ROI_COLOR = Color("ROI", 255, 40, 40)  # on the image (viridis) and the profile

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


# ------------------------------------------------------------------------------ iocStats
def _ioc_stat(name: str, desc: str, egu: str, prec: int, high: float) -> PV:
    """A devIocStats record under ``<prefix>:IOC:`` (softioc loads iocAdmin's ioc.template
    there; the PV table does not list them). Described here the way the table describes its
    own records, so the writer treats them alike."""
    return PV(f"{pvs.IOC_STATS}:{name}", Kind.AI, desc, egu=egu, prec=prec, low=0, high=high)


IOC_CPU_LOAD = _ioc_stat("IOC_CPU_LOAD", "CPU load of the IOC process", "%", 1, 100)
SYS_CPU_LOAD = _ioc_stat("SYS_CPU_LOAD", "CPU load of the host", "%", 1, 100)
MEM_USED = _ioc_stat("MEM_USED", "Resident memory of the IOC", "byte", 0, 1e12)
MEM_FREE = _ioc_stat("MEM_FREE", "Free memory of the host (+ cache)", "byte", 0, 1e12)
IOC_STATS_PVS = (IOC_CPU_LOAD, SYS_CPU_LOAD, MEM_USED, MEM_FREE)


# ------------------------------------------------------------------------------ model
class Show(Enum):
    """How one PV is shown."""

    READ = "textupdate"
    ENTRY = "textentry"
    CHOICE = "combo"  # items from the PV's enum strings
    STATE = "multi_state_led"  # LED with one colour per state, and the state's text
    BIG = "big"  # large readout with units, for the numbers operators watch
    BUTTON = "action_button"  # writes 1
    PROGRESS = "progressbar"  # bar over the PV's display range (LOPR..HOPR)


@dataclass(frozen=True)
class Item:
    pv: PV
    show: Show
    width: int
    text: str = ""  # button text
    background: Color | None = None  # button colour
    format: int | None = None  # FormatOption, instead of the one the PV's kind gives
    precision: int | None = None
    units: bool | None = None  # show the EGU; default: if the PV has one


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
class Marker:
    """A vertical line on an XY plot at the value of `pv` (on the x axis); not draggable."""

    pv: PV
    color: Color


@dataclass(frozen=True)
class Rule:
    """A Phoebus rule: on each update of `pv_name`, property `prop_id` takes the value of the
    first case whose condition holds, else its value in the file. Conditions and values are
    the rule's (Python) expressions over pv0 / pvInt0 / pvStr0, the value of the PV."""

    name: str
    prop_id: str
    pv_name: str
    cases: tuple[tuple[str, str], ...]  # (condition, value)


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
    markers: tuple[Marker, ...] = ()
    x_title_egu_of: PV | None = None  # x-axis title follows this PV's EGU field at run time
    show_legend: bool = True


@dataclass(frozen=True)
class ImageView:
    """The Image widget: a row-major waveform of `height_pv` rows x `width_pv` columns, the
    ROI drawn from `roi_y` over `roi_height` rows, across the whole width."""

    title: str
    x: int
    y: int
    width: int
    height: int
    pv: PV
    width_pv: PV
    height_pv: PV
    default_size: tuple[int, int]  # data width, height until the size records are read
    roi_y: PV
    roi_height: PV
    x_title: str
    y_title: str


@dataclass(frozen=True)
class Screen:
    title: str
    width: int
    sections: tuple[Section, ...]
    plots: tuple[Plot, ...]
    images: tuple[ImageView, ...]

    @property
    def height(self) -> int:
        bottoms = ([s.y + s.height for s in self.sections]
                   + [p.y + p.height for p in (*self.plots, *self.images)])
        return max(bottoms) + MARGIN


# ------------------------------------------------------------------------------ layout
MARGIN = 10
ROW_GAP = 6
ITEM_GAP = 8
GROUP_TOP = 22  # a titled group's children start below its title
GROUP_BOTTOM = 12
HEADER_HEIGHT = 50
TOP = HEADER_HEIGHT + MARGIN
# three columns: settings | spectrum, results, health | camera image and profile
LEFT, LEFT_WIDTH = MARGIN, 450
MIDDLE = LEFT + LEFT_WIDTH + MARGIN
MIDDLE_WIDTH = 860
RIGHT = MIDDLE + MIDDLE_WIDTH + MARGIN
RIGHT_WIDTH = 560
SCREEN_WIDTH = RIGHT + RIGHT_WIDTH + MARGIN
# the camera's frame binned by IMAGE_BIN's default (8): shown until the size records are read
CAMERA_BINNED = (2560 // 8, 2016 // 8)


def _stack(*sections: Section) -> tuple[Section, ...]:
    """Place sections of one column under each other (each keeps its x and width)."""
    placed: list[Section] = []
    y = sections[0].y
    for s in sections:
        placed.append(replace(s, y=y))
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
        _r("From profile", Item(pvs.ROI_SUGGEST, Show.BUTTON, 140, "Suggest ROI", ACTION_BG),
           height=34),
        _r("ROI status", Item(pvs.ROI_STATUS, Show.STATE, 290)),
        _r("Image W x H", Item(pvs.IMAGE_WIDTH, Show.READ, 140),
           Item(pvs.IMAGE_HEIGHT, Show.READ, 140)),
    )),
    Section("Background", LEFT, 0, LEFT_WIDTH, (
        _r("File", Item(pvs.BACKGROUND_FILE, Show.ENTRY, 290)),
        _r("Status", Item(pvs.BACKGROUND_STATUS, Show.READ, 290)),
        _r("Frames to average", Item(pvs.BACKGROUND_N, Show.ENTRY, 140)),
        _r("From camera", Item(pvs.BACKGROUND_ACQUIRE, Show.BUTTON, 140, "Acquire / stop",
                               ACTION_BG),
           Item(pvs.BACKGROUND_PROGRESS, Show.PROGRESS, 86),
           Item(pvs.BACKGROUND_PROGRESS, Show.READ, 58), height=34),
    )),
    Section("Energy axis (E = c0 + c1 x + c2 x^2, x: column)", LEFT, 0, LEFT_WIDTH, (
        _r("Source", Item(pvs.AXIS_MODE, Show.CHOICE, 160)),
        _r("c0", Item(pvs.AXIS_C0, Show.ENTRY, 200)),
        _r("c1", Item(pvs.AXIS_C1, Show.ENTRY, 200)),
        _r("c2", Item(pvs.AXIS_C2, Show.ENTRY, 200)),
        _r("Axis status", Item(pvs.AXIS_STATUS, Show.READ, 290)),
    )),
)

_SPECTRUM = Plot(
    "Spectrum", MIDDLE, TOP, MIDDLE_WIDTH, 370,
    # SPECTRUM_AXIS is the axis in force for SPECTRUM_Y: always as long as the spectrum, the
    # column index when there is no energy axis; its EGU says which ("eV" or "px").
    x_pv=pvs.SPECTRUM_AXIS, x_title=f"Energy ({pvs.SPECTRUM_AXIS.egu})",
    y_title="Intensity (ROI rows summed)",
    traces=(
        Trace(pvs.SPECTRUM_Y, "Spectrum", BLUE),
        Trace(pvs.SPECTRUM_FIT, "Gaussian fit", RED, line_width=2),
        Trace(pvs.SPECTRUM_AVG_Y, "Average", DARK_GREEN, line_width=2, line_style=1),
    ),
    x_title_egu_of=pvs.SPECTRUM_AXIS,
)

_BELOW_SPECTRUM = _SPECTRUM.y + _SPECTRUM.height + MARGIN
_RESULTS_WIDTH = 500
_HEALTH_X = MIDDLE + _RESULTS_WIDTH + MARGIN
_HEALTH_WIDTH = MIDDLE_WIDTH - _RESULTS_WIDTH - MARGIN

_MIDDLE_LEFT = _stack(
    Section("Result", MIDDLE, _BELOW_SPECTRUM, _RESULTS_WIDTH, (
        _r("Centre", Item(pvs.SPECTRUM_CENTER, Show.BIG, 330), height=52),
        _r("FWHM", Item(pvs.SPECTRUM_FWHM, Show.BIG, 330), height=52),
        _r("Fit status", Item(pvs.FIT_STATUS, Show.READ, 200)),
        _r("Fit chi2 / dof", Item(pvs.FIT_CHI2, Show.READ, 200)),
        _r("Centre of mass", Item(pvs.SPECTRUM_COM, Show.READ, 200)),
        _r("RMS width", Item(pvs.SPECTRUM_STD, Show.READ, 200)),
        _r("Average centre", Item(pvs.SPECTRUM_AVG_CENTER, Show.READ, 200)),
        _r("Average FWHM", Item(pvs.SPECTRUM_AVG_FWHM, Show.READ, 200)),
        _r("Pulse ID", Item(pvs.PULSE_ID, Show.READ, 200)),
    ), label_width=140),
    Section("Processing settings", MIDDLE, 0, _RESULTS_WIDTH, (
        _r("Gaussian fit", Item(pvs.FIT_ENABLE, Show.CHOICE, 140)),
        _r("Fit min. SNR", Item(pvs.FIT_MIN_SNR, Show.ENTRY, 140)),
        _r("Average shots", Item(pvs.AVG_N, Show.ENTRY, 140)),
        _r("Autosave", Item(pvs.AUTOSAVE_STATUS, Show.READ, 290)),
    ), label_width=140),
)

_HALF = 93  # two readouts in one row of the narrow sections


def _memory(pv: PV) -> Item:
    """Bytes with an exponent that is a multiple of 3 (e.g. 1.2E9 byte)."""
    return Item(pv, Show.READ, _HALF, format=FORMAT_ENGINEERING, precision=1)


_MIDDLE_RIGHT = _stack(
    Section("Health", _HEALTH_X, _BELOW_SPECTRUM, _HEALTH_WIDTH, (
        _r("Rate", Item(pvs.RATE, Show.READ, 180)),
        _r("Processed", Item(pvs.N_PROCESSED, Show.READ, 180)),
        _r("Lost", Item(pvs.N_LOST, Show.READ, 180)),
        _r("Errors", Item(pvs.N_ERRORS, Show.READ, 180)),
        _r("Output dropped", Item(pvs.N_OUT_DROPPED, Show.READ, 180)),
        _r("Processing time", Item(pvs.PROC_TIME, Show.READ, 180)),
        _r("CPU IOC | host", Item(IOC_CPU_LOAD, Show.READ, _HALF),
           Item(SYS_CPU_LOAD, Show.READ, _HALF)),
        _r("Memory used | free", _memory(MEM_USED), _memory(MEM_FREE)),
    ), label_width=140),
    Section("Saturation and image view", _HEALTH_X, 0, _HEALTH_WIDTH, (
        _r("Saturated pixels", Item(pvs.N_SATURATED, Show.READ, 180)),
        _r("Saturation level", Item(pvs.SATURATION_LEVEL, Show.ENTRY, 180)),
        _r("View binning", Item(pvs.IMAGE_BIN, Show.ENTRY, 180)),
        _r("View rate", Item(pvs.IMAGE_RATE, Show.ENTRY, 180)),
        _r("Binned W x H", Item(pvs.IMAGE_WIDTH_BINNED, Show.READ, _HALF),
           Item(pvs.IMAGE_HEIGHT_BINNED, Show.READ, _HALF)),
    ), label_width=140),
)

_SECTIONS = _LEFT_COLUMN + _MIDDLE_LEFT + _MIDDLE_RIGHT
_BOTTOM = max([s.y + s.height for s in _SECTIONS] + [_SPECTRUM.y + _SPECTRUM.height])

_IMAGE = ImageView(
    "Camera image", RIGHT, TOP, RIGHT_WIDTH, 480, pv=pvs.IMAGE,
    width_pv=pvs.IMAGE_WIDTH_BINNED, height_pv=pvs.IMAGE_HEIGHT_BINNED,
    default_size=CAMERA_BINNED, roi_y=pvs.IMAGE_ROI_Y, roi_height=pvs.IMAGE_ROI_HEIGHT,
    x_title="Column / binning", y_title="Row / binning",
)

_PROFILE_TOP = _IMAGE.y + _IMAGE.height + MARGIN
_PROFILE = Plot(
    "Row profile (ROI rows marked)", RIGHT, _PROFILE_TOP, RIGHT_WIDTH, _BOTTOM - _PROFILE_TOP,
    x_pv=pvs.PROFILE_X, x_title="Row (px)", y_title="Row sum, background removed",
    traces=(Trace(pvs.PROFILE_Y, "Profile", BLUE),),
    markers=(Marker(pvs.ROI_YMIN_RBV, ROI_COLOR), Marker(pvs.ROI_YMAX_RBV, ROI_COLOR)),
    show_legend=False,
)

SCREEN = Screen("PSSS spectrometer", SCREEN_WIDTH, _SECTIONS, (_SPECTRUM, _PROFILE), (_IMAGE,))


# ------------------------------------------------------------------------------ writer
def pv_name(pv: PV, field: str = "") -> str:
    """``$(P):<NAME>``, or ``$(P):<NAME>.<FIELD>`` for one field of the record."""
    name = pvs.full_name(PREFIX, pv)
    return f"{name}.{field}" if field else name


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


def _rules(widget: ET.Element, rules: tuple[Rule, ...]) -> None:
    """``<rules><rule name prop_id out_exp="true"><exp bool_exp><expression>`` and the
    rule's ``<pv_name>`` (RulesWidgetProperty's XML)."""
    if not rules:
        return
    element = _sub(widget, "rules")
    for rule in rules:
        xml = _sub(element, "rule", name=rule.name, prop_id=rule.prop_id, out_exp="true")
        for condition, value in rule.cases:
            _sub(_sub(xml, "exp", bool_exp=condition), "expression", value)
        _sub(xml, "pv_name", rule.pv_name)


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


def _text_format(widget: ET.Element, item: Item) -> None:
    """Long strings as text, integers without decimals, EGU shown where there is one
    (unless the item says otherwise)."""
    pv = item.pv
    fmt, precision = item.format, item.precision
    if fmt is None and pv.kind in (Kind.LONG_STRING_IN, Kind.LONG_STRING_OUT):
        fmt = FORMAT_STRING
    elif fmt is None and pv.kind in (Kind.LONG_IN, Kind.LONG_OUT, Kind.INT64_IN):
        fmt, precision = FORMAT_DECIMAL, 0
    if fmt is not None:
        _sub(widget, "format", fmt)
    if precision is not None:
        _sub(widget, "precision", precision)
    _sub(widget, "show_units", bool(pv.egu) if item.units is None else item.units)


def _alarm_border(widget: ET.Element, pv: PV) -> None:
    """Records with alarm limits (RATE, N_LOST, N_ERRORS, N_SATURATED, ...): the readout's
    border shows the severity (Phoebus's default, written out so that it stays)."""
    if pv.alarms:
        _sub(widget, "border_alarm_sensitive", True)


def _read(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    widget = _pv_widget(parent, "textupdate", item.pv, x, y, item.width, height)
    _text_format(widget, item)
    _sub(widget, "vertical_alignment", 1)
    if item.pv.kind == Kind.LONG_STRING_IN:
        _sub(widget, "wrap_words", True)
    _alarm_border(widget, item.pv)


def _big(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    widget = _pv_widget(parent, "textupdate", item.pv, x, y, item.width, height)
    _font(widget, BIG_FONT)
    _text_format(widget, item)
    _sub(widget, "horizontal_alignment", 2)
    _sub(widget, "vertical_alignment", 1)


def _entry(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    widget = _pv_widget(parent, "textentry", item.pv, x, y, item.width, height)
    _text_format(widget, item)


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


def _progress(parent: ET.Element, item: Item, x: int, y: int, height: int) -> None:
    """A bar from the PV's LOPR to HOPR (written here: not every Phoebus version reads the
    limits from a PV for this widget the same way)."""
    widget = _pv_widget(parent, "progressbar", item.pv, x, y, item.width, height, " bar")
    _color(widget, "fill_color", PROGRESS)
    _sub(widget, "limits_from_pv", False)
    _sub(widget, "minimum", item.pv.low)
    _sub(widget, "maximum", item.pv.high)
    _sub(widget, "horizontal", True)


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
         Show.BUTTON: _button, Show.STATE: _state, Show.PROGRESS: _progress}


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


def x_title_rule(pv: PV) -> Rule:
    """The spectrum's x-axis title from the axis's EGU at run time: "px" is the column index,
    anything else an energy in that unit."""
    return Rule(f"X axis title from {pv.name}.EGU", "x_axis.title", pv_name(pv, "EGU"),
                (('pvStr0 == "px"', '"Column index (px)"'),
                 ('pvStr0 != ""', '"Energy (" + pvStr0 + ")"')))


def _plot(parent: ET.Element, plot: Plot) -> None:
    widget = _widget(parent, "xyplot", plot.title, plot.x, plot.y, plot.width, plot.height)
    _sub(widget, "title", plot.title)
    _font(widget, BOLD_FONT, "title_font")
    _sub(widget, "show_toolbar", True)
    _sub(widget, "show_legend", plot.show_legend)
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
    if plot.markers:
        markers = _sub(widget, "marker")  # the array and its elements share the name
        for m in plot.markers:
            marker = _sub(markers, "marker")
            _color(marker, "color", m.color)
            _sub(marker, "pv_name", pv_name(m.pv))
            _sub(marker, "interactive", False)  # the RBV records are read-only
    if plot.x_title_egu_of is not None:
        _rules(widget, (x_title_rule(plot.x_title_egu_of),))


def size_rules(view: ImageView) -> tuple[Rule, ...]:
    """Data size and axis ranges from the size records (while they are above 0): axes in
    binned pixels, x from 0 (left) to the width, y from 0 (top) to the height."""
    rules = []
    for prop_id, pv in (("data_width", view.width_pv), ("data_height", view.height_pv),
                        ("x_axis.maximum", view.width_pv), ("y_axis.minimum", view.height_pv)):
        rules.append(Rule(f"{prop_id} from {pv.name}", prop_id, pv_name(pv),
                          (("pvInt0 > 0", "pvInt0"),)))
    return tuple(rules)


def _image(parent: ET.Element, view: ImageView) -> None:
    widget = _widget(parent, "image", view.title, view.x, view.y, view.width, view.height)
    _sub(widget, "pv_name", pv_name(view.pv))
    _sub(widget, "tooltip", f"{view.pv.desc}\n$(pv_name)")
    width, height = view.default_size
    # y from `height` at the bottom to 0 at the top: row 0 on top, as the camera sends it
    for tag, title, low, high in (("x_axis", view.x_title, 0, width),
                                  ("y_axis", view.y_title, height, 0)):
        axis = _sub(widget, tag)
        _sub(axis, "title", title)
        _sub(axis, "minimum", low)
        _sub(axis, "maximum", high)
        _axis_fonts(axis)
    _sub(widget, "data_width", width)
    _sub(widget, "data_height", height)
    _sub(widget, "unsigned", False)  # int32: background removed
    _sub(widget, "autoscale", True)  # colour range from each frame
    roi = _sub(_sub(widget, "rois"), "roi")
    _sub(roi, "name", "ROI")
    _color(roi, "color", ROI_COLOR)
    _sub(roi, "visible", True)
    _sub(roi, "interactive", False)  # drawn from read-only records; set the ROI by its entries
    _sub(roi, "x_pv", ROI_X_PV)
    _sub(roi, "y_pv", pv_name(view.roi_y))
    _sub(roi, "width_pv", pv_name(view.width_pv))
    _sub(roi, "height_pv", pv_name(view.roi_height))
    _rules(widget, size_rules(view))


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
    for plot in screen.plots:
        _plot(display, plot)
    for view in screen.images:
        _image(display, view)
    return display


def render(screen: Screen = SCREEN, prefix: str = DEFAULT_PREFIX) -> str:
    """The .bob file's text: indented XML, UTF-8 declaration, one trailing newline."""
    root = build(screen, prefix)
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def screen_pvs(screen: Screen = SCREEN) -> list[PV]:
    """Every record the screen connects to, in screen order, once each (a field of a record,
    e.g. SPECTRUM_AXIS.EGU for the axis title, counts as its record)."""
    found: dict[str, PV] = {}
    for section in screen.sections:
        for row in section.rows:
            for item in row.items:
                found.setdefault(item.pv.name, item.pv)
    for plot in screen.plots:
        for pv in (plot.x_pv, *(t.pv for t in plot.traces), *(m.pv for m in plot.markers)):
            found.setdefault(pv.name, pv)
        if plot.x_title_egu_of is not None:
            found.setdefault(plot.x_title_egu_of.name, plot.x_title_egu_of)
    for view in screen.images:
        for pv in (view.pv, view.width_pv, view.height_pv, view.roi_y, view.roi_height):
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
