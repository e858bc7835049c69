"""The bsread wire format: the one module that knows how a bsread message is laid out.

One ZeroMQ multipart message per pulse::

    [main header JSON, data header (JSON, maybe compressed), value_0, timestamp_0, value_1, ...]

A missing value is two empty frames. Shapes travel fastest dimension first (numpy (H, W) is
``[W, H]`` on the wire); `ChannelSpec.shape` is always in numpy order. ``bitshuffle_lz4``
values are an 8-byte big-endian byte count, a 4-byte big-endian block size (bytes) and the
bitshuffle/LZ4 blocks (the HDF5 bitshuffle chunk layout).

Decoding is defensive: anything that does not fit raises `WireError` with a `kind` (one of
`MALFORMED_KINDS`), never anything else; a value that would decode to more than `max_bytes`
is refused before anything is decompressed, and compressed data is bounds-checked before it is
handed to the C decompressor. A ``bitshuffle_lz4`` value is a sequence of independently
compressed blocks: `Bslz4Blocks` locates and checks them without decompressing, and
`Bslz4Image` decodes only the blocks that hold the rows asked for. Encoding is split so that
values can be encoded once and sent many times (`encode_value` + `MessageWriter.encode`),
which keeps the simulator cheap; `Encoded` values (received bytes forwarded as they came) are
sent as they are.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import bitshuffle
import bitshuffle.ext
import lz4.block
import numba
import numpy as np

MAIN_HTYPE = "bsr_m-1.1"
DATA_HTYPE = "bsr_d-1.1"
BSLZ4 = "bitshuffle_lz4"
LZ4 = "lz4"
COMPRESSIONS = (None, BSLZ4, LZ4)

# Kinds of malformed message (WireError.kind).
GARBAGE = "garbage"  # first frame is not a bsread main header
BAD_JSON = "bad_json"  # a header is not valid JSON or lacks/misuses required fields
FRAME_COUNT = "frame_count"  # number of frames does not match the data header
SIZE = "size"  # value byte count does not fit the declared shape and type
UNKNOWN_TYPE = "unknown_type"  # channel type we cannot decode (or not numeric where needed)
UNKNOWN_COMPRESSION = "unknown_compression"
CORRUPT = "corrupt"  # compressed data that does not decompress
TOO_LARGE = "too_large"  # a value that would decode to more than the receiver's size cap
MALFORMED_KINDS = (GARBAGE, BAD_JSON, FRAME_COUNT, SIZE, UNKNOWN_TYPE, UNKNOWN_COMPRESSION, CORRUPT,
                   TOO_LARGE)

# A compressed data header decodes to at most this (a header of thousands of channels is
# well under a MB): a bigger one is refused before it is decompressed.
MAX_DATA_HEADER_BYTES = 16 * 10**6

# bsread type name -> numpy type code (byte order added from the channel's encoding).
TYPES: dict[str, str] = {
    "bool": "?",
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "int64": "i8",
    "uint64": "u8",
    "float32": "f4",
    "float64": "f8",
    "string": "u1",
}
_TYPE_OF_DTYPE = {np.dtype(code).str[1:]: name for name, code in TYPES.items() if name != "string"}

Buffer = bytes | bytearray | memoryview | np.ndarray


class WireError(ValueError):
    """A message that does not follow the bsread format; `kind` says how."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------
# Headers


@dataclass(frozen=True, slots=True)
class MainHeader:
    pulse_id: int
    timestamp: tuple[int, int] | None  # global timestamp (sec, ns); None when absent
    hash: str | None  # opaque data-header cache key
    dh_compression: str | None


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One channel of a data header. `shape` is numpy order; None means "not declared"."""

    name: str
    type: str = "float64"
    shape: tuple[int, ...] | None = (1,)
    encoding: str = "little"
    compression: str | None = None

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of one element (raises WireError for an unknown type)."""
        code = TYPES.get(self.type)
        if code is None:
            raise WireError(UNKNOWN_TYPE, f"channel {self.name!r}: unknown type {self.type!r}")
        return np.dtype((">" if self.encoding == "big" else "<") + code)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "encoding": self.encoding}
        out["shape"] = list(self.shape[::-1]) if self.shape is not None else [1]
        if self.compression is not None:
            out["compression"] = self.compression
        return out

    @classmethod
    def from_json(cls, item: Any) -> ChannelSpec:
        """Parse one data-header channel, applying the bsread defaults for absent fields."""
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise WireError(BAD_JSON, f"data header channel without a name: {item!r:.80}")
        ctype = item.get("type", "float64")
        shape = item.get("shape")
        compression = item.get("compression")
        if not isinstance(ctype, str) or not (compression is None or isinstance(compression, str)):
            raise WireError(BAD_JSON, f"channel {item['name']!r}: bad type or compression")
        if shape is not None and not (
            isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise WireError(BAD_JSON, f"channel {item['name']!r}: bad shape {shape!r:.40}")
        return cls(
            name=item["name"],
            type=ctype.lower(),
            shape=tuple(shape[::-1]) if shape is not None else None,
            encoding="big" if item.get("encoding") == "big" else "little",
            compression=None if compression in (None, "none") else compression,
        )

    @classmethod
    def for_array(
        cls, name: str, value: np.ndarray, compression: str | None = None
    ) -> ChannelSpec:
        """The spec of a numpy array (or numpy scalar, which becomes shape (1,))."""
        arr = np.asarray(value)
        ctype = _TYPE_OF_DTYPE.get(arr.dtype.str[1:])
        if ctype is None:
            raise ValueError(f"channel {name!r}: dtype {arr.dtype} has no bsread type")
        encoding = "big" if arr.dtype.byteorder == ">" else "little"
        return cls(name, ctype, arr.shape or (1,), encoding, compression)


@dataclass(frozen=True)
class DataHeader:
    channels: tuple[ChannelSpec, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {c.name: i for i, c in enumerate(self.channels)})

    def to_bytes(self, compression: str | None = None) -> bytes:
        text = json.dumps({"htype": DATA_HTYPE, "channels": [c.to_json() for c in self.channels]})
        raw = text.encode()
        return bytes(_bslz4_encode(np.frombuffer(raw, np.uint8))) if compression == BSLZ4 else raw

    @classmethod
    def parse(cls, raw: Buffer, compression: str | None = None) -> DataHeader:
        if compression not in COMPRESSIONS:
            raise WireError(UNKNOWN_COMPRESSION, f"data header compression {compression!r}")
        if compression is not None:
            try:
                raw = _decompress(raw, np.dtype("u1"), None, compression,
                                  max_bytes=MAX_DATA_HEADER_BYTES).tobytes()
            except WireError as e:
                raise WireError(e.kind if e.kind == TOO_LARGE else BAD_JSON,
                                f"data header: {e}") from e
        doc = _loads(raw, "data header")
        channels = doc.get("channels")
        if not isinstance(channels, list):
            raise WireError(BAD_JSON, "data header has no channel list")
        return cls(tuple(ChannelSpec.from_json(item) for item in channels))


def _loads(raw: Buffer, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(BAD_JSON, f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise WireError(BAD_JSON, f"{what} is not a JSON object")
    return doc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_main_header(raw: Buffer) -> MainHeader:
    """Parse frame 0. A missing pulse_id is 0 (Java senders omit it); hash is opaque."""
    text = bytes(raw)
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        if text.lstrip()[:1] == b"{":  # meant to be a header, but broken (e.g. truncated)
            raise WireError(BAD_JSON, "main header is not valid JSON") from None
        raise WireError(GARBAGE, f"not a bsread message ({len(raw)}-byte first frame)") from None
    if not isinstance(doc, dict) or not str(doc.get("htype", "")).startswith("bsr_m"):
        raise WireError(GARBAGE, "first frame is JSON but not a bsread main header")
    pulse_id = doc.get("pulse_id", 0)
    if not _is_int(pulse_id) or not 0 <= pulse_id < 2**63:  # int64: the PULSE_ID record
        raise WireError(BAD_JSON, f"main header: bad pulse_id {pulse_id!r:.40}")
    timestamp = None
    ts = doc.get("global_timestamp")
    if ts is not None:
        sec = ts.get("sec", ts.get("epoch")) if isinstance(ts, dict) else None
        ns = ts.get("ns", 0) if isinstance(ts, dict) else None
        if not (_is_int(sec) and _is_int(ns)):
            raise WireError(BAD_JSON, f"main header: bad global_timestamp {ts!r:.60}")
        timestamp = (sec, ns)
    digest = doc.get("hash")
    dh_compression = doc.get("dh_compression")
    if dh_compression == "none":
        dh_compression = None
    if dh_compression not in COMPRESSIONS:
        raise WireError(UNKNOWN_COMPRESSION, f"data header compression {dh_compression!r:.40}")
    return MainHeader(pulse_id, timestamp, digest if isinstance(digest, str) else None,
                      dh_compression)


def encode_main_header(
    pulse_id: int, timestamp: tuple[int, int], digest: str, dh_compression: str | None = None
) -> bytes:
    doc: dict[str, Any] = {
        "htype": MAIN_HTYPE,
        "pulse_id": int(pulse_id),
        "global_timestamp": {"sec": int(timestamp[0]), "ns": int(timestamp[1])},
        "hash": digest,
    }
    if dh_compression is not None:
        doc["dh_compression"] = dh_compression
    return json.dumps(doc).encode()


# ---------------------------------------------------------------------------------------------
# Values


def encode_timestamp(timestamp: tuple[int, int], encoding: str = "little") -> bytes:
    return struct.pack(">qq" if encoding == "big" else "<qq", int(timestamp[0]), int(timestamp[1]))


def decode_timestamp(raw: Buffer, encoding: str = "little") -> tuple[int, int] | None:
    if len(raw) != 16:
        return None
    sec, ns = struct.unpack(">qq" if encoding == "big" else "<qq", raw)
    return sec, ns


@dataclass(frozen=True, slots=True)
class Encoded:
    """A value frame already in its wire form, sent as it is (`encode_value` passes it through):
    e.g. a camera's compressed image forwarded with the compression it came with."""

    data: Buffer


def encode_value(spec: ChannelSpec, value: Any) -> Buffer | None:
    """The value frame for `value` (None -> None, i.e. a missing value).

    Uncompressed arrays are returned as contiguous arrays, so they can be sent zero-copy.
    """
    if value is None:
        return None
    if isinstance(value, Encoded):
        return value.data
    if spec.type == "string":
        text = value if isinstance(value, str) else json.dumps(value)
        arr = np.frombuffer(text.encode(), np.uint8)
    else:
        arr = np.ascontiguousarray(value, dtype=spec.dtype)
    if spec.compression is None:
        return arr
    if spec.compression == BSLZ4:
        return _bslz4_encode(arr.reshape(-1))
    raise ValueError(f"channel {spec.name!r}: cannot encode compression {spec.compression!r}")


def decode_value(
    spec: ChannelSpec, raw: Buffer, max_bytes: int | None = None
) -> np.ndarray | str | None:
    """Decode one value frame: an array of `spec.shape` (numpy order), a str, or None (empty).

    Uncompressed values are zero-copy views of `raw` (read-only when `raw` is). A value that
    would decode to more than `max_bytes` is refused (TOO_LARGE) before anything is
    decompressed.
    """
    if len(raw) == 0:
        return None
    if spec.compression not in COMPRESSIONS:
        raise WireError(UNKNOWN_COMPRESSION, f"channel {spec.name!r}: {spec.compression!r:.40}")
    if spec.type == "string":
        data = _decompress(raw, np.dtype("u1"), None, spec.compression, spec.encoding, max_bytes)
        return data.tobytes().decode("utf-8", errors="replace")
    count = math.prod(spec.shape) if spec.shape is not None else None
    try:
        arr = _decompress(raw, spec.dtype, count, spec.compression, spec.encoding, max_bytes)
    except WireError as e:
        raise WireError(e.kind, f"channel {spec.name!r}: {e}") from None
    return arr.reshape(spec.shape) if spec.shape is not None else arr


def _decompress(
    raw: Buffer, dtype: np.dtype, count: int | None, compression: str | None,
    encoding: str = "little", max_bytes: int | None = None,
) -> np.ndarray:
    """Decode a value frame to a 1-D array of `count` elements (any count when None)."""
    if compression is None:
        _check_cap(len(raw), max_bytes)
        _check_count(len(raw), dtype, count)
        return np.frombuffer(raw, dtype)
    buf = np.frombuffer(raw, np.uint8)
    if compression == BSLZ4:
        return Bslz4Blocks(buf, dtype, count, max_bytes).decode()
    if compression == LZ4:
        return _lz4_decode(buf, dtype, count, encoding, max_bytes)
    raise WireError(UNKNOWN_COMPRESSION, f"compression {compression!r:.40}")


def _size_message(nbytes: int, dtype: np.dtype, count: int | None) -> str:
    want = "a multiple of" if count is None else f"{count} x"
    return f"{nbytes} bytes is not {want} {dtype.itemsize}-byte {dtype.name}"


def _check_count(nbytes: int, dtype: np.dtype, count: int | None) -> int:
    if nbytes % dtype.itemsize or (count is not None and nbytes != count * dtype.itemsize):
        raise WireError(SIZE, _size_message(nbytes, dtype, count))
    return nbytes // dtype.itemsize


def _check_cap(nbytes: int, max_bytes: int | None) -> None:
    """Refuse a value that would decode to more than `max_bytes` (a decompression bomb: a few
    MB that inflate to a GB), before any memory is set aside for it."""
    if max_bytes is not None and nbytes > max_bytes:
        raise WireError(TOO_LARGE, f"value of {nbytes / 1e6:.1f} MB exceeds the "
                        f"{max_bytes / 1e6:.1f} MB allowed")


def _lz4_decode(buf: np.ndarray, dtype: np.dtype, count: int | None, encoding: str,
                max_bytes: int | None = None) -> np.ndarray:
    if buf.size < 4:
        raise WireError(SIZE, "lz4 value shorter than its 4-byte header")
    nbytes = int.from_bytes(buf[:4].tobytes(), "big" if encoding == "big" else "little")
    _check_cap(nbytes, max_bytes)
    _check_count(nbytes, dtype, count)
    try:
        out = lz4.block.decompress(buf[4:].tobytes(), uncompressed_size=nbytes)
    except lz4.block.LZ4BlockError as e:
        raise WireError(CORRUPT, f"lz4 value does not decompress: {e}") from None
    if len(out) != nbytes:
        raise WireError(CORRUPT, f"lz4 value decompressed to {len(out)} bytes, not {nbytes}")
    return np.frombuffer(out, dtype)


# bitshuffle's default block size rule (elements): 8 kB worth, a multiple of 8, at least 128.
def bslz4_block_size(itemsize: int) -> int:
    return max(128, (8192 // itemsize) // 8 * 8)


def _bslz4_encode(arr: np.ndarray) -> np.ndarray:
    block = bslz4_block_size(arr.dtype.itemsize)
    head = struct.pack(">qi", arr.nbytes, block * arr.dtype.itemsize)
    body = bitshuffle.compress_lz4(arr, block)
    return np.concatenate([np.frombuffer(head, np.uint8), body.view(np.uint8)])


# ---------------------------------------------------------------------------------------------
# bitshuffle_lz4, block by block
#
# The work is bitshuffle's own C decompressor (`bshuf_decompress_lz4`: LZ4 per block, then the
# bit-unshuffle), called through ctypes on a run of blocks straight into the image's memory:
# its Python wrapper allocates a new array per call, which would cost a copy of every row.
# ctypes releases the GIL for the call. bitshuffle's wheel is built with OpenMP, whose threads
# spin after each call (libgomp's default) and burn CPU between frames (docs/performance.md),
# so the threads that decode here use one OpenMP thread each, and the parallelism is ours
# (`threads`).


def _bshuf_decompress_lz4() -> Callable[..., int] | None:
    """bitshuffle's exported ``bshuf_decompress_lz4``, or None (then its Python API is used)."""
    try:
        fn = ctypes.CDLL(bitshuffle.ext.__file__).bshuf_decompress_lz4
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                   ctypes.c_size_t]
    return fn  # type: ignore[no-any-return]


def _omp_set_num_threads() -> Callable[[int], Any] | None:
    """``omp_set_num_threads`` of the OpenMP runtime bitshuffle loaded (its wheel bundles its
    own libgomp), or None when there is none."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line})
    except OSError:
        return None
    for path in paths:
        try:  # RTLD_NOLOAD: the copy already loaded, never a second one
            return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


_DECOMPRESS = _bshuf_decompress_lz4()
_SET_OMP_THREADS = _omp_set_num_threads()
_THREAD = threading.local()  # .single_openmp: this thread's OpenMP team is set to one thread
_POOL_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
# Blocks per thread below which a hand-off to another thread costs more than it saves
# (a block is 8 kB decoded, a few microseconds of work).
PARALLEL_MIN_BLOCKS = 64


def _single_openmp_thread() -> None:
    if not getattr(_THREAD, "single_openmp", False):
        if _SET_OMP_THREADS is not None:
            _SET_OMP_THREADS(1)  # per calling thread (OpenMP's nthreads-var)
        _THREAD.single_openmp = True


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1),
                                       thread_name_prefix="bslz4-decode")
        return _POOL


class Bslz4Blocks:
    """A ``bitshuffle_lz4`` value located and checked block by block, nothing decompressed yet.

    The layout (HDF5 bitshuffle chunks): 8-byte big-endian byte count, 4-byte big-endian block
    size in bytes (0: bitshuffle's default), then per block a 4-byte big-endian compressed size
    and that many bytes of LZ4 data. Blocks hold `block` elements; a last, smaller block (a
    multiple of 8 elements) may follow, and the last ``size % 8`` elements come uncompressed at
    the very end ("the tail"). Units: blocks 0 .. n_blocks - 1, then the tail, if any.

    Every block size is checked to lie inside the value (and below LZ4's bound for a block) and
    the blocks to end exactly where the value does, so the decompressor never reads outside
    it; data that does not decompress is found when its block is decoded (CORRUPT).
    """

    __slots__ = ("_address", "block", "buf", "dtype", "n_blocks", "offsets", "size", "tail")

    def __init__(self, raw: Buffer, dtype: np.dtype, count: int | None = None,
                 max_bytes: int | None = None) -> None:
        buf = (raw.view(np.uint8).reshape(-1) if isinstance(raw, np.ndarray)
               else np.frombuffer(raw, np.uint8))
        if buf.size < 12:
            raise WireError(SIZE, "bitshuffle_lz4 value shorter than its 12-byte header")
        nbytes, block_bytes = struct.unpack(">qi", buf[:12].tobytes())
        if nbytes < 0:
            raise WireError(SIZE, f"bitshuffle_lz4 value declares {nbytes} bytes")
        _check_cap(nbytes, max_bytes)
        n = _check_count(nbytes, dtype, count)
        itemsize = dtype.itemsize
        block = block_bytes // itemsize if block_bytes else bslz4_block_size(itemsize)
        if n and (block_bytes < 0 or block_bytes % itemsize or block <= 0 or block % 8):
            raise WireError(CORRUPT, f"bitshuffle_lz4 block size {block_bytes} bytes is invalid")
        self.buf, self.dtype, self.size = buf, dtype, n
        self.block = max(block, 8)
        self.n_blocks = n // self.block + (1 if (n % self.block) // 8 else 0) if n else 0
        self.tail = n % 8
        self.offsets = np.empty(self.n_blocks + 1, np.int64)
        if n:
            block_bytes = self.block * itemsize
            end = _bslz4_block_offsets(buf, 12, block_bytes + block_bytes // 255 + 16,
                                       self.offsets)
            if end < 0 or end + self.tail * itemsize != buf.size:
                raise WireError(CORRUPT,
                                "bitshuffle_lz4 value is truncated or its block sizes are wrong")
        else:
            self.offsets[0] = 12
        self._address = buf.ctypes.data

    @property
    def n_units(self) -> int:
        return self.n_blocks + (1 if self.tail else 0)

    def units_for(self, first: int, stop: int) -> tuple[int, int]:
        """The units [u0, u1) that hold elements [first, stop)."""
        if stop <= first:
            return 0, 0
        in_blocks = self.size - self.tail

        def unit(e: int) -> int:
            return e // self.block if e < in_blocks else self.n_blocks

        return unit(first), unit(stop - 1) + 1

    def decode(self, threads: int = 1) -> np.ndarray:
        """The whole value, a new 1-D array of `dtype`."""
        out = np.empty(self.size, self.dtype)
        self.decode_into(out, 0, self.n_units, threads)
        return out

    def decode_into(self, out: np.ndarray, u0: int, u1: int, threads: int = 1) -> None:
        """Decode units [u0, u1) into their place in `out` (1-D, `size` elements of `dtype`'s
        size, C-contiguous, writable), on up to `threads` threads. Raises WireError(CORRUPT)."""
        b1 = min(u1, self.n_blocks)
        if u0 < b1:
            parts = max(1, min(threads, (b1 - u0) // PARALLEL_MIN_BLOCKS))
            pieces = list(itertools.pairwise(u0 + (b1 - u0) * k // parts
                                             for k in range(parts + 1)))
            others = [_pool().submit(self._decode_blocks, out, a, b) for a, b in pieces[1:]]
            try:
                self._decode_blocks(out, *pieces[0])
            finally:
                errors = [f.exception() for f in others]
            for error in errors:
                if error is not None:
                    raise error
        if u1 > self.n_blocks and self.tail:
            start = (self.size - self.tail) * self.dtype.itemsize
            out.view(np.uint8)[start:] = self.buf[self.offsets[-1]:]

    def _decode_blocks(self, out: np.ndarray, b0: int, b1: int) -> None:
        first = b0 * self.block
        stop = min(b1 * self.block, self.size - self.tail)
        used = int(self.offsets[b1] - self.offsets[b0])
        _single_openmp_thread()
        if _DECOMPRESS is not None:
            itemsize = self.dtype.itemsize
            got = _DECOMPRESS(self._address + int(self.offsets[b0]),
                              out.ctypes.data + first * itemsize, stop - first, itemsize,
                              self.block)
        else:  # a bitshuffle build without the exported C function
            try:
                part = bitshuffle.decompress_lz4(
                    self.buf[self.offsets[b0]:self.offsets[b1]], (stop - first,),
                    np.dtype(f"u{self.dtype.itemsize}"), self.block)
            except (RuntimeError, ValueError):
                got = -1
            else:
                out.view(part.dtype)[first:stop] = part
                got = used
        if got != used:
            which = f"block {b0}" if b1 - b0 == 1 else f"blocks {b0}..{b1 - 1}"
            raise WireError(CORRUPT, f"bitshuffle_lz4 {which}: decompression failed (error {got})"
                            if got < 0 else f"bitshuffle_lz4 {which}: {got} bytes decompressed, "
                            f"{used} declared")


@numba.njit(cache=True, nogil=True)
def _bslz4_block_offsets(buf: np.ndarray, start: int, max_size: int,
                         offsets: np.ndarray) -> int:
    """offsets[i] = where block i (its 4-byte big-endian size) starts, offsets[-1] = where the
    last block ends; returns that end, or -1 if a block leaves `buf` or claims more than
    `max_size` bytes."""
    pos = start
    n_blocks = offsets.size - 1
    for i in range(n_blocks):
        if pos + 4 > buf.size:
            return -1
        offsets[i] = pos
        size = ((np.int64(buf[pos]) << 24) | (np.int64(buf[pos + 1]) << 16)
                | (np.int64(buf[pos + 2]) << 8) | np.int64(buf[pos + 3]))
        if size > max_size:
            return -1
        pos += 4 + size
        if pos > buf.size:
            return -1
    offsets[n_blocks] = pos
    return pos


class Bslz4Image:
    """A 2-D ``bitshuffle_lz4`` image decoded on request: `rows(ymin, ymax)` decompresses only
    the blocks that hold those rows, `full()` the rest; nothing is decoded twice.

    `raw` is the value as received (to forward it as it came). Thread-safe. Raises
    WireError(CORRUPT) from the first block that does not decompress on, for every request.
    """

    __slots__ = ("_blocks", "_done", "_error", "_lock", "_out", "_threads", "dtype", "raw",
                 "shape")

    def __init__(self, raw: Buffer, blocks: Bslz4Blocks, shape: tuple[int, int],
                 threads: int = 1) -> None:
        if math.prod(shape) != blocks.size:
            raise ValueError(f"shape {shape} does not hold {blocks.size} elements")
        self.raw = raw
        self.shape = shape
        self.dtype = blocks.dtype
        self._blocks = blocks
        self._threads = threads
        self._out: np.ndarray | None = None
        self._done = (0, 0)  # the units decoded so far: [u0, u1)
        self._error: WireError | None = None
        self._lock = threading.Lock()

    @property
    def ndim(self) -> int:
        return 2

    def rows(self, ymin: int, ymax: int) -> np.ndarray:
        """The image, of its full shape, with at least rows [ymin, ymax) decoded. The other
        rows hold whatever the memory held unless decoded before: read only the rows asked
        for."""
        width = self.shape[1]
        return self._decoded(ymin * width, ymax * width)

    def full(self) -> np.ndarray:
        """The whole image, decoded (the blocks not decoded yet)."""
        return self._decoded(0, self._blocks.size)

    def _decoded(self, first: int, stop: int) -> np.ndarray:
        with self._lock:
            if self._error is not None:
                raise self._error
            blocks = self._blocks
            if self._out is None:
                self._out = np.empty(blocks.size, blocks.dtype)
            u0, u1 = blocks.units_for(first, stop)
            d0, d1 = self._done
            # one decoded run: a request beside or apart from it also decodes the gap between
            todo = [(u0, u1)] if d0 == d1 else [(min(u0, d0), d0), (d1, max(u1, d1))]
            try:
                for a, b in todo:
                    if a < b:
                        blocks.decode_into(self._out, a, b, self._threads)
            except WireError as e:
                self._error = e
                raise
            if u0 < u1:
                self._done = (u0, u1) if d0 == d1 else (min(u0, d0), max(u1, d1))
            return self._out.reshape(self.shape)


# ---------------------------------------------------------------------------------------------
# Messages


class MessageWriter:
    """Builds messages for a fixed channel list; the data header is encoded once."""

    def __init__(self, channels: Sequence[ChannelSpec], dh_compression: str | None = None):
        self.header = DataHeader(tuple(channels))
        self.dh_compression = dh_compression
        self.data_header = self.header.to_bytes(dh_compression)
        self.hash = hashlib.md5(self.data_header).hexdigest()

    @property
    def channels(self) -> tuple[ChannelSpec, ...]:
        return self.header.channels

    def encode_values(self, values: Iterable[Any]) -> list[Buffer | None]:
        return [encode_value(s, v) for s, v in zip(self.channels, values, strict=True)]

    def encode(
        self, pulse_id: int, timestamp: tuple[int, int], values: Sequence[Buffer | None]
    ) -> list[Buffer]:
        """All frames of one message, from values already passed through `encode_value`."""
        parts: list[Buffer] = [
            encode_main_header(pulse_id, timestamp, self.hash, self.dh_compression),
            self.data_header,
        ]
        stamps = {"little": encode_timestamp(timestamp)}
        for spec, value in zip(self.channels, values, strict=True):
            if value is None:
                parts += (b"", b"")
                continue
            if spec.encoding not in stamps:
                stamps[spec.encoding] = encode_timestamp(timestamp, spec.encoding)
            parts += (value, stamps[spec.encoding])
        return parts


class MessageReader:
    """Splits and decodes messages; data headers are cached by their (opaque) hash."""

    def __init__(self, cache_size: int = 8) -> None:
        self._cache: dict[tuple[str, str | None], DataHeader] = {}
        self._cache_size = cache_size

    def data_header(self, main: MainHeader, raw: Buffer) -> DataHeader:
        key = (main.hash, main.dh_compression) if main.hash is not None else None
        if key is not None and (cached := self._cache.get(key)) is not None:
            return cached
        header = DataHeader.parse(raw, main.dh_compression)
        if key is not None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = header
        return header

    def split(
        self, parts: Sequence[Buffer], main: MainHeader | None = None
    ) -> tuple[MainHeader, DataHeader]:
        """Parse both headers and check the frame count (raises WireError).

        `main`, when given, is frame 0 already parsed by the caller.
        """
        if not parts:
            raise WireError(GARBAGE, "empty message")
        if main is None:
            main = parse_main_header(parts[0])
        if len(parts) < 2:
            raise WireError(FRAME_COUNT, "message has a main header only")
        header = self.data_header(main, parts[1])
        if len(parts) != 2 + 2 * len(header.channels):
            raise WireError(
                FRAME_COUNT,
                f"{len(parts)} frames for {len(header.channels)} channels "
                f"(expected {2 + 2 * len(header.channels)})",
            )
        return main, header
