"""bsread in and out: `CameraSource` (camera frames in) and `ResultSender` (results out).

`CameraSource` is a thin adapter over psi-bsread's `bsread.Source` (socket set-up, PULL/SUB,
receive timeout) with our own message handler: psi-bsread's default handler raises on a main
header without ``pulse_id`` (Java senders omit a pulse id of 0), swallows decode errors into
None values and decodes every channel. Ours collects the frames of one message and decodes only
the image channel with `psss_ioc.streams.bsread_wire`, classifying every bad message.
What it counts is the messages it could make no frame of (`CameraSource.errors()`, by kind)
and what they showed (`CameraSource.fault()`); the sequence of the frames it returns (pulse
id gaps, image shape changes) is the pipeline's to count.

`ResultSender` binds its own ZeroMQ socket and writes pre-encoded messages with
`bsread_wire.MessageWriter`: psi-bsread's `Sender(block=False)` silently drops messages it
cannot queue, so it cannot count drops, and it cannot tell whether anyone is subscribed.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import bsread
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from psss_ioc.pipeline.source import BAD_IMAGE, MISSING_CHANNEL, SourceFault
from psss_ioc.ratelimit import RateLimitedLog
from psss_ioc.streams import bsread_wire as wire
from psss_ioc.streams.channels import (
    DEFAULT_IMAGE_CHANNEL,
    DEFAULT_MAX_IMAGE_MB,
    DEFAULT_OUTPUT_PORT,
    DOCUMENT_NAMES,
    IMAGE_CHANNEL_SUFFIX,
    OutputChannels,
    parse_address,
)

log = logging.getLogger(__name__)

# mflow attaches a StreamHandler of its own at import, so once the application configures
# logging every mflow line is printed twice: let its records reach the application's handlers.
_mflow_log = logging.getLogger("mflow.mflow")
for _handler in list(_mflow_log.handlers):
    if type(_handler) is logging.StreamHandler:
        _mflow_log.removeHandler(_handler)

SOURCE_MODES = ("PULL", "SUB")
SENDER_MODES = ("PUSH", "PUB")

# Counter names besides the malformed kinds (wire.MALFORMED_KINDS), as `SourceCounters`
# attributes and as keys of `CameraSource.errors()`.
MISSING_CHANNEL_COUNT = "missing_channel"
EMPTY_IMAGE_COUNT = "empty_image"

_NUMERIC_TYPES = frozenset(t for t in wire.TYPES if t not in ("string", "bool"))


class LazyImage:
    """A compressed (``bitshuffle_lz4``) 2-D camera image decoded on request, in native byte
    order: `rows(ymin, ymax)` decodes only the blocks that hold those rows (the pipeline asks
    for the ROI rows), `full()` the whole image. Data that turns out corrupt when decoded is
    reported once to `on_corrupt` (the source counts it as a corrupt message) and gives None.
    """

    __slots__ = ("_image", "_on_corrupt", "_reported", "spec")

    def __init__(self, image: wire.Bslz4Image, spec: wire.ChannelSpec,
                 on_corrupt: Callable[[wire.WireError], None] | None = None) -> None:
        self._image = image
        self.spec = spec  # the channel as received
        self._on_corrupt = on_corrupt
        self._reported = False

    @property
    def shape(self) -> tuple[int, int]:
        return self._image.shape

    @property
    def dtype(self) -> np.dtype:
        return self._image.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def raw(self) -> Any:
        """The value bytes as received."""
        return self._image.raw

    def rows(self, ymin: int, ymax: int) -> np.ndarray | None:
        """The image, of its full shape, with rows [ymin, ymax) decoded (read no others), or
        None when they do not decompress."""
        try:
            return self._image.rows(ymin, ymax)
        except wire.WireError as e:
            self._corrupt(e)
            return None

    def full(self) -> np.ndarray | None:
        """The whole image, or None when it does not decompress."""
        try:
            return self._image.full()
        except wire.WireError as e:
            self._corrupt(e)
            return None

    def _corrupt(self, error: wire.WireError) -> None:
        if not self._reported:
            self._reported = True
            if self._on_corrupt is not None:
                self._on_corrupt(error)


class Frame:
    """One camera image. `image` is in native byte order and may be a read-only view.

    A compressed camera image comes as `lazy_image` (`LazyImage`), decoded on request: `image`
    decodes all of it on first use (raises `bsread_wire.WireError` if it does not
    decompress), while the pipeline asks `lazy_image` for the ROI rows only. `output_value`
    gives the image as it came, to forward it without re-encoding.
    """

    __slots__ = ("_image", "lazy_image", "pulse_id", "timestamp")

    def __init__(self, pulse_id: int, timestamp: tuple[int, int],
                 image: np.ndarray | None = None, lazy_image: LazyImage | None = None) -> None:
        if (image is None) == (lazy_image is None):
            raise ValueError("a Frame has either an image or a lazy image")
        self.pulse_id = pulse_id
        self.timestamp = timestamp  # global timestamp (sec, ns)
        self._image = image
        self.lazy_image = lazy_image

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            assert self.lazy_image is not None
            image = self.lazy_image.full()
            if image is None:
                raise wire.WireError(wire.CORRUPT, f"pulse {self.pulse_id}: the compressed "
                                     "image does not decompress")
            self._image = image
        return self._image

    @image.setter
    def image(self, image: np.ndarray) -> None:
        self._image, self.lazy_image = image, None

    @property
    def shape(self) -> tuple[int, ...]:
        """The image's shape, without decoding it."""
        if self._image is None and self.lazy_image is not None:
            return self.lazy_image.shape
        return self.image.shape

    def output_value(self, name: str) -> tuple[wire.ChannelSpec, Any]:
        """The image as channel `name` of an output message: (spec, value for
        `MessageWriter.encode_values`). A compressed image goes as it came, compression
        declared, never decoded or encoded again."""
        lazy = self.lazy_image
        if lazy is not None:
            return replace(lazy.spec, name=name), wire.Encoded(lazy.raw)
        return wire.ChannelSpec.for_array(name, self.image), self.image

    def __repr__(self) -> str:
        return f"Frame(pulse_id={self.pulse_id}, timestamp={self.timestamp}, shape={self.shape})"


def image_output_value(frame: Any, name: str) -> tuple[wire.ChannelSpec, Any]:
    """(spec, value) of a frame's image as output channel `name`: as it came for a `Frame`
    (see `Frame.output_value`), the array itself for any other frame-like object."""
    output = getattr(frame, "output_value", None)
    if output is not None:
        return output(name)  # type: ignore[no-any-return]
    return wire.ChannelSpec.for_array(name, frame.image), frame.image


# ---------------------------------------------------------------------------------------------
# Input


@dataclass
class SourceCounters:
    """What the source made of the messages it received: good frames, and the messages it
    could make no frame of, by kind. All keys of `malformed` exist from the start."""

    received: int = 0  # good frames returned by receive()
    malformed: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(wire.MALFORMED_KINDS, 0)
    )
    missing_channel: int = 0  # messages without the image channel
    empty_image: int = 0  # messages whose image value is empty ("no value for this pulse")
    last_error: str = ""
    # For the pipeline's state (a wrong channel or an unusable image says so, not only a
    # counter): the last message without the image channel, and the image-like channels it
    # carried (a few, see `image_like_channels`) out of how many in all ...
    missing_channel_time: float | None = None  # time.monotonic()
    missing_channel_seen: tuple[str, ...] = ()
    missing_channel_n_channels: int = 0
    # ... and the last message whose image channel is of a type no image can be made of.
    bad_image_time: float | None = None  # time.monotonic()
    bad_image: str = ""  # why

    @property
    def skipped(self) -> int:
        return sum(self.malformed.values()) + self.missing_channel + self.empty_image


# Names that say "camera image" whatever their declared shape (SwissFEL: <camera>:FPICTURE).
_IMAGE_NAME_ENDINGS = (IMAGE_CHANNEL_SUFFIX.lstrip(":"), "IMAGE")
MAX_CHANNELS_SEEN = 5


def image_like_channels(channels: Sequence[wire.ChannelSpec],
                        limit: int = MAX_CHANNELS_SEEN) -> tuple[str, ...]:
    """The names of up to `limit` channels that look like a camera image: 2-D numeric, or
    named ``...FPICTURE`` / ``...IMAGE``."""
    found = [c.name for c in channels
             if (c.shape is not None and len(c.shape) == 2 and c.type in _NUMERIC_TYPES)
             or c.name.upper().endswith(_IMAGE_NAME_ENDINGS)]
    return tuple(found[:limit])


def _collect_parts(receiver: Any) -> list[Any] | None:
    """mflow receive handler: all frames of one message, or None on timeout."""
    first = receiver.next()
    if first is None:
        return None
    parts = [first]
    while receiver.has_more():
        part = receiver.next()
        if part is None:  # socket error mid-message: what we have is short
            break
        parts.append(part)
    return parts


class CameraSource:
    """Camera frames from a bsread stream (connects; PULL or SUB).

    `receive_timeout` is in seconds: `receive()` returns None when no good frame arrived within
    it (at most about twice the timeout when bad messages keep arriving). Bad messages never
    raise: they are skipped and counted in `counters` (see `SourceCounters`), with the latest
    reason in `counters.last_error` and a rate-limited log line; `errors()` and `fault()` are
    what the pipeline takes of them. The image may be of any dimension, numeric dtype and
    shape: checking it, and the sequence of the frames, is the caller's job.

    An image that would decode to more than `max_image_bytes` is refused before anything is
    decompressed (a decompression bomb: a few MB that inflate to a GB), counted as
    ``too_large`` and reported as an unusable image. A 2-D ``bitshuffle_lz4`` image is only
    checked here (its block layout) and decoded on request (`Frame.lazy_image`), on up to
    `decode_threads` threads; corrupt blocks found then are counted as a corrupt message.
    """

    def __init__(
        self,
        address: str,
        mode: str = "PULL",
        image_channel: str = DEFAULT_IMAGE_CHANNEL,
        receive_timeout: float = 1.0,
        queue_size: int = 20,
        max_image_bytes: int | None = DEFAULT_MAX_IMAGE_MB * 10**6,
        decode_threads: int = 1,
    ) -> None:
        parse_address(address)
        self.address = address
        self.mode = _check_mode(mode, SOURCE_MODES)
        self.image_channel = image_channel
        self.receive_timeout = float(receive_timeout)
        self.queue_size = queue_size
        self.max_image_bytes = max_image_bytes
        # One by default: a second thread shortens the wait for a frame's blocks, but on a
        # machine busy with other work it lost more frames, not fewer (docs/performance.md).
        self.decode_threads = max(1, int(decode_threads))
        self.counters = SourceCounters()
        self._reader = wire.MessageReader()
        self._source: bsread.Source | None = None
        self._log = RateLimitedLog(log)
        self._missing_header: wire.DataHeader | None = None  # of missing_channel_seen

    # -- connection ---------------------------------------------------------------------------

    def connect(self) -> CameraSource:
        if self._source is not None:
            return self
        host, port = parse_address(self.address)
        source = bsread.Source(
            host=host,
            port=port,
            mode=bsread.PULL if self.mode == "PULL" else bsread.SUB,
            queue_size=self.queue_size,
            receive_timeout=max(1, round(self.receive_timeout * 1000)),
            copy=False,  # zero-copy: uncompressed images are views of the received frames
        )
        source.connect()
        self._source = source
        return self

    def close(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            source.disconnect()

    def __enter__(self) -> CameraSource:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the pipeline takes of the counters ----------------------------------------------

    def errors(self) -> dict[str, int]:
        """The messages this source made no frame of, by kind, for the pipeline's error
        counts: ``malformed_<kind>`` (the kinds of `bsread_wire.MALFORMED_KINDS`),
        ``missing_channel`` and ``empty_image``, each a total since the source was made; a kind
        not seen yet is left out. Nothing about the frames returned (their sequence, their
        shape): the pipeline counts that."""
        c = self.counters
        errors = {f"malformed_{kind}": n for kind, n in c.malformed.items() if n}
        if c.missing_channel:
            errors[MISSING_CHANNEL_COUNT] = c.missing_channel
        if c.empty_image:
            errors[EMPTY_IMAGE_COUNT] = c.empty_image
        return errors

    def fault(self) -> SourceFault | None:
        """The latest of the messages without the image channel (MISSING_CHANNEL, with the
        image-like channels they carried) and those whose image no frame can be made of
        (BAD_IMAGE, with why), or None if there was neither; the pipeline decides what state
        that makes, and for how long."""
        c = self.counters
        missing, bad = c.missing_channel_time, c.bad_image_time
        if bad is not None and (missing is None or bad > missing):
            return SourceFault(BAD_IMAGE, bad, channel=self.image_channel, reason=c.bad_image)
        if missing is not None:
            return SourceFault(MISSING_CHANNEL, missing, channel=self.image_channel,
                               channels_seen=c.missing_channel_seen,
                               n_channels=c.missing_channel_n_channels)
        return None

    # -- receiving ----------------------------------------------------------------------------

    def receive(self) -> Frame | None:
        """The next good frame, or None on timeout."""
        if self._source is None:
            raise RuntimeError("CameraSource is not connected")
        deadline = time.monotonic() + self.receive_timeout
        while True:
            message = self._source.receive(handler=_collect_parts)
            if message is None:
                return None
            try:
                frame = self.decode(message.data)
            except Exception as e:  # a bug, not a bad message: never let it stop the caller
                log.exception("decoding a message failed unexpectedly")
                frame = self._skip(wire.GARBAGE, f"unexpected decode error: {e!r}")
            if frame is not None or time.monotonic() >= deadline:
                return frame

    def decode(self, parts: Sequence[Any]) -> Frame | None:
        """One message's frames -> Frame, or None (skipped and counted). Never raises."""
        if not parts:
            return self._skip(wire.GARBAGE, "empty message")
        try:
            main = wire.parse_main_header(parts[0])
        except wire.WireError as e:
            return self._skip(e.kind, str(e))
        try:
            _, header = self._reader.split(parts, main)
        except wire.WireError as e:
            return self._skip(e.kind, f"pulse {main.pulse_id}: {e}")
        index = header.index.get(self.image_channel)
        if index is None:
            self._note_missing_channel(header)
            return self._skip(MISSING_CHANNEL_COUNT,
                              f"pulse {main.pulse_id}: no channel {self.image_channel!r}")
        spec = header.channels[index]
        raw = parts[2 + 2 * index]
        if len(raw) == 0:
            return self._skip(EMPTY_IMAGE_COUNT, f"pulse {main.pulse_id}: empty image value")
        image: np.ndarray | None = None
        lazy: LazyImage | None = None
        try:
            if spec.type not in _NUMERIC_TYPES:
                self._note_bad_image(f"channel {spec.name!r} has type {spec.type!r:.40}, "
                                     "not a number type")
                raise wire.WireError(wire.UNKNOWN_TYPE, f"image type {spec.type!r:.40}")
            if _decodes_lazily(spec):
                lazy = self._lazy_image(spec, raw, main.pulse_id)
            else:
                decoded = wire.decode_value(spec, raw, self.max_image_bytes)
                assert isinstance(decoded, np.ndarray)
                image = decoded
        except wire.WireError as e:
            if e.kind == wire.TOO_LARGE:
                self._note_bad_image(f"channel {spec.name!r}: {e} (the IOC's --max-image-mb)")
            return self._skip(e.kind, f"pulse {main.pulse_id}: {e}")
        if image is not None and not image.dtype.isnative:
            image = image.astype(image.dtype.newbyteorder("="))
        timestamp = (main.timestamp or wire.decode_timestamp(parts[3 + 2 * index], spec.encoding)
                     or (0, 0))
        self.counters.received += 1
        return Frame(main.pulse_id, timestamp, image, lazy)

    def _lazy_image(self, spec: wire.ChannelSpec, raw: Any, pulse_id: int) -> LazyImage:
        """A 2-D bitshuffle_lz4 image, its blocks located and checked, none decoded."""
        assert spec.shape is not None
        try:
            blocks = wire.Bslz4Blocks(raw, spec.dtype, math.prod(spec.shape), self.max_image_bytes)
        except wire.WireError as e:
            raise wire.WireError(e.kind, f"channel {spec.name!r}: {e}") from None
        image = wire.Bslz4Image(raw, blocks, (spec.shape[0], spec.shape[1]), self.decode_threads)
        return LazyImage(image, spec, lambda e: self._corrupt_later(pulse_id, e))

    def _corrupt_later(self, pulse_id: int, error: wire.WireError) -> None:
        """A frame receive() returned whose compressed data does not decompress when decoded:
        counted as the corrupt message it was, not as a good frame."""
        self.counters.received -= 1
        self._skip(error.kind, f"pulse {pulse_id}: channel {self.image_channel!r}: {error}")

    def _note_bad_image(self, reason: str) -> None:
        """A message whose image no frame can be made of, whatever it holds (the pipeline
        shows the reason as state "Image not usable" while no good frame arrives)."""
        self.counters.bad_image_time = time.monotonic()
        self.counters.bad_image = reason

    def _note_missing_channel(self, header: wire.DataHeader) -> None:
        c = self.counters
        c.missing_channel_time = time.monotonic()
        if header is not self._missing_header:  # the reader keeps one object per header
            self._missing_header = header
            c.missing_channel_seen = image_like_channels(header.channels)
            c.missing_channel_n_channels = len(header.channels)

    def _skip(self, kind: str, message: str) -> None:
        if kind in self.counters.malformed:
            self.counters.malformed[kind] += 1
        else:
            setattr(self.counters, kind, getattr(self.counters, kind) + 1)
        self.counters.last_error = f"skipped message ({kind}): {message}"
        self._log(kind, logging.WARNING, f"{self.address}: {self.counters.last_error}")


def _decodes_lazily(spec: wire.ChannelSpec) -> bool:
    """A 2-D bitshuffle_lz4 image of a type the kernels take as it is (native byte order,
    not float16): decoded on request, a row range at a time."""
    if spec.compression != wire.BSLZ4 or spec.shape is None or len(spec.shape) != 2:
        return False
    dtype = spec.dtype
    return (0 not in spec.shape and dtype.isnative
            and (dtype.kind in "iu" or dtype in (np.float32, np.float64)))


def _check_mode(mode: str, allowed: tuple[str, ...]) -> str:
    upper = str(mode).upper()
    if upper not in allowed:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(allowed)}")
    return upper


# ---------------------------------------------------------------------------------------------
# Output


class SendStatus(enum.Enum):
    SENT = "sent"
    NO_CONSUMER = "no consumer connected"
    FULL = "queue full or no consumer connected"


class BoundSocket:
    """A bound PUSH or PUB socket that sends whole messages without blocking.

    PUB is an XPUB with ``XPUB_NODROP``: the subscriptions it receives tell whether anyone is
    listening, and a full queue is reported (`SendStatus.FULL`) instead of being silently
    dropped. But XPUB_NODROP refuses a message for every subscriber when one subscriber's queue
    is full: one that stops reading stops the stream for all. With `drop_for_slow` (the
    output stream's choice), such a message is sent once more without XPUB_NODROP, so ZeroMQ
    drops it for the full queue only: a slow subscriber loses its own messages, never the
    others'. ZeroMQ then sends that subscriber nothing until it has read half its queue and
    does not say how many it missed: `overflows` counts the times a subscriber fell behind
    (each time, it lost this message and the ones until it caught up). PUSH cannot
    tell "no consumer" from "queue full" (both are `SendStatus.FULL`) unless `track_peers`:
    then a socket monitor counts the connected peers and sending with none is
    `SendStatus.NO_CONSUMER`. `port` 0 binds a free port; `port` holds the actual one after
    `open()`.
    """

    def __init__(
        self, port: int, mode: str = "PUSH", host: str = "*", queue_size: int = 10,
        linger: float = 0.2, track_peers: bool = False, drop_for_slow: bool = False,
    ) -> None:
        self.mode = _check_mode(mode, SENDER_MODES)
        self.drop_for_slow = drop_for_slow
        self.host = host
        self.port = port
        self.queue_size = queue_size
        self.linger = linger
        self.track_peers = track_peers
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._topics: set[bytes] = set()
        self._monitor: zmq.Socket | None = None
        self._peers: set[int] = set()  # file descriptors of the connections (PUSH, tracked)
        self.overflows = 0  # PUB, drop_for_slow: times a subscriber fell behind (the class)

    @property
    def is_open(self) -> bool:
        return self._socket is not None

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("*", "0.0.0.0") else self.host
        return f"tcp://{host}:{self.port}"

    def open(self) -> int:
        if self._socket is not None:
            return self.port
        context = zmq.Context()
        sock = context.socket(zmq.PUSH if self.mode == "PUSH" else zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, self.queue_size)
        sock.setsockopt(zmq.LINGER, round(self.linger * 1000))
        if self.mode == "PUB":
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
            else:
                sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as e:
            sock.close(0)
            context.term()
            raise OSError(f"cannot bind tcp://{self.host}:{self.port}: {e}") from e
        self._context, self._socket = context, sock
        if self.mode == "PUSH" and self.track_peers:
            # Connections kept by file descriptor: the count stays right whatever the events
            # (a connection that fails its handshake is reported disconnected too).
            self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self._monitor.setsockopt(zmq.LINGER, 0)
        return self.port

    def close(self, linger: float | None = None) -> None:
        sock, self._socket = self._socket, None
        monitor, self._monitor = self._monitor, None
        if sock is not None and monitor is not None:
            sock.disable_monitor()
            monitor.close(0)  # before term(), which would wait for it
        self._peers.clear()
        if sock is not None:
            sock.close(round((self.linger if linger is None else linger) * 1000))
        if self._context is not None:
            self._context.term()
            self._context = None
        self._topics.clear()

    def has_consumer(self) -> bool | None:
        """PUB: whether anyone is subscribed. PUSH: whether anyone is connected when
        `track_peers`, else None (unknown)."""
        if self.mode == "PUSH" and self._monitor is not None:
            while True:
                try:
                    event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                except zmq.Again:
                    return bool(self._peers)
                if event["event"] == zmq.EVENT_ACCEPTED:
                    self._peers.add(event["value"])
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    self._peers.discard(event["value"])
        if self.mode == "PUSH" or self._socket is None:
            return None
        while True:  # subscription messages: b"\x01" + topic, b"\x00" + topic to unsubscribe
            try:
                msg = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[:1] == b"\x01":
                self._topics.add(msg[1:])
            elif msg[:1] == b"\x00":
                self._topics.discard(msg[1:])
        return bool(self._topics)

    def send(self, parts: Sequence[Any], timeout: float = 0.0) -> SendStatus:
        """Queue one message, waiting at most `timeout` seconds for room."""
        if self._socket is None:
            raise RuntimeError("socket is not open")
        if self.has_consumer() is False:
            return SendStatus.NO_CONSUMER
        if timeout > 0 and not self._socket.poll(round(timeout * 1000), zmq.POLLOUT):
            return SendStatus.FULL
        try:
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if self.mode == "PUB" and self.drop_for_slow:
                return self._send_past_full_subscribers(parts)
            return SendStatus.FULL
        return SendStatus.SENT

    def _send_past_full_subscribers(self, parts: Sequence[Any]) -> SendStatus:
        """PUB, a subscriber's queue full: the message to the others (see the class)."""
        assert self._socket is not None
        self._socket.setsockopt(zmq.XPUB_NODROP, 0)
        try:
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # pragma: no cover - a lossy XPUB does not refuse
            return SendStatus.FULL
        finally:
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.overflows += 1
        return SendStatus.SENT


@dataclass
class SenderCounters:
    sent: int = 0
    dropped: int = 0  # not queued: no consumer, queue full, or a value that cannot be encoded
    image_sent: int = 0  # separate image stream (image_port), if any
    image_dropped: int = 0
    # PUB: times a subscriber fell behind and lost messages the others got (`BoundSocket`)
    subscriber_overflows: int = 0
    last_pulse_id: int | None = None  # of the last message sent (with last_sent_time)
    last_sent_time: float | None = None  # epoch seconds
    last_error: str = ""


class ConsumerState:
    """"No consumer" on one output socket as a state: one log line when results start being
    dropped for want of a consumer, one when a consumer takes them again (with how many were
    dropped meanwhile). Not a warning every few seconds: in a demo or while the DAQ is not
    reading, nobody listening is normal, and the drops are counted anyway."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None  # time.monotonic() the state began; None: not in it
        self.dropped = 0  # messages dropped while in the state

    @property
    def active(self) -> bool:
        return self.since is not None

    def no_consumer(self) -> None:
        if self.since is None:
            self.since, self.dropped = time.monotonic(), 0
            log.warning("%s: no consumer connected; messages are dropped (and counted) until "
                        "one connects", self.what)
        self.dropped += 1

    def delivered(self) -> None:
        self._end("a consumer is connected")

    def closed(self) -> None:
        self._end("closed")

    def _end(self, why: str) -> None:
        if self.since is not None:
            log.info("%s: %s; %d messages were dropped in %.0f s without a consumer",
                     self.what, why, self.dropped, time.monotonic() - self.since)
            self.since = None


class ResultSender:
    """The output bsread stream: one message per processed frame (binds; PUSH or PUB).

    Channels (`OutputChannels`, named as `output_names` says): the image (unless
    ``forward_image=False``), the spectrum (its own dtype: integer stays integer), with 1.8's
    names the energy axis (float64), centre and FWHM (float64; missing values when the fit
    failed or was not run), the processing parameters (JSON string: `parameters`, or what
    `parameters_view` makes of them). The data header changes only when a channel's type or
    shape does. `send()` never blocks.

    `result` is duck-typed: ``spectrum``, ``fit`` (its ``center``, ``fwhm``, optionally
    ``ok``), optionally ``axis``. With `image_port`, the image goes in its own stream on that
    port, as psss_processing v1.8.0 did, instead of the results stream.

    No consumer connected (PUSH: no peer; PUB: no subscriber) is a state (`ConsumerState`):
    a line when it begins and one when it ends. Other drops (a consumer too slow: queue full;
    a value that cannot be encoded) are logged rate-limited.
    """

    def __init__(
        self,
        port: int = DEFAULT_OUTPUT_PORT,
        mode: str = "PUSH",
        image_channel: str = DEFAULT_IMAGE_CHANNEL,
        forward_image: bool = True,
        queue_size: int = 10,
        host: str = "*",
        image_port: int | None = None,
        output_names: str = DOCUMENT_NAMES,
        prefix: str | None = None,
    ) -> None:
        prefix = prefix if prefix is not None else image_channel.rsplit(":", 1)[0]
        self.names = OutputChannels.named(output_names, prefix, image_channel)
        self.forward_image = forward_image
        self.counters = SenderCounters()
        # what processing_parameters shows, made from the pipeline's parameters (the IOC's
        # legacy view: the uploaded background name, the clients' extra keys); None: as given
        self.parameters_view: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        # PUB: a subscriber that does not keep up loses its own messages, not the others'
        self._data = BoundSocket(port, mode, host, queue_size, track_peers=True,
                                 drop_for_slow=True)
        self._image = (
            BoundSocket(image_port, mode, host, queue_size, track_peers=True,
                        drop_for_slow=True)
            if forward_image and image_port is not None
            else None
        )
        self._data_consumer = ConsumerState("output stream")
        self._image_consumer = ConsumerState("image output stream")
        self._writers: dict[str, wire.MessageWriter] = {}
        self._spectrum_spec: wire.ChannelSpec | None = None
        self._log = RateLimitedLog(log)

    @property
    def port(self) -> int:
        return self._data.port

    @property
    def image_port(self) -> int | None:
        return self._image.port if self._image is not None else None

    def open(self) -> None:
        self._data.open()
        if self._image is not None:
            try:
                self._image.open()
            except OSError:
                self._data.close()
                raise

    def close(self) -> None:
        self._data.close()
        self._data_consumer.closed()
        if self._image is not None:
            self._image.close()
            self._image_consumer.closed()

    def __enter__(self) -> ResultSender:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: Frame, result: Any, parameters: dict[str, Any]) -> bool:
        """Queue the results of one frame; False (and counted) if dropped. Never blocks."""
        if not self._data.is_open:
            return self._dropped("dropped", f"pulse {frame.pulse_id}: output stream not open")
        try:
            parts = self._results_message(frame, result, parameters)
        except Exception as e:  # a value we cannot encode must not stop the caller
            return self._dropped("dropped", f"pulse {frame.pulse_id}: cannot encode: {e}")
        status = self._data.send(parts)
        if status is not SendStatus.SENT:
            return self._dropped("dropped", f"pulse {frame.pulse_id}: {status.value}",
                                 status, self._data_consumer)
        self._data_consumer.delivered()
        self.counters.sent += 1
        self.counters.last_pulse_id = frame.pulse_id
        self.counters.last_sent_time = time.time()
        if self._image is not None:
            self._send_image(frame)
        self._count_overflows(frame.pulse_id)
        return True

    def _count_overflows(self, pulse_id: int) -> None:
        overflows = self._data.overflows + (self._image.overflows if self._image else 0)
        if overflows != self.counters.subscriber_overflows:
            self.counters.subscriber_overflows = overflows
            self._log("overflow", logging.WARNING,
                      f"output stream: pulse {pulse_id}: a subscriber does not keep up and "
                      f"loses messages (the others get them); {overflows} times so far")

    def _dropped(self, counter: str, message: str, status: SendStatus | None = None,
                 consumer: ConsumerState | None = None) -> bool:
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        self.counters.last_error = message
        if consumer is not None and (status is SendStatus.NO_CONSUMER or consumer.active):
            # a queue full while a consumer is connecting belongs to the same state
            consumer.no_consumer()
        else:
            self._log(counter, logging.WARNING, f"output stream: {message}")
        return False

    def _send_image(self, frame: Frame) -> None:
        assert self._image is not None
        spec, value = image_output_value(frame, self.names.image)  # as it came
        writer = self._writer("image", (spec,))
        parts = writer.encode(frame.pulse_id, frame.timestamp, writer.encode_values([value]))
        status = self._image.send(parts)
        if status is SendStatus.SENT:
            self._image_consumer.delivered()
            self.counters.image_sent += 1
        else:
            self._dropped("image_dropped", f"pulse {frame.pulse_id}: image {status.value}",
                          status, self._image_consumer)

    def _parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        view = self.parameters_view
        if view is None:
            return parameters
        try:
            return view(parameters)
        except Exception as e:  # a bug there must not cost the results: send them as given
            self._log("parameters", logging.ERROR,
                      f"output stream: processing_parameters as given: {e!r}")
            return parameters

    def _writer(self, key: str, specs: tuple[wire.ChannelSpec, ...]) -> wire.MessageWriter:
        writer = self._writers.get(key)
        if writer is None or writer.channels != specs:
            writer = self._writers[key] = wire.MessageWriter(specs)
        return writer

    def _results_message(self, frame: Frame, result: Any, parameters: dict[str, Any]) -> list:
        names = self.names
        spectrum = getattr(result, "spectrum", None) if result is not None else None
        if spectrum is not None:
            spectrum = np.asarray(spectrum)
            self._spectrum_spec = wire.ChannelSpec.for_array(names.spectrum, spectrum)
        elif self._spectrum_spec is None:  # no spectrum yet: declare one the width of the image
            width = frame.image.shape[-1] if frame.image.ndim else 1
            self._spectrum_spec = wire.ChannelSpec(names.spectrum, "float64", (width,))
        specs: list[wire.ChannelSpec] = []
        values: list[Any] = []
        if self.forward_image and self._image is None:
            spec, value = image_output_value(frame, names.image)  # as it came
            specs.append(spec)
            values.append(value)
        specs.append(self._spectrum_spec)
        values.append(spectrum)
        if names.axis is not None:  # 1.8: the energy axis (or column index) of the spectrum
            width = self._spectrum_spec.shape[0] if self._spectrum_spec.shape else 1
            axis = getattr(result, "axis", None) if spectrum is not None else None
            specs.append(wire.ChannelSpec(names.axis, "float64", (width,)))
            values.append(None if axis is None else np.asarray(axis, dtype=np.float64))
        specs += [
            wire.ChannelSpec(names.center, "float64"),
            wire.ChannelSpec(names.fwhm, "float64"),
            wire.ChannelSpec(names.parameters, "string"),
        ]
        values += [
            _fit_value(result, "center"),
            _fit_value(result, "fwhm"),
            json.dumps(self._parameters(parameters), default=str),
        ]
        if names.saturated is not None:
            specs.append(wire.ChannelSpec(names.saturated, "int64"))
            saturated = getattr(result, "n_saturated", None) if spectrum is not None else None
            values.append(None if saturated is None else int(saturated))
        writer = self._writer("results", tuple(specs))
        return writer.encode(frame.pulse_id, frame.timestamp, writer.encode_values(values))


def _fit_value(result: Any, name: str) -> float | None:
    """A value of the result's fit, or None (sent as missing) when there is no result or no
    good fit."""
    fit = getattr(result, "fit", None)
    if fit is None or not getattr(fit, "ok", True):
        return None
    try:
        value = float(getattr(fit, name))
    except (AttributeError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
