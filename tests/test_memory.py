"""psss_ioc.ioc.memory: the IOC releases the real-time memory lock of iocInit (issue 7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from iochelpers import EPICS_ENV, IocProcess, wait_until

from psss_ioc.ioc.memory import ENV_KEEP_MLOCK, locked_kb

# mlockall(MCL_CURRENT | MCL_FUTURE) as iocInit does, then release_memory_lock.
_LOCK_THEN_RELEASE = """
import ctypes, os, sys
from psss_ioc.ioc.memory import locked_kb, release_memory_lock
if ctypes.CDLL(None, use_errno=True).mlockall(3) != 0:
    print("cannot lock"); sys.exit(0)
before = locked_kb()
released = release_memory_lock()
print(before, released, locked_kb())
"""


def _lock_then_release(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _LOCK_THEN_RELEASE], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    words = out.stdout.split()
    if words == ["cannot", "lock"]:
        pytest.skip("this process may not lock its memory (no CAP_IPC_LOCK, small memlock limit)")
    return words


def test_release_unlocks_a_locked_process() -> None:
    before, released, after = _lock_then_release({"PATH": "/usr/bin:/bin"})
    assert int(before) > 0 and released == "True" and int(after) == 0


def test_keep_mlock_keeps_it() -> None:
    before, released, after = _lock_then_release({"PATH": "/usr/bin:/bin", ENV_KEEP_MLOCK: "1"})
    assert int(before) > 0 and released == "False" and int(after) == int(before) > 0


def test_unlocked_process_is_left_alone() -> None:
    from psss_ioc.ioc.memory import release_memory_lock

    if locked_kb() > 0:
        pytest.skip("the test process itself is locked")
    assert release_memory_lock({}) is False


@pytest.mark.parametrize("keep", [False, True])
def test_the_ioc_runs_unlocked_unless_told(tmp_path: Path, keep: bool) -> None:
    env = {**EPICS_ENV, ENV_KEEP_MLOCK: "1" if keep else "0"}
    ioc = IocProcess("TST-PSSS-MEM", ["tcp://127.0.0.1:1", "--output-port", "0", "--no-rest",
                                      "--autosave-dir", str(tmp_path / "autosave")],
                     env, tmp_path / "ioc.log")
    try:
        # CA answers a moment before iocInit ends (and locks); the IOC logs "serving" after
        wait_until(lambda: " serving " in ioc.log(), 30, what="IOC serving")
        locked = locked_kb(ioc.proc.pid)
        log = ioc.log()
    finally:
        ioc.stop()
    assert "start-up objects out of the garbage collector's full passes" in log, log
    # iocInit locks only when real-time scheduling is available (root, rtprio limit)
    realtime = "released the real-time memory lock" in log or "memory stays locked" in log
    if keep:
        assert (locked > 0) == realtime, log
    else:
        assert locked == 0, log
        if not realtime:
            pytest.skip("iocInit did not lock here (no real-time scheduling): nothing to release")


# In a process of its own: freezing changes the collector of the whole interpreter.
_FREEZE = """
import gc, weakref
from psss_ioc.ioc.memory import freeze_startup_objects
class Node:
    pass
alive = [Node() for _ in range(1000)]
frozen = freeze_startup_objects()
later = Node()
later.self = later  # a cycle made after the freeze: only the collector can free it
ref = weakref.ref(later)
del later
gc.collect()
print(frozen, gc.get_freeze_count() == frozen, ref() is None, len(alive))
"""


def test_freezing_keeps_start_up_objects_and_still_collects_later_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", _FREEZE], capture_output=True, text=True,
                         timeout=60, check=True)
    frozen, counted, collected, alive = out.stdout.split()
    assert int(frozen) > 1000 and counted == "True" and alive == "1000"
    assert collected == "True"  # frames and results made later are collected as before
