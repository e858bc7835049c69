"""Full-size background uploads and the REST token, on a live IOC without a camera.

Without frames the image shape is unknown, so a full 2016 x 2560 background is accepted as is.
The IOC has a REST token: writes need it, reads do not.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import requests
from iochelpers import EPICS_ENV, IocProcess, caget, wait_until

from psss_ioc import PsssProcessingClient
from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port

PREFIX = "TST-PSSS-RESTUP"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FULL = (2016, 2560)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rest-upload")


@pytest.fixture(scope="module")
def address(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = IocProcess(PREFIX, ["--output-port", "0", "--rest-port", str(port), "--rest-token",
                               TOKEN, "--background-dir", str(workdir / "bg")],
                      EPICS_ENV, workdir / "ioc.log")
    address = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: _up(address), 30, what="REST up")
        yield address
    finally:
        code = proc.stop()
        assert code == 0, (workdir / "ioc.log").read_text()[-5000:]


@pytest.fixture(scope="module")
def ioc_name() -> str:
    return pvs.full_name(PREFIX, pvs.BACKGROUND_FILE)


def _up(address: str) -> bool:
    try:
        return requests.get(address + "status", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _frame(seed: int) -> np.ndarray:
    """A realistic dark frame: 4- and 5-digit values."""
    rng = np.random.default_rng(seed)
    return rng.integers(1000, 65536, size=FULL, dtype=np.int64).astype(np.uint16)


def _stored(address: str) -> Path:
    parameters = requests.get(address + "parameters", timeout=10).json()["parameters"]
    return Path(parameters["background_file"])  # "background": the name uploaded under


def _caget_string(name: str) -> str:
    return caget(name, "-S")


def test_full_size_json_background_with_five_digit_values(address: str, ioc_name: str,
                                                          workdir: Path) -> None:
    frame = _frame(1)
    body = json.dumps({"filename": "dark_full.h5", "data": frame.tolist()}).encode()
    assert len(body) > 30_000_000  # the legacy service answered these with an HTML 413
    response = requests.post(address + "background", data=body, timeout=120,
                             headers={"Content-Type": "application/json", **AUTH})
    assert response.status_code == 200, response.text[:300]
    assert response.json() == {"state": "ok", "status": "stopped"}
    stored = _stored(address)
    assert stored.parent == workdir / "bg" and stored.name.startswith("dark_full_")
    with h5py.File(stored) as f:
        assert f["/image"].dtype == np.uint16
        np.testing.assert_array_equal(f["/image"][()], frame)
    assert _caget_string(ioc_name) == str(stored)  # BACKGROUND_FILE: survives a restart


def test_client_uploads_large_arrays_as_npy(address: str) -> None:
    frame = _frame(2)
    client = PsssProcessingClient(address, token=TOKEN)
    before = _stored(address)
    assert client.set_background("second.h5", frame.astype(np.int64)) == "ok"
    stored = _stored(address)
    assert stored != before and stored.name.startswith("second_")
    with h5py.File(stored) as f:
        np.testing.assert_array_equal(f["/image"][()], frame)


def test_hdf5_body(address: str) -> None:
    frame = _frame(3)[:100, :200]
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset("image", data=frame)
    response = requests.post(address + "background", params={"filename": "h5body.h5"},
                             data=buffer.getvalue(), timeout=60,
                             headers={"Content-Type": "application/x-hdf5", **AUTH})
    assert response.status_code == 200, response.text
    with h5py.File(_stored(address)) as f:
        np.testing.assert_array_equal(f["/image"][()], frame)


@pytest.mark.parametrize(("array", "reason"), [
    (np.full((10, 10), 70000, dtype=np.int32), "within 0..65535"),
    (np.full((10, 10), 0.5), "whole numbers"),
    (np.full((10, 10), np.nan), "NaN"),
    (np.zeros((4, 4, 4), dtype=np.uint16), "2-D"),
    (np.array([["a", "b"], ["c", "d"]]), "numbers"),
])
def test_bad_npy_bodies(address: str, array: np.ndarray, reason: str) -> None:
    before = _stored(address)
    buffer = io.BytesIO()
    np.save(buffer, array)
    response = requests.post(address + "background", data=buffer.getvalue(), timeout=30,
                             headers={"Content-Type": "application/x-npy", **AUTH})
    assert response.status_code == 400 and reason in response.json()["status"]
    assert _stored(address) == before


def test_writes_need_the_token_reads_do_not(address: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for path in ("start", "stop", "parameters", "background"):
            response = requests.post(address + path, json={}, headers=headers, timeout=10)
            assert response.status_code == 401, (path, headers)
            assert response.json()["state"] == "error" and "token" in response.json()["status"]
            assert response.headers["WWW-Authenticate"] == "Bearer"
    for path in ("status", "parameters", "statistics", "openapi.json"):
        assert requests.get(address + path, timeout=10).status_code == 200
    with pytest.raises(ValueError, match="token"):
        PsssProcessingClient(address).stop()
    assert PsssProcessingClient(address, token=TOKEN).stop() == "stopped"


def test_start_without_input_stream_is_a_conflict(address: str) -> None:
    response = requests.post(address + "start", headers=AUTH, timeout=10)
    assert response.status_code == 409
    assert "no input stream" in response.json()["status"]
    assert requests.get(address + "status", timeout=10).json()["status"] == "stopped"
