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
- the IOC's memory as a curve, to tell a leak (growth without bound) from warm-up (caches,
  allocator arenas and ZeroMQ buffers settling): the RSS is sampled every ``--sample-seconds``
  (VmRSS, and RssAnon, the part that is not mapped files, from /proc/<pid>/status) together
  with the IOC's processed count.

  - ``rss_start_mb`` (after the first frames), ``rss_end_mb``, ``rss_growth_mb`` = end - start
    (target < 20);
  - ``rss_warm_mb``: the RSS at the first sample after the warm-up (``--warmup-frames``
    processed, by default a fifth of the frames, at most 5000), ``rss_growth_after_warmup_mb``
    = end - warm;
  - ``rss_peak_mb``: the highest sample; ``rss_hwm_mb``: the IOC's high-water mark (VmHWM: the
    peak over its whole life, start-up and between samples too); ``rss_anon_end_mb``;
  - ``rss_slope_mb_per_10k``: least-squares slope of RSS against frames processed, over the
    samples after the warm-up, in MB per 10000 frames (a leak: clearly > 0 and not falling in
    longer runs; warm-up: close to 0), with ``rss_slope_samples`` samples behind it (fewer
    than 3: NaN);
  - ``rss_curve``: the samples, ``[seconds, frames processed, rss_mb, anon_mb]`` each (the
    table form prints them below the row).
- ``ioc_cpu_ms_per_frame``: the IOC's CPU time (all threads, from /proc) from the first
  frame to the end, per frame processed in that time;
- ``proc_time_ms_p50/p99/max`` over ``proc_time_samples`` PROC_TIME updates;
- ``ca_updates`` (PULSE_ID monitor updates) and ``out_received`` (output stream messages),
  both to compare with ``processed``.

Reading the RSS curve (issue 7). Most of the IOC's memory that moves is camera frames in
flight: libzmq's IO thread allocates every received message (10 MB for a full frame) and once
the first one is freed glibc's dynamic mmap threshold rises above the frame size, so frames
come from that thread's malloc arena and are reused from there. The arena settles at the most
frames ever held at once: the input queue (``CameraSource`` queue_size 20), the frame being
processed, and the output queue (``ResultSender`` queue_size 10; the forwarded image is sent
zero-copy, so it holds the received buffer until sent). It is bounded by about (20 + 10 + 2)
frames, and in practice a few frames, reached in the first seconds: a step of 10 to 40 MB
after ``rss_start`` at 30 Hz, then flat; a backlog shows as a swing that comes back. With
real-time priority available (root, or an rtprio limit) iocInit locks all memory (EPICS
``epicsThreadRealtimeLock``: ``mlockall``); the IOC releases that lock (`psss_ioc.ioc.memory`).
Kept (``PSSS_KEEP_MLOCK=1``), memory freed inside an arena stays resident and the RSS
ratchets up to the largest backlog ever seen.
A slope near 0 after the warm-up with end close to warm is warm-up; a leak shows as a slope
that stays positive over a longer run. At a rate the IOC cannot keep up with, samples swing
by up to the queued frames (10 MB each), so compare figures from runs that lost nothing.
"""

from __future__ import annotations

import math
import re
import threading
import time
from typing import Any

import click

from psss_ioc.bench.e2e import PREFIX, RunningIoc, _simulator_args, running_ioc
from psss_ioc.bench.faults import FaultInjector
from psss_ioc.bench.report import emit, median, percentile
from psss_ioc.ioc import pvs
from psss_ioc.ioc.memory import memory_kb
from psss_ioc.processes import free_port, process_cpu_seconds
from psss_ioc.streams.simulate import SimulatorProcess

_SENT = re.compile(r"sent (\d+) frames.*dropped (\d+)", re.S)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, VmHWM (peak RSS) ... of a process in MB (`memory.memory_kb`)."""
    out = {key: kb / 1024.0 for key, kb in memory_kb(pid).items()}
    if "VmRSS" not in out:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return out


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (VmRSS from /proc/<pid>/status)."""
    return memory_mb(pid)["VmRSS"]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs; NaN with fewer than 3 points or no spread in x."""
    n = len(xs)
    if n < 3:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


class RssCurve:
    """RSS samples of the IOC against the frames it processed."""

    def __init__(self, pid: int, warmup_frames: int) -> None:
        self.pid = pid
        self.warmup_frames = warmup_frames
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, int, float, float]] = []  # (s, frames, rss, anon)

    def sample(self, processed: int) -> float:
        mem = memory_mb(self.pid)
        self.samples.append((round(time.monotonic() - self.t0, 1), processed,
                             round(mem["VmRSS"], 1), round(mem.get("RssAnon", math.nan), 1)))
        return mem["VmRSS"]

    def figures(self) -> dict[str, Any]:
        """The rss_* fields of the report (see the module docstring)."""
        mem = memory_mb(self.pid)
        start, end = self.samples[0][2], self.samples[-1][2]
        warm = [s for s in self.samples if s[1] >= self.warmup_frames]
        warm_rss = warm[0][2] if warm else math.nan
        per_frame = slope([float(s[1]) for s in warm], [s[2] for s in warm])
        return {
            "rss_start_mb": start,
            "rss_warm_mb": warm_rss,
            "rss_end_mb": end,
            "rss_peak_mb": max(s[2] for s in self.samples),
            "rss_hwm_mb": round(mem.get("VmHWM", math.nan), 1),
            "rss_anon_end_mb": self.samples[-1][3],
            "rss_growth_mb": round(end - start, 1),
            "rss_growth_after_warmup_mb": round(end - warm_rss, 1),
            "rss_slope_mb_per_10k": round(per_frame * 10_000, 2),
            "rss_slope_samples": len(warm),
            "warmup_frames": self.warmup_frames,
            "rss_curve": [list(s) for s in self.samples],
        }


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


def default_warmup(frames: int) -> int:
    """Frames counted as warm-up: a fifth of the run, at most 5000."""
    return min(frames // 5, 5000)


def soak_run(frames: int, rate: float, height: int, width: int, progress: bool = False,
             sample_seconds: float = 5.0, warmup_frames: int | None = None,
             fault_period: float | None = None) -> dict[str, Any]:
    """The soak; with `fault_period`, faults every period (see `psss_ioc.bench.faults`), the
    camera restarted at the end of each."""
    warmup = default_warmup(frames) if warmup_frames is None else warmup_frames
    rest_port = free_port() if fault_period else 0
    with running_ioc(rest_port=rest_port) as ioc:
        monitors = Monitors()
        faults = FaultInjector(PREFIX, rest_port, (height, width)) if fault_period else None
        try:
            per_camera = max(1, round(rate * fault_period)) if fault_period else frames
            sent = camera_dropped = 0
            port, next_pulse = 0, 1
            curve: RssCurve | None = None
            first = 0
            cpu_start = 0.0
            while sent < frames:
                args = [*_simulator_args(rate, height, width, drop=True),
                        "--count", str(min(per_camera, frames - sent)),
                        "--start-pulse-id", str(next_pulse)]
                with SimulatorProcess(args, port=port) as camera:
                    if curve is None:
                        port = camera.port
                        ioc.follow(camera.address)
                        _wait_for_first(ioc, camera)
                        curve = RssCurve(ioc.proc.pid, warmup)
                        first = ioc.value(pvs.N_PROCESSED)
                        cpu_start = process_cpu_seconds(ioc.proc.pid)
                        curve.sample(first)
                        monitors.reset_times()  # not the first frame's (caches, allocations)
                    limit = 2 * min(per_camera, frames - sent) / rate + 120
                    _follow_camera(ioc, camera, curve, faults, fault_period, frames,
                                   sample_seconds, progress, limit)
                    summary = camera.wait(30)
                match = _SENT.search(summary)
                if match is None:
                    raise click.ClickException(f"no summary from the simulated camera: "
                                               f"{summary!r}")
                sent += int(match.group(1))
                camera_dropped += int(match.group(2))
                next_pulse += int(match.group(1)) + int(match.group(2))
                if faults is not None and sent < frames:  # the camera restarts
                    faults.malformed_from(port)
                    faults.counts["camera_restarts"] += 1
            assert curve is not None
            processed = _settle(ioc, sent, timeout=60)
            time.sleep(0.5)  # the last monitor updates
            curve.sample(processed)
            cpu = process_cpu_seconds(ioc.proc.pid) - cpu_start
            row = {
                "case": "soak" + (" with faults" if faults else ""),
                "frames": frames,
                "rate_hz": rate,
                "shape": f"{height}x{width}",
                "sent": sent,
                "camera_dropped": camera_dropped,
                "processed": processed,
                "lost": sent - processed,
                "ioc_n_lost": ioc.value(pvs.N_LOST),
                "ioc_n_errors": ioc.value(pvs.N_ERRORS),
                **curve.figures(),
                "ioc_cpu_ms_per_frame": round(1e3 * cpu / max(processed - first, 1), 3),
                "proc_time_ms_p50": median(monitors.proc_times),
                "proc_time_ms_p99": percentile(monitors.proc_times, 99),
                "proc_time_ms_max": max(monitors.proc_times, default=float("nan")),
                "proc_time_samples": len(monitors.proc_times),
                "ca_updates": monitors.updates,  # target: = processed
                "out_received": ioc.counter.count,
                **(faults.figures() if faults else {}),
            }
        finally:
            if faults is not None:
                faults.close()
            monitors.close()
    if progress:
        click.echo(err=True)
    return row


def _wait_for_first(ioc: RunningIoc, camera: SimulatorProcess) -> None:
    deadline = time.monotonic() + 60
    while ioc.value(pvs.N_PROCESSED) == 0:
        if time.monotonic() > deadline or camera.proc.poll() is not None:
            raise click.ClickException("the IOC processed nothing within 60 s")
        time.sleep(0.1)


def _follow_camera(ioc: RunningIoc, camera: SimulatorProcess, curve: RssCurve,
                   faults: FaultInjector | None, fault_period: float | None, frames: int,
                   sample_seconds: float, progress: bool, limit: float) -> None:
    """Until this camera has sent its frames: RSS samples, progress, and the faults due."""
    start = time.monotonic()
    # the CA burst a quarter into the period, the REST upload at half
    due = ([(start + fault_period / 4, faults.ca_burst),
            (start + fault_period / 2, faults.rest_upload)]
           if faults is not None and fault_period else [])
    end = start + limit
    next_sample = start + sample_seconds
    while camera.proc.poll() is None:
        now = time.monotonic()
        if now > end:
            raise click.ClickException("the simulated camera did not finish")
        if now >= next_sample:
            next_sample += sample_seconds
            curve.sample(ioc.value(pvs.N_PROCESSED))
        while due and now >= due[0][0]:
            due.pop(0)[1]()
        if progress:
            click.echo(f"\r  IOC pid {ioc.proc.pid}: processed {ioc.value(pvs.N_PROCESSED)} "
                       f"of {frames}, RSS {rss_mb(ioc.proc.pid):.1f} MB   ", nl=False, err=True)
        time.sleep(min(0.25, sample_seconds))


@click.command()
@click.option("--frames", default=100000, show_default=True, help="Frames the camera sends.")
@click.option("--rate", default=100.0, show_default=True, help="Camera rate (Hz).")
@click.option("--height", default=2016, show_default=True)
@click.option("--width", default=2560, show_default=True)
@click.option("--sample-seconds", default=5.0, show_default=True,
              help="Seconds between samples of the IOC's RSS.")
@click.option("--warmup-frames", type=int, default=None,
              help="Frames processed before the RSS counts as warm [default: frames/5, at most "
                   "5000].")
@click.option("--faults", is_flag=True,
              help="Every --fault-period: a burst of CA puts, a REST background upload, a "
                   "camera restart with a malformed message (see psss_ioc/bench/faults.py).")
@click.option("--fault-period", type=float, default=60.0, show_default=True,
              help="Seconds between rounds of faults.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def soak(frames: int, rate: float, height: int, width: int, sample_seconds: float,
         warmup_frames: int | None, faults: bool, fault_period: float, as_json: bool) -> None:
    """Soak: FRAMES full frames at RATE through the IOC; loss, IOC memory curve, processing time."""
    if frames < 1 or rate <= 0 or height < 8 or width < 8 or sample_seconds <= 0:
        raise click.BadParameter("frames >= 1, rate > 0, sample-seconds > 0, frames at least "
                                 "8 x 8")
    if warmup_frames is not None and warmup_frames < 0:
        raise click.BadParameter("warmup-frames >= 0")
    if faults and fault_period < 4:
        raise click.BadParameter("fault-period >= 4 s")
    row = soak_run(frames, rate, height, width, progress=not as_json,
                   sample_seconds=sample_seconds, warmup_frames=warmup_frames,
                   fault_period=fault_period if faults else None)
    if as_json:
        emit([row], as_json)
        return
    curve = row.pop("rss_curve")
    emit([row], as_json, title=f"bench soak ({frames} frames of {height} x {width} at "
                               f"{rate:g} Hz)")
    click.echo()
    emit([{"seconds": s, "processed": n, "rss_mb": rss, "anon_mb": anon}
          for s, n, rss, anon in curve], as_json, title="IOC RSS curve")
