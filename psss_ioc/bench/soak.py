"""`psss-ioc bench soak`: N frames of the simulated camera through the IOC, for hours if asked.

The processes are those of `bench e2e` (simulated camera -> IOC subprocess -> this process):
the camera sends ``--frames`` frames at ``--rate`` (PUSH, dropping what it cannot queue, as a
real camera does), the IOC processes them with its output stream consumed here, and a CA
monitor here follows the results (PULSE_ID: one update per processed frame) and the
processing time (PROC_TIME, published with the statistics every 0.5 s, so a sample of
frames). Reported, as one row (``--json``: one JSON object):

- ``sent`` (camera), ``camera_dropped`` (could not be queued: IOC not reading, e.g. before it
  connected), ``processed`` (IOC), ``lost`` = sent - processed (target 0), ``ioc_n_lost`` and
  ``ioc_n_errors`` (the IOC's own counters);
- ``rss_start_mb`` (after the first frames), ``rss_end_mb``, ``rss_growth_mb`` (target < 20);
- ``proc_time_ms_p50/p99/max`` over ``proc_time_samples`` PROC_TIME updates;
- ``ca_updates`` (PULSE_ID monitor updates) and ``out_received`` (output stream messages),
  both to compare with ``processed``.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import click

from psss_ioc import pvs
from psss_ioc.bench.e2e import PREFIX, RunningIoc, _simulator_args, running_ioc
from psss_ioc.bench.report import emit, median, percentile
from psss_ioc.simulate import SimulatorProcess

_SENT = re.compile(r"sent (\d+) frames.*dropped (\d+)", re.S)


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (VmRSS from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


class Monitors:
    """CA monitors on PULSE_ID (counted) and PROC_TIME (collected), in this process."""

    def __init__(self) -> None:
        import epics

        self.updates = 0
        self.proc_times: list[float] = []
        self._lock = threading.Lock()
        self._pulse = epics.PV(pvs.full_name(PREFIX, pvs.PULSE_ID), callback=self._on_pulse,
                               auto_monitor=True)
        self._time = epics.PV(pvs.full_name(PREFIX, pvs.PROC_TIME), callback=self._on_time,
                              auto_monitor=True)
        for pv in (self._pulse, self._time):
            if not pv.wait_for_connection(timeout=30):
                raise click.ClickException(f"no CA connection to {pv.pvname}")

    def _on_pulse(self, value: Any = None, **_: Any) -> None:
        if value:  # not the connection's initial 0: one update per processed frame
            with self._lock:
                self.updates += 1

    def _on_time(self, value: Any = None, **_: Any) -> None:
        if value is not None and float(value) > 0:
            with self._lock:
                self.proc_times.append(float(value))

    def reset_times(self) -> None:
        with self._lock:
            self.proc_times.clear()

    def close(self) -> None:
        self._pulse.disconnect()
        self._time.disconnect()


def _settle(ioc: RunningIoc, target: int, timeout: float) -> int:
    """Wait until the IOC processed `target` frames or its count stopped moving for 2 s."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = ioc.value(pvs.N_PROCESSED)
        if n >= target:
            break
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 2.0:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # the statistics after the last frame (published every 0.5 s)
    return ioc.value(pvs.N_PROCESSED)


def soak_run(frames: int, rate: float, height: int, width: int,
             progress: bool = False) -> dict[str, Any]:
    with running_ioc() as ioc:
        monitors = Monitors()
        try:
            args = [*_simulator_args(rate, height, width, drop=True), "--count", str(frames)]
            with SimulatorProcess(args) as camera:
                ioc.follow(camera.address)
                deadline = time.monotonic() + 60
                while ioc.value(pvs.N_PROCESSED) == 0:
                    if time.monotonic() > deadline or camera.proc.poll() is not None:
                        raise click.ClickException("the IOC processed nothing within 60 s")
                    time.sleep(0.1)
                rss_start = rss_mb(ioc.proc.pid)
                monitors.reset_times()  # not the first frame's (caches, first allocations)
                expected = frames / rate if rate > 0 else frames / 1000.0
                end = time.monotonic() + 2 * expected + 120
                while camera.proc.poll() is None:
                    if time.monotonic() > end:
                        raise click.ClickException("the simulated camera did not finish")
                    if progress:
                        click.echo(f"\r  processed {ioc.value(pvs.N_PROCESSED)} of {frames}, "
                                   f"IOC RSS {rss_mb(ioc.proc.pid):.1f} MB   ", nl=False,
                                   err=True)
                    time.sleep(1.0)
                summary = camera.wait(30)
            match = _SENT.search(summary)
            if match is None:
                raise click.ClickException(f"no summary from the simulated camera: {summary!r}")
            sent, camera_dropped = int(match.group(1)), int(match.group(2))
            processed = _settle(ioc, sent, timeout=60)
            time.sleep(0.5)  # the last monitor updates
            rss_end = rss_mb(ioc.proc.pid)
            row = {
                "case": "soak",
                "frames": frames,
                "rate_hz": rate,
                "shape": f"{height}x{width}",
                "sent": sent,
                "camera_dropped": camera_dropped,
                "processed": processed,
                "lost": sent - processed,
                "ioc_n_lost": ioc.value(pvs.N_LOST),
                "ioc_n_errors": ioc.value(pvs.N_ERRORS),
                "rss_start_mb": round(rss_start, 1),
                "rss_end_mb": round(rss_end, 1),
                "rss_growth_mb": round(rss_end - rss_start, 1),
                "proc_time_ms_p50": median(monitors.proc_times),
                "proc_time_ms_p99": percentile(monitors.proc_times, 99),
                "proc_time_ms_max": max(monitors.proc_times, default=float("nan")),
                "proc_time_samples": len(monitors.proc_times),
                "ca_updates": monitors.updates,  # target: = processed
                "out_received": ioc.counter.count,
            }
        finally:
            monitors.close()
    if progress:
        click.echo(err=True)
    return row


@click.command()
@click.option("--frames", default=100000, show_default=True, help="Frames the camera sends.")
@click.option("--rate", default=100.0, show_default=True, help="Camera rate (Hz).")
@click.option("--height", default=2016, show_default=True)
@click.option("--width", default=2560, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def soak(frames: int, rate: float, height: int, width: int, as_json: bool) -> None:
    """Soak: FRAMES full frames at RATE through the IOC; loss, IOC memory, processing time."""
    if frames < 1 or rate <= 0 or height < 8 or width < 8:
        raise click.BadParameter("frames >= 1, rate > 0, frames at least 8 x 8")
    row = soak_run(frames, rate, height, width, progress=not as_json)
    emit([row], as_json, title=f"bench soak ({frames} frames of {height} x {width} at "
                               f"{rate:g} Hz)")
