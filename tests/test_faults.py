"""Fault injection against a real IOC process (issue 7).

The camera is this test process: a raw ZeroMQ PUSH socket that sends bsread messages built with
`bsread_wire`, so a test decides exactly which frames arrive, when, of what size and how broken.
One IOC serves the module (REST on a free loopback port, output stream on another, autosave);
its counters are compared as differences around each test. The tests that stop the IOC
(SIGTERM, kill -9) come last and use IOCs of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import zmq
from iochelpers import EPICS_ENV, IocProcess, caget, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port
from psss_ioc.streams import bsread_wire as wire
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera

PREFIX = "TST-PSSS-F"
CHANNEL = "TST-CAM-F:FPICTURE"
H, W = 200, 256
PERIOD = 0.01  # 100 Hz


# ------------------------------------------------------------------------------ the camera
def _timestamp() -> tuple[int, int]:
    ns = time.time_ns()
    return ns // 1_000_000_000, ns % 1_000_000_000


class Camera:
    """bsread messages of simulated images, good and broken, sent from a bound PUSH socket."""

    def __init__(self, height: int = H, width: int = W) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.pulse_id = 1000
        self.cameras: dict[tuple[int, int], SimulatedCamera] = {}
        self.camera(height, width)

    def camera(self, height: int, width: int) -> SimulatedCamera:
        key = (height, width)
        if key not in self.cameras:
            self.cameras[key] = SimulatedCamera(SimConfig(height=height, width=width, pool=4,
                                                          seed=5))
        return self.cameras[key]

    def good(self, pulse_id: int, shape: tuple[int, int] = (H, W)) -> list[bytes]:
        image = self.camera(*shape).images[pulse_id % 4]
        writer = wire.MessageWriter([wire.ChannelSpec.for_array(CHANNEL, image)])
        return [bytes(p) for p in writer.encode(pulse_id, _timestamp(),
                                                writer.encode_values([image]))]

    def bad(self, kind: str, pulse_id: int) -> list[bytes]:
        """One malformed message of `kind` (a wire.MALFORMED_KINDS name or missing_channel)."""
        good = self.good(pulse_id)
        image = self.camera(H, W).images[0]
        if kind == wire.GARBAGE:
            return [b"\x00\xff this is not bsread"]
        if kind == wire.FRAME_COUNT:
            return good[:-1]
        if kind == wire.BAD_JSON:
            return [b'{"htype": "bsr_m-1.1", "pulse_id": ', *good[1:]]
        if kind == wire.SIZE:
            return [good[0], good[1], good[2][:-2], good[3]]
        if kind == wire.UNKNOWN_TYPE:
            spec = wire.ChannelSpec.for_array(CHANNEL, image).to_json() | {"type": "uint128"}
            header = json.dumps({"htype": wire.DATA_HTYPE, "channels": [spec]}).encode()
            main = wire.encode_main_header(pulse_id, _timestamp(), f"bad-type-{pulse_id}")
            return [main, header, good[2], good[3]]
        if kind == "missing_channel":
            writer = wire.MessageWriter([wire.ChannelSpec.for_array("OTHER:IMAGE", image)])
            return [bytes(p) for p in writer.encode(pulse_id, _timestamp(),
                                                    writer.encode_values([image]))]
        raise ValueError(kind)

    def send(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def stream(self, count: int, shape: tuple[int, int] = (H, W),
               bad_every: int = 0, kinds: tuple[str, ...] = ()) -> dict[str, int]:
        """`count` messages at 100 Hz, every `bad_every`-th one malformed (kinds in turn);
        returns {"good": n, "bad": n, **per kind}."""
        sent: dict[str, int] = {"good": 0, "bad": 0}
        next_time = time.monotonic()
        for i in range(count):
            self.pulse_id += 1
            if bad_every and i % bad_every == bad_every // 2:
                kind = kinds[(i // bad_every) % len(kinds)]
                self.send(self.bad(kind, self.pulse_id))
                sent["bad"] += 1
                sent[kind] = sent.get(kind, 0) + 1
            else:
                self.send(self.good(self.pulse_id, shape))
                sent["good"] += 1
            next_time += PERIOD
            delay = next_time - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return sent

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()

    def __enter__(self) -> Camera:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Counters:
    processed: int
    errors: int
    lost: int
    out_dropped: int

    @classmethod
    def read(cls, ioc: IocProcess) -> Counters:
        return cls(*(int(ioc.get(pv)) for pv in (pvs.N_PROCESSED, pvs.N_ERRORS, pvs.N_LOST,
                                                  pvs.N_OUT_DROPPED)))


@dataclass
class Rig:
    ioc: IocProcess
    camera: Camera
    workdir: Path
    bgdir: Path
    background: Path
    output_port: int
    rest_port: int
    extra: dict[str, object] = field(default_factory=dict)

    def settle(self, expected_processed: int, timeout: float = 30.0) -> Counters:
        """Wait until N_PROCESSED reaches `expected_processed` and the statistics published
        after it (every 0.5 s) are in the records."""
        wait_until(lambda: int(self.ioc.get(pvs.N_PROCESSED)) >= expected_processed, timeout,
                   what=f"N_PROCESSED >= {expected_processed}")
        time.sleep(1.2)
        return Counters.read(self.ioc)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("faults")
    bgdir = workdir / "backgrounds"
    bgdir.mkdir()
    camera = Camera()
    background = camera.camera(H, W).write_background(bgdir / "dark.h5")
    output_port, rest_port = free_port(), free_port()
    ioc = IocProcess(PREFIX, [camera.address, "--image-channel", CHANNEL, "--output-port",
                              str(output_port), "--auto-start", "--autosave-dir",
                              str(workdir / "autosave"), "--rest-port", str(rest_port),
                              "--background-path", str(bgdir)],
                     EPICS_ENV, workdir / "ioc.log")
    try:
        rig = Rig(ioc, camera, workdir, bgdir, background, output_port, rest_port)
        camera.stream(20)
        wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 30, what="Processing")
        rig.settle(20)
        yield rig
    finally:
        code = ioc.stop()
        camera.close()
        assert code == 0, ioc.log()
        assert "Traceback" not in ioc.log_path.read_text(errors="replace"), ioc.log()


def spectrum(ioc: IocProcess) -> np.ndarray:
    """SPECTRUM_Y (`caget -t` prints the element count first, then NELM values)."""
    values = caget(ioc.name(pvs.SPECTRUM_Y)).split()
    return np.array([float(v) for v in values[1:W + 1]])


def background_in_force(rig: Rig) -> bool:
    """Whether the last frame sent was processed with a background: with the dark frame
    subtracted most columns are near 0; without it they carry the pedestal (100 counts per
    pixel) of every ROI row."""
    last = rig.camera.pulse_id
    wait_until(lambda: int(rig.ioc.get(pvs.PULSE_ID)) == last, what=f"pulse {last} processed")
    return float(np.median(spectrum(rig.ioc))) < 20.0 * H


def message(ioc: IocProcess) -> str:
    return ioc.get(pvs.MESSAGE, "-S")


# ------------------------------------------------------------------------------ the stream
MALFORMED = (wire.GARBAGE, wire.FRAME_COUNT, wire.BAD_JSON, wire.SIZE, wire.UNKNOWN_TYPE,
             "missing_channel")


def test_malformed_messages_mixed_into_a_100hz_stream_are_counted_exactly(rig: Rig) -> None:
    before = Counters.read(rig.ioc)
    sent = rig.camera.stream(600, bad_every=10, kinds=MALFORMED)
    assert rig.ioc.get(pvs.STATUS) == "Processing"  # bad messages are no error state
    assert sent["bad"] == 60 and all(sent[k] == 10 for k in MALFORMED)
    after = rig.settle(before.processed + sent["good"])
    assert after.processed - before.processed == sent["good"]  # every good frame
    assert after.errors - before.errors == sent["bad"]  # every bad one, once
    assert after.lost - before.lost == sent["bad"]  # their pulse ids never became results
    stats = requests.get(f"http://127.0.0.1:{rig.rest_port}/statistics", timeout=10).json()
    by_kind = stats["statistics"]["errors_by_kind"]
    for kind in MALFORMED:
        key = kind if kind == "missing_channel" else f"malformed_{kind}"
        assert by_kind.get(key, 0) >= 10, by_kind


def test_no_output_consumer_then_a_slow_one(rig: Rig) -> None:
    before = Counters.read(rig.ioc)
    rig.camera.stream(200)
    middle = rig.settle(before.processed + 200)
    assert middle.processed - before.processed == 200  # processing does not wait for anyone
    assert middle.out_dropped - before.out_dropped == 200  # nobody connected: all dropped

    context = zmq.Context()
    slow = context.socket(zmq.PULL)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.setsockopt(zmq.LINGER, 0)
    slow.setsockopt(zmq.RCVTIMEO, 100)
    slow.connect(f"tcp://127.0.0.1:{rig.output_port}")
    received = [0]
    stop = threading.Event()

    def consume() -> None:  # 5 messages per second
        while not stop.is_set():
            try:
                slow.recv_multipart(copy=False)
                received[0] += 1
            except zmq.Again:
                continue
            stop.wait(0.2)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        rig.camera.stream(400)
        after = rig.settle(middle.processed + 400)
    finally:
        stop.set()
        thread.join(5)
        slow.close(0)
        context.term()
    assert after.processed - middle.processed == 400  # the same rate: every frame processed
    dropped = after.out_dropped - middle.out_dropped
    assert dropped > 100 and received[0] > 0
    assert received[0] + dropped <= 400


def test_rest_hammering_does_not_slow_processing(rig: Rig) -> None:
    base = f"http://127.0.0.1:{rig.rest_port}"
    answers: list[int] = []
    failures: list[str] = []

    def hammer(worker: int) -> None:
        session = requests.Session()
        for i in range(120):
            try:
                if i % 4 == 3:
                    r = session.post(f"{base}/parameters", json={"average_n": 5 + (i + worker) % 7},
                                     timeout=20)
                else:
                    r = session.get(f"{base}/{('status', 'statistics', 'parameters')[i % 3]}",
                                    timeout=20)
                answers.append(r.status_code)
                if r.status_code != 200:
                    failures.append(r.text[:200])
            except requests.RequestException as e:
                failures.append(repr(e))

    before = Counters.read(rig.ioc)
    threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    sent = rig.camera.stream(400)
    for t in threads:
        t.join(120)
    after = rig.settle(before.processed + sent["good"])
    assert not failures, failures[:5]
    assert len(answers) == 4 * 120
    assert after.processed - before.processed == 400
    assert after.lost == before.lost and after.errors == before.errors


# ------------------------------------------------------------------------------ settings
def test_camera_pause_and_return_with_another_image_size(rig: Rig) -> None:
    ioc = rig.ioc
    assert ioc.put(pvs.SPC_ROI_YMIN, 0).returncode == 0
    assert ioc.put(pvs.SPC_ROI_YMAX, 0).returncode == 0
    assert ioc.put(pvs.SPC_ROI_YMAX, 150).returncode == 0
    assert ioc.put(pvs.SPC_ROI_YMIN, 50).returncode == 0
    assert ioc.put(pvs.BACKGROUND_FILE, str(rig.background), "-S").returncode == 0
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    axis = [9000.0 + 0.5 * i for i in range(W)]
    assert ioc.put(pvs.SPECTRUM_X, axis).returncode == 0
    assert ioc.get(pvs.AXIS_STATUS) == "OK"
    rig.camera.stream(100)
    wait_until(lambda: ioc.get(pvs.ROI_YMIN_RBV) == "50", what="ROI in force")
    assert background_in_force(rig)

    # the camera stops for 5 s ...
    wait_until(lambda: ioc.get(pvs.STATUS) == "Waiting for stream", 5, what="Waiting")
    time.sleep(5 - 2.0)
    # ... and comes back with 120 x 128 pixels: the ROI (to row 150), the background and the
    # energy axis no longer fit
    small = (120, W // 2)
    before = int(ioc.get(pvs.N_PROCESSED))
    back = threading.Thread(target=rig.camera.stream, args=(300, small), daemon=True)
    first_frame = time.monotonic()
    back.start()
    try:
        wait_until(lambda: ioc.get(pvs.STATUS) == "Processing", 10, period=0.05,
                   what="Processing again")
        assert time.monotonic() - first_frame < 2.0
        wait_until(lambda: ioc.get(pvs.IMAGE_HEIGHT) == "120", what="new height")
        wait_until(lambda: ioc.get(pvs.ROI_STATUS) == "Outside image", what="ROI re-checked")
        wait_until(lambda: ioc.get(pvs.AXIS_STATUS) == "Wrong length", what="axis re-checked")
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Error"
        text = message(ioc)
        assert "120" in text or "128" in text, text
        wait_until(lambda: int(ioc.get(pvs.N_PROCESSED)) > before + 50, what="new frames")
        assert ioc.get(pvs.ROI_YMIN_RBV) == "0" and ioc.get(pvs.ROI_YMAX_RBV) == "120"
        assert ioc.get(pvs.STATUS) == "Processing"
        # the records keep what was put: that is what comes back with the old size
        assert (ioc.get(pvs.SPC_ROI_YMIN), ioc.get(pvs.SPC_ROI_YMAX)) == ("50", "150")
        assert ioc.get(pvs.BACKGROUND_FILE, "-S") == str(rig.background)
    finally:
        back.join(30)
    # back to the old size: ROI, background and axis are in force again by themselves
    rig.camera.stream(50)
    wait_until(lambda: ioc.get(pvs.IMAGE_HEIGHT) == str(H), what="old height")
    wait_until(lambda: ioc.get(pvs.ROI_STATUS) == "OK", what="ROI in force again")
    text = message(ioc)  # (before the "no frame" notice 2 s after the last frame)
    assert "again" in text and ("[50, 150)" in text or "dark.h5" in text or "axis" in text), text
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded" and ioc.get(pvs.AXIS_STATUS) == "OK"
    assert (ioc.get(pvs.ROI_YMIN_RBV), ioc.get(pvs.ROI_YMAX_RBV)) == ("50", "150")
    assert background_in_force(rig)
    assert caget(ioc.name(pvs.SPECTRUM_AXIS) + ".NORD") == str(W)
    assert caget(ioc.name(pvs.SPECTRUM_AXIS)).split()[1:3] == ["9000", "9000.5"]
    # settings put now are checked against the old size
    assert ioc.put(pvs.SPECTRUM_X, []).returncode == 0
    assert ioc.put(pvs.SPC_ROI_YMIN, 0).returncode == 0
    assert ioc.put(pvs.SPC_ROI_YMAX, 0).returncode == 0
    rig.camera.stream(50)
    wait_until(lambda: ioc.get(pvs.ROI_YMAX_RBV) == str(H), what="whole image")
    assert ioc.get(pvs.ROI_STATUS) == "OK" and ioc.get(pvs.STATUS) == "Processing"


def test_background_deleted_or_overwritten_while_in_use(rig: Rig) -> None:
    ioc = rig.ioc
    live = rig.bgdir / "live.h5"
    shutil.copy(rig.background, live)
    assert ioc.put(pvs.BACKGROUND_FILE, str(live), "-S").returncode == 0
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    rig.camera.stream(30)
    assert background_in_force(rig)

    live.unlink()  # deleted under the IOC's feet
    rig.camera.stream(30)
    assert background_in_force(rig) and ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"

    live.write_bytes(b"\x89HDF\r\n\x1a\n but garbage after the signature" * 10)  # overwritten
    rig.camera.stream(30)
    assert background_in_force(rig)
    # putting the broken file (or another missing one) is refused; the loaded one stays in force
    for refused in (live, rig.bgdir / "missing.h5"):
        assert ioc.put(pvs.BACKGROUND_FILE, str(refused), "-S").returncode == 0
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Error"
        assert "keeping" in message(ioc) and str(live) in message(ioc)
        rig.camera.stream(30)
        assert background_in_force(rig)
        # the record shows the file in force, so autosave never stores a refused name
        assert ioc.get(pvs.BACKGROUND_FILE, "-S") == str(live)

    # a valid file is put: in force again
    assert ioc.put(pvs.BACKGROUND_FILE, str(rig.background), "-S").returncode == 0
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    assert ioc.put(pvs.BACKGROUND_FILE, "", "-S").returncode == 0
    assert ioc.get(pvs.BACKGROUND_STATUS) == "None"
    rig.camera.stream(30)
    assert not background_in_force(rig), (message(ioc), spectrum(ioc)[:20])


PUT_STORM = r"""
import sys, time
import epics
name, values, seconds = sys.argv[1], [int(v) for v in sys.argv[2].split(",")], float(sys.argv[3])
pv = epics.PV(name)
assert pv.wait_for_connection(timeout=20), name
n, start = 0, time.monotonic()
while time.monotonic() - start < seconds:
    pv.put(values[n % len(values)], wait=False)
    n += 1
    if n % 50 == 0:
        epics.ca.flush_io()
        time.sleep(max(0.0, start + n / 500.0 - time.monotonic()))
epics.ca.flush_io()
time.sleep(0.5)
print(n)
"""


def test_roi_put_storm_keeps_a_consistent_roi(rig: Rig) -> None:
    """1000 CA puts/s (two clients, 500/s each) to YMIN and YMAX for 10 s while processing:
    every frame uses a valid pair, and the ROI in force is the one the records show, or, when
    they end as no pair, a valid pair with ROI_STATUS in alarm."""
    ioc = rig.ioc
    assert ioc.put(pvs.SPC_ROI_YMAX, 150).returncode == 0
    assert ioc.put(pvs.SPC_ROI_YMIN, 10).returncode == 0
    context = zmq.Context()
    consumer = context.socket(zmq.PULL)
    consumer.setsockopt(zmq.RCVTIMEO, 200)
    consumer.setsockopt(zmq.LINGER, 0)
    consumer.connect(f"tcp://127.0.0.1:{rig.output_port}")
    rois: list[tuple[int, int]] = []
    stop = threading.Event()
    reader = wire.MessageReader()
    name = CHANNEL + ".processing_parameters"

    def consume() -> None:
        while not stop.is_set():
            try:
                parts = consumer.recv_multipart()
            except zmq.Again:
                continue
            _, header = reader.split(parts)
            i = header.index[name]
            params = json.loads(str(wire.decode_value(header.channels[i], parts[2 + 2 * i])))
            roi = params["roi"]
            rois.append((0, H) if roi is None else (roi[0], roi[1]))

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    clients = [
        subprocess.Popen([sys.executable, "-c", PUT_STORM, ioc.name(pv), values, "10"],
                         env={**os.environ, **EPICS_ENV}, stdout=subprocess.PIPE, text=True)
        for pv, values in ((pvs.SPC_ROI_YMIN, "10,90,30"), (pvs.SPC_ROI_YMAX, "50,150,120"))
    ]
    try:
        streamer = threading.Thread(target=rig.camera.stream, args=(1150,), daemon=True)
        streamer.start()
        counts = [int(c.communicate(timeout=60)[0].strip() or 0) for c in clients]
        streamer.join(30)
        time.sleep(0.5)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait(5)
        stop.set()
        thread.join(5)
        consumer.close(0)
        context.term()
    assert sum(counts) >= 8000, counts  # about 1000 puts/s for 10 s
    assert ioc.proc.poll() is None
    assert len(rois) > 500
    valid = {(a, b) for a in (10, 90, 30) for b in (50, 150, 120) if a < b}
    assert set(rois) <= valid, set(rois) - valid
    ymin, ymax = int(ioc.get(pvs.SPC_ROI_YMIN)), int(ioc.get(pvs.SPC_ROI_YMAX))
    rig.camera.stream(20)
    in_force = (int(ioc.get(pvs.ROI_YMIN_RBV)), int(ioc.get(pvs.ROI_YMAX_RBV)))
    if ymin < ymax:  # the records' pair is in force
        assert in_force == (ymin, ymax)
        assert ioc.get(pvs.ROI_STATUS) == "OK"
    else:  # the last puts made no pair: it waits, alarmed, and a valid pair stays in force
        assert in_force in valid
        assert ioc.get(pvs.ROI_STATUS) == "Invalid pair"
    assert ioc.get(pvs.STATUS) == "Processing"


# ------------------------------------------------------------------------------ path confinement
def test_background_paths_outside_the_allowed_directories_are_refused(rig: Rig) -> None:
    ioc = rig.ioc
    # no frames now: wait for the "no frame" notice, so that MESSAGE is ours below
    wait_until(lambda: ioc.get(pvs.STATUS) == "Waiting for stream", 10, what="Waiting")
    assert ioc.put(pvs.BACKGROUND_FILE, str(rig.background), "-S").returncode == 0
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"
    outside = rig.workdir / "outside.h5"
    shutil.copy(rig.background, outside)
    link = rig.bgdir / "link.h5"
    link.symlink_to(outside)
    (rig.bgdir / "sub").mkdir()
    (rig.bgdir / "sub" / "inner.h5").symlink_to(rig.background)  # a link that stays inside
    cases: list[tuple[str, str]] = [
        (str(outside), "outside"),
        (f"{rig.bgdir}/../outside.h5", ".."),
        (f"{rig.bgdir}/sub/../../outside.h5", ".."),
        (str(link), "symlink"),
        ("/etc/passwd", "outside"),
    ]
    for path, reason in cases:
        assert ioc.put(pvs.BACKGROUND_FILE, path, "-S").returncode == 0
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Error", path
        text = message(ioc)
        assert "not allowed" in text and reason in text and str(rig.bgdir) in text, text
        assert "keeping" in text and str(rig.background) in text, text
    rest = f"http://127.0.0.1:{rig.rest_port}"
    for path, _ in cases:  # REST resolves names itself: the reason says "outside"
        r = requests.post(f"{rest}/background", json={"filename": path, "data": None}, timeout=10)
        assert r.status_code == 400 and "not allowed" in r.json()["status"], r.text
        assert "outside" in r.json()["status"], r.text
        r = requests.post(f"{rest}/parameters", json={"background": path}, timeout=10)
        assert r.status_code == 400 and "not allowed" in r.json()["status"], r.text
    # inside the directory, also through a `..` or a link that stays inside: accepted
    for path in (f"{rig.bgdir}/sub/../dark.h5", str(rig.bgdir / "sub" / "inner.h5")):
        assert ioc.put(pvs.BACKGROUND_FILE, path, "-S").returncode == 0
        assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded", message(ioc)
