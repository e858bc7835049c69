"""The output stream and the REST parameters as psss_processing 1.8 gave them (issue
"Compatible and closed", sections 1 and 2; "Robust against hostile input" 4 and the ROI reply).

Two IOCs fed by simulated cameras:

- the legacy command line (`psss_processing`), 1.8 names and layout: SPECTRUM_Y, SPECTRUM_X,
  SPECTRUM_CENTER, SPECTRUM_FWHM, processing_parameters on the data port, the image on its own
  stream; REST on loopback;
- `psss-ioc run --output-mode PUB`, the document's names (`<prefix>:FPICTURE.spectrum`, ...),
  the image in the same stream, frames of 512 KB so a subscriber that stops reading fills its
  queues within a second.

psi-bsread's Source reads both layouts; every value is compared with the PVs' value of the
same pulse (PVA snapshot) and processing_parameters with GET /parameters.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bsread
import numpy as np
import pytest
import requests
import zmq
from iochelpers import EPICS_ENV, LEGACY, IocProcess, simulator_args, wait_until
from p4p.client.thread import Context

from psss_ioc import PsssProcessingClient
from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera, SimulatorProcess

LEGACY_PREFIX = "TST-PSSS-V18"
DOC_PREFIX = "TST-PSSS-DOC"
H, W, SEED, POOL = 100, 128, 11, 8
BIG = 512  # the PUB IOC's frames: 512 x 512 uint16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("output-compat")


@pytest.fixture(scope="module")
def camera() -> SimulatedCamera:
    return SimulatedCamera(SimConfig(height=H, width=W, seed=SEED, pool=POOL))


# ------------------------------------------------------------------------------ the 1.8 IOC
class Legacy:
    """The legacy command line's IOC; `restart()` starts it again on the same state."""

    def __init__(self, workdir: Path, sim: SimulatorProcess) -> None:
        self.data_port, self.image_port, self.rest_port = free_port(), free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.rest_port}/"
        self.workdir = workdir
        self.args = [sim.address, "-o", str(self.data_port), "--image_output_stream_port",
                     str(self.image_port), "-r", str(self.rest_port), "--rest_api_interface",
                     "127.0.0.1", "--auto_start", "--autosave_dir", str(workdir / "autosave")]
        self.proc = self._start()

    def _start(self) -> IocProcess:
        proc = IocProcess(LEGACY_PREFIX, self.args, EPICS_ENV, self.workdir / "legacy.log",
                          command=LEGACY)
        try:
            wait_until(lambda: _processed(self.address) > 0, 60, what="frames processed")
        except BaseException:
            proc.stop()
            raise
        return proc

    def restart(self) -> None:
        assert self.proc.stop() == 0, self.proc.log()
        self.proc = self._start()

    def name(self, pv: pvs.PV) -> str:
        return self.proc.name(pv)


def _processed(address: str) -> int:
    try:
        return int(requests.get(address + "statistics", timeout=2).json()["statistics"][
            "n_processed_images"])
    except (requests.RequestException, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def legacy(workdir: Path) -> Iterator[Legacy]:
    args = simulator_args(LEGACY_PREFIX, height=H, width=W, seed=SEED, pool=POOL)
    with SimulatorProcess(args) as sim:
        ioc = Legacy(workdir, sim)
        try:
            yield ioc
        finally:
            code = ioc.proc.stop()
            assert code == 0, ioc.proc.log()


# ------------------------------------------------------------------------------ the PUB IOC
@pytest.fixture(scope="module")
def document(workdir: Path) -> Iterator[tuple[IocProcess, int, str]]:
    args = simulator_args(DOC_PREFIX, height=BIG, width=BIG, seed=SEED, pool=4)
    output_port, rest_port = free_port(), free_port()
    address = f"http://127.0.0.1:{rest_port}/"
    with SimulatorProcess(args) as sim:
        proc = IocProcess(DOC_PREFIX, [sim.address, "--output-port", str(output_port),
                                       "--output-mode", "PUB", "--rest-port", str(rest_port),
                                       "--auto-start", "--autosave-dir",
                                       str(workdir / "autosave-doc")],
                          EPICS_ENV, workdir / "document.log")
        try:
            wait_until(lambda: _processed(address) > 0, 60, what="frames processed")
            yield proc, output_port, address
        finally:
            code = proc.stop()
            assert code == 0, proc.log()


# ------------------------------------------------------------------------------ matching
def _matching(pva: Context, group: str, sources: list[Any], timeout: float = 20.0
              ) -> tuple[Any, list[dict[str, Any]]]:
    """A PVA snapshot and, from each of `sources`, the message of the same pulse."""
    seen: list[dict[int, Any]] = [{} for _ in sources]
    snapshots: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = pva.get(group, timeout=5)
        snapshots[int(snap.pulse_id.value)] = snap
        for source, messages in zip(sources, seen, strict=True):
            for _ in range(20):
                message = source.receive()
                if message is None:
                    break
                messages[message.data.pulse_id] = message.data
        common = set(snapshots).intersection(*seen)
        if common:
            pulse = max(common)
            return snapshots[pulse], [messages[pulse] for messages in seen]
        time.sleep(0.02)
    raise AssertionError(f"no pulse both in the PVs and the streams: PVs {sorted(snapshots)}, "
                         f"streams {[sorted(m)[-5:] for m in seen]}")


def _parameters(address: str) -> dict[str, Any]:
    return requests.get(address + "parameters", timeout=10).json()["parameters"]


def _assert_results_equal(snap: Any, data: dict[str, Any], spectrum: str, center: str,
                          fwhm: str) -> None:
    np.testing.assert_array_equal(data[spectrum].value, snap.spectrum.value)
    assert data[center].value == snap.center.value
    assert data[fwhm].value == snap.fwhm.value


# ------------------------------------------------------------------------------ 1: names
def test_v18_names_and_layout(legacy: Legacy, pva: Context, camera: SimulatedCamera) -> None:
    axis = np.linspace(9000.0, 9100.0, W)
    pva.put(legacy.name(pvs.SPECTRUM_X), axis)
    wait_until(lambda: np.allclose(pva.get(legacy.name(pvs.SPECTRUM_AXIS)), axis), 10,
               what="axis in use")
    p = LEGACY_PREFIX
    with (bsread.Source(host="127.0.0.1", port=legacy.data_port, mode=bsread.PULL,
                        receive_timeout=100) as data,
          bsread.Source(host="127.0.0.1", port=legacy.image_port, mode=bsread.PULL,
                        receive_timeout=100) as images):
        snap, (results, image) = _matching(pva, legacy.name(pvs.PVA_GROUP), [data, images])
        parameters = _parameters(legacy.address)

    assert list(results.data) == [f"{p}:SPECTRUM_Y", f"{p}:SPECTRUM_X", f"{p}:SPECTRUM_CENTER",
                                  f"{p}:SPECTRUM_FWHM", f"{p}:processing_parameters"]
    _assert_results_equal(snap, results.data, f"{p}:SPECTRUM_Y", f"{p}:SPECTRUM_CENTER",
                          f"{p}:SPECTRUM_FWHM")
    np.testing.assert_array_equal(results.data[f"{p}:SPECTRUM_X"].value, snap.axis.value)
    np.testing.assert_allclose(results.data[f"{p}:SPECTRUM_X"].value, axis, rtol=1e-12)
    assert json.loads(results.data[f"{p}:processing_parameters"].value) == parameters
    assert list(image.data) == [f"{p}:FPICTURE"]
    pulse = int(snap.pulse_id.value)
    np.testing.assert_array_equal(image.data[f"{p}:FPICTURE"].value,
                                  camera.images[(pulse - 1) % POOL])
    assert (image.global_timestamp, image.global_timestamp_offset) == (
        results.global_timestamp, results.global_timestamp_offset)
    pva.put(legacy.name(pvs.SPECTRUM_X), np.zeros(0))


def test_document_names(document: tuple[IocProcess, int, str], pva: Context) -> None:
    ioc, port, address = document
    channel = f"{DOC_PREFIX}:FPICTURE"
    with bsread.Source(host="127.0.0.1", port=port, mode=bsread.SUB,
                       receive_timeout=100) as source:
        snap, [message] = _matching(pva, ioc.name(pvs.PVA_GROUP), [source])
        parameters = _parameters(address)

    assert list(message.data) == [channel, f"{channel}.spectrum", f"{channel}.center",
                                  f"{channel}.fwhm", f"{channel}.processing_parameters",
                                  f"{channel}.n_saturated"]
    assert message.data[f"{channel}.n_saturated"].value == snap.n_saturated.value
    _assert_results_equal(snap, message.data, f"{channel}.spectrum", f"{channel}.center",
                          f"{channel}.fwhm")
    assert message.data[channel].value.shape == (BIG, BIG)
    assert json.loads(message.data[f"{channel}.processing_parameters"].value) == parameters


# ------------------------------------------------------------------------------ 4: PUB
def test_a_subscriber_that_stops_reading_does_not_stop_the_others(
        document: tuple[IocProcess, int, str]) -> None:
    _, port, address = document
    context = zmq.Context()
    stalled = context.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(f"tcp://127.0.0.1:{port}")
    try:
        with bsread.Source(host="127.0.0.1", port=port, mode=bsread.SUB,
                           receive_timeout=100) as healthy:
            time.sleep(2.0)  # the stalled subscriber's queues fill (~10 MB/s of images)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and healthy.receive() is not None:
                pass  # what was queued before
            start = _processed(address)
            received = 0
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                received += healthy.receive() is not None
            processed = _processed(address) - start
        statistics = requests.get(address + "statistics", timeout=10).json()["statistics"]
    finally:
        stalled.close(0)
        context.term()
    assert processed >= 40, processed
    assert received >= 0.8 * processed, (received, processed)
    assert statistics["n_out_subscriber_overflows"] >= 1, statistics


# ------------------------------------------------------------------------------ 2: REST echo
def _stream_parameters(legacy: Legacy, want: dict[str, Any], timeout: float = 10.0
                       ) -> dict[str, Any]:
    """processing_parameters of the data stream, once they are `want`."""
    name = f"{LEGACY_PREFIX}:processing_parameters"
    last = None
    with bsread.Source(host="127.0.0.1", port=legacy.data_port, mode=bsread.PULL,
                       receive_timeout=100) as data:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = data.receive()
            if message is not None:
                last = json.loads(message.data.data[name].value)
                if last == want:
                    return last
    raise AssertionError(f"stream parameters {last} never became {want}")


TAGS = {"tag": "run 42", "operator": "ab", "attempt": 3, "cold": True, "gain": 1.5,
        "long": "x" * 256}


def test_the_client_gets_back_what_it_gave(legacy: Legacy) -> None:
    client = PsssProcessingClient(legacy.address)
    data = np.full((H, W), 2, np.uint16)
    assert client.set_background("bkg.h5", data) == "ok"
    parameters = client.get_parameters()
    assert parameters["background"] == "bkg.h5"
    stored = Path(parameters["background_file"])
    assert stored.parent == legacy.workdir / "autosave" / "backgrounds"

    parameters = client.set_parameters(TAGS)
    assert {k: parameters[k] for k in TAGS} == TAGS
    assert client.get_parameters() == parameters
    assert _stream_parameters(legacy, parameters) == parameters
    # the whole dict back, as scripts do: nothing changes, nothing reloaded
    assert client.set_parameters(client.get_parameters()) == parameters
    # a tag changes, null removes one
    parameters = client.set_parameters({"attempt": None, "operator": "cd"})
    assert "attempt" not in parameters and parameters["operator"] == "cd"
    assert parameters["background"] == "bkg.h5"
    assert _stream_parameters(legacy, parameters) == parameters


BAD_EXTRAS: list[tuple[dict[str, Any], str]] = [
    ({"tag": [1, 2]}, "a number, a string, true/false or null"),
    ({"tag": {"a": 1}}, "a number, a string, true/false or null"),
    ({"tag": "x" * 257}, "256 characters"),
    ({f"k{i}": i for i in range(40)}, "at most 32"),
    ({"x" * 65: 1}, "64 characters"),
    ({"tag2": "y", "roi": [5, 2]}, "less than ymax"),
    ({"tag2": "y", "average_n": 0}, "within 1..10000"),
    ({"background_file": "/etc/passwd"}, "background_file"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_EXTRAS)
def test_extra_parameters_are_bounded(legacy: Legacy, body: dict[str, Any], reason: str) -> None:
    before = _parameters(legacy.address)
    response = requests.post(legacy.address + "parameters", json=body, timeout=10)
    assert response.status_code == 400, response.text
    assert reason in response.json()["status"], response.json()
    assert _parameters(legacy.address) == before


def test_statistics_last_sent_pulse_and_time_go_together(legacy: Legacy) -> None:
    with bsread.Source(host="127.0.0.1", port=legacy.data_port, mode=bsread.PULL,
                       receive_timeout=200) as data:
        wait_until(lambda: data.receive() is not None, 10, what="a message")
        statistics = requests.get(legacy.address + "statistics", timeout=10).json()[
            "statistics"]
    assert statistics["last_sent_pulse_id"] is not None
    assert statistics["last_sent_time"] is not None


# ------------------------------------------------------------------------------ the ROI reply
def test_a_roi_reply_says_which_roi_won_a_concurrent_put(legacy: Legacy, pva: Context) -> None:
    """REST writes [10 + i % 5, 90], each time with a background to load (which keeps the
    request busy for a while), while a PV Access client writes SPC_ROI_YMIN 5 or 6 as fast as
    it can (the same record put as a Channel Access put): a reply that is "ok" shows the ROI
    requested; otherwise it says which one is in force."""
    client = PsssProcessingClient(legacy.address)
    first = client.get_parameters()["background_file"]
    client.set_background("other.h5", np.full((H, W), 1, np.uint16))
    files = [first, client.get_parameters()["background_file"]]
    stop = threading.Event()
    name = legacy.name(pvs.SPC_ROI_YMIN)

    def hammer() -> None:
        i = 0
        while not stop.is_set():
            pva.put(name, 5 + i % 2, wait=False)
            i += 1
            time.sleep(0.001)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    conflicts: list[str] = []
    session = requests.Session()
    try:
        deadline = time.monotonic() + 15.0
        i = 0
        while time.monotonic() < deadline and len(conflicts) < 3:
            wanted = [10 + i % 5, 90]
            response = session.post(legacy.address + "parameters", timeout=10,
                                    json={"roi": wanted, "background": files[i % 2]})
            i += 1
            reply = response.json()
            if reply["state"] == "ok":
                assert reply["parameters"]["roi"] == wanted, reply
            else:
                assert response.status_code == 409, reply
                assert f"roi [{wanted[0]}, {wanted[1]}]" in reply["status"], reply
                assert "in force" in reply["status"], reply
                assert reply["parameters"]["roi"] != wanted
                conflicts.append(reply["status"])
    finally:
        stop.set()
        thread.join(5)
        session.close()
    assert conflicts, "no concurrent put landed between a REST write and its reply"
    requests.post(legacy.address + "parameters", json={"roi": [0, 0], "background": first},
                  timeout=10)


# ------------------------------------------------------------------------------ restart
def test_names_and_tags_survive_a_restart(legacy: Legacy) -> None:
    before = _parameters(legacy.address)
    assert before["background"] == "bkg.h5" and before["tag"] == "run 42"
    legacy.restart()
    after = _parameters(legacy.address)
    assert after == before
    assert _stream_parameters(legacy, after) == after
