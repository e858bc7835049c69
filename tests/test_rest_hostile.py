"""Hostile REST clients against a live IOC (no camera) with a REST token and a low file
descriptor limit: requests a browser sends cross-site without a preflight, a token that is not
ASCII, JSON bodies beyond the JSON limit, and hundreds of idle connections (issues "Compatible
and closed" 2 and "Robust against hostile input" 5).

The IOC runs under ``ulimit -n 192``: without a cap on REST connections, idle connections took
every descriptor and Channel Access clients and autosave failed with them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from iochelpers import EPICS_ENV, RUN, IocProcess, caget, caput, wait_until

from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port
from psss_ioc.rest import server as rest

PREFIX = "TST-PSSS-HOSTILE"
TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FD_LIMIT = 192
IDLE_CONNECTIONS = 200


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rest-hostile")


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def address(port: int) -> str:
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def ioc(workdir: Path, port: int, address: str) -> Iterator[IocProcess]:
    command = ["sh", "-c", f'ulimit -n {FD_LIMIT} && exec "$0" "$@"', *RUN]
    proc = IocProcess(PREFIX, ["--output-port", "0", "--rest-port", str(port), "--rest-token",
                               TOKEN, "--autosave-dir", str(workdir / "autosave"),
                               "--autosave-period", "1"],
                      EPICS_ENV, workdir / "ioc.log", command=command)
    try:
        wait_until(lambda: _up(address), 30, what="REST up")
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, (workdir / "ioc.log").read_text()[-5000:]


def _up(address: str) -> bool:
    try:
        return requests.get(address + "status", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _roi(address: str) -> list[int]:
    return requests.get(address + "parameters", timeout=10).json()["parameters"]["roi"]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ content types
# What a web page can send cross-site without a CORS preflight (a form, or fetch with a text
# or untyped body): the IOC must not act on it, token or not.
SIMPLE_TYPES = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x", None]


@pytest.mark.parametrize("content_type", SIMPLE_TYPES)
@pytest.mark.parametrize("path", ["parameters", "background", "start", "stop"])
def test_a_body_a_browser_sends_without_preflight_is_refused(ioc: IocProcess, address: str,
                                                             path: str,
                                                             content_type: str | None) -> None:
    before = _roi(address)
    body = {"parameters": b'{"roi": [3, 7]}', "background": b'{"filename": "", "data": null}',
            "start": b"x=1", "stop": b"x=1"}[path]
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = requests.post(address + path, data=body, headers=headers, timeout=10)
    assert response.status_code == 415, (response.status_code, response.text)
    reply = response.json()
    assert reply["state"] == "error" and "application/json" in reply["status"], reply
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert _roi(address) == before


def test_json_and_binary_uploads_and_the_legacy_client_still_work(ioc: IocProcess,
                                                                  address: str) -> None:
    reply = requests.post(address + "parameters", json={"roi": [3, 7]}, headers=AUTH, timeout=10)
    assert reply.status_code == 200 and reply.json()["parameters"]["roi"] == [3, 7]
    # the legacy client's bodiless start/stop (no Content-Type): stop answers, start says why
    assert requests.post(address + "stop", headers=AUTH, timeout=10).status_code == 200
    assert requests.post(address + "start", headers=AUTH, timeout=10).status_code == 409
    image = np.full((4, 6), 9, np.uint16)
    for content_type in ("application/x-npy", "application/octet-stream"):
        reply = requests.post(address + "background", data=_npy(image), timeout=10,
                              params={"filename": "tiny.npy"},
                              headers={**AUTH, "Content-Type": content_type})
        assert reply.status_code == 200, reply.text
        assert _parameters(address)["background"] == "tiny.npy"
    requests.post(address + "background", json={"filename": "", "data": None}, headers=AUTH,
                  timeout=10)
    requests.post(address + "parameters", json={"roi": [0, 0]}, headers=AUTH, timeout=10)


def _parameters(address: str) -> dict[str, Any]:
    return requests.get(address + "parameters", timeout=10).json()["parameters"]


# ------------------------------------------------------------------------------ raw requests
def _raw(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return _reply(s)


def _reply(s: socket.socket) -> bytes:
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                return data
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _log_tracebacks(ioc: IocProcess) -> int:
    return ioc.log_path.read_text(errors="replace").count("Traceback")


@pytest.mark.parametrize("token", ["t\u00f6ken".encode(), "\u2603".encode(), b"\xff\xfe",
                                   "hostile-token\u00e9".encode()])
def test_a_token_that_is_not_ascii_is_refused_without_a_traceback(ioc: IocProcess, port: int,
                                                                 token: bytes) -> None:
    before = _log_tracebacks(ioc)
    reply = _raw(port, b"POST /stop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                 + b"\r\nContent-Length: 0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), reply[:300]
    assert json.loads(body)["state"] == "error"
    assert _log_tracebacks(ioc) == before


# ------------------------------------------------------------------------------ body sizes
@pytest.mark.parametrize("path", ["parameters", "background"])
def test_a_json_body_over_the_json_limit_is_refused_before_it_is_read(ioc: IocProcess,
                                                                       port: int,
                                                                       path: str) -> None:
    declared = rest.MAX_JSON_BYTES + 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"POST /{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Authorization: Bearer {TOKEN}\r\nContent-Length: {declared}\r\n\r\n"
                  .encode() + b'{"filename": ')
        reply = _reply(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert f"JSON body of {declared} bytes".encode() in body


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_chunked_json_body_is_cut_at_the_limit(ioc: IocProcess, port: int) -> None:
    """No length declared: the IOC stops reading at the JSON limit (the legacy service's 500 MB
    body took it to 6 GB)."""
    rss_before = _rss_mb(ioc.proc.pid)
    row = b"[" + b"65535, " * 2559 + b"65535], "
    chunk = row * 256  # ~9 MB
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /background HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
                  .encode())
        start = b'{"filename": "big.h5", "data": ['
        s.sendall(b"%x\r\n%s\r\n" % (len(start), start))
        sent = 0
        with contextlib.suppress(OSError):  # the IOC may close once it refused
            while sent < 2 * rest.MAX_JSON_BYTES:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        reply = _reply(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert sent < 2 * rest.MAX_JSON_BYTES or b"larger than the limit" in body
    assert _rss_mb(ioc.proc.pid) - rss_before < 400


def test_a_large_binary_body_is_still_accepted_for_reading(ioc: IocProcess, port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"POST /background HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                  + f"Authorization: Bearer {TOKEN}\r\nContent-Length: "
                  f"{rest.MAX_JSON_BYTES * 2}\r\n\r\n".encode() + _npy(np.zeros((2, 2)))[:20])
        with pytest.raises(TimeoutError):
            s.recv(100)  # no 413: the IOC waits for the rest of the body


# ------------------------------------------------------------------------------ connections
def _saved(workdir: Path) -> dict[str, Any]:
    path = workdir / "autosave" / f"{PREFIX}.softsav"
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def test_idle_connections_leave_channel_access_and_autosave_alone(
        ioc: IocProcess, workdir: Path, port: int, address: str) -> None:
    log_size = ioc.log_path.stat().st_size
    baseline = len(os.listdir(f"/proc/{ioc.proc.pid}/fd"))
    idle: list[socket.socket] = []
    try:
        # a request whose body stops coming, then connections that never send a byte
        stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
        idle.append(stalled)
        stalled.sendall(b"POST /parameters HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nContent-Length: 100\r\nAuthorization: Bearer "
                        + TOKEN.encode() + b"\r\n\r\n{")
        for _ in range(IDLE_CONNECTIONS):  # all at once: the kernel connects them meanwhile
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        fds = []
        for _ in range(20):  # while the connections beyond the limit are answered
            fds.append(len(os.listdir(f"/proc/{ioc.proc.pid}/fd")))
            time.sleep(0.1)
        assert max(fds) < FD_LIMIT - 32, f"descriptors open: {fds}"

        # Channel Access: a new client reads and writes; the setting is saved
        assert caget(ioc.name(pvs.STATUS)) == "Stopped"
        assert caput(ioc.name(pvs.AVG_N), 7).returncode == 0
        wait_until(lambda: _saved(workdir).get(ioc.name(pvs.AVG_N)) == 7, 10,
                   what="AVG_N 7 autosaved")
        assert ioc.get(pvs.AUTOSAVE_STATUS) == "OK"
        # REST answers a new client at once: the reply or "too many connections", in JSON
        response = requests.get(address + "status", timeout=5)
        assert response.status_code in (200, 503), response.text
        assert response.json()["state"] in ("ok", "error")

        # the IOC closes the idle connections within its idle timeout, the stalled upload
        # with 408 (connections still waiting in the kernel's accept queue are not its own)
        wait_until(lambda: len(os.listdir(f"/proc/{ioc.proc.pid}/fd")) <= baseline + 4,
                   rest.IDLE_TIMEOUT + 5, 0.2, "idle connections closed")
        stalled.settimeout(5)
        assert stalled.recv(100).startswith(b"HTTP/1.1 408")
        assert _up(address)
    finally:
        for s in idle:
            s.close()
    assert ioc.log_path.stat().st_size - log_size < 50_000
    assert caput(ioc.name(pvs.AVG_N), 10).returncode == 0
