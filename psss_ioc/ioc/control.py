"""The control layer: the one place that turns what operators write into the settings in
force, and shows the outcome. No EPICS, no HTTP.

The IOC's record callbacks, the REST shim, autosave restore and the external-PV mirror all
write through `Control` (the ROI through its `RoiControl`): validation, the ROI pair rule,
applying to the pipeline, the status records and the messages an operator sees are decided
here. Persistence follows from the records: autosave saves what `View.show_value` put there.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from psss_ioc.core import background
from psss_ioc.core.processing import Mismatch, Settings, roi_rows
from psss_ioc.ioc import pvs
from psss_ioc.ioc.parameters import LegacyParameters, parse_extra
from psss_ioc.ioc.pvs import BackgroundState, SettingState
from psss_ioc.pipeline.acquire import BackgroundAcquisition
from psss_ioc.pipeline.source import SourceFault
from psss_ioc.pipeline.state import State
from psss_ioc.pipeline.worker import Pipeline, Statistics
from psss_ioc.streams.channels import parse_address

log = logging.getLogger(__name__)

ROI_LIMIT_MAX = 65535  # a limit record takes 0..65535 (EPICS longout, any camera height)
WHOLE_IMAGE = (0, 0)

RoiPair = tuple[int, int]


def roi_limit_problem(name: str, value: object) -> str | None:
    """Why `value` cannot be written to the ROI limit `name`, or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be a whole number, not {value!r}"
    if not 0 <= value <= ROI_LIMIT_MAX:
        return f"{name} must be within 0..{ROI_LIMIT_MAX}, got {value}"
    return None


def roi_pair_problem(pair: RoiPair) -> str | None:
    """Why the pair (ymin, ymax) is not a ROI, or None. ymax = 0 means "to the last row"."""
    ymin, ymax = pair
    if ymax and ymin >= ymax:
        return f"ymin {ymin} must be less than ymax {ymax}"
    return None


def roi_setting(pair: RoiPair) -> tuple[int, int] | None:
    """The pipeline's form of a valid pair: None for the whole image."""
    return None if pair == WHOLE_IMAGE else pair


def describe_roi(pair: RoiPair, height: int | None = None) -> str:
    """"whole image", "rows [900, 1600)", "rows [900, 2016)" or "rows from 900"."""
    if pair == WHOLE_IMAGE:
        return "whole image"
    if pair[1] == 0 and height is None:
        return f"rows from {pair[0]} to the last"
    ymin, ymax = roi_rows(pair, height or 0)
    return f"rows [{ymin}, {ymax})"


@dataclass(frozen=True)
class RoiOutcome:
    """What one write made of the ROI: the pair written, the pair in force, and why the
    written pair waits (None when it is the one in force)."""

    written: RoiPair
    in_force: RoiPair
    waits_because: str | None

    @property
    def waiting(self) -> bool:
        return self.waits_because is not None

    def message(self) -> str:
        if self.waits_because is None:
            return f"ROI set to {describe_roi(self.in_force)}"
        return (f"ROI [{self.written[0]}, {self.written[1]}) waits: {self.waits_because}; "
                f"{describe_roi(self.in_force)} stay in force until SPC_ROI_YMIN/SPC_ROI_YMAX "
                f"make a valid pair")


class RoiControl:
    """The ROI pair rule.

    Each limit takes the value written (range-checked only), so a script may write them in any
    order. The pair in force is the last valid pair written: while the written pair is invalid
    it waits (the caller shows an alarm) and the pair before stays in force; the write that
    makes it valid puts it in force at once. Writes are serialised, so two clients writing at
    once end with the records' pair: in force if valid, waiting if not.

    Args:
        apply: puts a valid pair in force (the pipeline's ``configure(roi=...)``).
        show: shows an outcome (records, alarms, message); called under the lock, so what
            is shown follows the order of the writes.
    """

    def __init__(self, apply: Callable[[tuple[int, int] | None], object],
                 show: Callable[[RoiOutcome], None]) -> None:
        self._apply = apply
        self._show = show
        self._lock = threading.Lock()
        self._written: RoiPair = WHOLE_IMAGE
        self._in_force: RoiPair = WHOLE_IMAGE

    @property
    def written(self) -> RoiPair:
        return self._written

    @property
    def in_force(self) -> RoiPair:
        return self._in_force

    def write(self, ymin: int | None = None, ymax: int | None = None) -> RoiOutcome:
        """Write one limit or both; raises ValueError (nothing changed) for a value out of
        range. An invalid pair is taken and waits: see the class."""
        for name, value in (("ymin", ymin), ("ymax", ymax)):
            if value is not None and (problem := roi_limit_problem(name, value)):
                raise ValueError(problem)
        with self._lock:
            written = (self._written[0] if ymin is None else ymin,
                       self._written[1] if ymax is None else ymax)
            problem = roi_pair_problem(written)
            self._written = written
            if problem is None and written != self._in_force:
                self._apply(roi_setting(written))
                self._in_force = written
            outcome = RoiOutcome(written, self._in_force, problem)
            self._show(outcome)
        return outcome


class Refused(ValueError):
    """A write the control layer did not take; the message says why. Nothing changed."""


def check_range(pv: pvs.PV, value: Any) -> None:
    """Refused if `value` is outside the limits of `pv` in the PV table (NaN too)."""
    low = -math.inf if pv.low is None else pv.low
    high = math.inf if pv.high is None else pv.high
    if not low <= value <= high:
        raise Refused(f"{pv.name} refused: {value} is outside {low:g}..{high:g}")


class View(Protocol):
    """What the control layer shows the operator (the IOC's records; a fake in tests)."""

    def show_value(self, pv: pvs.PV, value: Any, alarmed: bool = False) -> None:
        """The setting's record shows `value` (set without processing: its callbacks do not
        run again), with a MAJOR alarm if `alarmed`, else none."""

    def show_status(self, pv: pvs.PV, state: int) -> None:
        """A status record (ROI_STATUS, AXIS_STATUS, BACKGROUND_STATUS) shows `state`."""

    def show_roi_rows(self, rows: tuple[int, int]) -> None:
        """ROI_YMIN_RBV / ROI_YMAX_RBV: the rows in force."""

    def message(self, text: str, error: bool = False) -> None:
        """MESSAGE (alarmed if `error`) and one log line."""

    def show_reading(self, pv: pvs.PV, value: Any) -> None:
        """A read-only record (BACKGROUND_PROGRESS) shows `value`."""

    def show_units(self, unit: str) -> None:
        """The energy results' EGU ("eV" or "px", following the axis)."""


class Control:
    """The one place that decides the settings: the record callbacks (Channel Access and PV
    Access puts), the REST shim, autosave restore and the external-PV mirror all call it.

    Each setting has ``check_<setting>`` (refuses with `Refused`, changes nothing: softioc's
    ``validate`` calls only this) and ``set_<setting>`` (checks, puts it in force in the
    pipeline, shows the outcome: the record's value when another path wrote it, the status
    records, MESSAGE). Writes are serialised. The status records ROI_STATUS, AXIS_STATUS and
    BACKGROUND_STATUS are decided here only (`_show_statuses`): from what was written and from
    whether the pipeline found it fits the frames (`frame_fit`).
    """

    def __init__(self, pipeline: Pipeline, view: View,
                 background_dirs: Callable[[], Sequence[Path]],
                 parameters: LegacyParameters, store_dir: Path | None = None) -> None:
        self.pipeline = pipeline
        self._view = view
        self._background_dirs = background_dirs
        self._store_dir = store_dir  # where uploaded and acquired backgrounds are stored
        self.parameters = parameters
        # the energy axis: its source, the axis a client wrote, the polynomial's coefficients
        self._axis_mode = pvs.AxisMode.EXTERNAL
        self._external_axis: np.ndarray | None = None
        self._coefficients: tuple[float, float, float] = (
            float(pvs.AXIS_C0.initial), float(pvs.AXIS_C1.initial), float(pvs.AXIS_C2.initial))
        self._image_rate = float(pvs.IMAGE_RATE.initial)
        self._image_bin = int(pvs.IMAGE_BIN.initial)
        self._background_n = int(pvs.BACKGROUND_N.initial)
        self._progress_shown = -1
        pipeline.set_view(self._image_rate, self._image_bin)
        self._lock = threading.RLock()
        self.roi = RoiControl(lambda roi: self.pipeline.configure(roi=roi), self._show_roi)
        # what does not fit the frames, by kind, as the pipeline last said (`frame_fit`)
        self._misfit: dict[Mismatch, str] = {}
        self._background_refused = False  # the last background written was refused
        self._roi_waits = False  # the ROI limits written are no pair (RoiControl)

    # ------------------------------------------------------------------ reads
    @property
    def image_shape(self) -> tuple[int, int] | None:
        return self.pipeline.image_shape

    @property
    def state(self) -> State:
        return self.pipeline.state

    @property
    def fault(self) -> SourceFault | None:
        return self.pipeline.fault

    @property
    def acquiring(self) -> bool:
        """A background acquisition runs."""
        return self.pipeline.acquiring

    def statistics(self) -> Statistics:
        return self.pipeline.statistics()

    def legacy_parameters(self) -> dict[str, Any]:
        """GET /parameters: the same view as the output stream's processing_parameters."""
        return self.parameters.view(self.pipeline.settings.describe())

    # ------------------------------------------------------------------ processing
    def start(self) -> None:
        if not self.pipeline.input[0]:
            raise Refused("cannot start: no input stream address set (INPUT_STREAM is empty)")
        try:
            self.pipeline.start()
        except ValueError as e:
            raise Refused(f"cannot start: {e}") from None

    def stop(self) -> None:
        self.pipeline.stop()

    def check_input_stream(self, address: str) -> None:
        """A malformed address is refused (the stream in use stays); empty means no input."""
        if address.strip():
            try:
                parse_address(address)
            except ValueError as e:
                raise Refused(f"INPUT_STREAM refused: {e}") from None

    def set_input_stream(self, address: str) -> None:
        self.check_input_stream(address)
        with self._lock:
            self.pipeline.set_input(address, None)
            self._view.show_value(pvs.INPUT_STREAM, address)
        self._view.message(f"input stream set to {address!r}")

    @staticmethod
    def check_input_mode(mode: int) -> None:
        if mode not in {m.value for m in pvs.InputMode}:
            raise Refused(f"INPUT_MODE refused: {mode} is not one of "
                          f"{', '.join(f'{m.value} ({m.name})' for m in pvs.InputMode)}")

    def set_input_mode(self, mode: int) -> None:
        self.check_input_mode(mode)
        name = pvs.InputMode(mode).name
        with self._lock:
            self.pipeline.set_input(self.pipeline.input[0], name)
            self._view.show_value(pvs.INPUT_MODE, mode)
        self._view.message(f"input mode set to {name}")

    # ------------------------------------------------------------------ ROI
    def write_roi(self, ymin: int | None = None, ymax: int | None = None) -> RoiOutcome:
        """One limit or both, by the ROI pair rule (`RoiControl`); Refused for a limit out of
        range (nothing changed)."""
        try:
            return self.roi.write(ymin, ymax)
        except ValueError as e:
            raise Refused(f"ROI refused: {e}") from None

    def check_roi_pair(self, pair: RoiPair) -> None:
        """Both limits written at once (REST): a pair that is no ROI, or does not fit the
        frames, would never be completed by another write, so it is refused up front."""
        problem = (roi_limit_problem("ymin", pair[0]) or roi_limit_problem("ymax", pair[1])
                   or roi_pair_problem(pair))
        if problem is None and (reason := self._misfit_of(Mismatch.ROI, roi=roi_setting(pair))):
            problem = reason
        if problem:
            raise Refused(f"roi refused: {problem}")

    def _show_roi(self, outcome: RoiOutcome) -> None:
        """Records, alarms and MESSAGE for one ROI decision (called by `RoiControl` under its
        lock, so what is shown follows the order of the writes)."""
        for pv, value in zip((pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX), outcome.written,
                             strict=True):
            self._view.show_value(pv, value, alarmed=outcome.waiting)
        text = outcome.message()
        reason = self._misfit_of(Mismatch.ROI, roi=roi_setting(outcome.in_force))
        with self._lock:
            self._roi_waits = outcome.waiting
            if reason:
                self._misfit[Mismatch.ROI] = reason
                text = f"{text}; not used until it fits: {reason}"
            else:
                self._misfit.pop(Mismatch.ROI, None)
                shape = self.pipeline.image_shape  # (no frame yet: the pair as written)
                self._view.show_roi_rows(outcome.in_force if shape is None else
                                         roi_rows(roi_setting(outcome.in_force), shape[0]))
            self._show_statuses()
        self._view.message(text, error=outcome.waiting or bool(reason))

    def _misfit_of(self, kind: Mismatch, **changes: Any) -> str | None:
        """Why the settings with `changes` would not fit the last frame's shape, for `kind`."""
        shape = self.pipeline.image_shape
        if shape is None:
            return None
        return replace(self.pipeline.settings, **changes).mismatches(shape).get(kind)

    # ------------------------------------------------------------------ energy axis
    def check_axis(self, value: Any) -> np.ndarray | None:
        """The axis of a SPECTRUM_X value (None: the column index); Refused if it is no axis
        (not monotonic, not finite, ...) or does not fit the frames' width.

        Empty or all zeros means the column index: a Channel Access client cannot always
        send an empty array (pyepics sends the record's length of zeros for ``[]``), and all
        zeros is no energy axis.
        """
        axis = np.asarray(value, dtype=np.float64)
        if axis.size == 0 or not axis.any():
            return None
        shape = self.pipeline.image_shape
        if shape is not None and axis.size != shape[1]:
            raise Refused(f"SPECTRUM_X refused: {axis.size} values but the image has "
                          f"{shape[1]} columns")
        try:
            replace(self.pipeline.settings, axis=axis)
        except ValueError as e:
            raise Refused(f"SPECTRUM_X refused: {e}") from None
        return axis

    def set_axis(self, value: Any) -> None:
        """SPECTRUM_X: the external axis, in force while AXIS_MODE is External."""
        axis = self.check_axis(value)
        with self._lock:
            self._external_axis = axis
            self._view.show_value(pvs.SPECTRUM_X, axis if axis is not None else _NO_AXIS)
            if self._axis_mode == pvs.AxisMode.EXTERNAL:
                self._apply_axis(self._axis_changes(self._axis_mode, self._coefficients))
        n = 0 if axis is None else axis.size
        text = f"energy axis set ({n} values)" if n else "energy axis: column index"
        if self._axis_mode != pvs.AxisMode.EXTERNAL:
            text = (f"SPECTRUM_X stored ({n} values); not used while AXIS_MODE is "
                    f"{_AXIS_MODE_NAMES[self._axis_mode]}")
        self._view.message(text)

    @staticmethod
    def check_axis_mode(mode: int) -> None:
        if mode not in {m.value for m in pvs.AxisMode}:
            names = ", ".join(f"{m.value} ({_AXIS_MODE_NAMES[m]})" for m in pvs.AxisMode)
            raise Refused(f"AXIS_MODE refused: {mode} is not one of {names}")

    def set_axis_mode(self, mode: int) -> None:
        """AXIS_MODE: the axis from SPECTRUM_X, from the polynomial, or the column index."""
        self.check_axis_mode(mode)
        new = pvs.AxisMode(mode)
        with self._lock:
            changes = self._axis_changes(new, self._coefficients)
            self._axis_mode = new
            self._view.show_value(pvs.AXIS_MODE, int(new))
            self._apply_axis(changes)
        self._view.message(f"energy axis: {self._describe_axis()}")

    def check_axis_coefficient(self, pv: pvs.PV, value: float) -> tuple[float, float, float]:
        """The coefficients with `pv` (AXIS_C0..C2) set to `value`; Refused if, in Polynomial
        mode, the axis they make is not strictly monotonic over the image width."""
        check_range(pv, value)
        coefficients = list(self._coefficients)
        coefficients[_COEFFICIENTS.index(pv)] = float(value)
        new = (coefficients[0], coefficients[1], coefficients[2])
        if self._axis_mode == pvs.AxisMode.POLYNOMIAL:
            self._axis_changes(pvs.AxisMode.POLYNOMIAL, new)
        return new

    def set_axis_coefficient(self, pv: pvs.PV, value: float) -> None:
        with self._lock:
            new = self.check_axis_coefficient(pv, value)
            self._coefficients = new
            self._view.show_value(pv, float(value))
            if self._axis_mode == pvs.AxisMode.POLYNOMIAL:
                self._apply_axis(self._axis_changes(self._axis_mode, new))
        if self._axis_mode == pvs.AxisMode.POLYNOMIAL:
            self._view.message(f"energy axis: {self._describe_axis()}")

    def _axis_changes(self, mode: pvs.AxisMode,
                      coefficients: tuple[float, float, float]) -> dict[str, Any]:
        """The Settings fields of the axis in `mode`; Refused if a polynomial is no axis over
        the frames' width (the axis in force stays)."""
        if mode == pvs.AxisMode.EXTERNAL:
            return {"axis": self._external_axis, "axis_poly": None}
        if mode == pvs.AxisMode.COLUMN_INDEX:
            return {"axis": None, "axis_poly": None}
        changes = {"axis": None, "axis_poly": coefficients}
        try:
            settings = replace(self.pipeline.settings, **changes)
        except ValueError as e:
            raise Refused(f"axis polynomial refused: {e}") from None
        shape = self.pipeline.image_shape
        if shape is not None and (reason := settings.mismatches(shape).get(Mismatch.AXIS)):
            raise Refused(f"axis polynomial refused: {reason}; the axis in force stays")
        return changes

    def _apply_axis(self, changes: dict[str, Any]) -> None:
        self.pipeline.configure(**changes)
        self._misfit.pop(Mismatch.AXIS, None)
        self._show_statuses()
        energy = changes["axis"] is not None or changes["axis_poly"] is not None
        self._view.show_units("eV" if energy else "px")

    def _describe_axis(self) -> str:
        mode = self._axis_mode
        if mode == pvs.AxisMode.POLYNOMIAL:
            c0, c1, c2 = self._coefficients
            return f"E = {c0:g} + {c1:g} x + {c2:g} x^2 eV (x the column)"
        if mode == pvs.AxisMode.EXTERNAL and self._external_axis is not None:
            return f"SPECTRUM_X ({self._external_axis.size} values)"
        return "the column index (px)"

    # ------------------------------------------------------------------ the operator's view
    def check_image_bin(self, n: int) -> int:
        check_range(pvs.IMAGE_BIN, n)
        shape = self.pipeline.image_shape
        if shape is not None:
            problem = image_bin_problem(int(n), shape)
            if problem:
                raise Refused(f"IMAGE_BIN refused: {problem}")
        return int(n)

    def set_image_bin(self, n: int) -> None:
        n = self.check_image_bin(n)
        with self._lock:
            self._image_bin = n
            self.pipeline.set_view(self._image_rate, n)
            self._view.show_value(pvs.IMAGE_BIN, n)

    def check_image_rate(self, hz: float) -> float:
        check_range(pvs.IMAGE_RATE, hz)
        return float(hz)

    def set_image_rate(self, hz: float) -> None:
        hz = self.check_image_rate(hz)
        with self._lock:
            self._image_rate = hz
            self.pipeline.set_view(hz, self._image_bin)
            self._view.show_value(pvs.IMAGE_RATE, hz)

    def check_saturation_level(self, level: int) -> int:
        """0: the top of the frames' pixel type; above it no pixel could reach the level."""
        check_range(pvs.SATURATION_LEVEL, level)
        dtype = self.pipeline.image_dtype
        if level and dtype is not None and dtype.kind in "iu" and level > np.iinfo(dtype).max:
            raise Refused(f"SATURATION_LEVEL refused: {level} is above the largest {dtype} "
                          f"pixel value {np.iinfo(dtype).max}: no pixel could reach it "
                          "(0: the largest value)")
        return int(level)

    def set_saturation_level(self, level: int) -> None:
        level = self.check_saturation_level(level)
        with self._lock:
            self.pipeline.configure(saturation_level=level or None)
            self._view.show_value(pvs.SATURATION_LEVEL, level)

    def suggest_roi(self) -> None:
        """ROI_SUGGEST: the ROI around the band of the row profile, averaged over the last
        AVG_N views, through the same rule as a put."""
        from psss_ioc.core.view import suggest_roi

        profiles = self.pipeline.recent_profiles()
        if not profiles:
            raise Refused("ROI_SUGGEST: no row profile yet: it needs frames processed with the "
                          "view on (IMAGE_RATE above 0); the ROI is unchanged")
        mean = np.mean(np.stack(profiles), axis=0)
        try:
            suggestion = suggest_roi(mean)
        except ValueError as e:
            raise Refused(f"ROI_SUGGEST: {e}; the ROI is unchanged") from None
        outcome = self.write_roi(*suggestion.rows)
        if not outcome.waiting:
            self._view.message(f"ROI_SUGGEST: {suggestion.text} (the mean of {len(profiles)} "
                               "row profiles)")

    # ------------------------------------------------------------------ background from the camera
    def set_background_n(self, n: int) -> None:
        check_range(pvs.BACKGROUND_N, n)
        with self._lock:
            self._background_n = int(n)
            self._view.show_value(pvs.BACKGROUND_N, int(n))

    def acquire_background(self) -> None:
        """BACKGROUND_ACQUIRE: start averaging the next BACKGROUND_N frames, or cancel the
        acquisition running."""
        if not self.cancel_background_acquisition("cancelled (BACKGROUND_ACQUIRE pressed "
                                                  "again)"):
            self.start_background_acquisition()

    def start_background_acquisition(self, n: int | None = None) -> None:
        if n is not None:
            self.set_background_n(n)
        try:
            acquisition = BackgroundAcquisition(self._background_n)
            self.pipeline.acquire_background(acquisition, _Acquiring(self))
        except ValueError as e:
            raise Refused(f"background acquisition refused: {e}") from None
        self._progress_shown = -1
        self._view.show_reading(pvs.BACKGROUND_PROGRESS, 0.0)
        self._view.message(f"averaging the next {self._background_n} frames into a background "
                           "(the beam should be off); BACKGROUND_ACQUIRE again cancels")

    def cancel_background_acquisition(self, reason: str = "cancelled") -> bool:
        return self.pipeline.cancel_acquisition(reason)

    def _acquisition_progress(self, percent: float) -> None:
        if int(percent) != self._progress_shown:
            self._progress_shown = int(percent)
            self._view.show_reading(pvs.BACKGROUND_PROGRESS, float(int(percent)))

    def _acquisition_done(self, image: np.ndarray) -> None:
        """Store and load the background (in a thread of its own: the worker goes on)."""
        def store() -> None:
            try:
                if self._store_dir is None:
                    raise Refused("no background directory to store it in")
                path = background.write_background(self._store_dir, "acquired_background",
                                                   image)
                self.set_background(str(path))
            except Exception as e:  # (a refusal was shown by set_background)
                if not isinstance(e, Refused):
                    log.error("storing the acquired background failed", exc_info=True)
                    self._view.message(f"background acquisition: storing it failed: {e}",
                                       error=True)
                self._view.show_reading(pvs.BACKGROUND_PROGRESS, 0.0)
                return
            self._view.show_reading(pvs.BACKGROUND_PROGRESS, 100.0)
            self._view.message(f"background acquired: {self._background_n} frames averaged "
                               f"into {path}")

        threading.Thread(target=store, name="psss-background-store", daemon=True).start()

    def _acquisition_aborted(self, reason: str) -> None:
        self._view.show_reading(pvs.BACKGROUND_PROGRESS, 0.0)
        kept = self.pipeline.settings.background_name
        self._view.message(f"background acquisition ended: {reason}; keeping "
                           f"{kept or 'no background'}", error=True)

    # ------------------------------------------------------------------ background
    def set_background(self, path: str, *, restoring: bool = False,
                       requester_told: bool = False) -> None:
        """Load a background file (or with "" clear it) and put it in force; Refused (the
        previous one stays) with the reason. The file is read once, here.

        A refusal is shown (BACKGROUND_STATUS Error, MESSAGE): a put's writer may never look
        at its completion status. Not when `requester_told` (REST: the reply says why, and
        the background in force did not change). A refused name is put back to the one in
        force in BACKGROUND_FILE, unless `restoring` (start-up): then the record keeps the
        saved name, so a file only missing for now (a share not mounted yet) is not
        forgotten by the next autosave.
        """
        path = path.strip()
        if not path:
            with self._lock:
                self.pipeline.configure(background=None, background_name="")
                self._view.show_value(pvs.BACKGROUND_FILE, "")
                self._background_refused = False
                self._misfit.pop(Mismatch.BACKGROUND, None)
                self._show_statuses()
            self._view.message("background cleared")
            return
        try:
            image = background.load(path, shape=self.pipeline.image_shape,
                                    allowed=self._background_dirs())
            with self._lock:
                self.pipeline.configure(background=image, background_name=path)
                self._view.show_value(pvs.BACKGROUND_FILE, path)
                self._background_refused = False
                self._misfit.pop(Mismatch.BACKGROUND, None)
                self._show_statuses()
        except Exception as e:  # refused (BackgroundError, Settings: ValueError) or a bug
            if not isinstance(e, ValueError):
                log.error("loading the background %s failed", path, exc_info=True)
            if requester_told:
                raise Refused(f"background refused: {e}") from None
            with self._lock:
                self._background_refused = True
                kept = self.pipeline.settings.background_name
                if not restoring:  # a refused name must not be autosaved over the good one
                    self._view.show_value(pvs.BACKGROUND_FILE, kept)
                self._show_statuses()
            reason = f"background refused: {e}; keeping {kept or 'none'}"
            self._view.message(reason, error=True)
            raise Refused(f"background refused: {e}") from None
        self._view.message(f"background loaded from {path} "
                           f"({image.shape[0]} x {image.shape[1]})")

    def upload_background(self, directory: Path, original: str, data: Any) -> Path:
        """An uploaded image (legacy rows or a decoded array): checked, stored under a new
        name in `directory` with the name it came under, loaded; older uploads pruned."""
        image = background.background_array(data, self.pipeline.image_shape)
        path = background.write_background(directory, original, image)
        try:
            self.set_background(str(path), requester_told=True)
        finally:
            background.prune_uploads(directory, self.pipeline.settings.background_name)
        return path

    # ------------------------------------------------------------------ scalars
    @staticmethod
    def check_average_n(n: Any) -> int:
        check_range(pvs.AVG_N, n)
        try:
            return Pipeline.checked_average_n(n)
        except ValueError as e:
            raise Refused(f"AVG_N refused: {e}") from None

    def set_average_n(self, n: Any) -> None:
        n = self.check_average_n(n)
        with self._lock:
            self.pipeline.set_average_n(n)
            self._view.show_value(pvs.AVG_N, n)

    def check_fit_enabled(self, enabled: Any) -> bool:
        return bool(self._checked("FIT_ENABLE", fit_enabled=bool(enabled)).fit_enabled)

    def set_fit_enabled(self, enabled: Any) -> None:
        value = self.check_fit_enabled(enabled)
        with self._lock:
            self.pipeline.configure(fit_enabled=value)
            self._view.show_value(pvs.FIT_ENABLE, int(value))

    def check_min_snr(self, snr: Any) -> float:
        check_range(pvs.FIT_MIN_SNR, snr)
        return self._checked("FIT_MIN_SNR", min_snr=float(snr)).min_snr

    def set_min_snr(self, snr: Any) -> None:
        value = self.check_min_snr(snr)
        with self._lock:
            self.pipeline.configure(min_snr=value)
            self._view.show_value(pvs.FIT_MIN_SNR, value)

    def _checked(self, name: str, **changes: Any) -> Settings:
        try:
            return replace(self.pipeline.settings, **changes)
        except ValueError as e:
            raise Refused(f"{name} refused: {e}") from None

    @staticmethod
    def check_extra(text: str) -> None:
        try:
            parse_extra(str(text))
        except ValueError as e:
            raise Refused(f"{pvs.PARAMETERS_EXTRA.name} refused: {e}") from None

    def set_extra(self, text: str) -> None:
        self.check_extra(text)
        with self._lock:
            self._view.show_value(pvs.PARAMETERS_EXTRA, text)

    # ------------------------------------------------------------------ frames
    def frame_fit(self, kind: Mismatch, reason: str | None) -> None:
        """The pipeline found the setting of `kind` does not fit the frames (`reason`), or
        fits them again (None): the status records follow."""
        with self._lock:
            if reason is None:
                self._misfit.pop(kind, None)
            else:
                self._misfit[kind] = reason
            self._show_statuses()

    def _show_statuses(self) -> None:
        """The one place ROI_STATUS, AXIS_STATUS and BACKGROUND_STATUS are decided. A ROI pair
        that waits wins over whether the pair in force fits the frames."""
        misfit = self._misfit
        roi = (SettingState.PAIR_INVALID if self._roi_waits
               else SettingState.INVALID if Mismatch.ROI in misfit else SettingState.OK)
        axis = SettingState.INVALID if Mismatch.AXIS in misfit else SettingState.OK
        if self._background_refused or Mismatch.BACKGROUND in misfit:
            bg = BackgroundState.ERROR
        else:
            loaded = self.pipeline.settings.background is not None
            bg = BackgroundState.LOADED if loaded else BackgroundState.NONE
        self._view.show_status(pvs.ROI_STATUS, int(roi))
        self._view.show_status(pvs.AXIS_STATUS, int(axis))
        self._view.show_status(pvs.BACKGROUND_STATUS, int(bg))


_NO_AXIS = np.zeros(0)
_COEFFICIENTS = (pvs.AXIS_C0, pvs.AXIS_C1, pvs.AXIS_C2)
_AXIS_MODE_NAMES = {mode: label for mode, (label, _) in zip(pvs.AxisMode, pvs.AXIS_MODE.options,
                                                             strict=True)}


def image_bin_problem(image_bin: int, shape: tuple[int, int]) -> str | None:
    """Why frames of `shape` cannot be shown binned `image_bin` x `image_bin`, or None."""
    height, width = shape
    if image_bin > min(height, width):
        side = "rows" if height < width else "columns"
        return f"{image_bin} is more than the image's {min(height, width)} {side}"
    pixels = (height // image_bin) * (width // image_bin)
    if pixels > pvs.IMAGE_MAX_PIXELS:
        least = next(b for b in range(image_bin, 65) if
                     (height // b) * (width // b) <= pvs.IMAGE_MAX_PIXELS)
        return (f"{image_bin} gives {height // image_bin} x {width // image_bin} = {pixels} "
                f"pixels, more than IMAGE holds ({pvs.IMAGE_MAX_PIXELS}): {least} or more")
    return None


class _Acquiring:
    """A background acquisition's events, into the control layer."""

    def __init__(self, control: Control) -> None:
        self._control = control

    def progress(self, percent: float) -> None:
        self._control._acquisition_progress(percent)

    def done(self, background: np.ndarray) -> None:
        self._control._acquisition_done(background)

    def aborted(self, reason: str) -> None:
        self._control._acquisition_aborted(reason)
