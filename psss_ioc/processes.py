"""Child processes of the IOC and the simulator, as the demo and the benchmarks run them: free
loopback ports, the loopback EPICS environment, the IOC's command line, CPU time from /proc,
stop.

Here, not in the command line, so that `psss_ioc.bench` and `psss_ioc.cli` both use it and
neither imports the other.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port(pair: bool = False) -> int:
    """A free loopback port; with `pair`, p and p+1 both free for TCP and UDP (CA needs the
    server port and the repeater port next to it)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        if port > 65000:
            continue
        try:
            for p in (port, port + 1):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as t:
                        t.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair on loopback")


def loopback_epics_env(ca_port: int = 5064, pva_port: int = 5075) -> dict[str, str]:
    """EPICS variables that keep an IOC and its clients on the loopback interface."""
    return {
        "EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_SERVER_PORT": str(ca_port), "EPICS_CA_REPEATER_PORT": str(ca_port + 1),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_CAS_SERVER_PORT": str(ca_port),
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1", "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_SERVER_PORT": str(pva_port), "EPICS_PVA_BROADCAST_PORT": str(pva_port + 1),
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_SERVER_PORT": str(pva_port),
        "EPICS_PVAS_BROADCAST_PORT": str(pva_port + 1),
        "EPICS_CA_MAX_ARRAY_BYTES": "40000000",
    }


def ioc_command(input_stream: str, prefix: str, *options: str) -> list[str]:
    """The command line that runs the IOC (`psss-ioc run`) in a subprocess of this Python."""
    return [sys.executable, "-c", "from psss_ioc.cli.commands import run_command; run_command()",
            input_stream, "--prefix", prefix, *options]


def process_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far, all threads (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all threads."""
    return sum(process_cpu_times(pid))


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, wait, kill on timeout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
