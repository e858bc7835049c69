"""The IOC process's memory: the lock (issue 7: RSS growth in `bench soak`), and the objects
of its start-up kept out of the garbage collector's full passes (`freeze_startup_objects`).

Why: EPICS iocInit locks the whole process into RAM whenever real-time scheduling is available
to it (``epicsThreadRealtimeLock``: ``mlockall(MCL_CURRENT | MCL_FUTURE)``; the IOC runs as
root, or with an rtprio limit). For this IOC that lock costs memory and buys nothing:

- every mapping becomes resident at once: shared libraries (llvmlite's is large), the stack of
  each of the IOC's threads, BLAS buffers;
- camera frames are received by libzmq's IO thread into its glibc malloc arena (the dynamic
  mmap threshold rises above the frame size after the first one is freed) and are reused from
  there: the arena settles at the most frames in flight at once. In a locked process memory
  freed inside an arena is never given back (``madvise(MADV_DONTNEED)`` fails on locked pages)
  and every backlog populates a whole new arena heap at once, so the RSS ratchets up to the
  largest backlog ever seen and stays there after the queues drained. Unlocked, the RSS swings
  with the backlog and comes back to the settled pool; the CPU per frame is the same.

The processing is Python and numba with a garbage collector, not a hard real-time loop, and
the frames in use are touched at every frame, so they are never paged out. The lock is
released right after iocInit (`release_memory_lock`); ``PSSS_KEEP_MLOCK=1`` keeps it. (Pages it
made resident stay so until the kernel wants them back: the absolute RSS right after the start
does not drop, its growth does.)

Not done instead: a fixed ``M_MMAP_THRESHOLD`` below the frame size (mallopt) also stops the
growth, but then every frame is a fresh mmap whose pages the kernel zeroes, which costs more
IOC CPU per frame than the lock costs memory.

The measurements behind this: docs/performance.md, "bench soak" (memory lock).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

ENV_KEEP_MLOCK = "PSSS_KEEP_MLOCK"
_TRUE = ("1", "yes", "true", "on")


def memory_kb(pid: int | str = "self") -> dict[str, int]:
    """The memory figures of /proc/<pid>/status in kB (VmRSS, RssAnon, VmHWM, VmLck, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def locked_kb(pid: int | str = "self") -> int:
    """Locked memory of a process in kB (VmLck); 0 if not known."""
    try:
        return memory_kb(pid).get("VmLck", 0)
    except OSError:
        return 0


def release_memory_lock(env: Mapping[str, str] | None = None) -> bool:
    """Undo iocInit's ``mlockall`` (see the module docstring) unless ``PSSS_KEEP_MLOCK`` is set.

    Returns True if memory was locked and is now unlocked. Never raises: a failure is logged.
    """
    env = os.environ if env is None else env
    locked = locked_kb()
    if not locked:
        return False
    if env.get(ENV_KEEP_MLOCK, "").strip().lower() in _TRUE:
        log.info("memory stays locked (%s): %d MB", ENV_KEEP_MLOCK, locked // 1024)
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.munlockall() != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warning("cannot release the memory lock: %s", e)
        return False
    log.info("released the real-time memory lock of iocInit (%d MB were locked; %s=1 keeps "
             "it)", locked // 1024, ENV_KEEP_MLOCK)
    return True


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now out of the collector's sight.

    The IOC starts with ~170k tracked objects (softioc, numba, scipy, the records), all alive
    until it exits. Each full (generation 2) pass of the cyclic collector walks them all while
    holding the GIL: 50-75 ms measured here, 5-7 frames at 100 Hz with the worker thread
    stopped. Frozen, they are not walked (a full pass then takes microseconds) and frames
    made later are collected as before. Returns the number of objects frozen.
    """
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("kept %d start-up objects out of the garbage collector's full passes (%.0f ms)",
             frozen, (time.perf_counter() - start) * 1e3)
    return frozen
