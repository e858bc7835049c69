"""PsssProcessingClient against a stub HTTP server: legacy requests and return values, errors,
timeouts, binary uploads. (The live IOC tests are in test_rest_*.py.)"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests

from psss_ioc import PsssProcessingClient
from psss_ioc.rest.client import DEFAULT_ADDRESS


class Stub:
    """Records every request; answers with `replies[path]` (HTTP code, body bytes)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: dict[str, tuple[int, bytes]] = {}
        self.delay = 0.0


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            url = urlsplit(self.path)
            state.requests.append({"method": self.command, "path": url.path,
                                   "query": parse_qs(url.query), "headers": dict(self.headers),
                                   "body": self.rfile.read(length)})
            time.sleep(state.delay)
            code, body = state.replies.get(url.path, (200, b'{"state": "ok", "status": "x"}'))
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def ok(**fields: Any) -> tuple[int, bytes]:
    return 200, json.dumps({"state": "ok", "status": "processing", **fields}).encode()


def test_default_address_and_get_address() -> None:
    assert PsssProcessingClient().get_address() == DEFAULT_ADDRESS == "http://sf-daqsync-02:12000/"
    assert PsssProcessingClient("http://h:1").get_address() == "http://h:1/"


def test_legacy_methods_requests_and_return_values(stub: tuple[Stub, str]) -> None:
    state, address = stub
    state.replies = {
        "/start": ok(), "/stop": (200, b'{"state": "ok", "status": "stopped"}'),
        "/status": ok(), "/statistics": ok(statistics={"n_processed_images": 5}),
        "/parameters": ok(parameters={"roi": [1, 2], "background": ""}),
        "/background": ok(),
    }
    client = PsssProcessingClient(address)
    assert client.start() == "processing"
    assert client.stop() == "stopped"
    assert client.get_status() == "processing"
    assert client.get_statistics() == {"n_processed_images": 5}
    assert client.get_parameters() == {"roi": [1, 2], "background": ""}
    assert client.set_parameters({"roi": [1, 2]}) == {"roi": [1, 2], "background": ""}
    assert client.set_background() == "ok"
    assert client.set_background("bg.h5", np.arange(6, dtype=np.uint16).reshape(2, 3)) == "ok"
    seen = [(r["method"], r["path"]) for r in state.requests]
    assert seen == [("POST", "/start"), ("POST", "/stop"), ("GET", "/status"),
                    ("GET", "/statistics"), ("GET", "/parameters"), ("POST", "/parameters"),
                    ("POST", "/background"), ("POST", "/background")]
    assert json.loads(state.requests[5]["body"]) == {"roi": [1, 2]}
    assert json.loads(state.requests[6]["body"]) == {"filename": "", "data": None}
    assert json.loads(state.requests[7]["body"]) == {"filename": "bg.h5",
                                                     "data": [[0, 1, 2], [3, 4, 5]]}
    assert state.requests[7]["headers"]["Content-Type"] == "application/json"
    assert "Authorization" not in state.requests[0]["headers"]


@pytest.mark.parametrize("code", [200, 400, 404, 500])
def test_error_reply_raises_value_error_with_the_reason(stub: tuple[Stub, str], code: int
                                                        ) -> None:
    state, address = stub
    state.replies["/parameters"] = (code, b'{"state": "error", "status": "roi refused: why"}')
    with pytest.raises(ValueError, match=r"^roi refused: why$"):
        PsssProcessingClient(address).set_parameters({"roi": [5, 1]})


def test_html_reply_raises_value_error(stub: tuple[Stub, str]) -> None:
    state, address = stub
    state.replies["/status"] = (413, b"<html><body>Request Entity Too Large</body></html>")
    with pytest.raises(ValueError, match="HTTP 413, not a JSON reply: <html>"):
        PsssProcessingClient(address).get_status()


def test_request_timeout(stub: tuple[Stub, str]) -> None:
    state, address = stub
    state.delay = 2.0
    t0 = time.monotonic()
    with pytest.raises(requests.Timeout):
        PsssProcessingClient(address, timeout=0.3).get_status()
    assert time.monotonic() - t0 < 1.5


def test_large_arrays_go_up_as_npy(stub: tuple[Stub, str]) -> None:
    state, address = stub
    data = np.arange(20000, dtype=np.int64).reshape(100, 200) % 60000
    client = PsssProcessingClient(address, binary_threshold=1000)
    assert client.set_background("dark frame.h5", data) == "ok"
    request = state.requests[-1]
    assert request["headers"]["Content-Type"] == "application/x-npy"
    assert request["query"] == {"filename": ["dark frame.h5"]}
    sent = np.load(io.BytesIO(request["body"]), allow_pickle=False)
    assert sent.dtype == np.uint16  # whole numbers in range: half the bytes of int32
    np.testing.assert_array_equal(sent, data)
    # out of uint16 range: sent as is, for the server to refuse with a reason
    client.set_background("x.h5", np.full((100, 200), 70000))
    assert np.load(io.BytesIO(state.requests[-1]["body"])).max() == 70000
    # threshold None: always JSON (as the legacy client)
    PsssProcessingClient(address, binary_threshold=None).set_background("x.h5", data)
    assert state.requests[-1]["headers"]["Content-Type"] == "application/json"


def test_default_threshold_sends_a_full_frame_as_npy(stub: tuple[Stub, str]) -> None:
    state, address = stub
    frame = np.ones((2016, 2560), dtype=np.uint16)
    PsssProcessingClient(address).set_background("full.h5", frame)
    assert state.requests[-1]["headers"]["Content-Type"] == "application/x-npy"
    assert len(state.requests[-1]["body"]) < frame.nbytes + 1000
    PsssProcessingClient(address).set_background("small.h5", frame[:200, :256])
    assert state.requests[-1]["headers"]["Content-Type"] == "application/json"


def test_token_is_sent_as_bearer(stub: tuple[Stub, str]) -> None:
    state, address = stub
    with PsssProcessingClient(address, token="abc") as client:
        client.start()
    assert state.requests[-1]["headers"]["Authorization"] == "Bearer abc"
