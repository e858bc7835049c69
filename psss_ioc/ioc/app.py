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

from psss_ioc.core import background as bgfile
from psss_ioc.core import processing
from psss_ioc.core.processing import AveragedResult, FrameMismatchError, Result, Settings
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
    prefix_problem,
)
from psss_ioc.ioc.control import WHOLE_IMAGE, RoiControl, RoiOutcome, roi_setting
from psss_ioc.ioc.parameters import LegacyParameters
from psss_ioc.ioc.pvs import PV, AutosaveState, BackgroundState, Kind, SettingState, State
from psss_ioc.ioc.record_writer import FrameChainWriter
from psss_ioc.ioc.settings_file import SettingsFile
from psss_ioc.pipeline.worker import (
    BAD_IMAGE,
    MISSING_CHANNEL,
    FrameLike,
    Pipeline,
    ResultSink,
    SourceFactory,
    SourceFault,
    Statistics,
)
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

    def __init__(self, records: dict[str, Any], prefix: str) -> None:
        self.r = records
        self._prefix = prefix
        self._axis: np.ndarray | None = None
        self._roi_rbv: tuple[int, int] | None = None
        self.roi_waits = False  # the ROI limits written are no pair (see RoiControl)
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
        if result.roi != self._roi_rbv:
            self.show_roi_rows(result.roi)
        curve = result.fit_curve
        values: dict[str, Any] = {
            pvs.PULSE_ID.name: int(frame.pulse_id),
            pvs.SPECTRUM_CENTER.name: result.center,
            pvs.SPECTRUM_FWHM.name: result.fwhm,
            pvs.SPECTRUM_AMPLITUDE.name: result.amplitude,
            pvs.SPECTRUM_OFFSET.name: result.offset,
            pvs.SPECTRUM_COM.name: result.com,
            pvs.SPECTRUM_STD.name: result.rms,
            pvs.FIT_CHI2.name: result.chi2_reduced,
            pvs.FIT_STATUS.name: int(result.fit_status),
            pvs.SPECTRUM_FIT.name: curve if curve is not None else _EMPTY,
            pvs.SPECTRUM_Y.name: result.spectrum,
            # not averaging: the average records show no value rather than repeat an old one
            pvs.SPECTRUM_AVG_CENTER.name: average.center if average is not None else math.nan,
            pvs.SPECTRUM_AVG_FWHM.name: average.fwhm if average is not None else math.nan,
            pvs.SPECTRUM_AVG_Y.name: average.spectrum if average is not None else _EMPTY,
        }
        # One GIL-free step under the chain's lock: CA and PVA see this frame's values together.
        sec, ns = frame.timestamp
        self._write_chain(pvs.FRAME_CHAIN, values, (int(sec), int(ns)))

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

    def show_roi_status(self, fits: bool) -> None:
        """The one place ROI_STATUS is decided: a written pair that waits wins over whether
        the pair in force fits the frames."""
        state = (SettingState.PAIR_INVALID if self.roi_waits
                 else SettingState.OK if fits else SettingState.INVALID)
        self._set(pvs.ROI_STATUS, int(state))

    def publish_rejected(self, kind: str, message: str, in_force: Settings) -> None:
        if kind == "roi":
            self.show_roi_status(fits=False)
        elif kind == "background_shape":
            self._set(pvs.BACKGROUND_STATUS, int(BackgroundState.ERROR))
        elif kind == "axis_length":
            self._set(pvs.AXIS_STATUS, int(SettingState.INVALID))
        self.message(message, error=True)

    def publish_accepted(self, kind: str, message: str, in_force: Settings) -> None:
        if kind == "roi":
            self.show_roi_status(fits=True)
        elif kind == "background_shape":
            loaded = in_force.background is not None
            self._set(pvs.BACKGROUND_STATUS,
                      int(BackgroundState.LOADED if loaded else BackgroundState.NONE))
        elif kind == "axis_length":
            self._set(pvs.AXIS_STATUS, int(SettingState.OK))
        self.message(message)

    def publish_message(self, message: str, error: bool) -> None:
        self.message(message, error)


class PsssIoc:
    """The records, the pipeline and the callbacks between them."""

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
        self.pipeline = Pipeline(factory, sender=sender,
                                 source_counters=_source_counters, source_fault=_source_fault,
                                 max_width=pvs.MAX_WIDTH)
        self.pipeline.set_input(config.input_stream, config.input_mode)
        self.roi = RoiControl(lambda roi: self.pipeline.configure(roi=roi), self._show_roi)
        # GET /parameters and the output stream's processing_parameters: one view
        self.sender = sender
        self.parameters = LegacyParameters(lambda pv: self.rec(pv).get())
        if hasattr(sender, "parameters_view"):
            sender.parameters_view = self.parameters.view  # type: ignore[union-attr]

    # -------------------------------------------------------------- building
    def build(self) -> None:
        builder.SetDeviceName(self.config.prefix)
        cb: dict[str, dict[str, Any]] = {
            pvs.START.name: {"on_update": self._on_start, "blocking": True},
            pvs.STOP.name: {"on_update": self._on_stop, "blocking": True},
            pvs.INPUT_STREAM.name: {"validate": self._validate_input_stream,
                                    "on_update": self._on_input_stream, "blocking": True},
            pvs.INPUT_MODE.name: {"validate": self._validate_input_mode,
                                  "on_update": self._on_input_mode, "blocking": True},
            # each limit takes the value written; RoiControl decides the pair in force
            pvs.SPC_ROI_YMIN.name: {"on_update": lambda v: self._write_roi(ymin=int(v)),
                                    "blocking": True},
            pvs.SPC_ROI_YMAX.name: {"on_update": lambda v: self._write_roi(ymax=int(v)),
                                    "blocking": True},
            pvs.SPECTRUM_X.name: {"validate": self._validate_axis, "on_update": self._on_axis},
            pvs.BACKGROUND_FILE.name: {"on_update": self._on_background, "blocking": True,
                                       "always_update": True},
            pvs.AVG_N.name: {"validate": self._validate_avg_n},
            pvs.FIT_ENABLE.name: {"validate": self._validate_fit_enable},
            pvs.FIT_MIN_SNR.name: {"validate": self._validate_min_snr},
            pvs.PARAMETERS_EXTRA.name: {"validate": self.parameters.validator(self.message)},
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
        self.publisher = RecordPublisher(self.records, self.config.prefix)
        self.pipeline.publisher = self.publisher

    def rec(self, pv: PV) -> Any:
        return self.records[pv.name]

    def message(self, text: str, error: bool = False) -> None:
        self._log_limit(text.split(" ", 1)[0], logging.WARNING if error else logging.INFO, text)
        if self.publisher is not None:
            self.publisher.message(text, error)

    # -------------------------------------------------------------- control callbacks
    async def _on_start(self, value: int) -> None:
        if not value:
            return
        try:
            self.pipeline.start()
        except ValueError as e:
            self.message(f"cannot start: {e}", error=True)

    async def _on_stop(self, value: int) -> None:
        if not value:
            return
        await asyncio.get_running_loop().run_in_executor(None, self.pipeline.stop)

    def _validate_input_stream(self, record: Any, value: str) -> bool:
        """A malformed address is refused (the stream in use stays); empty means no input."""
        from psss_ioc.streams.stream import parse_address

        if value.strip():
            try:
                parse_address(value)
            except ValueError as e:
                self.message(f"INPUT_STREAM refused: {e}", error=True)
                return False
        return True

    async def _on_input_stream(self, value: str) -> None:
        self.pipeline.set_input(value, None)
        self.message(f"input stream set to {value!r}")

    def _validate_input_mode(self, record: Any, value: int) -> bool:
        """The mbbo takes any state number 0..15, not only the two defined ones."""
        if value not in {m.value for m in pvs.InputMode}:
            self.message(f"INPUT_MODE refused: {value} is not one of "
                         f"{', '.join(f'{m.value} ({m.name})' for m in pvs.InputMode)}",
                         error=True)
            return False
        return True

    async def _on_input_mode(self, value: int) -> None:
        mode = pvs.InputMode(value).name
        self.pipeline.set_input(self.pipeline.input[0], mode)
        self.message(f"input mode set to {mode}")

    # -------------------------------------------------------------- settings callbacks
    def _validate_range(self, pv: PV, then: Callable[[Any, Any], bool] | None
                        ) -> Callable[[Any, Any], bool]:
        """Refuse a value outside the PV's limits (with the reason), then run `then`."""
        low = -math.inf if pv.low is None else pv.low
        high = math.inf if pv.high is None else pv.high

        def validate(record: Any, value: Any) -> bool:
            if not low <= value <= high:  # NaN too
                self.message(f"{pv.name} refused: {value} is outside {low:g}..{high:g}",
                             error=True)
                return False
            return then is None or then(record, value)

        return validate

    def _try_configure(self, what: str, **changes: Any) -> bool:
        try:
            self.pipeline.configure(**changes)
        except ValueError as e:
            self.message(f"{what} refused: {e}", error=True)
            return False
        return True

    def _write_roi(self, ymin: int | None = None, ymax: int | None = None) -> None:
        try:
            self.roi.write(ymin, ymax)
        except ValueError as e:
            self.message(f"ROI refused: {e}", error=True)

    def _show_roi(self, outcome: RoiOutcome) -> None:
        """Records, alarms, readbacks and MESSAGE for one ROI decision (see RoiControl)."""
        severity = alarm.MAJOR_ALARM if outcome.waiting else alarm.NO_ALARM
        status = alarm.STATE_ALARM if outcome.waiting else alarm.NO_ALARM
        for pv, value in zip((pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX), outcome.written,
                             strict=True):
            record = self.rec(pv)
            if record.get() != value:  # written by REST, restore or an external PV
                record.set(value, process=False, severity=severity, alarm=status)
            record.set_alarm(severity, status)
        assert self.publisher is not None
        self.publisher.roi_waits = outcome.waiting
        text = outcome.message()
        shape = self.pipeline.image_shape
        in_force = roi_setting(outcome.in_force)
        try:  # in force, but used only while it fits the frames (the pipeline checks each)
            rows = Settings(roi=in_force).check_frame(shape) if shape else outcome.in_force
            fits = True
        except FrameMismatchError as e:
            fits = False
            text = f"{text}; not used until it fits: {e}"
        self.publisher.show_roi_status(fits)
        if fits:
            self.publisher.show_roi_rows(rows)
        self.message(text, error=outcome.waiting or not fits)

    def _axis_value(self, value: Any) -> np.ndarray | None:
        axis = np.asarray(value, dtype=np.float64)
        return None if axis.size == 0 else axis

    def _validate_axis(self, record: Any, value: Any) -> bool:
        axis = self._axis_value(value)
        shape = self.pipeline.image_shape
        if axis is not None and shape is not None and axis.size != shape[1]:
            self.message(f"SPECTRUM_X refused: {axis.size} values but the image has "
                         f"{shape[1]} columns", error=True)
            return False
        return self._try_configure("SPECTRUM_X", axis=axis)

    def _on_axis(self, value: Any) -> None:
        self.rec(pvs.AXIS_STATUS).set(int(SettingState.OK))
        n = np.asarray(value).size
        self.message(f"energy axis set ({n} values)" if n else "energy axis: column index")

    def _validate_avg_n(self, record: Any, value: int) -> bool:
        try:
            self.pipeline.set_average_n(value)
        except ValueError as e:
            self.message(f"AVG_N refused: {e}", error=True)
            return False
        return True

    def _validate_fit_enable(self, record: Any, value: int) -> bool:
        return self._try_configure("FIT_ENABLE", fit_enabled=bool(value))

    def _validate_min_snr(self, record: Any, value: float) -> bool:
        return self._try_configure("FIT_MIN_SNR", min_snr=float(value))

    async def _on_background(self, value: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.apply_background, value)

    def apply_background(self, path: str, restoring: bool = False) -> bool:
        """Load a background file and make it current; on error keep the previous one.

        A refused file name is put back to the one in force in the record, unless `restoring`
        (start-up): then the record keeps the saved name, so a file that is only missing for
        now (a share not mounted yet) is not forgotten by the next autosave.
        """
        status = self.rec(pvs.BACKGROUND_STATUS)
        path = path.strip()
        if not path:
            self.pipeline.configure(background=None, background_name="")
            status.set(int(BackgroundState.NONE))
            self.message("background cleared")
            return True
        try:
            image = bgfile.load(path, shape=self.pipeline.image_shape,
                                allowed=self.config.allowed_background_dirs())
            self.pipeline.configure(background=image, background_name=path)
        except Exception as e:  # refused (BackgroundError, Settings: ValueError) or a bug
            if not isinstance(e, ValueError):
                log.error("loading the background %s failed", path, exc_info=True)
            status.set(int(BackgroundState.ERROR))
            kept = self.pipeline.settings.background_name
            self.message(f"background refused: {e}; keeping {kept or 'none'}", error=True)
            if not restoring:  # a refused name must not be autosaved over the good one
                self.rec(pvs.BACKGROUND_FILE).set(kept, process=False)
            return False
        status.set(int(BackgroundState.LOADED))
        self.message(f"background loaded from {path} ({image.shape[0]} x {image.shape[1]})")
        return True

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
        """Autosave restores record values without callbacks: apply them once here."""
        try:  # the same rule as a put: an invalid pair waits, alarmed, the whole image used
            self.roi.write(int(self.rec(pvs.SPC_ROI_YMIN).get()),
                           int(self.rec(pvs.SPC_ROI_YMAX).get()))
        except ValueError as e:
            self.roi.write(*WHOLE_IMAGE)
            self.message(f"restored ROI refused: {e}; using the whole image", error=True)
        self._try_configure("restored SPECTRUM_X",
                            axis=self._axis_value(self.rec(pvs.SPECTRUM_X).get()))
        self._try_configure("restored FIT_ENABLE",
                            fit_enabled=bool(self.rec(pvs.FIT_ENABLE).get()))
        self._try_configure("restored FIT_MIN_SNR",
                            min_snr=float(self.rec(pvs.FIT_MIN_SNR).get()))
        try:
            self.pipeline.set_average_n(int(self.rec(pvs.AVG_N).get()))
        except ValueError as e:
            self.message(f"restored AVG_N refused: {e}", error=True)
        path = self.rec(pvs.BACKGROUND_FILE).get()
        if path:
            self.apply_background(path, restoring=True)

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
                    self._write_roi(**{limit: int(value)})
            return callback

        def follow_axis(value: Any = None, **_: Any) -> None:
            if value is None:
                return
            try:
                self.rec(pvs.SPECTRUM_X).set(np.asarray(value, dtype=np.float64))
            except Exception as e:
                self.message(f"following the external axis failed: {e}", error=True)

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
    """`dbpf` without its echo: softioc.dbpf prints the new value (`DBF_STRING: "LOCKED"`)
    into the IOC's output at every start."""
    from epicscorelibs.ioc import dbCore

    from psss_ioc.ioc.record_writer import FieldAddress

    put = dbCore.dbPutField
    put.argtypes = [ctypes.c_void_p, ctypes.c_short, ctypes.c_void_p, ctypes.c_long]
    put.restype = ctypes.c_long
    data = value.encode()
    if len(data) >= 40:  # MAX_STRING_SIZE with its terminating NUL
        raise ValueError(f"{value!r} is longer than an EPICS string")
    buffer = ctypes.create_string_buffer(data, 40)
    field = FieldAddress(name)  # holds the struct dbAddr: kept alive over the call
    status = put(field.address, 0, buffer, 1)  # 0: DBR_STRING
    if status != 0:
        raise RuntimeError(f"writing {value!r} to {name} failed (status {status})")


def _source_counters(source: Any) -> dict[str, int]:
    """Malformed input counted by the stream (pulse gaps are counted by the pipeline)."""
    counters = getattr(source, "counters", None)
    if counters is None:
        return {}
    flat = counters.as_dict()
    return {k: int(v) for k, v in flat.items()
            if (k.startswith("malformed_") or k in ("missing_channel", "empty_image")) and v}


def _source_fault(source: Any) -> SourceFault | None:
    """The latest of the stream's "no image channel" and "unusable image" messages, if any
    (`stream.SourceCounters`); the pipeline decides what state that makes."""
    counters = getattr(source, "counters", None)
    if counters is None:
        return None
    missing = getattr(counters, "missing_channel_time", None)
    bad = getattr(counters, "bad_image_time", None)
    if bad is not None and (missing is None or bad > missing):
        return SourceFault(BAD_IMAGE, bad, channel=source.image_channel,
                           reason=counters.bad_image)
    if missing is not None:
        return SourceFault(MISSING_CHANNEL, missing, channel=source.image_channel,
                           channels_seen=counters.missing_channel_seen,
                           n_channels=counters.missing_channel_n_channels)
    return None


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


