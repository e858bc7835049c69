"""The processing loop without an IOC: a fake frame source, a recording publisher."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from psss_ioc.core.processing import Settings, process
from psss_ioc.ioc.pvs import State
from psss_ioc.pipeline.worker import Pipeline, Statistics

H, W = 40, 64


@dataclass
class FakeFrame:
    pulse_id: int
    timestamp: tuple[int, int]
    image: Any


def make_image(seed: int, height: int = H, width: int = W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.arange(width)
    peak = 200.0 * np.exp(-((x - width / 2 - seed % 5) ** 2) / (2 * 6.0**2))
    image = rng.poisson(5.0 + peak[None, :] / height * np.ones((height, 1)) * 4)
    return image.astype(np.uint16)


def frame(pulse_id: int, image: np.ndarray | None = None) -> FakeFrame:
    img = make_image(pulse_id) if image is None else image
    return FakeFrame(pulse_id, (1_700_000_000 + pulse_id, 1000 * pulse_id), img)


class FakeSource:
    def __init__(self, address: str, mode: str, frames: queue.Queue[Any]) -> None:
        self.address, self.mode, self.frames = address, mode, frames
        self.closed = False

    def receive(self) -> FakeFrame | None:
        try:
            item = self.frames.get(timeout=0.02)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed = True


@dataclass
class Recorder:
    """A Publisher that keeps everything it is told."""

    results: list[tuple[Any, Any, Any]] = field(default_factory=list)
    states: list[tuple[State, str]] = field(default_factory=list)
    stats: list[Statistics] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    rejected: list[tuple[str, str, Settings]] = field(default_factory=list)
    accepted: list[tuple[str, str, Settings]] = field(default_factory=list)
    messages: list[tuple[str, bool]] = field(default_factory=list)
    views: list[tuple[Any, Any, Any]] = field(default_factory=list)
    fail_on: set[int] = field(default_factory=set)

    def publish_result(self, frame: Any, result: Any, average: Any) -> None:
        if frame.pulse_id in self.fail_on:
            raise RuntimeError(f"publisher exploded on {frame.pulse_id}")
        self.results.append((frame, result, average))

    def publish_state(self, state: State, message: str) -> None:
        self.states.append((state, message))

    def publish_statistics(self, stats: Statistics) -> None:
        self.stats.append(stats)

    def publish_image_shape(self, height: int, width: int) -> None:
        self.shapes.append((height, width))

    def publish_rejected(self, kind: str, message: str, in_force: Settings) -> None:
        self.rejected.append((kind, message, in_force))

    def publish_accepted(self, kind: str, message: str, in_force: Settings) -> None:
        self.accepted.append((kind, message, in_force))

    def publish_view(self, frame: Any, view: Any, rows: Any) -> None:
        self.views.append((frame, view, rows))

    def publish_message(self, message: str, error: bool) -> None:
        self.messages.append((message, error))


class FakeSender:
    def __init__(self, accept: Callable[[int], bool] = lambda pid: True) -> None:
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.accept = accept

    def send(self, frame: Any, result: Any, parameters: dict[str, Any]) -> bool:
        if not self.accept(frame.pulse_id):
            return False
        self.sent.append((frame.pulse_id, parameters))
        return True


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


@dataclass
class Rig:
    pipeline: Pipeline
    recorder: Recorder
    frames: queue.Queue[Any]
    sources: list[FakeSource]
    sender: FakeSender

    def feed(self, *items: Any) -> None:
        for item in items:
            self.frames.put(item)

    def processed(self) -> list[int]:
        return [f.pulse_id for f, _, _ in self.recorder.results]


@pytest.fixture
def rig() -> Iterator[Rig]:
    frames: queue.Queue[Any] = queue.Queue()
    sources: list[FakeSource] = []
    recorder = Recorder()
    sender = FakeSender()

    def factory(address: str, mode: str) -> FakeSource:
        source = FakeSource(address, mode, frames)
        sources.append(source)
        return source

    pipeline = Pipeline(factory, recorder, sender, wait_timeout=0.3, error_hold=0.3,
                        stats_period=0.05)
    pipeline.set_input("tcp://camera:9000", "PULL")
    yield Rig(pipeline, recorder, frames, sources, sender)
    pipeline.stop()


def test_start_process_stop(rig: Rig) -> None:
    p = rig.pipeline
    assert p.state == State.STOPPED
    p.start()
    assert p.state == State.WAITING
    rig.feed(*(frame(i) for i in range(1, 6)))
    wait_until(lambda: len(rig.recorder.results) == 5)
    wait_until(lambda: p.state == State.PROCESSING)
    p.start()  # harmless when running
    assert len(rig.sources) == 1
    p.stop()
    assert p.state == State.STOPPED
    assert rig.sources[0].closed
    states = [s for s, _ in rig.recorder.states]
    assert states[0] == State.WAITING and states[-1] == State.STOPPED
    assert State.PROCESSING in states
    stats = p.statistics()
    assert stats.n_processed == 5 and stats.n_received == 5 and stats.n_lost == 0
    assert stats.last_pulse_id == 5
    assert [pid for pid, _ in rig.sender.sent] == [1, 2, 3, 4, 5]
    p.stop()  # harmless when stopped


def test_results_equal_process_on_the_same_frames(rig: Rig) -> None:
    settings = rig.pipeline.configure(roi=(10, 30))
    rig.pipeline.start()
    frames = [frame(i) for i in range(1, 4)]
    rig.feed(*frames)
    wait_until(lambda: len(rig.recorder.results) == 3)
    for f, (got_frame, result, _average) in zip(frames, rig.recorder.results, strict=True):
        expected = process(f.image, settings)
        assert got_frame is f
        np.testing.assert_array_equal(result.spectrum, expected.spectrum)
        assert result.roi == (10, 30)
        assert result.fit.status == expected.fit.status
        np.testing.assert_allclose(result.fit.center, expected.fit.center)
    # the running average over the three spectra
    mean = np.mean([process(f.image, settings).spectrum for f in frames], axis=0)
    np.testing.assert_allclose(rig.recorder.results[-1][2].spectrum, mean)
    assert rig.sender.sent[0][1] == {"background": "", "roi": [10, 30]}


def test_invalid_settings_refused_nothing_applied(rig: Rig) -> None:
    before = rig.pipeline.configure(roi=(5, 10))
    with pytest.raises(ValueError, match="less than ymax"):
        rig.pipeline.configure(roi=(10, 5))
    with pytest.raises(ValueError, match=r"monotonic|increasing"):
        rig.pipeline.configure(roi=(1, 2), axis=np.array([1.0, 1.0, 2.0]))
    assert rig.pipeline.settings is before
    with pytest.raises(ValueError):
        rig.pipeline.set_average_n(0)
    with pytest.raises(ValueError):
        rig.pipeline.set_input("tcp://x:1", "DEALER")


def test_roi_beyond_image_keeps_last_good_roi(rig: Rig) -> None:
    p = rig.pipeline
    p.configure(roi=(10, 20))
    p.start()
    rig.feed(frame(1))
    wait_until(lambda: len(rig.recorder.results) == 1)
    p.configure(roi=(10, H + 5))
    rig.feed(frame(2), frame(3))
    wait_until(lambda: len(rig.recorder.results) == 3)
    assert [r.roi for _, r, _ in rig.recorder.results] == [(10, 20)] * 3
    assert len(rig.recorder.rejected) == 1  # not retried on every frame
    kind, message, in_force = rig.recorder.rejected[0]
    assert kind == "roi" and str(H) in message and in_force.roi == (10, 20)
    assert "using rows [10, 20)" in message
    assert p.settings.roi == (10, H + 5)  # still requested: in force when the frames fit it
    assert rig.recorder.results[-1][1].roi == (10, 20)  # the settings in force
    # another bad ROI: still the last good one
    p.configure(roi=(0, H + 1))
    rig.feed(frame(4))
    wait_until(lambda: len(rig.recorder.results) == 4)
    assert rig.recorder.results[-1][1].roi == (10, 20)


def test_settings_refused_for_another_image_size_return_by_themselves(rig: Rig) -> None:
    """ROI, background and axis fit H x W frames; the camera sends smaller frames for a while
    (each refused once, the frames processed without them), then H x W again: all three are
    in force again without being put again, and the publisher is told so, once."""
    p = rig.pipeline
    dark = np.full((H, W), 3, dtype=np.uint16)
    axis = np.linspace(9000.0, 9100.0, W)
    p.configure(roi=(10, 30), background=dark, background_name="dark.h5", axis=axis)
    p.start()
    rig.feed(frame(1))
    wait_until(lambda: len(rig.recorder.results) == 1)
    small = [frame(i, make_image(i, H // 2, W // 2)) for i in (2, 3, 4)]
    rig.feed(*small)
    wait_until(lambda: len(rig.recorder.results) == 4)
    kinds = sorted(kind for kind, _, _ in rig.recorder.rejected)
    assert kinds == ["axis_length", "background_shape", "roi"]  # once each, not per frame
    for (_, result, _), f in zip(rig.recorder.results[1:], small, strict=True):
        # none of the three fits (the last good ones neither): whole image, no background
        np.testing.assert_array_equal(result.spectrum, process(f.image, Settings()).spectrum)
        assert result.roi == (0, H // 2) and result.axis.shape == (W // 2,)
    assert p.settings.roi == (10, 30) and p.settings.background_name == "dark.h5"
    assert not rig.recorder.accepted

    back = frame(5)
    rig.feed(back, frame(6))
    wait_until(lambda: len(rig.recorder.results) == 6)
    result = rig.recorder.results[4][1]
    expected = process(back.image, Settings(roi=(10, 30), background=dark, axis=axis))
    np.testing.assert_array_equal(result.spectrum, expected.spectrum)
    np.testing.assert_array_equal(result.axis, axis)
    assert sorted(kind for kind, _, _ in rig.recorder.accepted) == kinds
    messages = {kind: message for kind, message, _ in rig.recorder.accepted}
    assert "[10, 30)" in messages["roi"] and "again" in messages["roi"]
    assert "dark.h5" in messages["background_shape"]
    assert len(rig.recorder.rejected) == 3  # nothing refused any more

    # a setting cleared while refused is not announced when the frames fit again
    rig.feed(frame(7, make_image(7, H // 2, W // 2)))
    wait_until(lambda: len(rig.recorder.results) == 7)
    assert len(rig.recorder.rejected) == 6
    p.configure(background=None, background_name="")
    rig.feed(frame(8))
    wait_until(lambda: len(rig.recorder.results) == 8)
    assert sorted(kind for kind, _, _ in rig.recorder.accepted[3:]) == ["axis_length", "roi"]


def test_first_frame_with_bad_roi_uses_whole_image(rig: Rig) -> None:
    rig.pipeline.configure(roi=(0, H + 1))
    rig.pipeline.start()
    rig.feed(frame(1))
    wait_until(lambda: len(rig.recorder.results) == 1)
    assert rig.recorder.results[0][1].roi == (0, H)
    assert rig.recorder.rejected[0][0] == "roi"


def test_background_of_wrong_shape_keeps_previous(rig: Rig) -> None:
    p = rig.pipeline
    good = np.full((H, W), 3, dtype=np.uint16)
    p.configure(background=good, background_name="good.h5")
    p.start()
    rig.feed(frame(1))
    wait_until(lambda: len(rig.recorder.results) == 1)
    p.configure(background=np.zeros((H + 1, W)), background_name="bad.h5")
    f = frame(2)
    rig.feed(f)
    wait_until(lambda: len(rig.recorder.results) == 2)
    expected = process(f.image, Settings(background=good, background_name="good.h5"))
    np.testing.assert_array_equal(rig.recorder.results[-1][1].spectrum, expected.spectrum)
    assert rig.recorder.rejected[0][0] == "background_shape"
    assert rig.recorder.rejected[0][2].background_name == "good.h5"  # in force


def test_axis_of_wrong_length_keeps_previous(rig: Rig) -> None:
    p = rig.pipeline
    axis = np.linspace(9000.0, 9100.0, W)
    p.configure(axis=axis)
    p.start()
    rig.feed(frame(1))
    wait_until(lambda: len(rig.recorder.results) == 1)
    p.configure(axis=np.linspace(0.0, 1.0, W + 3))
    rig.feed(frame(2))
    wait_until(lambda: len(rig.recorder.results) == 2)
    np.testing.assert_array_equal(rig.recorder.results[-1][1].axis, axis)
    assert rig.recorder.rejected[0][0] == "axis_length"


def test_unexpected_exception_is_shown_and_processing_continues(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.recorder.fail_on = {2}
    rig.pipeline.start()
    rig.feed(frame(1), frame(2), frame(3))
    wait_until(lambda: len(rig.recorder.results) == 2)
    assert rig.processed() == [1, 3]
    errors = [m for s, m in rig.recorder.states if s == State.ERROR]
    assert errors and "publisher exploded on 2" in errors[0]
    assert "Traceback" in caplog.text and "publisher exploded" in caplog.text
    assert rig.pipeline.statistics().errors_by_kind["unexpected"] == 1
    assert rig.pipeline.statistics().n_errors >= 1
    # the error is held for error_hold, then the state recovers by itself
    wait_until(lambda: rig.pipeline.state == State.WAITING)
    rig.feed(frame(4))
    wait_until(lambda: rig.pipeline.state == State.PROCESSING)


def test_receive_exception_does_not_kill_the_loop(rig: Rig) -> None:
    rig.pipeline.start()
    rig.feed(OSError("socket hiccup"), frame(1))
    wait_until(lambda: rig.processed() == [1])
    assert rig.pipeline.running
    assert any("socket hiccup" in m for s, m in rig.recorder.states if s == State.ERROR)


def test_stream_loss_and_return(rig: Rig) -> None:
    p = rig.pipeline
    p.start()
    rig.feed(frame(1))
    wait_until(lambda: p.state == State.PROCESSING)
    wait_until(lambda: p.state == State.WAITING, timeout=3)
    assert "no frame" in rig.recorder.states[-1][1]
    rig.feed(frame(2))
    wait_until(lambda: p.state == State.PROCESSING)
    wait_until(lambda: p.statistics().rate_hz == 0.0, timeout=3)


def test_lost_pulses_skipped_frames_and_dropped_output(rig: Rig) -> None:
    rig.sender.accept = lambda pid: pid != 7
    rig.pipeline.start()
    rig.feed(frame(1), frame(5), FakeFrame(6, (0, 0), np.zeros(5)), frame(7), frame(8))
    wait_until(lambda: len(rig.recorder.results) == 4)
    stats = rig.pipeline.statistics()
    assert stats.n_lost == 3 + 1  # pulses 2-4 never came, 6 was skipped
    assert stats.n_out_dropped == 1 and stats.n_sent == 3
    assert stats.errors_by_kind["bad_image"] == 1
    assert rig.processed() == [1, 5, 7, 8]


def test_shape_change_mid_stream(rig: Rig) -> None:
    rig.pipeline.start()
    rig.feed(frame(1), frame(2, make_image(2, H + 8, W)))
    wait_until(lambda: len(rig.recorder.results) == 2)
    assert rig.recorder.shapes == [(H, W), (H + 8, W)]
    assert any("shape changed" in m for m, _ in rig.recorder.messages)
    assert rig.pipeline.image_shape == (H + 8, W)


def test_start_without_input_is_refused() -> None:
    p = Pipeline(lambda a, m: FakeSource(a, m, queue.Queue()))
    with pytest.raises(ValueError, match="INPUT_STREAM"):
        p.start()
    assert p.state == State.STOPPED


def test_source_that_cannot_open_shows_error_and_retries() -> None:
    calls: list[str] = []
    recorder = Recorder()
    frames: queue.Queue[Any] = queue.Queue()

    def factory(address: str, mode: str) -> FakeSource:
        calls.append(address)
        if len(calls) == 1:
            raise OSError("connection refused")
        return FakeSource(address, mode, frames)

    p = Pipeline(factory, recorder, error_hold=0.1, wait_timeout=0.2)
    p.set_input("tcp://nowhere:1")
    p.start()
    try:
        wait_until(lambda: len(calls) >= 2, timeout=5)
        assert any("connection refused" in m for s, m in recorder.states if s == State.ERROR)
        frames.put(frame(1))
        wait_until(lambda: p.state == State.PROCESSING)
    finally:
        p.stop()


def test_set_input_while_running_reconnects(rig: Rig) -> None:
    rig.pipeline.start()
    wait_until(lambda: len(rig.sources) == 1)
    rig.pipeline.set_input("tcp://other:9100", "SUB")
    wait_until(lambda: len(rig.sources) == 2)
    assert rig.sources[0].closed
    assert (rig.sources[1].address, rig.sources[1].mode) == ("tcp://other:9100", "SUB")


def test_settings_swap_is_atomic_under_concurrent_configure(rig: Rig) -> None:
    """Every frame is processed with one of the settings objects that were configured."""
    rig.pipeline.start()
    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            rig.pipeline.configure(roi=(0, 10) if i % 2 else (20, 40), fit_enabled=bool(i % 2))
            i += 1

    t = threading.Thread(target=flip)
    t.start()
    try:
        rig.feed(*(frame(i) for i in range(1, 40)))
        wait_until(lambda: len(rig.recorder.results) == 39)
    finally:
        stop.set()
        t.join()
    for _, result, _ in rig.recorder.results:
        # fit on <=> roi (0, 10): a mixed pair would mean a half-applied update
        assert (result.roi == (0, 10)) == (result.fit.status.name != "DISABLED")



def test_log_lines_are_rate_limited_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from psss_ioc.ratelimit import RateLimitedLog

    limit = RateLimitedLog(logging.getLogger("psss_ioc.test"), period=0.2)
    with caplog.at_level(logging.INFO, logger="psss_ioc.test"):
        for k in range(1000):  # a put storm's worth of notices, at once
            limit("ROI", logging.INFO, f"ROI set to [{k}, {k + 1}]")
        limit("background", logging.WARNING, "background refused")  # another kind passes
        time.sleep(0.25)
        limit("ROI", logging.INFO, "ROI set to [5, 6]")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["ROI set to [0, 1]", "background refused",
                     "ROI set to [5, 6] (999 similar messages suppressed)"]
