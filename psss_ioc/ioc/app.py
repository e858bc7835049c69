"""The IOC: records built from the PV table, wired to the pipeline. The only softioc user.

Start-up order (see `run`): boot script through iocsh (epicsEnvSet, asSetFilename, extra db
loads) -> autosave configured -> records built from `pvs.TABLE` -> LoadDatabase -> iocStats
under ``<prefix>:IOC`` -> iocInit -> restored settings applied -> optional auto start.

Control flows only through the records: a put runs `validate` (quick checks in the EPICS thread,
refusing bad values so the record keeps its old one) and then `on_update` (on the asyncio
dispatcher), which calls the pipeline. Results flow back through `RecordPublisher`, called from
the pipeline's worker thread, stamping every result record with the frame's own timestamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from epicscorelibs.ca.dbr import ca_timestamp
from softioc import alarm, asyncio_dispatcher, builder, softioc

from psss_ioc.core import processing, view
from psss_ioc.core.processing import AveragedResult, Mismatch, Result, Settings
from psss_ioc.core.view import View
from psss_ioc.ioc import access, memory, pvs, record_writer
from psss_ioc.ioc.config import (
    ENV_AUTOSAVE_DIR,
    ENV_INPUT_MODE,
    ENV_INPUT_STREAM,
    ENV_OUTPUT_NAMES,
    ENV_OUTPUT_PORT,
    ENV_PREFIX,
    ENV_REST_HOST,
    ENV_REST_PORT,
    KERNELS_LOADING,
    OUTPUT_NAMES,
    IocConfig,
    autosave_dir_of,
    default_background_dir,
    prefix_problem,
)
from psss_ioc.ioc.control import WHOLE_IMAGE, Control, Refused, check_range, image_bin_problem
from psss_ioc.ioc.parameters import LegacyParameters
from psss_ioc.ioc.pvs import PV, AutosaveState, Kind, State
from psss_ioc.ioc.record_writer import FrameChainWriter
from psss_ioc.ioc.settings_file import SettingsFile
from psss_ioc.pipeline.source import FrameLike, SourceFactory
from psss_ioc.pipeline.worker import Pipeline, ResultSink, Statistics
from psss_ioc.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

_EMPTY = np.zeros(0)
_SEVERITIES = {pvs.NO_ALARM: alarm.NO_ALARM, pvs.MINOR: alarm.MINOR_ALARM,
               pvs.MAJOR: alarm.MAJOR_ALARM, pvs.INVALID: alarm.INVALID_ALARM}


# ---------------------------------------------------------------------------- boot script
def _libc_getenv(name: str) -> str | None:
    """Read the C environment (epicsEnvSet writes there, not into os.environ)."""
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    getenv.argtypes = [ctypes.c_char_p]
    value = getenv(name.encode())
    return value.decode() if value is not None else None


def run_boot_script(path: Path) -> dict[str, str]:
    """Run an iocsh script (st.cmd) before iocInit; return the PSSS_* variables it set.

    The macro ``ST_DIR`` is the script's directory, so it can name files next to it.
    """
    from epicscorelibs.ioc import Com, iocshRegisterCommon

    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"boot script {path} does not exist")
    iocshRegisterCommon()
    iocsh_load = Com.iocshLoad
    iocsh_load.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    iocsh_load.restype = ctypes.c_int
    with _without_colours():
        status = iocsh_load(str(path).encode(), f"ST_DIR={path.parent}".encode())
    if status != 0:
        raise RuntimeError(f"boot script {path} failed (iocsh status {status})")
    names = [ENV_PREFIX, ENV_INPUT_STREAM, ENV_INPUT_MODE, ENV_OUTPUT_PORT, ENV_OUTPUT_NAMES,
             ENV_AUTOSAVE_DIR, ENV_REST_HOST, ENV_REST_PORT, "EPICS_CA_MAX_ARRAY_BYTES"]
    found = {n: v for n in names if (v := _libc_getenv(n)) is not None}
    if "EPICS_CA_MAX_ARRAY_BYTES" in found:
        os.environ["EPICS_CA_MAX_ARRAY_BYTES"] = found["EPICS_CA_MAX_ARRAY_BYTES"]
    return found


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@contextlib.contextmanager
def _without_colours() -> Iterator[None]:
    """What is printed to stdout/stderr meanwhile (by C code too) is printed again, without
    ANSI colour codes.

    iocsh echoes every st.cmd line in colour even into a file or the journal, where the codes
    are noise. Only for the boot script: no other thread prints yet.
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = {1: os.dup(1), 2: os.dup(2)}
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            libc.fflush(None)
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            for capture, stream in ((out, sys.stdout), (err, sys.stderr)):
                capture.seek(0)
                stream.write(_ANSI_ESCAPE.sub("", capture.read().decode(errors="replace")))
                stream.flush()


def set_access_security_file(path: Path) -> None:
    """``--acf``: wins over the boot script's asSetFilename and the built-in file."""
    access.set_file(path)


def check_access_security(config: IocConfig) -> None:
    """Right after iocInit: a file that did not load leaves asLib inactive, and every client
    could write every field. Exit instead (the ACF error is in the log just before)."""
    if not access.active():
        log.critical("access security did not load (see the error above): not serving "
                     "without it")
        softioc.safeEpicsExit(1)
    log.info(access.describe())
    # REST open to the network under a file that lets any host write (the built-in one, the
    # legacy psss_processing line): say so once (an address of no real host, RFC 5737)
    open_rest = config.rest is not None and config.rest[0] not in ("127.0.0.1", "localhost")
    if open_rest and not config.rest_token and access.may_write_settings("192.0.2.1"):
        log.warning("REST API open on %s without a token, and the access security file in "
                    "force lets any host write the settings: list the control hosts in an "
                    "access security file (--acf, st.cmd) or set --rest-token", config.rest[0])


# ---------------------------------------------------------------------------- records
def _timestamp(frame: FrameLike) -> ca_timestamp:
    sec, ns = frame.timestamp
    t = ca_timestamp()
    t.secs = int(sec)
    t.nsec = int(ns)
    return t


_MBB_STATES = ("ZR", "ON", "TW", "TH", "FR", "FV", "SX", "SV", "EI", "NI", "TE", "EL", "TV",
               "TT", "FT", "FF")
_FTVL = {"float64": "DOUBLE", "float32": "FLOAT", "int32": "LONG", "int16": "SHORT",
         "uint8": "UCHAR", "int64": "INT64"}


def build_chained_record(pv: PV, prefix: str) -> Any:
    """A record of one of `pvs.CHAINS`: a plain soft record (no Python device support) that
    `RecordPublisher` writes and processes through `FrameChainWriter`. In the frame chain the
    head's TIME is written with the frame's timestamp (TSE=-2: nothing else sets it) and the
    others copy it through TSEL; the statistics are stamped when processed."""
    chain = pvs.chain_of(pv)
    assert chain is not None
    head = chain[0]
    position = chain.index(pv)
    next_pv = chain[position + 1] if position + 1 < len(chain) else None
    # Results are the IOC's to write (dbPut, which neither access security nor DISP stops):
    # their group has no write rule, so no client writes VAL or any other field (DISP 0 first
    # would let a later put show a made-up value). DISP=1 also refuses puts under a site file
    # that grants more.
    fields: dict[str, Any] = {"DESC": pv.desc, "PINI": "YES", "DISP": 1, "ASG": pv.asg}
    fields.update(_alarm_fields(pv))
    if pv.timestamped and pv == head:
        fields["TSE"] = -2
    elif pv.timestamped:
        fields["TSEL"] = f"{pvs.full_name(prefix, head)}.TIME"
    if next_pv is not None:
        fields["FLNK"] = pvs.full_name(prefix, next_pv)
    if pv.egu:
        fields["EGU"] = pv.egu
    if pv.prec is not None:
        fields["PREC"] = pv.prec
    if pv.kind == Kind.INT64_IN:
        return builder.records.int64in(pv.name, MDEL=-1, VAL=pv.initial or 0, **fields)
    if pv.kind == Kind.AI:
        # a NaN value (no fit) shows as INVALID/UDF: the record says the number is not valid
        fields.update(MDEL=-1, ADEL=-1, VAL=pv.initial if pv.initial is not None else 0)
        if pv.low is not None:
            fields["LOPR"] = pv.low
        if pv.high is not None:
            fields["HOPR"] = pv.high
        return builder.records.ai(pv.name, **fields)
    if pv.kind == Kind.WAVEFORM_IN:
        return builder.records.waveform(pv.name, NELM=pv.nelm, FTVL=_FTVL[str(pv.dtype)],
                                        **fields)
    if pv.kind == Kind.MBB_IN:
        for i, ((label, severity), state) in enumerate(zip(pv.options, _MBB_STATES,
                                                           strict=False)):
            fields[f"{state}ST"] = label
            fields[f"{state}VL"] = i
            fields[f"{state}SV"] = severity
        fields["VAL"] = pv.initial if pv.initial is not None else 0
        fields["UNSV"] = pvs.INVALID  # a value with no state: not a valid state
        return builder.records.mbbi(pv.name, **fields)
    raise ValueError(f"{pv.name}: a {pv.kind.value} record cannot be in a chain")


def _alarm_fields(pv: PV) -> dict[str, Any]:
    """Limit alarms of the entry: LOW=1, LSV=MINOR, ..., HYST."""
    fields: dict[str, Any] = {}
    for limit, value, severity in pv.alarms:
        fields[limit] = value
        fields[pvs.ALARM_FIELDS[limit]] = severity
    if pv.hyst is not None:
        fields["HYST"] = pv.hyst
    return fields


def build_record(pv: PV, prefix: str, **callbacks: Any) -> Any:
    """One record from one PV table entry (softioc's, except the frame chain's)."""
    if pvs.chain_of(pv) is not None:
        return build_chained_record(pv, prefix)
    # settings: clients write VAL only (from the hosts the file in force lists); the others:
    # no field at all (see pvs.SETTINGS_ASG)
    fields: dict[str, Any] = {"DESC": pv.desc, "ASG": pv.asg}
    fields.update(_alarm_fields(pv))
    if pv.egu:
        fields["EGU"] = pv.egu
    if pv.prec is not None and pv.kind in (Kind.AI, Kind.AO, Kind.WAVEFORM_IN, Kind.WAVEFORM_OUT):
        fields["PREC"] = pv.prec
    if pv.initial is not None:
        fields["initial_value"] = pv.initial
    if pv.timestamped:
        fields["TSE"] = -2
    if pv.writable:
        fields.update(callbacks)
    kind = pv.kind
    if kind in (Kind.AI,):
        fields["MDEL"] = -1
        fields["ADEL"] = -1
    if kind in (Kind.AI, Kind.AO, Kind.LONG_OUT):
        # display limits only: DRVL/DRVH would clamp a put silently; writes out of range are
        # refused with a reason instead (`PsssIoc._validate_range`)
        if pv.low is not None:
            fields["LOPR"] = pv.low
        if pv.high is not None:
            fields["HOPR"] = pv.high
    if kind == Kind.MBB_IN:
        fields["UNSV"] = pvs.INVALID  # a value with no state: not a valid state
    if kind in (Kind.MBB_IN, Kind.MBB_OUT):
        options = [(label, _SEVERITIES[sev]) for label, sev in pv.options]
        maker = builder.mbbIn if kind == Kind.MBB_IN else builder.mbbOut
        return maker(pv.name, *options, **fields)
    if kind == Kind.BOOL_OUT:
        (znam, _), (onam, _) = pv.options
        return builder.boolOut(pv.name, ZNAM=znam, ONAM=onam, **fields)
    if kind in (Kind.WAVEFORM_IN, Kind.WAVEFORM_OUT):
        fields.pop("initial_value", None)
        maker = builder.WaveformIn if kind == Kind.WAVEFORM_IN else builder.WaveformOut
        return maker(pv.name, length=pv.nelm, datatype=np.dtype(pv.dtype), **fields)
    if kind in (Kind.LONG_STRING_IN, Kind.LONG_STRING_OUT):
        fields["length"] = pv.nelm
        maker = builder.longStringIn if kind == Kind.LONG_STRING_IN else builder.longStringOut
        return maker(pv.name, **fields)
    if kind == Kind.ACTION:
        fields.pop("initial_value", None)
        return builder.Action(pv.name, ZNAM="", ONAM="Go", **fields)
    return getattr(builder, kind.value)(pv.name, **fields)


def add_pva_group(records: dict[str, Any], prefix: str) -> None:
    """One PVA group: spectrum, centre, FWHM, pulse id, ... read as one atomic snapshot."""
    group = pvs.full_name(prefix, pvs.PVA_GROUP)
    for pv in pvs.TABLE:
        if pv.group_field is None:
            continue
        spec: dict[str, Any] = {"+channel": "VAL", "+trigger": "*" if pv.group_trigger else ""}
        records[pv.name].add_info("Q:group", {group: {pv.group_field: spec}})


def write_database(path: Path, prefix: str = "$(P)") -> None:
    """The records of the PV table as a database file, for reading (`psss-ioc db`): built by
    `build_record` like the IOC's own, written by softioc. Call in a process with no IOC."""
    builder.SetDeviceName(prefix)
    records = {pv.name: build_record(pv, prefix) for pv in pvs.TABLE}
    add_pva_group(records, prefix)
    for pv in pvs.AUTOSAVED:  # saved by psss_ioc.ioc.settings_file; the info tag tells the reader
        records[pv.name].add_info("autosaveFields", "VAL")
    builder.WriteRecords(str(path))


# Results in the axis' unit (eV in the PV table): their EGU follows it (`PsssIoc.show_units`)
ENERGY_RESULTS = tuple(pv for pv in pvs.TABLE if pv.egu == "eV" and not pv.writable)

def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def _clip_message(text: str) -> str:
    data = text.encode(errors="replace")
    limit = pvs.MESSAGE_LENGTH - 1
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def _saturated(count: int) -> int:
    """A counter as the int64 records hold it: it stops at the top instead of failing."""
    return min(int(count), 2**63 - 1)


class RecordPublisher:
    """The pipeline's Publisher: writes results, state and statistics into the records."""

    def __init__(self, records: dict[str, Any], prefix: str, control: Control) -> None:
        self.r = records
        self._prefix = prefix
        self._control = control  # told whether the settings fit the frames
        self._axis: np.ndarray | None = None
        self._roi_rbv: tuple[int, int] | None = None
        self._width = 0
        self._profile_x: np.ndarray | None = None
        self._view_problem: str | None = None
        # one per chain (by its head's name), made on first use: they need the loaded database
        self._writers: dict[str, FrameChainWriter] = {}

    def _set(self, pv: PV, value: Any, **kw: Any) -> None:
        self.r[pv.name].set(value, **kw)

    def message(self, text: str, error: bool = False) -> None:
        severity = alarm.MINOR_ALARM if error else alarm.NO_ALARM
        self._set(pvs.MESSAGE, _clip_message(text), severity=severity,
                  alarm=alarm.STATE_ALARM if error else alarm.NO_ALARM)

    def _write_chain(self, chain: tuple[PV, ...], values: dict[str, Any],
                     timestamp: tuple[int, int] | None = None) -> None:
        """All values of one chain (by PV name) in one step; `timestamp` stamps its head."""
        writer = self._writers.get(chain[0].name)
        if writer is None:
            writer = self._writers[chain[0].name] = FrameChainWriter(
                [pvs.full_name(self._prefix, pv) for pv in chain], timestamp is not None)
        writer.write([values[pv.name] for pv in chain], *(timestamp or (0, 0)))

    def publish_result(
        self, frame: FrameLike, result: Result, average: AveragedResult | None
    ) -> None:
        width = result.spectrum.shape[0]
        if width > pvs.MAX_WIDTH:
            raise ValueError(f"spectrum of {width} points exceeds the waveform length")
        if result.axis is not self._axis:
            self._axis = result.axis
            self._set(pvs.SPECTRUM_AXIS, result.axis, timestamp=_timestamp(frame))
        if result.roi != self._roi_rbv or width != self._width:
            self.show_roi_rows(result.roi)
            self._width = width
            self._saturation_limit(result.roi, width)
        fit = result.fit
        curve = fit.curve
        values: dict[str, Any] = {
            pvs.PULSE_ID.name: int(frame.pulse_id),
            pvs.SPECTRUM_CENTER.name: fit.center,
            pvs.SPECTRUM_FWHM.name: fit.fwhm,
            pvs.SPECTRUM_AMPLITUDE.name: fit.amplitude,
            pvs.SPECTRUM_OFFSET.name: fit.offset,
            pvs.SPECTRUM_COM.name: fit.com,
            pvs.SPECTRUM_STD.name: fit.rms,
            pvs.FIT_CHI2.name: fit.chi2_reduced,
            pvs.FIT_STATUS.name: int(fit.status),
            pvs.N_SATURATED.name: result.n_saturated,
            pvs.SPECTRUM_FIT.name: curve if curve is not None else _EMPTY,
            pvs.SPECTRUM_Y.name: result.spectrum,
            # not averaging: the average records show no value rather than repeat an old one
            pvs.SPECTRUM_AVG_CENTER.name: average.fit.center if average is not None else math.nan,
            pvs.SPECTRUM_AVG_FWHM.name: average.fit.fwhm if average is not None else math.nan,
            pvs.SPECTRUM_AVG_Y.name: average.spectrum if average is not None else _EMPTY,
        }
        # One GIL-free step under the chain's lock: CA and PVA see this frame's values together.
        sec, ns = frame.timestamp
        self._write_chain(pvs.FRAME_CHAIN, values, (int(sec), int(ns)))

    def _saturation_limit(self, rows: tuple[int, int], width: int) -> None:
        """N_SATURATED's MAJOR limit: more than 0.1 % of the ROI's pixels."""
        pixels = (rows[1] - rows[0]) * width
        name = pvs.full_name(self._prefix, pvs.N_SATURATED)
        put_string_field(f"{name}.HIHI", str(pixels // 1000 + 1))

    def publish_view(self, frame: FrameLike, view: View, rows: tuple[int, int]) -> None:
        """Row profile and binned image (a few times a second, not per frame)."""
        stamp = _timestamp(frame)
        height = view.profile.shape[0]
        if height > pvs.MAX_HEIGHT:
            self._view_refused(f"the image has {height} rows, more than PROFILE_Y holds "
                               f"({pvs.MAX_HEIGHT}): no view")
            return
        if self._profile_x is None or self._profile_x.shape[0] != height:
            self._profile_x = np.arange(height, dtype=np.float64)
        self._set(pvs.PROFILE_X, self._profile_x, timestamp=stamp)
        self._set(pvs.PROFILE_Y, view.profile, timestamp=stamp)
        image = view.image
        if image.size > pvs.IMAGE_MAX_PIXELS or image.size == 0:
            self._view_refused(f"IMAGE_BIN {view.image_bin} does not fit this image: "
                               f"{image_bin_problem(view.image_bin, frame.image.shape)}")
            return
        self._view_problem = None
        bin_ = view.image_bin
        self._set(pvs.IMAGE_HEIGHT_BINNED, image.shape[0])
        self._set(pvs.IMAGE_WIDTH_BINNED, image.shape[1])
        self._set(pvs.IMAGE_ROI_Y, rows[0] // bin_)
        self._set(pvs.IMAGE_ROI_HEIGHT, -(-rows[1] // bin_) - rows[0] // bin_)
        self._set(pvs.IMAGE, image.ravel(), timestamp=stamp)

    def _view_refused(self, why: str) -> None:
        if why != self._view_problem:  # once, not a few times a second
            self._view_problem = why
            self.message(why, error=True)

    def publish_state(self, state: State, message: str) -> None:
        self._set(pvs.STATUS, int(state))
        if message:
            # ERROR, NO_IMAGE_CHANNEL, BAD_IMAGE: MESSAGE in alarm too ("Waiting" is no error)
            self.message(message, error=pvs.STATE_SEVERITIES[state] == pvs.MAJOR)

    def publish_statistics(self, stats: Statistics) -> None:
        self._write_chain(pvs.STATS_CHAIN, {
            pvs.RATE.name: float(stats.rate_hz),
            pvs.N_PROCESSED.name: _saturated(stats.n_processed),
            pvs.N_LOST.name: _saturated(stats.n_lost),
            pvs.N_ERRORS.name: _saturated(stats.n_errors),
            pvs.N_OUT_DROPPED.name: _saturated(stats.n_out_dropped),
            pvs.PROC_TIME.name: float(stats.proc_time_ms),
        })

    def publish_image_shape(self, height: int, width: int) -> None:
        self._set(pvs.IMAGE_HEIGHT, height)
        self._set(pvs.IMAGE_WIDTH, width)

    def show_roi_rows(self, rows: tuple[int, int]) -> None:
        """ROI_YMIN_RBV/ROI_YMAX_RBV: the rows in force."""
        self._roi_rbv = rows
        self._set(pvs.ROI_YMIN_RBV, rows[0])
        self._set(pvs.ROI_YMAX_RBV, rows[1])

    def publish_rejected(self, kind: Mismatch, message: str, in_force: Settings) -> None:
        self._control.frame_fit(kind, message)
        self.message(message, error=True)

    def publish_accepted(self, kind: Mismatch, message: str, in_force: Settings) -> None:
        self._control.frame_fit(kind, None)
        self.message(message)

    def publish_message(self, message: str, error: bool) -> None:
        self.message(message, error)


class PsssIoc:
    """The records, the pipeline, and the record callbacks into the control layer."""

    def __init__(
        self,
        config: IocConfig,
        source_factory: SourceFactory | None = None,
        sender: ResultSink | None = None,
    ) -> None:
        self.config = config
        self.records: dict[str, Any] = {}
        self.publisher: RecordPublisher | None = None
        # MESSAGE shows every notice; the log gets one line per kind per second (a put storm
        # is 1000 notices a second).
        self._log_limit = RateLimitedLog(log, period=1.0)
        factory = source_factory or default_source_factory(config)
        self.pipeline = Pipeline(factory, sender=sender, max_width=pvs.MAX_WIDTH)
        self.pipeline.set_input(config.input_stream, config.input_mode)
        # GET /parameters and the output stream's processing_parameters: one view
        self.sender = sender
        self.parameters = LegacyParameters(lambda pv: self.rec(pv).get())
        if hasattr(sender, "parameters_view"):
            sender.parameters_view = self.parameters.view  # type: ignore[union-attr]
        self.control = Control(self.pipeline, self, config.allowed_background_dirs,
                               self.parameters, default_background_dir(config))
        self._alarmed: set[str] = set()  # setting records shown in alarm (show_value)

    # -------------------------------------------------------------- building
    def build(self) -> None:
        builder.SetDeviceName(self.config.prefix)
        c = self.control
        # validate: accept or refuse only (the record keeps its value); on_update: the control
        # layer applies. Blocking: a put with completion (caput -c) returns once applied.
        cb: dict[str, dict[str, Any]] = {
            pvs.START.name: {"on_update": self._on_start, "blocking": True},
            pvs.STOP.name: {"on_update": self._on_stop, "blocking": True},
            pvs.INPUT_STREAM.name: self._callbacks(c.check_input_stream, c.set_input_stream),
            pvs.INPUT_MODE.name: self._callbacks(c.check_input_mode, c.set_input_mode),
            # each limit takes the value written; the ROI pair rule decides the pair in force
            pvs.SPC_ROI_YMIN.name: self._callbacks(None, lambda v: c.write_roi(ymin=int(v))),
            pvs.SPC_ROI_YMAX.name: self._callbacks(None, lambda v: c.write_roi(ymax=int(v))),
            pvs.SPECTRUM_X.name: self._callbacks(c.check_axis, c.set_axis),
            pvs.BACKGROUND_FILE.name: {"on_update": self._on_background, "blocking": True,
                                       "always_update": True},
            pvs.AVG_N.name: self._callbacks(c.check_average_n, c.set_average_n),
            pvs.FIT_ENABLE.name: self._callbacks(c.check_fit_enabled, c.set_fit_enabled),
            pvs.FIT_MIN_SNR.name: self._callbacks(c.check_min_snr, c.set_min_snr),
            pvs.PARAMETERS_EXTRA.name: self._callbacks(c.check_extra, c.set_extra),
            pvs.AXIS_MODE.name: self._callbacks(c.check_axis_mode, c.set_axis_mode),
            **{pv.name: self._callbacks(functools.partial(c.check_axis_coefficient, pv),
                                        functools.partial(c.set_axis_coefficient, pv))
               for pv in (pvs.AXIS_C0, pvs.AXIS_C1, pvs.AXIS_C2)},
            pvs.IMAGE_BIN.name: self._callbacks(c.check_image_bin, c.set_image_bin),
            pvs.IMAGE_RATE.name: self._callbacks(c.check_image_rate, c.set_image_rate),
            pvs.SATURATION_LEVEL.name: self._callbacks(c.check_saturation_level,
                                                       c.set_saturation_level),
            pvs.BACKGROUND_N.name: self._callbacks(None, c.set_background_n),
            pvs.ROI_SUGGEST.name: self._action(c.suggest_roi),
            pvs.BACKGROUND_ACQUIRE.name: self._action(c.acquire_background),
        }
        for pv in pvs.TABLE:
            callbacks = cb.get(pv.name, {})
            if pv.writable and (pv.low is not None or pv.high is not None):
                callbacks["validate"] = self._validate_range(pv, callbacks.get("validate"))
            self.records[pv.name] = build_record(pv, self.config.prefix, **callbacks)
        add_pva_group(self.records, self.config.prefix)
        self.records[pvs.INPUT_STREAM.name].set(self.config.input_stream, process=False)
        self.records[pvs.INPUT_MODE.name].set(
            int(pvs.InputMode[self.config.input_mode.upper()]), process=False)
        self.publisher = RecordPublisher(self.records, self.config.prefix, self.control)
        self.pipeline.publisher = self.publisher

    def rec(self, pv: PV) -> Any:
        return self.records[pv.name]

    def message(self, text: str, error: bool = False) -> None:
        self._log_limit(text.split(" ", 1)[0], logging.WARNING if error else logging.INFO, text)
        if self.publisher is not None:
            self.publisher.message(text, error)

    # -------------------------------------------------------------- the control layer's View
    def show_value(self, pv: PV, value: Any, alarmed: bool = False) -> None:
        record = self.rec(pv)
        severity = alarm.MAJOR_ALARM if alarmed else alarm.NO_ALARM
        status = alarm.STATE_ALARM if alarmed else alarm.NO_ALARM
        if not _same_value(record.get(), value):  # written by REST, restore, ...
            # without processing (no callbacks run again), then its monitors told
            record.set(value, process=False, severity=severity, alarm=status)
            post_value(pvs.full_name(self.config.prefix, pv))
        if alarmed or pv.name in self._alarmed:
            # the alarm needs processing: set_alarm puts the record's own value (no on_update:
            # only the ROI limits are ever alarmed, and they run it for new values only)
            record.set_alarm(severity, status)
            (self._alarmed.add if alarmed else self._alarmed.discard)(pv.name)

    def show_status(self, pv: PV, state: int) -> None:
        self.rec(pv).set(state)

    def show_roi_rows(self, rows: tuple[int, int]) -> None:
        if self.publisher is not None:
            self.publisher.show_roi_rows(rows)

    def show_reading(self, pv: PV, value: Any) -> None:
        self.rec(pv).set(value)

    def show_units(self, unit: str) -> None:
        """EGU of the records in energy units follows the axis (eV, or px for columns)."""
        for pv in ENERGY_RESULTS:
            put_string_field(f"{pvs.full_name(self.config.prefix, pv)}.EGU", unit)

    # -------------------------------------------------------------- record callbacks
    def _callbacks(self, check: Callable[[Any], Any] | None,
                   apply: Callable[[Any], Any]) -> dict[str, Any]:
        """softioc callbacks of a setting record: `check` refuses a value (the record keeps
        its old one, MESSAGE says why), `apply` puts it in force (the control layer)."""
        callbacks: dict[str, Any] = {"on_update": self._applier(apply), "blocking": True}
        if check is not None:
            def validate(record: Any, value: Any) -> bool:
                try:
                    check(value)
                except Refused as e:
                    self.message(str(e), error=True)
                    return False
                return True

            callbacks["validate"] = validate
        return callbacks

    def _action(self, act: Callable[[], Any]) -> dict[str, Any]:
        """An action record's callbacks: `act` on a write of 1, its refusal in MESSAGE."""
        def on_update(value: Any) -> None:
            if value:
                try:
                    act()
                except Refused as e:
                    self.message(str(e), error=True)

        return {"on_update": on_update, "blocking": True}

    def _applier(self, apply: Callable[[Any], Any]) -> Callable[[Any], None]:
        def on_update(value: Any) -> None:
            try:
                apply(value)
            except Refused as e:  # (e.g. the image size changed since validate)
                self.message(str(e), error=True)

        return on_update

    def _validate_range(self, pv: PV, then: Callable[[Any, Any], bool] | None
                        ) -> Callable[[Any, Any], bool]:
        """Refuse a value outside the PV's limits (with the reason), then run `then`."""
        def validate(record: Any, value: Any) -> bool:
            try:
                check_range(pv, value)
            except Refused as e:
                self.message(str(e), error=True)
                return False
            return then is None or then(record, value)

        return validate

    async def _on_start(self, value: int) -> None:
        if not value:
            return
        try:
            self.control.start()
        except Refused as e:
            self.message(str(e), error=True)

    async def _on_stop(self, value: int) -> None:
        if value:
            await asyncio.get_running_loop().run_in_executor(None, self.control.stop)

    async def _on_background(self, value: str) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Refused):  # (shown by the control layer)
            await loop.run_in_executor(None, self.control.set_background, value)

    # -------------------------------------------------------------- start-up
    def restore_settings(self, settings_file: SettingsFile | None
                         ) -> tuple[AutosaveState, str]:
        """Put the saved values into the records (before iocInit); the state and message to
        show once the IOC is up (`show_autosave`)."""
        if settings_file is None:
            return AutosaveState.OFF, "autosave is off: settings will not survive a restart"
        try:
            restored = settings_file.restore()
        except OSError as e:  # the directory cannot be made or read
            return AutosaveState.SAVE_FAILING, f"autosave directory unusable: {e}"
        log.log(logging.INFO if restored.state == AutosaveState.OK else logging.ERROR,
                "%s", restored.message)
        for pv in pvs.AUTOSAVED:
            name = pvs.full_name(self.config.prefix, pv)
            if name not in restored.values:
                continue
            try:
                self.rec(pv).set(restored.values[name])
            except Exception as e:  # a value the record cannot hold: its default stays
                log.error("restored %s refused (%r): %s", pv.name, restored.values[name], e)
        return restored.state, restored.message

    def autosaved_values(self) -> dict[str, Any]:
        return {pvs.full_name(self.config.prefix, pv): self.rec(pv).get()
                for pv in pvs.AUTOSAVED}

    def show_autosave(self, state: AutosaveState, message: str) -> None:
        self.rec(pvs.AUTOSAVE_STATUS).set(int(state))
        if state not in (AutosaveState.OK, AutosaveState.OFF):
            self.message(message, error=True)

    def apply_restored_settings(self) -> None:
        """The restored record values (put without callbacks) through the control layer,
        by the same rules as a put: an invalid ROI pair waits, alarmed; a refused setting
        keeps its default, with the reason in MESSAGE."""
        c = self.control
        try:
            c.write_roi(int(self.rec(pvs.SPC_ROI_YMIN).get()),
                        int(self.rec(pvs.SPC_ROI_YMAX).get()))
        except Refused as e:
            c.write_roi(*WHOLE_IMAGE)
            self.message(f"restored {e}; using the whole image", error=True)
        restored: tuple[tuple[PV, Callable[[Any], Any]], ...] = (
            # the axis: the coefficients and SPECTRUM_X first, then the mode that picks one
            *((pv, functools.partial(c.set_axis_coefficient, pv))
              for pv in (pvs.AXIS_C0, pvs.AXIS_C1, pvs.AXIS_C2)),
            (pvs.SPECTRUM_X, c.set_axis), (pvs.AXIS_MODE, c.set_axis_mode),
            (pvs.FIT_ENABLE, c.set_fit_enabled), (pvs.FIT_MIN_SNR, c.set_min_snr),
            (pvs.AVG_N, c.set_average_n), (pvs.IMAGE_BIN, c.set_image_bin),
            (pvs.IMAGE_RATE, c.set_image_rate), (pvs.SATURATION_LEVEL, c.set_saturation_level),
            (pvs.BACKGROUND_N, c.set_background_n))
        for pv, apply in restored:
            try:
                apply(self.rec(pv).get())
            except Refused as e:
                self.message(f"restored {e}", error=True)
            except Exception as e:  # a bug: the other settings are still restored
                log.error("restoring %s failed", pv.name, exc_info=True)
                self.message(f"restoring {pv.name} failed: {type(e).__name__}: {e}",
                             error=True)
        path = self.rec(pvs.BACKGROUND_FILE).get()
        if path:
            with contextlib.suppress(Refused):  # (shown by the control layer)
                c.set_background(path, restoring=True)

    def follow_external_pvs(self) -> None:
        """Mirror external ROI/axis PVs (legacy deployment) into the local records."""
        if not (self.config.roi_pvs or self.config.axis_pv):
            return
        # pyepics must use the libca this IOC already runs (epicscorelibs'), not a bundled
        # second copy: two CA libraries in one process made the IOC's own CA server miss
        # searches now and then.
        from epicscorelibs.path import get_lib

        os.environ.setdefault("PYEPICS_LIBCA", get_lib("ca"))
        import epics  # pyepics, only when asked for

        def follow_roi(limit: str) -> Callable[..., None]:
            def callback(value: Any = None, **_: Any) -> None:
                if value is not None:  # the same rule as a put: a pair in between waits
                    try:
                        self.control.write_roi(**{limit: int(value)})
                    except Refused as e:
                        self.message(str(e), error=True)
            return callback

        def follow_axis(value: Any = None, **_: Any) -> None:
            if value is None:
                return
            try:
                self.control.set_axis(np.asarray(value, dtype=np.float64))
            except Refused as e:
                self.message(f"following the external axis: {e}", error=True)

        self._external = []
        if self.config.roi_pvs:
            for name, limit in zip(self.config.roi_pvs, ("ymin", "ymax"), strict=True):
                self._external.append(epics.PV(name, callback=follow_roi(limit),
                                               auto_monitor=True))
        if self.config.axis_pv:
            self._external.append(
                epics.PV(self.config.axis_pv, callback=follow_axis, auto_monitor=True)
            )

    def lock_sysreset(self) -> None:
        name = pvs.full_name(self.config.prefix, pvs.IOC_STATS) + ":SYSRESET.ASG"
        put_string_field(name, pvs.LOCKED_ASG)


def put_string_field(name: str, value: str) -> None:
    """The IOC's own write of a field (a record's EGU, an alarm limit, SYSRESET's ASG): `dbPut`
    under the record's lock. Not `dbPutField`, which a result record's DISP=1 refuses, and not
    softioc.dbpf, which prints the new value into the IOC's output."""
    from psss_ioc.ioc.record_writer import put_string

    put_string(name, value)


def post_value(name: str) -> None:
    """Tell the monitors of a record's value (put without processing) that it changed."""
    from psss_ioc.ioc.record_writer import post_value_monitors

    post_value_monitors(name)


def default_source_factory(config: IocConfig) -> SourceFactory:
    def factory(address: str, mode: str) -> Any:
        from psss_ioc.streams.stream import CameraSource

        source = CameraSource(address, mode=mode, image_channel=config.channel,
                              receive_timeout=config.receive_timeout,
                              max_image_bytes=round(config.max_image_mb * 1e6))
        return source.connect()

    return factory


def make_sender(config: IocConfig) -> Any:
    if not config.output_port:
        return None
    from psss_ioc.streams.stream import ResultSender

    sender = ResultSender(config.output_port, mode=config.output_mode,
                          image_channel=config.channel, forward_image=config.forward_image,
                          image_port=config.image_output_port,
                          output_names=config.output_names, prefix=config.prefix)
    sender.open()
    return sender


def apply_boot_environment(config: IocConfig, env: dict[str, str], explicit: set[str]) -> None:
    """Values from the boot script fill in what the command line did not give explicitly."""
    if ENV_PREFIX in env and "prefix" not in explicit:
        config.prefix = env[ENV_PREFIX]
    if ENV_INPUT_STREAM in env and "input_stream" not in explicit:
        config.input_stream = env[ENV_INPUT_STREAM]
    if ENV_INPUT_MODE in env and "input_mode" not in explicit:
        config.input_mode = env[ENV_INPUT_MODE].upper()
    if ENV_OUTPUT_PORT in env and "output_port" not in explicit:
        config.output_port = int(env[ENV_OUTPUT_PORT])
    if ENV_OUTPUT_NAMES in env and "output_names" not in explicit:
        if env[ENV_OUTPUT_NAMES] not in OUTPUT_NAMES:
            raise ValueError(f"{ENV_OUTPUT_NAMES} {env[ENV_OUTPUT_NAMES]!r} is not one of "
                             f"{', '.join(OUTPUT_NAMES)}")
        config.output_names = env[ENV_OUTPUT_NAMES]
    if ENV_AUTOSAVE_DIR in env and "autosave_dir" not in explicit and env[ENV_AUTOSAVE_DIR]:
        config.autosave_dir = Path(env[ENV_AUTOSAVE_DIR])
    if config.rest is not None and "no_rest" not in explicit:  # REST: PSSS_REST_PORT "0" = off
        host = env.get(ENV_REST_HOST) if "rest_host" not in explicit else None
        port = env.get(ENV_REST_PORT) if "rest_port" not in explicit else None
        config.rest = (host or config.rest[0], int(port or config.rest[1]))
        if not config.rest[1]:
            config.rest = None


def settings_file_of(config: IocConfig) -> SettingsFile | None:
    """The autosave file, on by default (see `autosave_dir_of`); None with --no-autosave."""
    directory = autosave_dir_of(config)
    if directory is None:
        log.warning("autosave is off (--no-autosave): settings will not survive a restart")
        return None
    return SettingsFile(directory, config.prefix.replace(":", "_"))


def _serve_rest(ioc: PsssIoc) -> Any:
    """The legacy REST API when ``config.rest`` is set (aiohttp only imported then)."""
    if ioc.config.rest is None:
        return None
    from psss_ioc.rest import server as rest

    return rest.serve(ioc)


def run(config: IocConfig, explicit: set[str] | None = None,
        on_ready: Callable[[PsssIoc], None] | None = None) -> None:
    """Boot and serve until SIGTERM/SIGINT. Does not return normally (epicsExit)."""
    # Take SIGTERM/SIGINT from the very start: one arriving during boot (before softioc's own
    # wait_for_quit would install its handlers) must still end in a clean, saving exit.
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    # the built-in access security file unless the boot script or --acf names another
    access.use_defaults()
    if config.st_cmd is not None:
        apply_boot_environment(config, run_boot_script(config.st_cmd), explicit or set())
    if config.acf is not None:
        set_access_security_file(config.acf)
    if config.input_mode.upper() not in ("PULL", "SUB"):
        raise ValueError(f"input mode must be PULL or SUB, not {config.input_mode!r}")
    if problem := prefix_problem(config.prefix):  # (st.cmd may have set it)
        raise SystemExit(f"psss-ioc: cannot serve records: {problem}")
    settings_file = settings_file_of(config)
    # Load the compiled kernels from numba's cache (~0.5 s; the first start after an install
    # compiles them) before serving, instead of stalling the first frame. Not in a thread: it
    # would hold the GIL while the main thread still has to reach wait_for_quit, and a SIGTERM
    # in that window would kill the IOC without saving.
    log.info("%s (the first start after an install compiles them: a minute or so)",
             KERNELS_LOADING)
    started = time.monotonic()
    processing.warm_up()
    view.warm_up()
    record_writer.warm_up()
    log.info("processing kernels ready (%.1f s)", time.monotonic() - started)
    sender = make_sender(config)
    ioc = PsssIoc(config, sender=sender)
    ioc.build()
    restored = ioc.restore_settings(settings_file)  # before iocInit: records start with them
    builder.LoadDatabase()
    softioc.devIocStats(pvs.full_name(config.prefix, pvs.IOC_STATS))
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    softioc.iocInit(dispatcher, enable_pva=config.enable_pva)
    check_access_security(config)
    rest_server = None
    try:
        # From here the records are served: whatever fails, this thread must go on to wait for
        # the stop signal (a dead main thread leaves CA serving dead records, deaf to SIGTERM).
        memory.release_memory_lock()  # iocInit's mlockall, with real-time priority available
        ioc.lock_sysreset()
        ioc.apply_restored_settings()
        ioc.show_autosave(*restored)
        if settings_file is not None:
            settings_file.start(ioc.autosaved_values, config.autosave_period,
                                ioc.show_autosave)
        ioc.follow_external_pvs()
        memory.freeze_startup_objects()  # before the first frame: no 70 ms full GC passes
        log.info("IOC %s serving %d records", config.prefix, len(pvs.TABLE))
        rest_server = _serve_rest(ioc)
        if config.auto_start:
            try:
                ioc.pipeline.start()
            except ValueError as e:
                ioc.message(f"cannot start: {e}", error=True)
        if on_ready is not None:
            on_ready(ioc)
    except Exception as e:
        log.critical("start-up failed after iocInit; serving what is up", exc_info=True)
        ioc.message(f"start-up failed: {type(e).__name__}: {e}", error=True)
    try:
        stop_requested.wait()
    finally:
        _exit_within(STOP_DEADLINE)
        if settings_file is not None:  # first: whatever hangs below, the settings are saved
            settings_file.stop(ioc.autosaved_values)
        if rest_server is not None:
            rest_server.stop()
        ioc.pipeline.stop(timeout=3.0)
        if sender is not None:
            sender.close()
    softioc.safeEpicsExit(0)


STOP_DEADLINE = 4.5  # seconds from SIGTERM to the end of the process, whatever hangs


def _exit_within(seconds: float) -> None:
    """End the process after `seconds` if the orderly stop has not by then: a thread blocked
    in a file system or a library call must not keep an IOC alive that was told to stop."""
    def force() -> None:
        log.error("the IOC did not stop within %g s: exiting anyway", seconds)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


