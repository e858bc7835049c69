"""Publishing one frame's results into plain (C) records in one GIL-free step.

The per-frame result records (`pvs.FRAME_CHAIN`) are plain soft records with no Python device
support, joined by forward links into one lock set. `FrameChainWriter.write` puts every value
with `dbPut`, stamps the head record's TIME with the frame's timestamp (the others copy it
through TSEL), and processes the head (which processes the chain) - all while holding the
chain's lock, in one compiled call that never holds the GIL.

Why: softioc's Python device support cost ~90 us of interpreter time per record and a GIL
hand-off with the callback thread each (14 records: 1.5-3 ms a frame, the largest cost of the
IOC after the image itself). Why GIL-free: the CA server reads these records under the same
lock; a lock held while waiting for the GIL (numba compiling, a long Python task) would stall
CA clients for as long.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from epicscorelibs.ioc import dbCore
from numba import njit

# dbFldTypes.h request types (the values softioc.fields reads from EPICS; a test checks them)
DBR_LONG = 5
DBR_ULONG = 6
DBR_INT64 = 7
DBR_UINT64 = 8
DBR_DOUBLE = 10
# Arrays of these dtypes are put as they are (dbPut converts in C); others as float64.
_ARRAY_TYPES = {np.dtype(np.float64): DBR_DOUBLE, np.dtype(np.uint32): DBR_ULONG,
                np.dtype(np.int32): DBR_LONG, np.dtype(np.int64): DBR_INT64,
                np.dtype(np.uint64): DBR_UINT64}
POSIX_TO_EPICS_EPOCH = 631_152_000  # seconds from 1970-01-01 to 1990-01-01 (EPICS epoch)
_ADDR_BYTES = 256  # > sizeof(struct dbAddr); only its first two members (pointers) are read


def _function(name: str, restype: Any, *argtypes: Any) -> Any:
    """An EPICS function as a ctypes prototype of integers, which numba can call."""
    address = ctypes.cast(getattr(dbCore, name), ctypes.c_void_p).value
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


_u64, _long = ctypes.c_uint64, ctypes.c_long
_dbNameToAddr = dbCore.dbNameToAddr
_dbNameToAddr.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
_dbNameToAddr.restype = ctypes.c_long
_put = _function("dbPut", _long, _u64, ctypes.c_short, _u64, _long)
_lock = _function("dbScanLock", None, _u64)
_unlock = _function("dbScanUnlock", None, _u64)
_process = _function("dbProcess", _long, _u64)
_memcpy = ctypes.CFUNCTYPE(_u64, _u64, _u64, ctypes.c_size_t)(
    ctypes.cast(ctypes.CDLL(None).memcpy, ctypes.c_void_p).value)


# Not cached: the compiled code holds these functions' addresses, valid in this process only.
@njit(nogil=True)
def _publish(head_record: int, addrs: np.ndarray, dbr_types: np.ndarray, data: np.ndarray,
             counts: np.ndarray, time_field: int,
             stamp: np.ndarray) -> int:  # pragma: no cover - compiled
    """Under the head's lock (the chain's lock set): put every value, stamp the head, process
    it. 0 or the first error."""
    _lock(head_record)
    status = 0
    for i in range(addrs.shape[0]):
        s = _put(addrs[i], dbr_types[i], data[i], counts[i])
        if s != 0 and status == 0:
            status = s
    if time_field != 0:
        _memcpy(time_field, stamp.ctypes.data, 8)
    s = _process(head_record)
    if s != 0 and status == 0:
        status = s
    _unlock(head_record)
    return status


_SIGNATURE = "int64(int64, uint64[::1], int16[::1], uint64[::1], int64[::1], int64, uint32[::1])"


def warm_up() -> None:
    """Compile the publishing call now: compiled on the first frame instead (it cannot be
    cached), it stalled the IOC ~1 s and the camera dropped the frames it could not queue."""
    _publish.compile(_SIGNATURE)


class FieldAddress:
    """A record field resolved once (the `struct dbAddr` EPICS resolves a PV name to)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buffer = ctypes.create_string_buffer(_ADDR_BYTES)
        if _dbNameToAddr(name.encode(), self.buffer) != 0:
            raise KeyError(f"no such record field: {name}")
        # struct dbAddr starts with `struct dbCommon *precord; void *pfield;`
        self.record, self.field = (ctypes.c_void_p * 2).from_buffer(self.buffer)[:]
        self.address = ctypes.addressof(self.buffer)


def put_string(name: str, value: str) -> None:
    """`value` into the field `name` as DBR_STRING, with `dbPut` under the record's lock: the
    IOC's own write (DISP and access security are for clients). Monitors of the field (not
    processed when it is put: EGU, alarm limits) see it."""
    data = value.encode()
    if len(data) >= _MAX_STRING:
        raise ValueError(f"{value!r} is longer than an EPICS string")
    buffer = ctypes.create_string_buffer(data, _MAX_STRING)
    field = FieldAddress(name)  # holds the struct dbAddr: kept alive over the call
    _lock(field.record)
    try:
        status = _put(field.address, 0, ctypes.addressof(buffer), 1)  # 0: DBR_STRING
    finally:
        _unlock(field.record)
    if status != 0:
        raise RuntimeError(f"writing {value!r} to {name} failed (status {status})")


_MAX_STRING = 40  # MAX_STRING_SIZE, with the terminating NUL
_post_events = dbCore.db_post_events
_post_events.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)
_post_events.restype = ctypes.c_int
_DBE_VALUE_LOG = 1 | 4  # DBE_VALUE | DBE_LOG


def post_value_monitors(name: str) -> None:
    """Post the value of record `name` to its monitors (CA and PVA), as processing would: for
    a value put without processing (dbPut posts no event for a field that processes)."""
    field = FieldAddress(name)
    _lock(field.record)
    try:
        _post_events(field.record, field.field, _DBE_VALUE_LOG)
    finally:
        _unlock(field.record)


class FrameChainWriter:
    """Writes the values of a chain of records, then stamps and processes its head.

    `names`: the record fields to write, the chain's head first. `stamped`: the head's TIME is
    written with the timestamp given to `write` (the record has TSE=-2, so nothing else sets
    it); otherwise processing stamps it. Scalars go through preallocated buffers; arrays are
    passed by address.
    """

    def __init__(self, names: Sequence[str], stamped: bool = True) -> None:
        self.names = tuple(names)
        if not self.names:
            raise ValueError("a chain needs at least its head")
        # kept: the compiled call gets the addresses of their buffers
        self._targets = targets = [FieldAddress(name) for name in self.names]
        self._head = targets[0].record
        self._time_field = FieldAddress(f"{self.names[0]}.TIME").field if stamped else 0
        self._addrs = np.array([t.address for t in targets], dtype=np.uint64)
        n = len(targets)
        self._types = np.zeros(n, dtype=np.int16)
        self._data = np.zeros(n, dtype=np.uint64)
        self._counts = np.ones(n, dtype=np.int64)
        self._doubles = np.zeros(n, dtype=np.float64)
        self._ints = np.zeros(n, dtype=np.int64)
        self._stamp = np.zeros(2, dtype=np.uint32)  # epicsTimeStamp: secPastEpoch, nsec
        # where each scalar's buffer slot is (the buffers never move; `.ctypes` per value per
        # frame made a ctypes object each time)
        self._int_slots = [self._ints.ctypes.data + 8 * i for i in range(n)]
        self._double_slots = [self._doubles.ctypes.data + 8 * i for i in range(n)]
        self._keep: list[np.ndarray] = []
        self._busy = threading.Lock()  # the buffers above are shared by every write

    def write(self, values: Sequence[Any], posix_seconds: int = 0, nanoseconds: int = 0) -> None:
        """`values`: float, int or 1-D array (may be empty) for each of `names`, in order."""
        if len(values) != len(self.names):
            raise ValueError(f"{len(values)} values for the {len(self.names)} records "
                             f"{', '.join(self.names)}")
        with self._busy:
            self._write(values, posix_seconds, nanoseconds)

    def _write(self, values: Sequence[Any], posix_seconds: int, nanoseconds: int) -> None:
        keep = self._keep
        keep.clear()
        for i, value in enumerate(values):
            if isinstance(value, np.ndarray):
                dbr = _ARRAY_TYPES.get(value.dtype)
                array = np.ascontiguousarray(value if dbr else value.astype(np.float64))
                keep.append(array)
                self._types[i] = dbr or DBR_DOUBLE
                self._data[i] = array.ctypes.data
                self._counts[i] = array.size
            elif isinstance(value, int | np.integer):
                self._ints[i] = value
                self._types[i] = DBR_INT64
                self._data[i] = self._int_slots[i]
                self._counts[i] = 1
            else:
                self._doubles[i] = value
                self._types[i] = DBR_DOUBLE
                self._data[i] = self._double_slots[i]
                self._counts[i] = 1
        self._stamp[0] = max(int(posix_seconds) - POSIX_TO_EPICS_EPOCH, 0)
        self._stamp[1] = int(nanoseconds)
        status = _publish(self._head, self._addrs, self._types, self._data, self._counts,
                          self._time_field, self._stamp)
        keep.clear()
        if status != 0:
            raise RuntimeError(f"writing the frame's records failed (EPICS status {status:#x})")
