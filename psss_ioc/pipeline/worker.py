"""The processing loop: one worker thread doing receive -> process -> send -> publish.

`Pipeline` knows nothing of EPICS: it talks to the IOC through the small `Publisher`
interface and gets its frames from any `FrameSource` (the bsread `stream.CameraSource` in the
IOC, a fake in the tests). Settings are one immutable `processing.Settings` object swapped
atomically; a frame is always processed with one consistent set.

Bad input policy: a setting that does not fit the frames (ROI beyond the image height,
background of another shape, axis of another length) is rejected *at the first frame that
shows it*: the last good value stays in force and the publisher is told which setting and why.
The requested value is kept: when the frames fit it again (the camera is back to its size), it
is in force again by itself and the publisher is told so.
An unexpected exception is logged with its traceback, shown as state ERROR with the reason for
a few seconds, counted, and the loop goes on with the next frame.
Input that arrives but gives no spectrum for a reason the operator has to fix (messages without
the image channel, images that are 1-D or of a type process() cannot take) is shown as state
NO_IMAGE_CHANNEL or BAD_IMAGE with the reason and the fix in MESSAGE (`SourceFault`), once no
good frame came for `wait_timeout`; the state clears by itself with the next good frame.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from psss_ioc.core.processing import (
    SETTING_MISMATCHES,
    AveragedResult,
    FrameMismatchError,
    Mismatch,
    Resolution,
    Result,
    RunningAverage,
    Settings,
    polynomial_text,
    process,
    resolve_for_frame,
    roi_rows,
)
from psss_ioc.core.view import View, frame_view
from psss_ioc.pipeline.acquire import AcquisitionAborted, BackgroundAcquisition
from psss_ioc.pipeline.source import (
    BAD_IMAGE,
    FAULT_STATES,
    MISSING_CHANNEL,
    FrameLike,
    FrameSource,
    PartialImage,
    SourceFactory,
    SourceFault,
)
from psss_ioc.pipeline.state import State
from psss_ioc.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

_NUMBERS = re.compile(r"\d+")

# The largest pulse id gap counted as lost frames: a day at SwissFEL's 100 Hz. A larger jump
# (or one backwards) is a camera restart or a corrupt message, not lost frames.
MAX_PULSE_GAP = 100 * 86_400

class ResultSink(Protocol):
    def send(self, frame: Any, result: Result, parameters: dict[str, Any]) -> bool: ...


class Publisher(Protocol):
    """What the pipeline tells the outside world (the IOC's records, or a test)."""

    def publish_result(
        self, frame: FrameLike, result: Result, average: AveragedResult | None
    ) -> None: ...

    def publish_state(self, state: State, message: str) -> None: ...

    def publish_statistics(self, stats: Statistics) -> None: ...

    def publish_image_shape(self, height: int, width: int) -> None: ...

    def publish_rejected(self, kind: str, message: str, in_force: Settings) -> None:
        """A requested setting does not fit the frames; `in_force` is what is used instead."""
        ...

    def publish_accepted(self, kind: str, message: str, in_force: Settings) -> None:
        """A requested setting refused before (`publish_rejected`) fits the frames again."""
        ...

    def publish_message(self, message: str, error: bool) -> None: ...

    def publish_view(self, frame: FrameLike, view: View, rows: tuple[int, int]) -> None:
        """The operator's view of a frame (profile, binned image), `rows` the ROI in force;
        at most `Pipeline.set_view`'s rate."""
        ...


class AcquisitionEvents(Protocol):
    """What a background acquisition tells (`Pipeline.acquire_background`); called from the
    worker thread."""

    def progress(self, percent: float) -> None: ...

    def done(self, background: np.ndarray) -> None: ...

    def aborted(self, reason: str) -> None: ...


class NullPublisher:
    """A publisher that drops everything (for benchmarks and a bare pipeline)."""

    def publish_result(self, frame: Any, result: Any, average: Any) -> None:
        pass

    def publish_state(self, state: State, message: str) -> None:
        pass

    def publish_statistics(self, stats: Statistics) -> None:
        pass

    def publish_image_shape(self, height: int, width: int) -> None:
        pass

    def publish_rejected(self, kind: str, message: str, in_force: Settings) -> None:
        pass

    def publish_accepted(self, kind: str, message: str, in_force: Settings) -> None:
        pass

    def publish_message(self, message: str, error: bool) -> None:
        pass

    def publish_view(self, frame: Any, view: Any, rows: Any) -> None:
        pass


@dataclass(frozen=True)
class Statistics:
    state: State
    n_received: int
    n_processed: int
    n_lost: int
    n_errors: int
    n_out_dropped: int
    n_sent: int
    rate_hz: float
    proc_time_ms: float
    last_pulse_id: int | None
    processing_start_time: float | None
    last_sent_time: float | None
    errors_by_kind: dict[str, int] = field(default_factory=dict)




def _is_set(settings: Settings, kind: Mismatch) -> bool:
    """Whether the operator set the setting of `kind` (not the default)."""
    return any(value is not None and not (isinstance(value, str) and not value)
               for value in (getattr(settings, f) for f in kind.fields))


def _requested_text(kind: Mismatch, settings: Settings) -> str:
    if kind == Mismatch.ROI and settings.roi is not None:
        ymin, ymax = settings.roi
        return f"ROI rows [{ymin}, {ymax})" if ymax else f"ROI rows from {ymin}"
    if kind == Mismatch.BACKGROUND:
        return f"background {settings.background_name or '(uploaded)'}"
    if kind == Mismatch.AXIS and settings.axis is not None:
        return f"energy axis of {settings.axis.shape[0]} values"
    if kind == Mismatch.AXIS and settings.axis_poly is not None:
        return f"energy axis {polynomial_text(settings.axis_poly)}"
    return str(kind)


def _in_force_text(kind: Mismatch, settings: Settings, shape: tuple[int, ...]) -> str:
    """What is used instead of a refused setting of `kind`."""
    if kind == Mismatch.ROI:
        ymin, ymax = roi_rows(settings.roi, shape[0])
        return f"using rows [{ymin}, {ymax})"
    if kind == Mismatch.BACKGROUND:
        if settings.background is None:
            return "using no background"
        return f"keeping background {settings.background_name or '(uploaded)'}"
    if settings.axis is None and settings.axis_poly is None:
        return "using the column index as axis"
    return "keeping the previous energy axis"


def _image_problem(image: Any, max_width: int | None = None) -> tuple[str, str] | None:
    """Why no spectrum can be made of `image` (an array or a `PartialImage`) whatever the
    settings, as (reason, detail for the log), or None. The dtype is process()'s to judge."""
    if not isinstance(image, np.ndarray) and not hasattr(image, "rows"):
        return f"the image is a {type(image).__name__}, not an array", ""
    if image.ndim != 2:
        # the shape goes to the log only: MESSAGE changes when the reason does, not per frame
        return f"the image is {image.ndim}-D, not 2-D", f"shape {image.shape}"
    if 0 in image.shape:
        return "the image is empty", f"shape {image.shape}"
    if max_width is not None and image.shape[1] > max_width:
        return (f"the image is {image.shape[1]} columns wide, more than the {max_width} the "
                "spectrum records hold", f"shape {image.shape}")
    return None


def _same_fault(a: SourceFault | None, b: SourceFault | None) -> bool:
    """Whether `a` and `b` tell the operator the same (their times do not matter)."""
    return a is not None and b is not None and (
        (a.kind, a.channel, a.channels_seen, a.reason)
        == (b.kind, b.channel, b.channels_seen, b.reason)
    )


def _fault_text(fault: SourceFault, address: str) -> str:
    """MESSAGE for a fault: what is wrong and how to fix it."""
    if fault.kind != MISSING_CHANNEL:
        return f"Image not usable: {fault.reason}; frames from {address} are skipped"
    if fault.channels_seen:
        seen = f"image-like channels in it: {', '.join(fault.channels_seen)}"
    else:
        seen = f"none of its {fault.n_channels} channels looks like a camera image"
    option = "--image-channel " + (fault.channels_seen[0] if len(fault.channels_seen) == 1
                                   else "CHANNEL")
    return (f"No image channel: the stream {address} has no channel {fault.channel!r}; {seen}. "
            f"Is the IOC prefix the camera's? Else run the IOC with {option} "
            f"(psss_processing: --image_channel)")


class Pipeline:
    """Receive, process, send and publish frames in one worker thread.

    Args:
        source_factory: ``(address, mode) -> FrameSource``; called in the worker thread.
        publisher: receives results, state, statistics and notices.
        sender: the output stream (``send`` must never block), or None.
        wait_timeout: seconds without a frame before the state becomes "Waiting for stream".
        error_hold: seconds an unexpected error keeps the state at ERROR.
        stats_period: seconds between statistics updates.
        source_counters: the source's error counters by kind (for the statistics); default:
            the source's own ``errors()``, if it has one.
        source_fault: what the source saw in messages it made no frame of (see `SourceFault`),
            or None; asked while no good frame arrives; default: the source's ``fault()``.
        max_width: the widest image whose spectrum the publisher can show (the records'
            length); wider frames are refused as unusable images. None: no limit.
    """

    def __init__(
        self,
        source_factory: SourceFactory,
        publisher: Publisher | None = None,
        sender: ResultSink | None = None,
        settings: Settings | None = None,
        average_n: int = 10,
        wait_timeout: float = 2.0,
        error_hold: float = 3.0,
        stats_period: float = 0.5,
        source_counters: Callable[[FrameSource], dict[str, int]] | None = None,
        source_fault: Callable[[FrameSource], SourceFault | None] | None = None,
        max_width: int | None = None,
    ) -> None:
        self._factory = source_factory
        self.publisher: Publisher = publisher or NullPublisher()
        self._sender = sender
        self._requested = settings if settings is not None else Settings()
        self._in_force = self._requested
        self._lock = threading.Lock()
        self._average_n = self.checked_average_n(average_n)
        self._average: RunningAverage | None = None
        self._average_settings: Settings | None = None
        self.wait_timeout = wait_timeout
        self.error_hold = error_hold
        self.stats_period = stats_period
        self._source_counters = source_counters
        self._source_fault = source_fault
        self.max_width = max_width
        self._input: tuple[str, str] = ("", "PULL")
        self._input_changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = State.STOPPED
        self._log = RateLimitedLog(log)
        self._image_shape: tuple[int, int] | None = None
        self._parameters_cache: tuple[Settings, dict[str, Any]] | None = None
        self._noticed = False
        # (requested, image shape, settings used) of the last `_settings_for`
        self._resolved: tuple[Settings, tuple[int, ...], Settings] | None = None
        self._refused: dict[str, str] = {}  # kind -> the refusal last published
        # the operator's view: a pass over the whole frame at most `_view_period` apart
        self._view_period: float | None = 0.5
        self._view_bin = 8
        self._next_view = 0.0
        self._profiles: deque[np.ndarray] = deque(maxlen=average_n)
        self._profiles_background: np.ndarray | None = None  # the profiles' background
        self._acquisition: tuple[BackgroundAcquisition, AcquisitionEvents] | None = None
        self._image_dtype: np.dtype | None = None
        self._reset_counters()

    # ------------------------------------------------------------------ control API
    @property
    def state(self) -> State:
        return self._state

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def settings(self) -> Settings:
        """The settings requested (what the next frame will be processed with)."""
        return self._requested

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(height, width) of the last frame, None before the first frame."""
        return self._image_shape

    @property
    def fault(self) -> SourceFault | None:
        """Why the state is NO_IMAGE_CHANNEL or BAD_IMAGE; None in any other state."""
        fault = self._fault
        return fault if fault is not None and self._state == FAULT_STATES[fault.kind] else None

    @property
    def input(self) -> tuple[str, str]:
        return self._input

    @property
    def average_n(self) -> int:
        return self._average_n

    def configure(self, **changes: Any) -> Settings:
        """Replace some fields of the settings; raises ValueError (nothing applied) if invalid.

        The new settings are built completely (and validated by `Settings`) before one
        reference swap makes them current.
        """
        with self._lock:
            new = dataclasses.replace(self._requested, **changes)
            self._requested = new
        return new

    def set_average_n(self, n: int) -> None:
        self._average_n = self.checked_average_n(n)
        self._average_settings = None  # the worker starts a new average
        self._profiles = deque(self._profiles, maxlen=self._average_n)

    @property
    def image_dtype(self) -> np.dtype | None:
        """The pixel type of the last frame, None before the first frame."""
        return self._image_dtype

    def set_view(self, rate_hz: float, image_bin: int) -> None:
        """The operator's view (row profile and binned image): `rate_hz` passes a second at
        most (0: none), binned `image_bin` x `image_bin`."""
        if not 0 <= rate_hz <= 1000 or image_bin < 1:
            raise ValueError(f"view rate {rate_hz} Hz / bin {image_bin} out of range")
        self._view_period = 1.0 / rate_hz if rate_hz > 0 else None
        self._view_bin = int(image_bin)
        self._next_view = 0.0

    def recent_profiles(self) -> list[np.ndarray]:
        """The row profiles of the last AVG_N views, oldest first, of the current frame size
        and background (a change clears them)."""
        return list(self._profiles)

    @property
    def acquiring(self) -> bool:
        return self._acquisition is not None

    def acquire_background(self, acquisition: BackgroundAcquisition,
                           events: AcquisitionEvents) -> None:
        """Feed the next raw frames to `acquisition` until it is done (`events.done`), the
        frame size changes or processing stops (`events.aborted`). ValueError if one runs
        already or processing is not running."""
        if not self.running:
            raise ValueError("processing is not running: a background is averaged from the "
                             "next frames of the camera (START first)")
        if self._acquisition is not None:
            raise ValueError("a background acquisition is running already")
        self._acquisition = (acquisition, events)

    def cancel_acquisition(self, reason: str) -> bool:
        """End a running acquisition (`events.aborted(reason)`); False if none ran."""
        running, self._acquisition = self._acquisition, None
        if running is None:
            return False
        running[1].aborted(reason)
        return True

    def set_input(self, address: str, mode: str | None = None) -> None:
        """Change the input stream; a running pipeline reconnects."""
        mode = (mode or self._input[1]).upper()
        if mode not in ("PULL", "SUB"):
            raise ValueError(f"input mode must be PULL or SUB, not {mode!r}")
        self._input = (address.strip(), mode)
        self._input_changed.set()

    def start(self) -> None:
        """Start processing; harmless when already running. Raises ValueError without input."""
        if self.running:
            return
        if not self._input[0]:
            raise ValueError("no input stream address set (INPUT_STREAM is empty)")
        self._stop.clear()
        self._input_changed.clear()
        self._reset_counters()
        self._processing_start_time = time.time()
        self._set_state(State.WAITING, f"connecting to {self._input[0]} ({self._input[1]})")
        self._thread = threading.Thread(target=self._run, name="psss-pipeline", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop processing and wait until the worker has finished; harmless when stopped."""
        thread = self._thread
        self._stop.set()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("processing thread did not stop within %.1f s", timeout)
                return
        self._thread = None
        self.cancel_acquisition("processing stopped")
        if self._state != State.STOPPED:
            self._set_state(State.STOPPED, "processing stopped")
            self.publisher.publish_statistics(self.statistics())

    def statistics(self) -> Statistics:
        return Statistics(
            state=self._state,
            n_received=self._n_received,
            n_processed=self._n_processed,
            n_lost=self._n_lost + self._n_skipped,
            n_errors=sum(self._errors.values()) + sum(self._source_errors.values()),
            n_out_dropped=self._n_out_dropped,
            n_sent=self._n_sent,
            rate_hz=self._rate,
            proc_time_ms=self._proc_time_ms,
            last_pulse_id=self._last_pulse_id,
            processing_start_time=self._processing_start_time,
            last_sent_time=self._last_sent_time,
            errors_by_kind={**self._source_errors, **self._errors},
        )

    # ------------------------------------------------------------------ internals
    @staticmethod
    def checked_average_n(n: int) -> int:
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"running average length must be a positive integer, not {n!r}")
        return int(n)

    def _reset_counters(self) -> None:
        self._n_received = 0
        self._n_processed = 0
        self._n_lost = 0
        self._n_skipped = 0
        self._n_out_dropped = 0
        self._n_sent = 0
        self._errors: dict[str, int] = {}
        self._source_errors: dict[str, int] = {}
        self._rate = 0.0
        self._proc_time_ms = 0.0
        self._last_pulse_id: int | None = None
        self._processing_start_time: float | None = None
        self._last_sent_time: float | None = None
        self._last_frame_time: float | None = None
        self._last_good_time: float | None = None  # of the last frame processed
        self._last_error_time: float = -1e9
        self._fault: SourceFault | None = None  # the last one shown (state or notice)
        self._rate_mark = (time.monotonic(), 0)
        self._next_stats = 0.0

    def _set_state(self, state: State, message: str = "", error: bool = False) -> None:
        changed = state != self._state
        self._state = state
        if changed and state not in FAULT_STATES.values():
            self._fault = None  # the same fault coming back is news again
        if changed or message:
            self.publisher.publish_state(state, message)
            if message:
                log.log(logging.ERROR if error else logging.INFO, "%s", message)

    def _count_error(self, kind: str) -> None:
        self._errors[kind] = self._errors.get(kind, 0) + 1

    def _unexpected(self, where: str, exc: BaseException) -> None:
        """An exception nobody expected: log with traceback, show, count, go on."""
        self._count_error("unexpected")
        self._last_error_time = time.monotonic()
        message = f"unexpected error while {where}: {type(exc).__name__}: {exc}"
        # one rate-limit key per place, not per frame: "processing frame 123" and "... 124" are
        # the same kind (a key per pulse id logged every frame and grew the key dict forever)
        key = "unexpected:" + _NUMBERS.sub("N", where)
        self._log(key, logging.ERROR, message, exc_info=True)
        self._set_state(State.ERROR, message, error=True)

    def _run(self) -> None:
        source: FrameSource | None = None
        try:
            while not self._stop.is_set():
                if source is None or self._input_changed.is_set():
                    self._input_changed.clear()
                    self._close(source)
                    source = self._open()
                    if source is None:
                        self._stop.wait(1.0)
                        continue
                try:
                    frame = source.receive()
                except Exception as e:
                    self._unexpected("receiving a frame", e)
                    self._stop.wait(0.1)
                    continue
                try:  # no input may end this loop: only stop() does
                    if frame is None:
                        self._idle(source)
                    else:
                        self._handle(frame)
                    self._maybe_publish_statistics(source)
                except Exception as e:
                    self._unexpected("handling the input", e)
        except BaseException as e:  # pragma: no cover - last resort, must never be silent
            log.critical("processing thread died", exc_info=True)
            self._set_state(State.ERROR, f"processing thread died: {e!r}", error=True)
            raise
        finally:
            self._close(source)
        self._maybe_publish_statistics(source, force=True)

    def _open(self) -> FrameSource | None:
        address, mode = self._input
        try:
            source = self._factory(address, mode)
        except Exception as e:
            self._count_error("connect")
            self._last_error_time = time.monotonic()
            # a malformed address (ValueError) is the operator's, not a bug: no traceback
            self._log("connect", logging.ERROR, f"cannot open {address}: {e}",
                      exc_info=not isinstance(e, ValueError))
            self._set_state(State.ERROR, f"cannot open input stream {address}: {e}", error=True)
            return None
        self._last_frame_time = None
        self._last_good_time = None
        self._set_state(State.WAITING, f"waiting for stream {address} ({mode})")
        return source

    @staticmethod
    def _close(source: FrameSource | None) -> None:
        if source is None:
            return
        try:
            source.close()
        except Exception:
            log.exception("closing the input stream failed")

    def _idle(self, source: FrameSource) -> None:
        now = time.monotonic()
        if self._state == State.ERROR and now - self._last_error_time < self.error_hold:
            return
        if self._check_source_fault(source, now):
            return
        last = self._last_frame_time
        if self._state != State.WAITING and (last is None or now - last >= self.wait_timeout):
            self._set_state(
                State.WAITING,
                f"waiting for stream {self._input[0]}: no frame for {self.wait_timeout:g} s",
            )

    def _check_source_fault(self, source: FrameSource | None, now: float) -> bool:
        """Show what the source saw in the messages it made no frame of, while it lasts;
        True if that is the state now."""
        if source is None:
            return False
        ask = self._source_fault or getattr(source, "fault", None)
        if ask is None:
            return False
        try:
            fault = ask(source) if self._source_fault else ask()
        except Exception:
            self._log("source_fault", logging.ERROR, "reading the input stream's faults failed",
                      exc_info=True)
            return False
        if fault is None or now - fault.time >= self.wait_timeout:
            return False  # none, or messages stopped coming: "Waiting for stream" says so
        if self._last_good_time is not None and fault.time <= self._last_good_time:
            return False  # from before the last good frame
        return self._show_fault(fault, now)

    def _show_fault(self, fault: SourceFault, now: float) -> bool:
        """Make `fault` the state (alarmed, the reason in MESSAGE) unless good frames came
        within `wait_timeout`: then it is one notice. True if it is the state.

        MESSAGE is written when the state is entered or what it names changes (other channels
        seen, another reason), never per message.
        """
        if self._state == State.ERROR and now - self._last_error_time < self.error_hold:
            return True  # an unexpected error stays shown for error_hold first
        good = self._last_good_time
        if good is not None and now - good < self.wait_timeout:
            if not _same_fault(fault, self._fault):
                self._fault = fault
                self.publisher.publish_message(_fault_text(fault, self._input[0]), error=True)
            return False
        state = FAULT_STATES[fault.kind]
        if self._state != state or not _same_fault(fault, self._fault):
            self._fault = fault
            self._set_state(state, _fault_text(fault, self._input[0]), error=True)
        else:
            self._fault = fault  # the same fault, seen later
        return True

    def _bad_frame(self, frame: FrameLike, reason: str, detail: str) -> None:
        """A frame no spectrum can be made of: counted, logged (rate-limited) and shown."""
        self._count_error("bad_image")
        self._n_skipped += 1
        self._log("bad_image", logging.WARNING,
                  f"frame {frame.pulse_id}: {reason} ({detail}); skipped")
        now = time.monotonic()
        self._show_fault(SourceFault(BAD_IMAGE, now, reason=reason), now)

    def _handle(self, frame: FrameLike) -> None:
        t0 = time.perf_counter()
        self._n_received += 1
        self._noticed = False  # set when this frame published a notice (shape change, reject)
        self._last_frame_time = time.monotonic()
        try:
            self._count_pulse(frame.pulse_id)
            # a compressed frame's image is decoded on request: only the rows processed
            lazy: PartialImage | None = getattr(frame, "lazy_image", None)
            image = frame.image if lazy is None else lazy
            problem = _image_problem(image, self.max_width)
            if problem is not None:
                self._bad_frame(frame, *problem)
                return
            self._note_shape(image.shape, image.dtype)
            if self._acquisition is not None:
                self._feed_acquisition(frame)
            try:
                result = self._process(image)
            except FrameMismatchError as e:
                if e.kind != "image":  # (the settings' kinds are resolved in _settings_for)
                    raise
                # what process() cannot take (a dtype it has no kernel for, 64-bit pixels
                # whose sum would overflow): the same
                self._bad_frame(frame, f"{image.dtype} image: {e}", "")
                return
            if result is None:
                self._n_skipped += 1
                return
            self._last_good_time = time.monotonic()
            settings = self._in_force
            average = self._add_to_average(result, settings)
            if self._sender is not None:
                if self._sender.send(frame, result, self._parameters(settings)):
                    self._n_sent += 1
                    self._last_sent_time = time.time()
                else:
                    self._n_out_dropped += 1
            else:  # no output stream: the records are the output (last_sent_time for REST)
                self._last_sent_time = time.time()
            self._n_processed += 1
            self._proc_time_ms = (time.perf_counter() - t0) * 1e3
            self.publisher.publish_result(frame, result, average)
            if self._view_period is not None and time.monotonic() >= self._next_view:
                self._view(frame, settings, result.roi)
            if self._state != State.PROCESSING and not (
                self._state == State.ERROR
                and time.monotonic() - self._last_error_time < self.error_hold
            ):
                # a notice this frame published (image size changed, setting refused) stays
                # in MESSAGE: the state change alone shows that processing goes on
                self._set_state(State.PROCESSING,
                                "" if self._noticed else f"processing {self._input[0]}")
        except Exception as e:
            self._unexpected(f"processing frame {getattr(frame, 'pulse_id', '?')}", e)

    def _count_pulse(self, pulse_id: int) -> None:
        """Frames lost: the gaps in the pulse id sequence. A jump no real gap explains
        (backwards, or more than MAX_PULSE_GAP) is a corrupt or restarted source: counted as
        such, not as lost frames, and the sequence goes on from the new id."""
        last = self._last_pulse_id
        self._last_pulse_id = pulse_id
        if last is None or pulse_id == last + 1:
            return
        gap = pulse_id - last - 1
        if 0 < gap <= MAX_PULSE_GAP:
            self._n_lost += gap
        elif gap != -1:  # (the same pulse id again is a duplicate, not a jump)
            self._count_error("pulse_id_jump")
            self._log("pulse_id_jump", logging.WARNING,
                      f"pulse id jumped from {last} to {pulse_id}: not counted as lost frames")

    def _feed_acquisition(self, frame: FrameLike) -> None:
        """One raw frame (the whole image, decoded) into the running acquisition."""
        running = self._acquisition
        if running is None:
            return
        acquisition, events = running
        try:
            percent = acquisition.add(frame.image)
        except AcquisitionAborted as e:
            self.cancel_acquisition(str(e))
            return
        if acquisition.done:
            self._acquisition = None
            events.done(acquisition.result())
        else:
            events.progress(percent)

    def _view(self, frame: FrameLike, settings: Settings, rows: tuple[int, int]) -> None:
        """The operator's view: one pass over the whole frame (decoded in full), a few times
        a second; its profile kept for ROI_SUGGEST."""
        self._next_view = time.monotonic() + (self._view_period or 0.0)
        view = frame_view(frame.image, settings.background, self._view_bin)
        if (self._profiles and (self._profiles[-1].shape != view.profile.shape
                                or self._profiles_background is not settings.background)):
            self._profiles.clear()  # another frame size or background: another profile
        self._profiles_background = settings.background
        self._profiles.append(view.profile)
        self.publisher.publish_view(frame, view, rows)

    def _note_shape(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._image_dtype = dtype
        h, w = int(shape[0]), int(shape[1])
        if self._image_shape != (h, w):
            previous = self._image_shape
            self._image_shape = (h, w)
            self.publisher.publish_image_shape(h, w)
            if previous is not None:
                msg = f"image shape changed from {previous[0]} x {previous[1]} to {h} x {w}"
                self._count_error("shape_change")
                self._log("shape", logging.WARNING, msg)
                self.publisher.publish_message(msg, error=True)
                self._noticed = True

    def _process(self, image: np.ndarray | PartialImage) -> Result | None:
        """process() with the settings for this frame's shape (see `_settings_for`)."""
        settings = self._settings_for(image.shape)
        if settings is None:
            return None
        if not isinstance(image, np.ndarray):
            # The one place an image is decoded for processing: the ROI rows only, which are
            # all process() reads. None: they do not decode (counted by the frame's source).
            decoded = image.rows(*roi_rows(settings.roi, image.shape[0]))
            if decoded is None:
                return None
            image = decoded
        result = process(image, settings)
        self._in_force = settings
        return result

    def _settings_for(self, shape: tuple[int, ...]) -> Settings | None:
        """The settings for frames of `shape` (`processing.resolve_for_frame`: a requested
        setting that does not fit them falls back to the one in force); None: skip the frame.
        Worked out once per change of the requested settings or of the shape, so the
        per-frame cost is a comparison."""
        requested = self._requested
        resolved = self._resolved
        if resolved is not None and resolved[0] is requested and resolved[1] == shape:
            return resolved[2]
        resolution = resolve_for_frame(requested, self._in_force, shape)
        if resolution is None:  # (_image_problem let it through: a bug, not a bad frame)
            raise FrameMismatchError(Mismatch.IMAGE, f"no settings fit a frame of {shape}")
        self._publish_fit(requested, resolution, shape)
        self._resolved = (requested, shape, resolution.settings)
        return resolution.settings

    def _publish_fit(self, requested: Settings, resolution: Resolution,
                     shape: tuple[int, ...]) -> None:
        """Tell the publisher which requested settings stopped or started fitting the frames:
        a refusal once (again when its reason changes), not on every frame."""
        for kind in SETTING_MISMATCHES:
            reason = resolution.refused.get(kind)
            if reason is not None:
                msg = f"{reason}; {_in_force_text(kind, resolution.settings, shape)} until it fits"
                if self._refused.get(kind) == msg:
                    continue
                self._refused[kind] = msg
                self._count_error(f"rejected_{kind}")
                self._log("reject:" + kind, logging.WARNING, msg)
                self.publisher.publish_rejected(kind, msg, resolution.settings)
                self._noticed = True
            elif self._refused.pop(kind, None) is not None and _is_set(requested, kind):
                # (a setting cleared while refused needs no notice: its put said so)
                msg = (f"{_requested_text(kind, requested)} fits the {shape[0]} x {shape[1]} "
                       "image again: in force")
                self._log("accept:" + kind, logging.INFO, msg)
                self.publisher.publish_accepted(kind, msg, resolution.settings)
                self._noticed = True

    def _add_to_average(self, result: Result, settings: Settings) -> AveragedResult | None:
        if self._average is None or self._average_settings is not settings:
            # new settings (ROI, background, axis, ...): a new average, no mixed spectra
            self._average = RunningAverage(self._average_n, min_snr=settings.min_snr)
            self._average_settings = settings
        return self._average.add(result, fit_enabled=settings.fit_enabled)

    def _parameters(self, settings: Settings) -> dict[str, Any]:
        cache = self._parameters_cache
        if cache is None or cache[0] is not settings:
            cache = (settings, settings.describe())
            self._parameters_cache = cache
        return cache[1]

    def _maybe_publish_statistics(self, source: FrameSource | None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_stats:
            return
        self._next_stats = now + self.stats_period
        t_mark, n_mark = self._rate_mark
        if now > t_mark:
            self._rate = (self._n_processed - n_mark) / (now - t_mark)
        self._rate_mark = (now, self._n_processed)
        count = self._source_counters or getattr(source, "errors", None)
        if source is not None and count is not None:
            try:
                self._source_errors = dict(count(source) if self._source_counters else count())
            except Exception:
                log.exception("reading the input stream counters failed")
        if self._state == State.ERROR and now - self._last_error_time >= self.error_hold:
            last = self._last_frame_time
            if last is not None and now - last < self.wait_timeout:
                self._set_state(State.PROCESSING, f"processing {self._input[0]}")
            elif not self._check_source_fault(source, now):
                self._set_state(State.WAITING, f"waiting for stream {self._input[0]}")
        self.publisher.publish_statistics(self.statistics())
