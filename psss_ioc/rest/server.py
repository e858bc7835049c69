"""The legacy REST API of psss_processing, served by the IOC (the only HTTP server).

It holds no state of its own: every change is a call of the IOC's control layer
(`psss_ioc.ioc.control.Control`), the one the record callbacks of a Channel Access put call,
so both paths are validated alike and the records (and their monitors) show REST changes.

The server is aiohttp on its own asyncio loop in a daemon thread: requests are served
concurrently (a slow upload never blocks /status or /stop), and HTTP work never delays the
IOC's own dispatcher. Parsing and file I/O run in an executor; writes are serialised.

Replies are always JSON: ``{"state": "ok"|"error", "status": ...}`` plus one endpoint field.
Errors carry a fitting HTTP code (400 bad request, 401 bad token, 403 host not allowed to
write by the access security file, 404 unknown path,
405 wrong method, 408 request body not sent in time, 409 cannot start or the ROI was changed
by another write, 413 body over `MAX_JSON_BYTES` (JSON) or `MAX_BODY_BYTES` (binary), 415 a
content type a browser could send cross-site without asking (text/plain, forms), 500 bug, 503
too many connections, 504 the IOC did not finish in time) and the reason in ``status``.

Hostile clients: a connection that sends no complete request (or no body data) for
`IDLE_TIMEOUT` is closed, at most `MAX_CONNECTIONS` are served at once (more get 503 and are
closed), so HTTP clients never take the file descriptors Channel Access and autosave need, and
error lines of the HTTP stack are rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from psss_ioc.core import background as bgfile
from psss_ioc.core.background import (
    decode_binary,
    is_binary,
)
from psss_ioc.ioc import access, pvs
from psss_ioc.ioc.config import default_background_dir
from psss_ioc.ioc.control import Refused
from psss_ioc.ioc.parameters import (
    BACKGROUND_FILE,
    KNOWN,
    SETTABLE,
    dump_extra,
    merged_extra,
)
from psss_ioc.ioc.pvs import State
from psss_ioc.ratelimit import RateLimitedLog
from psss_ioc.rest.limits import (
    DEFAULT_PORT,
    IDLE_TIMEOUT,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    MAX_JSON_BYTES,
    MAX_PARAMETERS_BYTES,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
# DEFAULT_PORT and the limits openapi.py describes: limits.py
BODY_TIMEOUT = 300.0  # a whole request body (a 512 MB upload at 2 MB/s)
# After an error reply to a request whose body was not read, its rest is read (and dropped)
# this long so that the client sees the reply, then the connection is closed.
LINGER_TIME = 2.0
# Connections waiting to be accepted; asyncio also accepts this many at once before it can
# answer any of them, so it bounds the descriptors a burst of connections takes too.
ACCEPT_BACKLOG = 16
# Background uploads that may be this large or more go one at a time (RestApi.background).
LARGE_BODY = 1024 * 1024
JSON_TYPE = "application/json"
BINARY_TYPES = ("application/x-npy", "application/x-hdf5", "application/x-hdf",
                "application/octet-stream")
# How long a write waits for the control layer (a background file to read, the worker to stop).
CONTROL_TIMEOUT = 30.0
ENDPOINTS = ("/start", "/stop", "/status", "/background", "/background/acquire",
             "/background/cancel", "/parameters", "/statistics",
             "/openapi.json")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Origin, Accept, Content-Type, X-Requested-With, "
                                    "X-CSRF-Token, Authorization",
}
# Settings POST /parameters sets; GET /parameters also shows background_file and the extra keys
# clients added (psss_ioc.ioc.parameters).
PARAMETERS = SETTABLE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestError(Exception):
    """A request the shim refuses; `reason` goes into the reply's ``status``."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# ------------------------------------------------------------------------------ replies
def reply(status: str, http_status: int = 200, **extra: Any) -> web.Response:
    body = {"state": "ok" if http_status < 400 else "error", "status": status, **extra}
    return web.json_response(body, status=http_status, headers=CORS_HEADERS)


def error_reply(reason: str, http_status: int, headers: dict[str, str] | None = None
                ) -> web.Response:
    response = reply(reason, http_status)
    response.headers.update(headers or {})
    return response


def _reason_of(exc: web.HTTPException, request: web.Request) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return f"unknown path {request.path}; endpoints: {', '.join(ENDPOINTS)}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(m for m in exc.allowed_methods if m != "HEAD"))
        return f"method {request.method} not allowed for {request.path}; use {allowed}"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"request body larger than the limit of {MAX_BODY_BYTES} bytes"
    return exc.reason or f"HTTP {exc.status}"


# ------------------------------------------------------------------------------ background data
def parse_json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"request body is not valid JSON: {e}") from None


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float | np.floating) else str(value)


# ------------------------------------------------------------------------------ the IOC side
class Controller:
    """Legacy operations over the IOC's control layer (`ioc.control.Control`), the same one
    the record callbacks call. No state of its own besides the lock that keeps REST writes
    from interleaving. Control calls that may wait (a file to read, the worker to stop) run
    in an executor, so this server's loop keeps serving."""

    def __init__(self, ioc: Any, background_dir: Path) -> None:
        self.ioc = ioc
        self.control = ioc.control
        self.background_dir = background_dir
        self.write_lock = asyncio.Lock()

    # ---------------------------------------------------------------- reads
    def status(self) -> str:
        return "stopped" if self.control.state == State.STOPPED else "processing"

    def message(self) -> str:
        return str(self.ioc.rec(pvs.MESSAGE).get())

    def parameters(self) -> dict[str, Any]:
        """The legacy parameters: the same view as the output stream's processing_parameters
        (the ROI in force, the uploaded background name, the extra keys)."""
        return self.control.legacy_parameters()

    def statistics(self) -> dict[str, Any]:
        control = self.control
        stats = control.statistics()
        shape = control.image_shape
        fault = control.fault
        # The last message sent, pulse id and time together: the output stream's, else (no
        # stream) the last frame processed, whose results went to the records.
        sender = getattr(getattr(self.ioc, "sender", None), "counters", None)
        last_pulse, last_time = ((sender.last_pulse_id, sender.last_sent_time) if sender
                                 else (stats.last_pulse_id, stats.last_sent_time))
        return {
            # the five legacy keys, same meaning (times as the legacy str(datetime))
            "processing_start_time": _legacy_time(stats.processing_start_time),
            "last_sent_pulse_id": last_pulse,
            "last_sent_time": _legacy_time(last_time),
            "n_processed_images": stats.n_processed,
            "last_processing_duration_ms": stats.proc_time_ms,
            # new figures
            "processing_start_timestamp": stats.processing_start_time,
            "last_sent_timestamp": last_time,
            "state": pvs.STATE_LABELS[stats.state],
            "rate_hz": stats.rate_hz,
            "n_received": stats.n_received,
            "n_sent": stats.n_sent,
            "n_lost": stats.n_lost,
            "n_errors": stats.n_errors,
            "n_out_dropped": stats.n_out_dropped,
            "n_out_subscriber_overflows": getattr(sender, "subscriber_overflows", 0),
            "errors_by_kind": dict(stats.errors_by_kind),
            "image_shape": list(shape) if shape is not None else None,
            "message": self.message(),
            # a wrong channel says so here too: the one expected, the image-like ones seen
            "image_channel": self.ioc.config.channel,
            "channels_seen": list(fault.channels_seen) if fault is not None else [],
            "background_acquiring": control.acquiring,
            "background_progress": float(self.ioc.rec(pvs.BACKGROUND_PROGRESS).get()),
        }

    # ---------------------------------------------------------------- writes
    async def _call(self, method: Callable[..., Any], *args: Any, status: int = 400,
                    **kwargs: Any) -> Any:
        """A control-layer call in an executor; its refusal is the reply (`status`)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(None, lambda: method(*args, **kwargs)), CONTROL_TIMEOUT)
        except Refused as e:
            raise RequestError(str(e), status) from None
        except TimeoutError:
            raise RequestError(f"the IOC did not finish within {CONTROL_TIMEOUT:g} s",
                               504) from None

    def acquisition(self) -> dict[str, Any]:
        return {"running": self.control.acquiring,
                "n": int(self.ioc.rec(pvs.BACKGROUND_N).get()),
                "progress": float(self.ioc.rec(pvs.BACKGROUND_PROGRESS).get())}

    async def acquire_background(self, n: int | None) -> None:
        if self.control.acquiring:
            raise RequestError("a background acquisition is running: POST /background/cancel "
                               "ends it", 409)
        await self._call(self.control.start_background_acquisition, n, status=409)

    async def cancel_acquisition(self) -> bool:
        return bool(await self._call(self.control.cancel_background_acquisition,
                                     "cancelled over REST"))

    async def start(self) -> None:
        await self._call(self.control.start, status=409)
        if self.status() != "processing":  # pragma: no cover - start() refused it
            raise RequestError(self.message() or "cannot start", 409)

    async def stop(self) -> None:
        await self._call(self.control.stop)

    def check_roi(self, roi: Any) -> tuple[int, int]:
        """The pair, checked up front with the reason: both limits are written at once, so an
        invalid pair would never be completed; it is refused, and nothing changes."""
        if (not isinstance(roi, list | tuple) or len(roi) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in roi)):
            raise RequestError(f"roi must be [ymin, ymax] (two whole numbers), not "
                               f"{json.dumps(roi)[:100]}")
        pair = (int(roi[0]), int(roi[1]))
        try:
            self.control.check_roi_pair(pair)
        except Refused as e:
            raise RequestError(str(e)) from None
        return pair

    async def set_roi(self, roi: Any) -> None:
        """Both limits at once, through the same rule as a CA put (`RoiControl`)."""
        ymin, ymax = self.check_roi(roi)
        await self._call(self.control.write_roi, ymin, ymax)

    @staticmethod
    def check_scalar(pv: pvs.PV, value: Any, kind: type) -> Any:
        """AVG_N, FIT_ENABLE, FIT_MIN_SNR: the JSON value as the control layer takes it,
        type and range checked with the legacy API's wording."""
        ok_type = (isinstance(value, bool) if kind is bool else
                   isinstance(value, int | float) and not isinstance(value, bool)
                   and (kind is float or float(value).is_integer()))
        if not ok_type or (kind is float and not np.isfinite(value)):
            raise RequestError(f"{pv.name.lower()} must be {_kind_word(kind)}, "
                               f"not {json.dumps(value)[:100]}")
        if kind is not bool and not (pv.low or 0) <= value <= (pv.high or np.inf):
            raise RequestError(f"{pv.name.lower()} must be within {_num(pv.low)}..{_num(pv.high)},"
                               f" got {_num(value)}")
        return kind(value)

    async def set_scalar(self, pv: pvs.PV, typed: Any) -> None:
        """Put a value `check_scalar` made, through the control layer."""
        setter = {pvs.AVG_N: self.control.set_average_n,
                  pvs.FIT_ENABLE: self.control.set_fit_enabled,
                  pvs.FIT_MIN_SNR: self.control.set_min_snr}[pv]
        await self._call(setter, typed)

    def background_to_load(self, value: Any) -> str | None:
        """The file a POST /parameters ``background`` asks to load, None when it names the one
        in force (by the name shown or its path: a client sends back what it got)."""
        if not isinstance(value, str):
            raise RequestError("background must be a file name (a string), not "
                               f"{json.dumps(value)[:100]}")
        shown = self.parameters()
        if value in (shown["background"], shown[BACKGROUND_FILE]):
            return None
        path = _resolved(value)
        return None if path == shown[BACKGROUND_FILE] else path

    def check_extra(self, changes: dict[str, Any]) -> str | None:
        """The PARAMETERS_EXTRA text after `changes`, None if unchanged; RequestError why not."""
        current = self.control.parameters.extra()
        try:
            extra = merged_extra(current, changes)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if extra == current:
            return None
        text = dump_extra(extra)
        if len(text.encode()) >= pvs.EXTRA_LENGTH:  # pragma: no cover - bounded by the rules
            raise RequestError("the extra parameters do not fit the record")
        return text

    async def set_extra(self, text: str) -> None:
        await self._call(self.control.set_extra, text)

    async def set_background_file(self, path: str) -> None:
        """Load (or with "" clear) a background file: read once, by the control layer."""
        await self._call(self.control.set_background, path, requester_told=True)

    async def upload_background(self, original: str, data: Any) -> Path:
        """Check and store an uploaded image, then load it (the control layer)."""
        try:
            return await self._call(self.control.upload_background, self.background_dir,
                                    original, data)
        except RequestError:
            raise
        except ValueError as e:  # (BackgroundError: the upload is no usable background)
            raise RequestError(str(e)) from None


def _kind_word(kind: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number"}[kind]


def _legacy_time(epoch: float | None) -> str | None:
    return None if epoch is None else str(datetime.datetime.fromtimestamp(epoch))


# ------------------------------------------------------------------------------ HTTP
class RestApi:
    """The aiohttp application: routes, error and CORS middleware, optional write token."""

    def __init__(self, controller: Controller, token: str | None = None) -> None:
        self.c = controller
        self.token = token or None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES,
                                   middlewares=[self._middleware])
        self._large_body = asyncio.Semaphore(1)  # see background()
        self.app.add_routes([
            web.post("/start", self.start),
            web.post("/stop", self.stop),
            web.get("/status", self.status),
            web.post("/background", self.background),
            web.post("/background/acquire", self.acquire_background),
            web.post("/background/cancel", self.cancel_acquisition),
            web.get("/parameters", self.get_parameters),
            web.post("/parameters", self.set_parameters),
            web.get("/statistics", self.statistics),
            web.get("/openapi.json", self.openapi),
        ])

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.method == "OPTIONS":
                return self._preflight(request)
            _check_authorization_is_ascii(request, self.token)
            self._authorize(request)
            _check_content_type(request)
            return await handler(request)
        except RequestError as e:
            return error_reply(e.reason, e.status, _auth_header(e.status))
        except bgfile.BackgroundError as e:  # an uploaded background refused, as it says
            return error_reply(str(e), 400)
        except web.HTTPException as e:
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}
            return error_reply(_reason_of(e, request), e.status, headers)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # a bug: say so in JSON, keep serving
            log.exception("REST %s %s failed", request.method, request.path)
            return error_reply(f"internal error: {type(e).__name__}: {e}", 500)

    def _preflight(self, request: web.Request) -> web.Response:
        exc = request.match_info.http_exception
        if isinstance(exc, web.HTTPNotFound):
            raise exc
        return web.Response(status=200, headers=CORS_HEADERS)

    def _authorize(self, request: web.Request) -> None:
        """Write requests: only from a host the access security file in force lets write the
        settings over CA/PVA (403 otherwise), and with a token ``Authorization: Bearer
        <token>`` (401 otherwise). Reads stay open."""
        if request.method in ("GET", "HEAD"):
            return
        if not access.may_write_settings(request.remote):
            raise RequestError(f"writes from {request.remote} are refused: the IOC's access "
                               f"security file does not let this host write the settings "
                               f"(HAG {access.CONTROL_HOSTS})", 403)
        if self.token is None:
            return
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if not (scheme.lower() == "bearer"
                and hmac.compare_digest(value.strip().encode(), self.token.encode())):
            raise RequestError("this endpoint needs the header 'Authorization: Bearer <token>' "
                               "with the IOC's REST token", 401)

    async def _body(self, request: web.Request, limit: int) -> bytearray:
        """The body, read within `limit` bytes and within `IDLE_TIMEOUT` per piece,
        `BODY_TIMEOUT` in all."""
        declared = request.content_length
        if declared is not None and declared > limit:
            raise RequestError(_too_large(limit, f"body of {declared} bytes"), 413)
        body = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUT
        try:
            while True:
                timeout = min(IDLE_TIMEOUT, deadline - loop.time())
                try:
                    chunk = await asyncio.wait_for(request.content.readany(), max(timeout, 0))
                except TimeoutError:
                    raise RequestError(
                        f"request body not received in time (nothing for {IDLE_TIMEOUT:g} s, "
                        f"or not all within {BODY_TIMEOUT:g} s)", 408) from None
                if not chunk:
                    return body
                body += chunk
                if len(body) > limit:
                    raise RequestError(_too_large(limit, "body"), 413)
        except (ConnectionResetError, web.RequestPayloadError):
            # the client went away mid-upload, or sent a broken chunk
            log.info("REST %s %s: the upload broke off", request.method, request.path)
            raise RequestError("connection lost during the upload") from None

    async def _json_object(self, request: web.Request, what: str) -> dict[str, Any]:
        body = await self._body(request, MAX_PARAMETERS_BYTES)
        loop = asyncio.get_running_loop()
        value = await loop.run_in_executor(None, parse_json_body, body)
        if not isinstance(value, dict):
            raise RequestError(f"{what} must be a JSON object, not {type(value).__name__}")
        return value

    # ---------------------------------------------------------------- endpoints
    async def acquire_background(self, request: web.Request) -> web.Response:
        """Average the next BACKGROUND_N frames (or ``{"n": N}``) into a background, stored
        and loaded when done (progress: GET /statistics ``background_progress``)."""
        body = await self._body(request, MAX_PARAMETERS_BYTES)
        n = None
        if body.strip():
            value = parse_json_body(body)
            if not isinstance(value, dict) or set(value) - {"n"}:
                raise RequestError('acquire takes an optional JSON object {"n": frames}')
            if "n" in value:
                n = self.c.check_scalar(pvs.BACKGROUND_N, value["n"], int)
        async with self.c.write_lock:
            await self.c.acquire_background(n)
        return reply(self.c.status(), acquisition=self.c.acquisition())

    async def cancel_acquisition(self, request: web.Request) -> web.Response:
        async with self.c.write_lock:
            cancelled = await self.c.cancel_acquisition()
        return reply(self.c.status(), acquisition={**self.c.acquisition(),
                                                   "cancelled": cancelled})

    async def start(self, request: web.Request) -> web.Response:
        async with self.c.write_lock:
            await self.c.start()
        return reply(self.c.status())

    async def stop(self, request: web.Request) -> web.Response:
        async with self.c.write_lock:
            await self.c.stop()
        return reply(self.c.status())

    async def status(self, request: web.Request) -> web.Response:
        return reply(self.c.status())

    async def get_parameters(self, request: web.Request) -> web.Response:
        return reply(self.c.status(), parameters=self.c.parameters())

    async def statistics(self, request: web.Request) -> web.Response:
        return reply(self.c.status(), statistics=self.c.statistics())

    async def openapi(self, request: web.Request) -> web.Response:
        from psss_ioc.rest.openapi import OPENAPI

        return web.json_response(OPENAPI, headers=CORS_HEADERS)

    async def background(self, request: web.Request) -> web.Response:
        declared = request.content_length
        large = declared is None or declared >= LARGE_BODY
        # one large upload at a time, from its first byte to its file: parsing takes several
        # times a body's size, and every upload must not be in memory at once
        async with self._large_body if large else contextlib.nullcontext():
            await self._background(request)
        return reply(self.c.status())

    async def _background(self, request: web.Request) -> None:
        is_json = request.content_type == JSON_TYPE
        body = await self._body(request, MAX_JSON_BYTES if is_json else MAX_BODY_BYTES)
        loop = asyncio.get_running_loop()
        if is_binary(body):
            original = request.query.get("filename", "")
            data: Any = await loop.run_in_executor(None, decode_binary, body)
        elif not is_json:  # JSON above the JSON limit: refused
            raise RequestError(f"a {request.content_type} body must be a .npy or HDF5 file "
                               "(it starts with neither's signature); JSON goes as "
                               f"{JSON_TYPE}")
        else:
            value = await loop.run_in_executor(None, parse_json_body, body)
            original, data = _background_request(value)
        del body
        async with self.c.write_lock:
            if data is not None:
                await self.c.upload_background(original, data)
            else:
                await self.c.set_background_file(_resolved(original))

    async def set_parameters(self, request: web.Request) -> web.Response:
        request_body = await self._json_object(request, "parameters")
        async with self.c.write_lock:
            await self._apply_parameters(request_body)
            parameters = self.c.parameters()
        if "roi" in request_body and parameters["roi"] != list(request_body["roi"]):
            # another write (a CA put, the external ROI PVs) came between: say which won
            wanted = request_body["roi"]
            return reply(f"roi [{wanted[0]}, {wanted[1]}] was set, then changed by another "
                         f"write (Channel Access or an external ROI PV): "
                         f"{parameters['roi']} is in force", 409, parameters=parameters)
        return reply(self.c.status(), parameters=parameters)

    async def _apply_parameters(self, p: dict[str, Any]) -> None:
        """Check everything before changing anything, then apply in a fixed order. Keys the
        IOC does not know are kept as extra parameters (psss_ioc.ioc.parameters)."""
        if "roi" in p:
            self.c.check_roi(p["roi"])
        path = self.c.background_to_load(p["background"]) if "background" in p else None
        if BACKGROUND_FILE in p and "background" not in p and \
                p[BACKGROUND_FILE] != self.c.parameters()[BACKGROUND_FILE]:
            raise RequestError(f"{BACKGROUND_FILE} shows the stored file of the background in "
                               "force and cannot be set; to load a file, set background")
        scalars = [(pv, self.c.check_scalar(pv, p[key], kind)) for key, pv, kind in (
            ("average_n", pvs.AVG_N, int), ("fit_enabled", pvs.FIT_ENABLE, bool),
            ("min_snr", pvs.FIT_MIN_SNR, float)) if key in p]
        extra = self.c.check_extra({k: v for k, v in p.items() if k not in KNOWN})
        for pv, value in scalars:
            await self.c.set_scalar(pv, value)
        if "roi" in p:
            await self.c.set_roi(p["roi"])
        if path is not None:
            await self.c.set_background_file(path)
        if extra is not None:
            await self.c.set_extra(extra)


def _background_request(value: Any) -> tuple[str, Any]:
    """``{"filename": str, "data": rows or null}`` -> (filename, data)."""
    if not isinstance(value, dict):
        raise RequestError("background request must be a JSON object "
                           '{"filename": "...", "data": [[...], ...] or null}')
    unknown = sorted(set(value) - {"filename", "data"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; expected filename and data")
    filename = value.get("filename", "")
    if not isinstance(filename, str):
        raise RequestError(f"filename must be a string, not {json.dumps(filename)[:100]}")
    return filename, value.get("data")


def _resolved(path: str) -> str:
    """A file name as the IOC should store it: absolute, so it survives a change of directory."""
    path = path.strip()
    if "\x00" in path:  # the OS refuses such names; say so instead of failing inside
        raise RequestError("file name must not contain a NUL character")
    return str(Path(path).resolve()) if path else ""


def _auth_header(status: int) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"} if status == 401 else {}


def _check_authorization_is_ascii(request: web.Request, token: str | None) -> None:
    """A write's Authorization header must be ASCII (bytes that are not UTF-8 reach us as
    surrogates, which no token comparison can take)."""
    if (token is not None and request.method not in ("GET", "HEAD")
            and not request.headers.get("Authorization", "").isascii()):
        raise RequestError("the Authorization header must be ASCII: 'Bearer <token>'", 401)


def _check_content_type(request: web.Request) -> None:
    """POST bodies must say they are JSON (or, for /background, binary): text/plain, form and
    untyped bodies are what a web page can make a browser send cross-site without a CORS
    preflight, so the IOC does not act on them."""
    if request.method != "POST" or request.match_info.http_exception is not None:
        return
    background = request.path == "/background"
    allowed = (JSON_TYPE, *BINARY_TYPES) if background else (JSON_TYPE,)
    if "Content-Type" not in request.headers:
        if not request.body_exists:  # the legacy client's POST /start and /stop
            return
        given = "a body without Content-Type"
    elif request.content_type in allowed:
        return
    else:
        given = f"Content-Type {request.content_type}"
    binary = f" (a binary background: {', '.join(BINARY_TYPES)})" if background else ""
    raise RequestError(f"{given} is not accepted: send {JSON_TYPE}{binary}. Browsers send "
                       "text/plain and forms cross-site without asking, so the IOC refuses "
                       "them", 415)


def _too_large(limit: int, what: str) -> str:
    if limit == MAX_PARAMETERS_BYTES:
        return f"JSON {what} is larger than the limit of {limit} bytes for parameters"
    if limit == MAX_JSON_BYTES:
        return (f"JSON {what} is larger than the limit of {limit} bytes for JSON; upload a "
                "large background as .npy or HDF5 (application/x-npy), up to "
                f"{MAX_BODY_BYTES} bytes")
    return f"request {what} is larger than the limit of {limit} bytes"


# ------------------------------------------------------------------------------ connections
_BUSY_BODY = json.dumps({"state": "error", "status": f"too many connections (the limit is "
                         f"{MAX_CONNECTIONS}); try again later"}).encode()
_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in CORS_HEADERS.items()).encode()
               + b"Retry-After: 5\r\nConnection: close\r\n"
               + f"Content-Length: {len(_BUSY_BODY)}\r\n\r\n".encode() + _BUSY_BODY)


class _Busy(asyncio.Protocol):
    """A connection over the limit: 503, closed at once (it must not hold a descriptor)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY_REPLY)
        transport.close()


class _Counted(asyncio.Protocol):
    """One HTTP connection (aiohttp's protocol), counted until it is closed."""

    def __init__(self, handler: asyncio.Protocol, closed: Callable[[], None]) -> None:
        self._handler = handler
        self._closed: Callable[[], None] | None = closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        closed, self._closed = self._closed, None
        if closed is not None:
            closed()
        self._handler.connection_lost(exc)


class _ConnectionCap:
    """The protocol factory of the listening socket: aiohttp's protocol for up to `limit`
    connections at once, `_Busy` beyond."""

    def __init__(self, server: web.Server, limit: int = MAX_CONNECTIONS) -> None:
        self._server = server
        self.limit = limit
        self.open = 0
        self._log = RateLimitedLog(log)

    def protocol(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            self._log("busy", logging.WARNING, f"REST: {self.open} connections open, the "
                      "limit: new ones get 503 until some close (idle ones are closed after "
                      f"{IDLE_TIMEOUT:g} s)")
            return _Busy()
        self.open += 1
        return _Counted(self._server(), self._closed)

    def _closed(self) -> None:
        self.open -= 1


class _RateLimitFilter(logging.Filter):
    """At most one record per logger and message per `period` seconds, then how many were
    left out. For the HTTP stack's loggers: asyncio logs every failed accept (out of file
    descriptors: 448 MB of log in two minutes)."""

    def __init__(self, period: float = 10.0) -> None:
        super().__init__()
        self.period = period
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e9, 0))
        if now - last < self.period:
            self._last[key] = (last, suppressed + 1)
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar messages left out)"
        return True


_HTTP_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access")


def _limit_http_logging() -> None:
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RateLimitFilter) for f in logger.filters):
            logger.addFilter(_RateLimitFilter())


# ------------------------------------------------------------------------------ server thread
class RestServer:
    """The REST API on its own asyncio loop in a daemon thread."""

    def __init__(self, ioc: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 token: str | None = None, background_dir: Path | None = None) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.background_dir = background_dir or default_background_dir(ioc.config)
        self._ioc = ioc
        self._token = token
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> RestServer:
        """Bind and serve; raises OSError when the port cannot be bound."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(ready, failure),
                                        name="psss-rest", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"REST server on {self.host}:{self.requested_port} did not start")
        if failure:
            raise failure[0]
        log.info("REST API on http://%s:%d/ (backgrounds stored in %s)", self.host, self.port,
                 self.background_dir)
        return self

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._bind())
        except BaseException as e:
            failure.append(e)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _bind(self) -> None:
        _limit_http_logging()
        controller = Controller(self._ioc, self.background_dir)
        api = RestApi(controller, self._token)
        # keepalive_timeout: aiohttp closes a connection that has no complete request within
        # it, from the connection's start (a header that trickles in too)
        self._runner = web.AppRunner(api.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=IDLE_TIMEOUT, lingering_time=LINGER_TIME)
        await self._runner.setup()
        assert self._runner.server is not None
        cap = _ConnectionCap(self._runner.server)
        try:  # our own listener (not TCPSite): its protocol factory is the connection cap
            self._listener = await asyncio.get_running_loop().create_server(
                cap.protocol, self.host, self.requested_port, reuse_address=True,
                backlog=ACCEPT_BACKLOG)
        except BaseException:
            await self._runner.cleanup()
            raise
        sockets = self._listener.sockets or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.requested_port

    async def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)


def start_in_thread(ioc: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                    token: str | None = None, background_dir: Path | None = None) -> RestServer:
    """Serve the REST API for `ioc` (a started `PsssIoc`); raises OSError if the port is busy."""
    return RestServer(ioc, host, port, token, background_dir).start()


def serve(ioc: Any) -> RestServer | None:
    """The IOC's hook: serve as ``ioc.config`` says (``rest`` = (host, port) or None = off,
    ``rest_token``, ``background_dir``). A port that cannot be bound is reported in MESSAGE and
    the log; the IOC goes on without REST."""
    address = getattr(ioc.config, "rest", None)
    if not address:
        return None
    host, port = address
    try:
        return start_in_thread(ioc, host, int(port), getattr(ioc.config, "rest_token", None))
    except (OSError, TimeoutError) as e:
        ioc.message(f"REST API not served on {host}:{port}: {e}", error=True)
        return None
