"""The legacy REST API of psss_processing, served by the IOC (the only HTTP server).

It holds no state of its own: every change is a ``record.set(value, process=True)`` on the
IOC's records, which runs the same ``validate`` and ``on_update`` callbacks as a Channel Access
put, so CA monitors see REST changes and both paths are validated alike. Reads come from the
records and the pipeline.

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
import io
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from psss_ioc.core import background as bgfile
from psss_ioc.core.processing import FrameMismatchError, Settings
from psss_ioc.ioc import access, pvs
from psss_ioc.ioc.config import default_background_dir
from psss_ioc.ioc.control import roi_limit_problem, roi_pair_problem, roi_setting
from psss_ioc.ioc.parameters import (
    BACKGROUND_FILE,
    KNOWN,
    SETTABLE,
    UPLOADED_NAME,
    dump_extra,
    merged_extra,
)
from psss_ioc.ioc.pvs import BackgroundState, State
from psss_ioc.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12000
# A full 2016 x 2560 frame as JSON with 5-digit values is ~36 MB; the legacy service refused
# anything over 30 MB. 512 MB leaves room for larger cameras and float text.
MAX_BODY_BYTES = 512 * 1024 * 1024
# JSON bodies: parsing takes several times their size in memory (a 500 MB body took the IOC
# to 6 GB). A full frame of 5-digit values is ~36 MB of JSON; larger frames go up in binary.
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_PARAMETERS_BYTES = 1024 * 1024  # POST /parameters: 32 extra keys take ~40 kB at most
# A connection that sends no complete request, or no body data, for this long is closed.
IDLE_TIMEOUT = 10.0
BODY_TIMEOUT = 300.0  # a whole request body (a 512 MB upload at 2 MB/s)
# After an error reply to a request whose body was not read, its rest is read (and dropped)
# this long so that the client sees the reply, then the connection is closed.
LINGER_TIME = 2.0
# Connections served at once; more are answered 503 and closed. Each is a file descriptor:
# idle ones must not take those Channel Access clients and autosave need.
MAX_CONNECTIONS = 64
# Connections waiting to be accepted; asyncio also accepts this many at once before it can
# answer any of them, so it bounds the descriptors a burst of connections takes too.
ACCEPT_BACKLOG = 16
# Background uploads that may be this large or more go one at a time (RestApi.background).
LARGE_BODY = 1024 * 1024
JSON_TYPE = "application/json"
BINARY_TYPES = ("application/x-npy", "application/x-hdf5", "application/x-hdf",
                "application/octet-stream")
UINT16_MAX = 65535
# How long a write waits for the IOC's on_update callback (background load, stop) to finish.
RECORD_TIMEOUT = 30.0
NPY_MAGIC = b"\x93NUMPY"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ENDPOINTS = ("/start", "/stop", "/status", "/background", "/parameters", "/statistics",
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


def background_array(data: Any, shape: tuple[int, int] | None) -> np.ndarray:
    """The legacy ``data`` (rows of whole numbers) or a decoded array as a checked uint16 image.

    Refuses (RequestError) anything that is not 2-D, not numeric, not whole numbers in
    0..65535, or not of `shape` (the current image shape) when that is known.
    """
    if isinstance(data, np.ndarray):
        array = data
    elif isinstance(data, list):
        try:
            array = np.array(data)
        except (ValueError, TypeError, OverflowError) as e:
            raise RequestError(f"background data must be rows of equal length: {e}") from None
    else:
        raise RequestError(f"background data must be a list of rows, not {type(data).__name__}")
    if array.ndim != 2:
        raise RequestError(f"background data must be 2-D (rows of numbers), got {array.ndim} "
                           f"dimension(s) of shape {list(array.shape)}")
    if array.size == 0:
        raise RequestError("background data is empty")
    if array.dtype.kind not in "iuf":
        raise RequestError("background data must be numbers (whole numbers 0..65535), "
                           f"got {_kind_name(array)}")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise RequestError("background data contains NaN or infinite values")
        if not np.array_equal(array, np.floor(array)):
            raise RequestError("background data must be whole numbers")
    low, high = array.min(), array.max()
    if low < 0 or high > UINT16_MAX:
        raise RequestError(f"background values must be within 0..{UINT16_MAX}, "
                           f"got {_num(low)}..{_num(high)}")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise RequestError(f"background shape {array.shape[0]} x {array.shape[1]} does not "
                           f"match the image {shape[0]} x {shape[1]}")
    return array.astype(np.uint16)


def _kind_name(array: np.ndarray) -> str:
    return {"b": "true/false values", "U": "strings", "S": "strings",
            "O": "mixed or non-numeric values"}.get(array.dtype.kind, str(array.dtype))


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float | np.floating) else str(value)


def decode_binary(body: bytes) -> np.ndarray:
    """A `.npy` or HDF5 (dataset /image) body as an array; RequestError if unreadable."""
    try:
        if body.startswith(NPY_MAGIC):
            return np.load(io.BytesIO(body), allow_pickle=False)
        import h5py

        with h5py.File(io.BytesIO(body), "r") as f:
            dataset = f.get(bgfile.HDF5_DATASET)
            if not isinstance(dataset, h5py.Dataset):
                raise RequestError(f"HDF5 body has no /{bgfile.HDF5_DATASET} dataset")
            return dataset[()]
    except RequestError:
        raise
    except Exception as e:  # numpy and h5py raise many kinds on corrupt input
        raise RequestError(f"binary body is not a readable .npy or HDF5 file: {e}") from None


def is_binary(body: bytes) -> bool:
    return body.startswith(NPY_MAGIC) or body.startswith(HDF5_MAGIC)


def stored_name(original: str) -> str:
    """A new unique file name for an uploaded background, keeping the original's stem."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(original).stem if original else "")[:60]
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    return f"{stem or 'background'}_{stamp}_{uuid.uuid4().hex[:8]}.h5"


KEEP_UPLOADS = 10
# what `stored_name` makes: other files in the directory (an operator's own) are never pruned
_STORED_NAME = re.compile(r".+_\d{8}_\d{6}_[0-9a-f]{8}\.h5")


def prune_uploads(directory: Path, in_use: str, keep: int = KEEP_UPLOADS) -> list[Path]:
    """Delete uploaded backgrounds but the one in use and the `keep` newest; returns those
    deleted. Uploads pile up otherwise: each is a full frame (10 MB for the camera)."""
    uploads = [p for p in directory.glob("*.h5") if _STORED_NAME.fullmatch(p.name)]
    uploads.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for path in uploads[keep:]:
        if str(path.resolve()) == in_use:
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError as e:
            log.warning("could not remove the old upload %s: %s", path, e)
    return removed


def write_background(directory: Path, original: str, image: np.ndarray) -> Path:
    """Write `image` as HDF5 /image under a new name, with the name it was uploaded under
    (GET /parameters shows that one); atomic (written, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / stored_name(original)
    part = path.with_name(path.name + ".part")
    try:
        _save_h5(part, image, original)  # bgfile.save picks the format by suffix
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path.resolve()


def _save_h5(path: Path, image: np.ndarray, original: str) -> None:
    import h5py

    bgfile.validate(image, source=str(path))
    with h5py.File(path, "w") as f:
        f.create_dataset(bgfile.HDF5_DATASET, data=image)
        f.attrs[UPLOADED_NAME] = original  # with the file: it survives restarts




# ------------------------------------------------------------------------------ the IOC side
class Controller:
    """Legacy operations mapped onto the IOC's records. No state of its own besides the lock
    that keeps REST writes from interleaving."""

    def __init__(self, ioc: Any, background_dir: Path) -> None:
        self.ioc = ioc
        self.background_dir = background_dir
        self.write_lock = asyncio.Lock()

    # ---------------------------------------------------------------- reads
    def rec(self, pv: pvs.PV) -> Any:
        return self.ioc.rec(pv)

    def status(self) -> str:
        return "stopped" if self.rec(pvs.STATUS).get() == State.STOPPED else "processing"

    def message(self) -> str:
        return str(self.rec(pvs.MESSAGE).get())

    def parameters(self) -> dict[str, Any]:
        """The legacy parameters: the same view as the output stream's processing_parameters
        (the ROI in force, the uploaded background name, the extra keys)."""
        return self.ioc.parameters.view(self.ioc.pipeline.settings.describe())

    def statistics(self) -> dict[str, Any]:
        stats = self.ioc.pipeline.statistics()
        shape = self.ioc.pipeline.image_shape
        fault = self.ioc.pipeline.fault
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
        }

    # ---------------------------------------------------------------- writes
    async def put(self, pv: pvs.PV, value: Any, wait: bool = False) -> bool:
        """record.set(value, process=True) (validate + on_update, as a CA put); with `wait`,
        until a blocking record's on_update finished. True if the record took the value."""
        record = self.rec(pv)
        record.set(value, process=True)
        if wait:
            await self._completion(record, pv)
        return _same(record.get(), value)

    async def _completion(self, record: Any, pv: pvs.PV) -> None:
        deadline = time.monotonic() + RECORD_TIMEOUT
        while record.get_field("PACT") not in ("0", ""):
            if time.monotonic() > deadline:
                raise RequestError(f"the IOC did not finish {pv.name} within "
                                   f"{RECORD_TIMEOUT:g} s", 504)
            await asyncio.sleep(0.01)

    async def start(self) -> None:
        if not self.ioc.pipeline.input[0]:
            raise RequestError("cannot start: no input stream address set "
                               "(INPUT_STREAM is empty)", 409)
        await self.put(pvs.START, 1, wait=True)
        if self.status() != "processing":
            raise RequestError(self.message() or "cannot start", 409)

    async def stop(self) -> None:
        await self.put(pvs.STOP, 1, wait=True)

    async def set_roi(self, roi: Any) -> None:
        """Both limits at once, through the same rule as a CA put (`RoiControl`)."""
        ymin, ymax = self.check_roi(roi)
        outcome = self.ioc.roi.write(ymin, ymax)
        if outcome.in_force != (ymin, ymax):  # pragma: no cover - check_roi refused it
            raise RequestError(outcome.message())

    def check_roi(self, roi: Any) -> tuple[int, int]:
        """The pair, checked up front with the reason: both limits are written at once, so an
        invalid pair would never be completed; it is refused, and nothing changes."""
        if (not isinstance(roi, list | tuple) or len(roi) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in roi)):
            raise RequestError(f"roi must be [ymin, ymax] (two whole numbers), not "
                               f"{json.dumps(roi)[:100]}")
        pair = (int(roi[0]), int(roi[1]))
        problem = (roi_limit_problem("ymin", pair[0]) or roi_limit_problem("ymax", pair[1])
                   or roi_pair_problem(pair))
        if problem:
            raise RequestError(f"roi refused: {problem}")
        shape = self.ioc.pipeline.image_shape
        if shape is not None:
            try:
                Settings(roi=roi_setting(pair)).check_frame(shape)
            except FrameMismatchError as e:
                raise RequestError(f"roi refused: {e}") from None
        return pair

    @staticmethod
    def check_scalar(pv: pvs.PV, value: Any, kind: type) -> Any:
        """AVG_N, FIT_ENABLE, FIT_MIN_SNR: the value to put, type and range checked."""
        ok_type = (isinstance(value, bool) if kind is bool else
                   isinstance(value, int | float) and not isinstance(value, bool)
                   and (kind is float or float(value).is_integer()))
        if not ok_type or (kind is float and not np.isfinite(value)):
            raise RequestError(f"{pv.name.lower()} must be {_kind_word(kind)}, "
                               f"not {json.dumps(value)[:100]}")
        if kind is not bool and not (pv.low or 0) <= value <= (pv.high or np.inf):
            raise RequestError(f"{pv.name.lower()} must be within {_num(pv.low)}..{_num(pv.high)},"
                               f" got {_num(value)}")
        return kind(value) if kind is not bool else int(value)

    async def set_scalar(self, pv: pvs.PV, typed: Any) -> None:
        """Put a value `check_scalar` made."""
        if not await self.put(pv, typed):
            raise RequestError(self.message() or f"{pv.name} refused {typed}")

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
        current = self.ioc.parameters.extra()
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
        if not await self.put(pvs.PARAMETERS_EXTRA, text):
            raise RequestError(self.message() or "extra parameters refused")

    async def set_background_file(self, path: str) -> None:
        """Load (or with "" clear) a background file through BACKGROUND_FILE."""
        if path:
            shape = self.ioc.pipeline.image_shape
            loop = asyncio.get_running_loop()
            allowed = self.ioc.config.allowed_background_dirs()
            try:  # the same checks apply_background makes, so the reply can say why
                await loop.run_in_executor(None, bgfile.load, path, shape, allowed)
            except ValueError as e:
                raise RequestError(f"background refused: {e}") from None
        await self.put(pvs.BACKGROUND_FILE, path, wait=True)
        loaded = self.ioc.pipeline.settings.background_name == path
        state = self.rec(pvs.BACKGROUND_STATUS).get()
        if not loaded or state == BackgroundState.ERROR:
            raise RequestError(self.message() or f"background {path!r} refused")

    async def upload_background(self, original: str, data: Any) -> Path:
        """Check and store an uploaded image, then load it through BACKGROUND_FILE."""
        shape = self.ioc.pipeline.image_shape
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(None, background_array, data, shape)
        path = await loop.run_in_executor(None, write_background, self.background_dir,
                                          original, image)
        try:
            await self.set_background_file(str(path))
        finally:
            in_use = self.ioc.pipeline.settings.background_name
            await loop.run_in_executor(None, prune_uploads, self.background_dir, in_use)
        return path


def _kind_word(kind: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number"}[kind]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.isclose(float(a), float(b), rtol=1e-12, atol=0))
    return bool(a == b)


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
