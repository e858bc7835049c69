"""Issue 7 (soak RSS): many frames through the pipeline leave nothing behind that grows.

The IOC's RSS growth in `bench soak` is the frame buffers in flight (see
psss_ioc/bench/soak.py); these tests make sure our own code adds no per-frame growth on top:
no frame kept after it is processed, a bounded Python heap over thousands of frames, and
bounded rate-limit tables even when every frame fails.
"""

from __future__ import annotations

import gc
import logging
import time
import tracemalloc
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from psss_ioc.core.processing import Settings
from psss_ioc.pipeline.worker import NullPublisher, Pipeline
from psss_ioc.ratelimit import RateLimitedLog

H, W = 32, 64


@dataclass
class Frame:
    pulse_id: int
    timestamp: tuple[int, int]
    image: np.ndarray


class CountingSource:
    """`total` frames made on demand (nothing queued up front), then timeouts."""

    def __init__(self, total: int, images: list[weakref.ref] | None = None) -> None:
        self.total = total
        self.made = 0
        self.images = images
        rng = np.random.default_rng(1)
        x = np.arange(W)
        peak = 300.0 * np.exp(-((x - W / 2) ** 2) / (2 * 5.0**2))
        self._template = (rng.poisson(5.0, (H, W)) + peak[None, :]).astype(np.uint16)

    def receive(self) -> Frame | None:
        if self.made >= self.total:
            time.sleep(0.01)
            return None
        self.made += 1
        image = self._template.copy()  # a new buffer per frame, as the camera stream gives
        if self.images is not None:
            self.images.append(weakref.ref(image))
        return Frame(self.made, (1_700_000_000 + self.made, 0), image)

    def close(self) -> None:
        pass


class CountingPublisher(NullPublisher):
    """Counts results (keeps none); optionally fails on every frame."""

    def __init__(self, fail: bool = False) -> None:
        self.results = 0
        self.fail = fail

    def publish_result(self, frame: Any, result: Any, average: Any) -> None:
        self.results += 1
        if self.fail:
            raise RuntimeError(f"publisher failed on frame {frame.pulse_id}")


class CountingSender:
    def __init__(self) -> None:
        self.sent = 0

    def send(self, frame: Any, result: Any, parameters: dict[str, Any]) -> bool:
        self.sent += 1
        return True


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def run_frames(source: CountingSource, publisher: CountingPublisher,
               settings: Settings | None = None) -> Pipeline:
    pipeline = Pipeline(lambda address, mode: source, publisher, CountingSender(),
                        settings=settings, stats_period=0.01, error_hold=0.01)
    pipeline.set_input("tcp://camera:9000")
    pipeline.start()
    try:
        wait_until(lambda: publisher.results >= source.total)
    finally:
        pipeline.stop()
    return pipeline


def test_no_frame_is_kept_after_processing() -> None:
    images: list[weakref.ref] = []
    source = CountingSource(500, images)
    run_frames(source, CountingPublisher())
    gc.collect()
    alive = sum(1 for ref in images if ref() is not None)
    assert len(images) == 500 and alive == 0, f"{alive} of the frames' images still alive"


def test_python_heap_does_not_grow_with_frames() -> None:
    """Traced Python allocations after 500 frames and after 3000 more: the same (< 64 kB)."""
    background = np.full((H, W), 3, dtype=np.uint16)
    settings = Settings(roi=(4, 28), background=background, axis=np.linspace(1.0, 2.0, W))
    run_frames(CountingSource(200), CountingPublisher(), settings)  # caches, compiled code
    tracemalloc.start()
    try:
        source = CountingSource(3500)
        publisher = CountingPublisher()
        pipeline = Pipeline(lambda address, mode: source, publisher, CountingSender(),
                            settings=settings, stats_period=0.01)
        pipeline.set_input("tcp://camera:9000")
        pipeline.start()
        try:
            wait_until(lambda: publisher.results >= 500)
            gc.collect()
            after_500 = tracemalloc.get_traced_memory()[0]
            wait_until(lambda: publisher.results >= 3500)
            gc.collect()
            after_3500 = tracemalloc.get_traced_memory()[0]
        finally:
            pipeline.stop()
    finally:
        tracemalloc.stop()
    assert after_3500 - after_500 < 64 * 1024, (after_500, after_3500)


def test_failing_frames_leave_one_rate_limit_key() -> None:
    """An unexpected error on every frame: one log key, not one per pulse id."""
    publisher = CountingPublisher(fail=True)
    pipeline = run_frames(CountingSource(300), publisher)
    assert pipeline.statistics().errors_by_kind["unexpected"] >= 300
    assert len(pipeline._log) == 1


def test_rate_limited_log_table_is_bounded() -> None:
    limit = RateLimitedLog(logging.getLogger("psss_ioc.test"), period=0.05, max_keys=50)
    for i in range(500):
        limit(f"kind {i}", logging.DEBUG, "message")
    assert len(limit) <= 50
    time.sleep(0.06)
    limit("another", logging.DEBUG, "message")
    for i in range(60):
        limit(f"late {i}", logging.DEBUG, "message")
    assert len(limit) <= 50
