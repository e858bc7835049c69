"""THE PV table: one declarative entry per record of the IOC.

Every record the IOC serves is listed here once, with everything needed to build it
(`ioc.py`), to document it (README table, operator screen) and to test it. Nothing else in
the project spells a PV name by hand: code refers to the entries (``pvs.SPECTRUM_Y.name``).

Records are ``<prefix>:<name>``; the iocStats records live under ``<prefix>:IOC:``.
This module imports nothing heavy on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from psss_ioc.core.fit_status import FitStatus
from psss_ioc.pipeline.state import State


class Kind(Enum):
    """Record kinds, named after the softioc builder function that makes them."""

    AI = "aIn"
    AO = "aOut"
    LONG_IN = "longIn"
    LONG_OUT = "longOut"
    INT64_IN = "int64In"
    BOOL_OUT = "boolOut"
    MBB_IN = "mbbIn"
    MBB_OUT = "mbbOut"
    ACTION = "Action"
    WAVEFORM_IN = "WaveformIn"
    WAVEFORM_OUT = "WaveformOut"
    LONG_STRING_IN = "longStringIn"
    LONG_STRING_OUT = "longStringOut"


WRITABLE_KINDS = frozenset(
    {Kind.AO, Kind.LONG_OUT, Kind.BOOL_OUT, Kind.MBB_OUT, Kind.ACTION, Kind.WAVEFORM_OUT,
     Kind.LONG_STRING_OUT}
)

# Alarm severities as the softioc builder spells them in mbb options.
NO_ALARM, MINOR, MAJOR, INVALID = "NO_ALARM", "MINOR", "MAJOR", "INVALID"

# Access security groups (iocBoot/iocpsss/psss.acf, psss_ioc/default.acf): the writable
# records are SETTINGS (their value only, from the listed hosts), every other record of the
# table RESULTS (no client writes any field: the IOC writes them itself), the iocStats
# SYSRESET record LOCKED.
SETTINGS_ASG = "SETTINGS"
RESULTS_ASG = "RESULTS"
LOCKED_ASG = "LOCKED"

# Limit alarms of analog and integer input records: (limit field, value, severity).
ALARM_FIELDS = {"LOLO": "LLSV", "LOW": "LSV", "HIGH": "HSV", "HIHI": "HHSV"}

# Longest spectrum/axis waveform: the camera is 2560 columns wide; leave room for others.
MAX_WIDTH = 8192
MAX_HEIGHT = 8192  # PROFILE_Y: one value per image row
IMAGE_MAX_PIXELS = 1024 * 1024  # IMAGE, binned: the camera's frame at IMAGE_BIN 4 and up
MESSAGE_LENGTH = 1024
PATH_LENGTH = 1024
EXTRA_LENGTH = 65536  # PARAMETERS_EXTRA: 32 keys of up to 64 + 256 characters, as JSON

# Name of the PV Access group (one atomic snapshot of a result) under the prefix.
PVA_GROUP = "SNAPSHOT"
IOC_STATS = "IOC"


@dataclass(frozen=True)
class PV:
    """One record: everything needed to build, document and test it."""

    name: str
    kind: Kind
    desc: str
    egu: str = ""
    prec: int | None = None
    low: float | None = None  # LOPR; writable records refuse values outside low..high
    high: float | None = None  # HOPR
    initial: Any = None
    dtype: str | None = None  # waveforms: numpy dtype name
    nelm: int | None = None  # waveforms and long strings
    options: tuple[tuple[str, str], ...] = ()  # mbb: (label, severity)
    autosave: bool = False
    timestamped: bool = False  # result records: stamped with the frame's timestamp (TSE=-2)
    group_field: str | None = None  # field name in the PVA group, if any
    group_trigger: bool = False  # posting this field posts the whole group
    alarms: tuple[tuple[str, float, str], ...] = ()  # (LOLO|LOW|HIGH|HIHI, value, severity)
    hyst: float | None = None  # alarm deadband (HYST)

    @property
    def writable(self) -> bool:
        return self.kind in WRITABLE_KINDS

    @property
    def asg(self) -> str:
        return SETTINGS_ASG if self.writable else RESULTS_ASG

    def __post_init__(self) -> None:
        if len(self.desc) > 40:
            raise ValueError(f"{self.name}: DESC longer than 40 characters")
        if len(self.name) > 40:
            raise ValueError(f"{self.name}: name suffix too long")
        if self.kind in (Kind.WAVEFORM_IN, Kind.WAVEFORM_OUT) and not (self.dtype and self.nelm):
            raise ValueError(f"{self.name}: waveforms need dtype and nelm")
        if self.kind in (Kind.MBB_IN, Kind.MBB_OUT) and not self.options:
            raise ValueError(f"{self.name}: mbb records need options")
        if self.kind in (Kind.AI, Kind.AO) and not (
                self.egu and self.prec is not None and self.low is not None
                and self.high is not None):
            raise ValueError(f"{self.name}: analog records need EGU, PREC and display limits")
        for limit, _, severity in self.alarms:
            if limit not in ALARM_FIELDS or severity not in (MINOR, MAJOR, INVALID):
                raise ValueError(f"{self.name}: bad alarm {limit} {severity}")
            if self.kind not in (Kind.AI, Kind.LONG_IN, Kind.INT64_IN):
                raise ValueError(f"{self.name}: limit alarms on ai/longin/int64in only")


STATE_LABELS = {
    State.STOPPED: "Stopped",
    State.WAITING: "Waiting for stream",
    State.PROCESSING: "Processing",
    State.ERROR: "Error",
    State.NO_IMAGE_CHANNEL: "No image channel",
    State.BAD_IMAGE: "Image not usable",
}
STATE_SEVERITIES = {
    State.STOPPED: NO_ALARM,
    State.WAITING: MINOR,
    State.PROCESSING: NO_ALARM,
    State.ERROR: MAJOR,
    State.NO_IMAGE_CHANNEL: MAJOR,
    State.BAD_IMAGE: MAJOR,
}


class AutosaveState(IntEnum):
    """AUTOSAVE_STATUS: are the settings saved, and what was restored at start?"""

    OK = 0
    OFF = 1  # --no-autosave
    FROM_BACKUP = 2  # the autosave file was bad: restored from the last good start's copy
    DEFAULTS = 3  # the file and its backup were bad: started with defaults
    SAVE_FAILING = 4  # e.g. the disk is full


class BackgroundState(IntEnum):
    NONE = 0
    LOADED = 1
    ERROR = 2


class InputMode(IntEnum):
    PULL = 0
    SUB = 1


class AxisMode(IntEnum):
    """AXIS_MODE: where the energy axis comes from."""

    EXTERNAL = 0  # SPECTRUM_X, written by a client or followed from another IOC (--axis-pv)
    POLYNOMIAL = 1  # E = AXIS_C0 + AXIS_C1 x + AXIS_C2 x^2, x the column index
    COLUMN_INDEX = 2  # no energy: the column index (px)


class SettingState(IntEnum):
    """ROI_STATUS / AXIS_STATUS: does the requested setting fit the frames?"""

    OK = 0
    INVALID = 1  # does not fit the image
    PAIR_INVALID = 2  # ROI only: the limits written are no pair (ymin >= ymax > 0); waits


# Labels of FIT_STATUS, in the order of FitStatus (OK=0 ... DISABLED=4): the enum's own.
FIT_STATUS_LABELS = tuple(status.label for status in FitStatus)

# ---------------------------------------------------------------- control
START = PV("START", Kind.ACTION, "Start processing (write 1)")
STOP = PV("STOP", Kind.ACTION, "Stop processing (write 1)")
STATUS = PV(
    "STATUS", Kind.MBB_IN, "Processing state",
    options=tuple((STATE_LABELS[s], STATE_SEVERITIES[s]) for s in State),
    initial=int(State.STOPPED),
)
MESSAGE = PV("MESSAGE", Kind.LONG_STRING_IN, "Last error or notice", nelm=MESSAGE_LENGTH,
             initial="")
INPUT_STREAM = PV("INPUT_STREAM", Kind.LONG_STRING_OUT, "Camera bsread stream address",
                  nelm=PATH_LENGTH, initial="")
INPUT_MODE = PV("INPUT_MODE", Kind.MBB_OUT, "Camera stream socket mode",
                options=(("PULL", NO_ALARM), ("SUB", NO_ALARM)), initial=int(InputMode.PULL))

# ---------------------------------------------------------------- settings (autosaved)
SPC_ROI_YMIN = PV("SPC_ROI_YMIN", Kind.LONG_OUT, "ROI first row (inclusive)", egu="px",
                  low=0, high=65535, initial=0, autosave=True)
SPC_ROI_YMAX = PV("SPC_ROI_YMAX", Kind.LONG_OUT, "ROI end row (excl.); 0 = to the last row",
                  egu="px", low=0, high=65535, initial=0, autosave=True)
SPECTRUM_X = PV("SPECTRUM_X", Kind.WAVEFORM_OUT, "Energy axis per column (empty/0: index)",
                egu="eV", prec=3, dtype="float64", nelm=MAX_WIDTH, autosave=True)
BACKGROUND_FILE = PV("BACKGROUND_FILE", Kind.LONG_STRING_OUT, "Background file (.h5 /image, .npy)",
                     nelm=PATH_LENGTH, initial="", autosave=True)
AVG_N = PV("AVG_N", Kind.LONG_OUT, "Shots in the running average", low=1, high=10000,
           initial=10, autosave=True)
FIT_ENABLE = PV("FIT_ENABLE", Kind.BOOL_OUT, "Gaussian fit on/off",
                options=(("Off", NO_ALARM), ("On", NO_ALARM)), initial=1, autosave=True)
FIT_MIN_SNR = PV("FIT_MIN_SNR", Kind.AO, "Least peak/noise ratio to fit", egu="ratio",
                 prec=1, low=0, high=1e6, initial=3.0, autosave=True)
# The operator's view of the camera (PROFILE_Y, IMAGE) and what it is computed with
IMAGE_BIN = PV("IMAGE_BIN", Kind.LONG_OUT, "Image view binning (N x N pixels)", egu="px",
               low=1, high=64, initial=8, autosave=True)
IMAGE_RATE = PV("IMAGE_RATE", Kind.AO, "Image view and profile rate (0: off)", egu="Hz",
                prec=1, low=0, high=10, initial=2.0, autosave=True)
SATURATION_LEVEL = PV("SATURATION_LEVEL", Kind.LONG_OUT, "Saturated at or above (0: dtype top)",
                      egu="counts", low=0, high=2**31 - 1, initial=0, autosave=True)
BACKGROUND_N = PV("BACKGROUND_N", Kind.LONG_OUT, "Frames BACKGROUND_ACQUIRE averages",
                  low=1, high=10000, initial=100, autosave=True)
AXIS_MODE = PV("AXIS_MODE", Kind.MBB_OUT, "Energy axis source",
               options=(("External", NO_ALARM), ("Polynomial", NO_ALARM),
                        ("Column index", NO_ALARM)),
               initial=int(AxisMode.EXTERNAL), autosave=True)
AXIS_C0 = PV("AXIS_C0", Kind.AO, "Axis polynomial: E at column 0", egu="eV", prec=4,
             low=-1e6, high=1e6, initial=0.0, autosave=True)
AXIS_C1 = PV("AXIS_C1", Kind.AO, "Axis polynomial: eV per column", egu="eV/px", prec=6,
             low=-1e6, high=1e6, initial=1.0, autosave=True)
AXIS_C2 = PV("AXIS_C2", Kind.AO, "Axis polynomial: eV per column^2", egu="eV/px2", prec=9,
             low=-1e6, high=1e6, initial=0.0, autosave=True)
ROI_SUGGEST = PV("ROI_SUGGEST", Kind.ACTION, "Set the ROI around the band seen")
BACKGROUND_ACQUIRE = PV("BACKGROUND_ACQUIRE", Kind.ACTION,
                        "Average BACKGROUND_N frames; again: stop")
# Keys REST clients add to the parameters (tags shown in processing_parameters), a JSON object
# (psss_ioc.ioc.parameters: at most 32 keys; scalars, strings up to 256 characters).
PARAMETERS_EXTRA = PV("PARAMETERS_EXTRA", Kind.LONG_STRING_OUT, "Extra REST parameters (JSON)",
                      nelm=EXTRA_LENGTH, initial="", autosave=True)

# ---------------------------------------------------------------- results (per frame)
SPECTRUM_Y = PV("SPECTRUM_Y", Kind.WAVEFORM_IN, "Spectrum: ROI rows summed per column",
                prec=1, dtype="float64", nelm=MAX_WIDTH, timestamped=True,
                group_field="spectrum", group_trigger=True)
SPECTRUM_AXIS = PV("SPECTRUM_AXIS", Kind.WAVEFORM_IN, "Energy axis in use for SPECTRUM_Y",
                   egu="eV", prec=3, dtype="float64", nelm=MAX_WIDTH, timestamped=True,
                   group_field="axis")
# Display limits (LOPR/HOPR) of the results: photon energies of SwissFEL's hard and soft X-ray
# lines; also the column index (up to MAX_WIDTH) when no energy axis is set.
ENERGY_RANGE = (0.0, 20000.0)  # eV
WIDTH_RANGE = (0.0, 1000.0)  # eV
COUNTS_RANGE = (0.0, 1e7)  # ROI rows summed: a few hundred rows of 16-bit pixels
SPECTRUM_CENTER = PV("SPECTRUM_CENTER", Kind.AI, "Fitted Gaussian centre", egu="eV", prec=3,
                     low=ENERGY_RANGE[0], high=ENERGY_RANGE[1], timestamped=True,
                     group_field="center")
SPECTRUM_FWHM = PV("SPECTRUM_FWHM", Kind.AI, "Fitted Gaussian FWHM", egu="eV", prec=3,
                   low=WIDTH_RANGE[0], high=WIDTH_RANGE[1], timestamped=True,
                   group_field="fwhm")
SPECTRUM_AMPLITUDE = PV("SPECTRUM_AMPLITUDE", Kind.AI, "Fitted Gaussian amplitude",
                        egu="counts", prec=2, low=COUNTS_RANGE[0], high=COUNTS_RANGE[1],
                        timestamped=True, group_field="amplitude")
SPECTRUM_OFFSET = PV("SPECTRUM_OFFSET", Kind.AI, "Fitted constant offset", egu="counts",
                     prec=2, low=-COUNTS_RANGE[1] / 10, high=COUNTS_RANGE[1] / 10,
                     timestamped=True)
SPECTRUM_COM = PV("SPECTRUM_COM", Kind.AI, "Spectrum centre of mass", egu="eV", prec=3,
                  low=ENERGY_RANGE[0], high=ENERGY_RANGE[1], timestamped=True,
                  group_field="com")
SPECTRUM_STD = PV("SPECTRUM_STD", Kind.AI, "Spectrum RMS width", egu="eV", prec=3,
                  low=WIDTH_RANGE[0], high=WIDTH_RANGE[1], timestamped=True,
                  group_field="std")
SPECTRUM_FIT = PV("SPECTRUM_FIT", Kind.WAVEFORM_IN, "Fitted curve (for plotting)", prec=1,
                  dtype="float64", nelm=MAX_WIDTH, timestamped=True)
FIT_STATUS = PV(
    "FIT_STATUS", Kind.MBB_IN, "Fit result of the last frame",
    options=tuple((status.label, status.severity) for status in FitStatus),
    timestamped=True, group_field="fit_status", initial=4,
)
FIT_CHI2 = PV("FIT_CHI2", Kind.AI, "Fit reduced chi-square", egu="chi2/dof", prec=3, low=0,
              high=100, timestamped=True)
PULSE_ID = PV("PULSE_ID", Kind.INT64_IN, "Pulse id of the last frame", timestamped=True,
              group_field="pulse_id")
# MINOR from one saturated pixel; MAJOR above 0.1 % of the ROI's pixels (HIHI, set by the IOC
# when the ROI or the image width changes)
N_SATURATED = PV("N_SATURATED", Kind.INT64_IN, "ROI pixels at or above SATURATION_LEVEL",
                 timestamped=True, group_field="n_saturated",
                 alarms=(("HIGH", 1, MINOR), ("HIHI", 2**62, MAJOR)))
SPECTRUM_AVG_Y = PV("SPECTRUM_AVG_Y", Kind.WAVEFORM_IN, "Running average spectrum", prec=1,
                    dtype="float64", nelm=MAX_WIDTH, timestamped=True)
SPECTRUM_AVG_CENTER = PV("SPECTRUM_AVG_CENTER", Kind.AI, "Centre of average spectrum fit",
                         egu="eV", prec=3, low=ENERGY_RANGE[0], high=ENERGY_RANGE[1],
                         timestamped=True)
SPECTRUM_AVG_FWHM = PV("SPECTRUM_AVG_FWHM", Kind.AI, "FWHM of average spectrum fit", egu="eV",
                       prec=3, low=WIDTH_RANGE[0], high=WIDTH_RANGE[1], timestamped=True)

# The results of one frame, in the order their records process: plain soft records joined
# by forward links (one lock set). Per frame, `record_writer.FrameChainWriter` puts all values,
# stamps the head with the frame's timestamp and processes it, in one GIL-free call under the
# chain's lock: CA/PVA see one frame's values together, and no Python runs per record (softioc
# device support cost ~90 us and a GIL hand-off per record). SPECTRUM_Y comes last: it
# triggers the PVA group snapshot.
FRAME_CHAIN: tuple[PV, ...] = (
    PULSE_ID, SPECTRUM_CENTER, SPECTRUM_FWHM, SPECTRUM_AMPLITUDE, SPECTRUM_OFFSET, SPECTRUM_COM,
    SPECTRUM_STD, FIT_CHI2, FIT_STATUS, N_SATURATED, SPECTRUM_FIT, SPECTRUM_AVG_CENTER,
    SPECTRUM_AVG_FWHM, SPECTRUM_AVG_Y, SPECTRUM_Y,
)

# The view, IMAGE_RATE times a second (not per frame: a pass over the whole frame)
PROFILE_Y = PV("PROFILE_Y", Kind.WAVEFORM_IN, "Row profile: each row summed, bg removed",
               prec=0, dtype="float64", nelm=MAX_HEIGHT, timestamped=True)
PROFILE_X = PV("PROFILE_X", Kind.WAVEFORM_IN, "Row index of PROFILE_Y", egu="px", prec=0,
               dtype="float64", nelm=MAX_HEIGHT, timestamped=True)
IMAGE = PV("IMAGE", Kind.WAVEFORM_IN, "Image, bg removed, binned IMAGE_BIN", dtype="int32",
           nelm=IMAGE_MAX_PIXELS, timestamped=True)
IMAGE_WIDTH_BINNED = PV("IMAGE_WIDTH_BINNED", Kind.LONG_IN, "IMAGE width (binned columns)",
                        egu="px", initial=0)
IMAGE_HEIGHT_BINNED = PV("IMAGE_HEIGHT_BINNED", Kind.LONG_IN, "IMAGE height (binned rows)",
                         egu="px", initial=0)
IMAGE_ROI_Y = PV("IMAGE_ROI_Y", Kind.LONG_IN, "ROI first row in IMAGE (binned)", egu="px",
                 initial=0)
IMAGE_ROI_HEIGHT = PV("IMAGE_ROI_HEIGHT", Kind.LONG_IN, "ROI rows in IMAGE (binned)",
                      egu="px", initial=0)
BACKGROUND_PROGRESS = PV("BACKGROUND_PROGRESS", Kind.AI, "Background acquisition done",
                         egu="%", prec=0, low=0, high=100, initial=0.0)


# ---------------------------------------------------------------- state of inputs
BACKGROUND_STATUS = PV(
    "BACKGROUND_STATUS", Kind.MBB_IN, "Background state",
    options=(("None", NO_ALARM), ("Loaded", NO_ALARM), ("Error", MAJOR)),
    initial=int(BackgroundState.NONE),
)
ROI_STATUS = PV("ROI_STATUS", Kind.MBB_IN, "ROI limits a valid pair within image?",
                options=(("OK", NO_ALARM), ("Outside image", MAJOR), ("Invalid pair", MAJOR)),
                initial=0)
AXIS_STATUS = PV("AXIS_STATUS", Kind.MBB_IN, "SPECTRUM_X fits the image width?",
                 options=(("OK", NO_ALARM), ("Wrong length", MAJOR)), initial=0)
ROI_YMIN_RBV = PV("ROI_YMIN_RBV", Kind.LONG_IN, "ROI first row in force", egu="px", initial=0)
ROI_YMAX_RBV = PV("ROI_YMAX_RBV", Kind.LONG_IN, "ROI end row in force", egu="px", initial=0)
IMAGE_WIDTH = PV("IMAGE_WIDTH", Kind.LONG_IN, "Image width of the last frame", egu="px",
                 initial=0)
IMAGE_HEIGHT = PV("IMAGE_HEIGHT", Kind.LONG_IN, "Image height of the last frame", egu="px",
                  initial=0)
AUTOSAVE_STATUS = PV(
    "AUTOSAVE_STATUS", Kind.MBB_IN, "Settings saved? restored from where?",
    options=(("OK", NO_ALARM), ("Off", MINOR), ("From backup", MINOR),
             ("Bad file: defaults", MAJOR), ("Save failing", MAJOR)),
    initial=int(AutosaveState.OK),
)

# ---------------------------------------------------------------- statistics
# Health alarms a control room can put in its alarm handler. RATE: no spectra flowing (below
# 1 Hz, also while stopped). The counters count since processing started (START clears them):
# N_ERRORS MINOR from the first malformed frame or processing error, MAJOR when errors go on;
# N_LOST MINOR once 1000 pulses are missing (a reduced repetition rate counts as gaps too).
RATE = PV("RATE", Kind.AI, "Processed frames per second", egu="Hz", prec=1, low=0, high=200,
          initial=0.0, alarms=(("LOW", 1.0, MINOR),), hyst=0.5)
N_PROCESSED = PV("N_PROCESSED", Kind.INT64_IN, "Frames processed since start", initial=0)
N_LOST = PV("N_LOST", Kind.INT64_IN, "Pulse-id gaps and frames skipped", initial=0,
            alarms=(("HIGH", 1000, MINOR),))
N_ERRORS = PV("N_ERRORS", Kind.INT64_IN, "Malformed input and processing errors",
              initial=0, alarms=(("HIGH", 1, MINOR), ("HIHI", 1000, MAJOR)))
N_OUT_DROPPED = PV("N_OUT_DROPPED", Kind.INT64_IN, "Output stream messages dropped",
                   initial=0)
PROC_TIME = PV("PROC_TIME", Kind.AI, "Processing time of the last frame", egu="ms", prec=3,
               low=0, high=100, initial=0.0)

# The statistics (every 0.5 s), the same way: plain records in one chain, written in one step,
# stamped with the time they are written (TSE 0).
STATS_CHAIN: tuple[PV, ...] = (RATE, N_PROCESSED, N_LOST, N_ERRORS, N_OUT_DROPPED, PROC_TIME)
CHAINS: tuple[tuple[PV, ...], ...] = (FRAME_CHAIN, STATS_CHAIN)


def chain_of(pv: PV) -> tuple[PV, ...] | None:
    """The chain of records written together that `pv` belongs to, if any."""
    return next((chain for chain in CHAINS if pv in chain), None)


TABLE: tuple[PV, ...] = tuple(v for v in list(globals().values()) if isinstance(v, PV))
BY_NAME: dict[str, PV] = {pv.name: pv for pv in TABLE}
if len(BY_NAME) != len(TABLE):  # pragma: no cover - a typo in the table above
    raise RuntimeError("duplicate PV names in the PV table")

AUTOSAVED: tuple[PV, ...] = tuple(pv for pv in TABLE if pv.autosave)


def full_name(prefix: str, pv: PV | str) -> str:
    """``<prefix>:<name>`` for an entry of the table (or a bare suffix such as PVA_GROUP)."""
    suffix = pv.name if isinstance(pv, PV) else pv
    return f"{prefix}:{suffix}"


def markdown_table() -> str:
    """The PV table for the README."""
    lines = ["| PV | kind | EGU | writable | autosaved | description |",
             "|---|---|---|---|---|---|"]
    for pv in TABLE:
        lines.append(
            f"| `<prefix>:{pv.name}` | {pv.kind.value} | {pv.egu} | "
            f"{'yes' if pv.writable else ''} | {'yes' if pv.autosave else ''} | {pv.desc} |"
        )
    return "\n".join(lines)
