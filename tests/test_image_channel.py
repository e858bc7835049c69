"""A wrong camera channel, and frames the IOC cannot process, say so: a state, a message, REST.

Unit level: the pipeline with fake sources (as tests/test_pipeline.py) and `CameraSource.decode`
on hand-made messages. IOC level: a real IOC fed by a simulated camera of another prefix, then
pointed at the right channel.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from iochelpers import EPICS_ENV, LEGACY, IocProcess, caget, simulator_args
from iochelpers import wait_until as wait_for
from test_pipeline import FakeFrame, FakeSender, FakeSource, Recorder, frame, wait_until

from psss_ioc.cli import commands
from psss_ioc.ioc import app as ioc
from psss_ioc.ioc import pvs
from psss_ioc.ioc.pvs import State
from psss_ioc.pipeline.worker import BAD_IMAGE, MISSING_CHANNEL, Pipeline, SourceFault
from psss_ioc.processes import free_port
from psss_ioc.streams.simulate import SimulatorProcess

WAIT = 0.3  # the rigs' wait_timeout


# ------------------------------------------------------------------------------ pipeline
class FaultySource(FakeSource):
    """A fake source that, while `fault` is set, keeps "receiving" messages it makes no frame
    of: the fault's time is renewed on every receive() that returns no frame."""

    def __init__(self, address: str, mode: str, frames: queue.Queue[Any]) -> None:
        super().__init__(address, mode, frames)
        self.fault: SourceFault | None = None

    def receive(self) -> FakeFrame | None:
        item = super().receive()
        if item is None and self.fault is not None:
            self.fault = dataclasses.replace(self.fault, time=time.monotonic())
        return item


@dataclasses.dataclass
class FaultRig:
    pipeline: Pipeline
    recorder: Recorder
    frames: queue.Queue[Any]
    sources: list[FaultySource]

    def feed(self, *items: Any) -> None:
        for item in items:
            self.frames.put(item)

    def states(self, state: State) -> list[str]:
        return [m for s, m in self.recorder.states if s == state]


@pytest.fixture
def frig() -> Iterator[FaultRig]:
    frames: queue.Queue[Any] = queue.Queue()
    sources: list[FaultySource] = []
    recorder = Recorder()

    def factory(address: str, mode: str) -> FaultySource:
        source = FaultySource(address, mode, frames)
        sources.append(source)
        return source

    def fault_of(source: Any) -> SourceFault | None:
        return source.fault

    pipeline = Pipeline(factory, recorder, FakeSender(), wait_timeout=WAIT, error_hold=0.3,
                        stats_period=0.05, source_fault=fault_of)
    pipeline.set_input("tcp://camera:9000", "PULL")
    yield FaultRig(pipeline, recorder, frames, sources)
    pipeline.stop()


def bad_frames(start: int, n: int, image: Any) -> list[FakeFrame]:
    return [FakeFrame(i, (0, 0), image) for i in range(start, start + n)]


@pytest.mark.parametrize(("image", "words"), [
    (np.zeros(64, np.uint16), "1-D"),
    (np.zeros((2, 8, 8), np.uint16), "3-D"),
    (np.zeros((0, 64), np.uint16), "empty"),
    (np.zeros((40, 64), np.complex128), "complex128"),
    (np.zeros((40, 64), bool), "bool"),
    (np.full((40, 64), "a"), "<U1"),
    ([[1, 2], [3, 4]], "list"),
])
def test_frames_that_cannot_be_processed_give_a_state_and_clear_on_good_frames(
    frig: FaultRig, image: Any, words: str
) -> None:
    p = frig.pipeline
    p.start()
    frig.feed(*bad_frames(1, 20, image))
    wait_until(lambda: p.statistics().n_received == 20)
    assert p.state == State.BAD_IMAGE
    shown = frig.states(State.BAD_IMAGE)
    assert len(shown) == 1, shown  # entered once, not once per frame
    assert shown[0].startswith("Image not usable") and words in shown[0], shown[0]
    assert p.fault is not None and p.fault.kind == BAD_IMAGE
    stats = p.statistics()
    assert stats.errors_by_kind["bad_image"] == 20 and stats.n_errors >= 20
    assert stats.n_processed == 0 and stats.n_lost == 20
    assert stats.state == State.BAD_IMAGE
    # good frames again: the state clears by itself
    frig.feed(frame(21), frame(22))
    wait_until(lambda: p.statistics().n_processed == 2)
    wait_until(lambda: p.state == State.PROCESSING)
    assert p.fault is None
    # and a bad run later is news again, after wait_timeout without a good frame
    frig.feed(*bad_frames(23, 5, image))
    wait_until(lambda: p.statistics().n_received == 27)
    time.sleep(WAIT + 0.05)
    frig.feed(*bad_frames(28, 2, image))
    wait_until(lambda: len(frig.states(State.BAD_IMAGE)) == 2)


def test_a_bad_frame_among_good_ones_is_a_notice_not_a_state(frig: FaultRig) -> None:
    p = frig.pipeline
    p.start()
    items: list[Any] = []
    for i in range(1, 31):
        items.append(frame(i) if i % 5 else FakeFrame(i, (0, 0), np.zeros(8)))
    frig.feed(*items)
    wait_until(lambda: p.statistics().n_received == 30)
    assert p.state == State.PROCESSING
    assert not frig.states(State.BAD_IMAGE)
    notices = [m for m, error in frig.recorder.messages if "Image not usable" in m]
    assert len(notices) == 1 and "1-D" in notices[0]  # once, not per bad frame
    assert p.statistics().errors_by_kind["bad_image"] == 6


def test_a_good_stream_turning_bad_shows_the_state_after_the_wait(frig: FaultRig) -> None:
    p = frig.pipeline
    p.start()
    frig.feed(frame(1))
    wait_until(lambda: p.state == State.PROCESSING)
    stop = threading.Event()

    def bad_stream() -> None:
        i = 2
        while not stop.is_set():
            frig.feed(FakeFrame(i, (0, 0), np.zeros((40, 64), np.complex64)))
            i += 1
            time.sleep(0.02)

    thread = threading.Thread(target=bad_stream, daemon=True)
    thread.start()
    try:
        wait_until(lambda: p.state == State.BAD_IMAGE, timeout=5)
        assert "complex64" in frig.states(State.BAD_IMAGE)[0]
        states = [s for s, _ in frig.recorder.states]
        assert State.WAITING not in states[states.index(State.PROCESSING):]  # frames come
    finally:
        stop.set()
        thread.join(5)
    # the camera stops: waiting for the stream, the fault is over
    wait_until(lambda: p.state == State.WAITING, timeout=5)
    assert p.fault is None


def test_messages_without_the_image_channel_give_a_state_with_the_channels_seen(
    frig: FaultRig,
) -> None:
    p = frig.pipeline
    p.start()
    wait_until(lambda: bool(frig.sources))
    source = frig.sources[0]
    source.fault = SourceFault(MISSING_CHANNEL, time.monotonic(), channel="MY-CAM:FPICTURE",
                               channels_seen=("OTHER-CAM:FPICTURE",), n_channels=3)
    wait_until(lambda: p.state == State.NO_IMAGE_CHANNEL)
    time.sleep(5 * WAIT)  # many receive() calls with the same fault
    shown = frig.states(State.NO_IMAGE_CHANNEL)
    assert len(shown) == 1, shown  # the message is set once, not per message
    text = shown[0]
    assert "'MY-CAM:FPICTURE'" in text and "OTHER-CAM:FPICTURE" in text
    assert "--image-channel OTHER-CAM:FPICTURE" in text and "--image_channel" in text
    assert p.fault is not None and p.fault.channels_seen == ("OTHER-CAM:FPICTURE",)
    assert p.statistics().state == State.NO_IMAGE_CHANNEL

    # other channels seen: the message says so, once
    source.fault = dataclasses.replace(source.fault, channels_seen=("A:IMAGE", "B:FPICTURE"))
    wait_until(lambda: len(frig.states(State.NO_IMAGE_CHANNEL)) == 2)
    assert "A:IMAGE, B:FPICTURE" in frig.states(State.NO_IMAGE_CHANNEL)[1]
    source.fault = dataclasses.replace(source.fault, channels_seen=())
    wait_until(lambda: len(frig.states(State.NO_IMAGE_CHANNEL)) == 3)
    assert "none of its 3 channels" in frig.states(State.NO_IMAGE_CHANNEL)[2]

    # the messages stop: waiting for the stream
    source.fault = None
    wait_until(lambda: p.state == State.WAITING, timeout=5)
    assert p.fault is None

    # they come back, then the right channel does (the camera's prefix was fixed)
    source.fault = SourceFault(MISSING_CHANNEL, time.monotonic(), channel="MY-CAM:FPICTURE")
    wait_until(lambda: p.state == State.NO_IMAGE_CHANNEL)
    source.fault = dataclasses.replace(source.fault)  # a last one, then good frames
    frig.feed(frame(1), frame(2))
    wait_until(lambda: p.state == State.PROCESSING)
    source.fault = None
    assert p.fault is None


def test_a_missing_channel_now_and_then_leaves_a_good_stream_processing(frig: FaultRig) -> None:
    p = frig.pipeline
    p.start()
    wait_until(lambda: bool(frig.sources))
    source = frig.sources[0]
    stop = threading.Event()

    def good_stream() -> None:
        i = 1
        while not stop.is_set():
            frig.feed(frame(i))
            i += 1
            time.sleep(0.01)

    thread = threading.Thread(target=good_stream, daemon=True)
    thread.start()
    try:
        wait_until(lambda: p.state == State.PROCESSING)
        # the source saw one message without the channel between good frames
        source.fault = SourceFault(MISSING_CHANNEL, time.monotonic(), channel="X:FPICTURE")
        time.sleep(3 * WAIT)
        assert p.state == State.PROCESSING
        assert not frig.states(State.NO_IMAGE_CHANNEL)
    finally:
        stop.set()
        thread.join(5)


# (the stream's own part, CameraSource.fault(): tests/test_stream_malformed.py)


# ------------------------------------------------------------------------------ command lines
@pytest.mark.parametrize("option", ["--image_channel", "--image-channel"])
def test_legacy_command_line_takes_the_image_channel(
    monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(ioc, "run", lambda config, *a, **k: seen.append(config))
    result = CliRunner().invoke(commands.legacy_main,
                                ["tcp://cam:9000", "-i", "MY-CAM", option, "CAM-X:FPICTURE"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen[-1].image_channel == "CAM-X:FPICTURE" and seen[-1].channel == "CAM-X:FPICTURE"
    CliRunner().invoke(commands.legacy_main, ["tcp://cam:9000", "-i", "MY-CAM"],
                       catch_exceptions=False)
    assert seen[-1].channel == "MY-CAM:FPICTURE"


# ------------------------------------------------------------------------------ a real IOC
PREFIX = "TST-PSSS-IMGCH"
CAMERA = "TST-PSSS-IMGCH-CAM"  # the simulated camera's prefix: its channel is CAMERA:FPICTURE


@pytest.fixture(scope="module")
def other_camera() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(simulator_args(CAMERA, rate=20.0)) as sim:
        yield sim


@pytest.fixture(scope="module")
def right_camera() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(simulator_args(PREFIX, rate=20.0)) as sim:
        yield sim


def rest_statistics(port: int) -> dict[str, Any]:
    reply = requests.get(f"http://127.0.0.1:{port}/statistics", timeout=10)
    assert reply.status_code == 200, reply.text
    return dict(reply.json()["statistics"])


def test_ioc_on_a_camera_of_another_prefix_says_so_and_clears(
    other_camera: SimulatorProcess, right_camera: SimulatorProcess, tmp_path: Path
) -> None:
    rest_port = free_port()
    proc = IocProcess(PREFIX, [other_camera.address, "--output-port", "0", "--auto-start",
                               "--rest-port", str(rest_port),
                               "--autosave-dir", str(tmp_path / "autosave")],
                      EPICS_ENV, tmp_path / "ioc.log")
    expected, carried = f"{PREFIX}:FPICTURE", f"{CAMERA}:FPICTURE"
    try:
        wait_for(lambda: proc.get(pvs.STATUS) == "No image channel", 30,
                 what="No image channel")
        assert proc.get(pvs.STATUS, "-a").split()[-1] == "MAJOR"  # ... STAT SEVR
        assert caget(proc.name("STATUS.SEVR")) == "MAJOR"
        text = proc.get(pvs.MESSAGE, "-S")
        assert expected in text and carried in text, text  # (caget -S escapes quotes)
        assert f"--image-channel {carried}" in text, text
        errors = int(proc.get(pvs.N_ERRORS))
        wait_for(lambda: int(proc.get(pvs.N_ERRORS)) > errors + 5, 10, what="N_ERRORS counts")
        assert int(proc.get(pvs.N_PROCESSED)) == 0

        stats = rest_statistics(rest_port)
        assert stats["state"] == "No image channel"
        assert carried in stats["message"] and expected in stats["message"]
        assert stats["image_channel"] == expected and stats["channels_seen"] == [carried]
        assert stats["errors_by_kind"]["missing_channel"] > 0
        time.sleep(2.0)  # 40 more messages without the channel: the state is not re-entered
        assert proc.log().count("No image channel:") == 1, proc.log()
        assert proc.get(pvs.STATUS) == "No image channel"

        # the right camera: the state clears by itself
        assert proc.put(pvs.INPUT_STREAM, right_camera.address, "-S").returncode == 0
        wait_for(lambda: proc.get(pvs.STATUS) == "Processing", 30, what="Processing")
        assert caget(proc.name("STATUS.SEVR")) == "NO_ALARM"
        stats = rest_statistics(rest_port)
        assert stats["state"] == "Processing" and stats["channels_seen"] == []
        # and back to the wrong one: said again
        assert proc.put(pvs.INPUT_STREAM, other_camera.address, "-S").returncode == 0
        wait_for(lambda: proc.get(pvs.STATUS) == "No image channel", 30,
                 what="No image channel again")
        assert carried in proc.get(pvs.MESSAGE, "-S")
    finally:
        code = proc.stop()
    assert code == 0, proc.log()
    assert "Traceback" not in (tmp_path / "ioc.log").read_text(errors="replace")


def test_legacy_command_line_with_the_image_channel_processes(
    other_camera: SimulatorProcess, tmp_path: Path
) -> None:
    """`psss_processing STREAM -i PREFIX --image_channel CAMERA:FPICTURE`: the fix."""
    rest_port = free_port()
    proc = IocProcess(PREFIX, [other_camera.address, "-i", PREFIX, "--image_channel",
                               f"{CAMERA}:FPICTURE", "-o", "0", "-r", str(rest_port),
                               "--rest_api_interface", "127.0.0.1", "--autosave_dir",
                               str(tmp_path / "autosave"), "--auto_start"],
                      EPICS_ENV, tmp_path / "legacy.log", pass_prefix=False, command=LEGACY)
    try:
        wait_for(lambda: proc.get(pvs.STATUS) == "Processing", 60,
                 what="legacy IOC processing")
        assert int(proc.get(pvs.N_PROCESSED)) > 0
        stats = rest_statistics(rest_port)
        assert stats["state"] == "Processing"
        assert stats["image_channel"] == f"{CAMERA}:FPICTURE" and stats["channels_seen"] == []
        assert stats["errors_by_kind"].get("missing_channel", 0) == 0
    finally:
        code = proc.stop()
    assert code == 0, proc.log()
