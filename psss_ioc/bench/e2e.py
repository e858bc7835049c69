"""`psss-ioc bench e2e`: simulated camera -> IOC -> output-stream consumer, on this machine.

Three processes, as in production: the simulated camera (PUSH, dropping frames it cannot send
like a real camera that does not wait), the IOC (`psss-ioc run`, a subprocess on loopback
ports of its own), and in this process a consumer of the IOC's output stream plus a CA client
that reads the IOC's statistics records.

Cases, measured in one run:
- ``rate_100hz``: 100 Hz for ``--duration`` seconds: lost frames (pulse-id gaps and skipped
  frames the IOC counted, target 0), processed rate, IOC CPU per frame (all its threads, from
  /proc) and the user-space part of it (the IOC's own code; the rest is the kernel's TCP
  copies in and out), output messages received.
- ``ceiling``: the transport ceiling: the same simulated stream, unthrottled, into a bare
  pyzmq ``recv_multipart`` loop (no IOC); measured before and after the IOC's runs (the
  machine's other load moves it by tens of percent) and their mean used.
- ``transport floor`` (in the ``rate_100hz`` row): CPU per frame of a bare pyzmq relay that
  receives each frame and forwards it to a consumer, as the IOC's transport must
  (`bench/relay.py`); ``cpu_vs_floor`` is the IOC's CPU per frame over it.
- ``max_lossless``: the highest rate tried at which the IOC kept up with no loss, as a ratio to
  the ceiling. Rates are tried from 95% of the ceiling downwards in steps, then the gap to the
  lowest rate not kept is halved with the steps left; the IOC stays up and is pointed at each
  new camera through its INPUT_STREAM record, as an operator would. ``--max-steps 0`` leaves
  this search (and the ceiling) out.
- ``rate_100hz_bitshuffle_lz4`` (with ``--compression bitshuffle_lz4``): the same steady run,
  the same IOC and settings, the camera sending bitshuffle_lz4 frames; ``compressed_vs_plain``
  is its CPU per frame over the uncompressed run's, its floor a relay of the compressed frames.
- ``rate_100hz_no_view`` (unless ``--no-view-phase``): the same steady run, the same IOC and
  frames, with the operator's image view off (IMAGE_RATE 0; the ``rate_100hz`` run has it at
  the IOC's default, ``image_rate_hz`` in each row). ``view_vs_no_view`` is the CPU per frame
  with the view over the CPU per frame without it (issue 18: at most 1.10), beside both
  figures (``view_cpu_ms_per_frame``, ``no_view_cpu_ms_per_frame``). Afterwards IMAGE_RATE is
  put back, so the later cases run with the view at its default.

The IOC subtracts the camera's dark frame (``--no-background``: none) and sums the rows of
``--roi`` (default: the whole image), as set through its records.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import zmq

from psss_ioc.bench.report import emit
from psss_ioc.ioc import pvs
from psss_ioc.processes import (
    free_port,
    ioc_command,
    loopback_epics_env,
    process_cpu_times,
    stop_process,
)
from psss_ioc.streams.bsread_wire import BSLZ4
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera, SimulatorProcess

PREFIX = "BENCH-PSSS"
SEED = 0  # the simulated camera's (its dark frame is written with the same)


class StreamCounter:
    """Counts the messages of a bsread stream (PULL) in a thread, without decoding them."""

    def __init__(self, address: str) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVTIMEO, 200)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-counter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._socket.recv_multipart(copy=False)
            except zmq.Again:
                continue
            self.count += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(0)
        self._context.term()


def _simulator_args(rate: float, height: int, width: int, drop: bool,
                    compression: str | None = None) -> list[str]:
    args = ["--rate", str(rate), "--height", str(height), "--width", str(width),
            "--prefix", PREFIX, "--pool", "16", "--seed", str(SEED)]
    if compression:
        args += ["--compression", compression]
    return [*args, "--drop-when-full"] if drop else args


def write_background(path: Path, height: int, width: int) -> Path:
    """The simulated camera's dark frame (the same seed as its frames)."""
    return SimulatedCamera(SimConfig(height=height, width=width, pool=1,
                                     seed=SEED)).write_background(path)


def measure_ceiling(height: int, width: int, seconds: float) -> float:
    """Frames/s a bare pyzmq receiver takes from the unthrottled simulated camera."""
    with SimulatorProcess(_simulator_args(0, height, width, drop=False)) as camera:
        context = zmq.Context()
        sock = context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(camera.address)
        try:
            for _ in range(20):  # connection and warm-up
                sock.recv_multipart(copy=False)
            count = 0
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                sock.recv_multipart(copy=False)
                count += 1
            return count / (time.monotonic() - start)
        finally:
            sock.close(0)
            context.term()


def _relay_cpu_times(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """(user, system) CPU seconds of the relay, to the microsecond (it measures itself)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"cpu\n")
    proc.stdin.flush()
    answer = proc.stdout.readline().decode().split()
    if len(answer) != 3 or answer[0] != "cpu":
        raise click.ClickException(f"relay gave no CPU times: {answer!r}")
    return float(answer[1]), float(answer[2])


def measure_transport_floor(rate: float, height: int, width: int, seconds: float,
                            forward: bool = True,
                            compression: str | None = None) -> tuple[float, float]:
    """(all, user) CPU ms per frame of a bare relay (receive + forward; `bench/relay.py`)."""
    with SimulatorProcess(_simulator_args(rate, height, width, True, compression)) as camera:
        args = [camera.address, *([] if forward else ["--receive-only"])]
        proc = subprocess.Popen([sys.executable, "-m", "psss_ioc.bench.relay", *args],
                                stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            if not line.startswith("relay on "):
                raise click.ClickException(f"relay did not start: {line!r}")
            counter = StreamCounter(line.split()[-1])
            try:
                time.sleep(2.0)  # connections and warm-up
                count0, (user0, sys0) = counter.count, _relay_cpu_times(proc)
                time.sleep(seconds)
                count1, (user1, sys1) = counter.count, _relay_cpu_times(proc)
            finally:
                counter.close()
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            stop_process(proc)
    frames = max(count1 - count0, 1)
    user, system = 1e3 * (user1 - user0) / frames, 1e3 * (sys1 - sys0) / frames
    return user + system, user


@dataclass
class Sample:
    time: float
    processed: int
    lost: int
    errors: int
    out_dropped: int
    received: int
    cpu: float
    user_cpu: float


class RunningIoc:
    """The IOC subprocess plus this process's CA channels to its statistics records."""

    def __init__(self, workdir: Path, env: dict[str, str], forward_image: bool = True,
                 rest_port: int = 0) -> None:
        self.workdir = workdir
        import epics  # this process is a plain CA client of the IOC subprocess

        self.output_port = free_port()
        self._log = open(workdir / "ioc.log", "ab")  # noqa: SIM115 (closed in close)
        # The IOC starts on a camera address nobody serves; each run points it at its camera.
        args = ioc_command("tcp://127.0.0.1:1", PREFIX, "--output-port", str(self.output_port),
                           "--autosave-dir", str(workdir / "autosave"),
                           "--background-path", str(workdir),
                           *(["--rest-port", str(rest_port)] if rest_port else ["--no-rest"]),
                           *([] if forward_image else ["--no-forward-image"]))
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self._pv = {pv.name: epics.PV(pvs.full_name(PREFIX, pv))
                    for pv in (pvs.N_PROCESSED, pvs.N_LOST, pvs.N_ERRORS, pvs.N_OUT_DROPPED,
                               pvs.INPUT_STREAM, pvs.START, pvs.STOP, pvs.BACKGROUND_FILE,
                               pvs.BACKGROUND_STATUS, pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX,
                               pvs.IMAGE_RATE)}
        if not all(pv.wait_for_connection(timeout=60) for pv in self._pv.values()):
            self.close()
            raise click.ClickException(f"the IOC did not come up; log in {workdir}")
        self.counter = StreamCounter(f"tcp://127.0.0.1:{self.output_port}")

    def value(self, pv: pvs.PV) -> int:
        got = self._pv[pv.name].get(timeout=5, use_monitor=False)
        if got is None:
            raise click.ClickException(f"no answer from {pv.name}")
        return int(got)

    def sample(self) -> Sample:
        user, system = process_cpu_times(self.proc.pid)
        return Sample(time.monotonic(), self.value(pvs.N_PROCESSED), self.value(pvs.N_LOST),
                      self.value(pvs.N_ERRORS), self.value(pvs.N_OUT_DROPPED),
                      self.counter.count, user + system, user)

    def configure(self, background: Path | None, roi: tuple[int, int] | None) -> None:
        """Background file (None: none) and ROI rows (None: the whole image), as an operator
        sets them."""
        self._pv[pvs.BACKGROUND_FILE.name].put(str(background or ""), wait=True, timeout=30)
        status = self._pv[pvs.BACKGROUND_STATUS.name].get(as_string=True, timeout=5,
                                                           use_monitor=False)
        if background is not None and status != "Loaded":
            raise click.ClickException(f"background {background} not loaded: {status}")
        ymin, ymax = roi or (0, 0)
        self._pv[pvs.SPC_ROI_YMIN.name].put(0, wait=True, timeout=30)  # any pair order works
        self._pv[pvs.SPC_ROI_YMAX.name].put(ymax, wait=True, timeout=30)
        self._pv[pvs.SPC_ROI_YMIN.name].put(ymin, wait=True, timeout=30)

    def image_rate(self) -> float:
        """IMAGE_RATE in force (Hz; 0: the image view is off)."""
        got = self._pv[pvs.IMAGE_RATE.name].get(timeout=5, use_monitor=False)
        if got is None:
            raise click.ClickException(f"no answer from {pvs.IMAGE_RATE.name}")
        return float(got)

    def set_image_rate(self, hz: float) -> None:
        """Put IMAGE_RATE, as an operator does, and check that the IOC took it."""
        self._pv[pvs.IMAGE_RATE.name].put(hz, wait=True, timeout=30)
        if abs(self.image_rate() - hz) > 1e-6:
            raise click.ClickException(f"{pvs.IMAGE_RATE.name} did not take {hz:g}: "
                                       f"{self.image_rate():g}")

    def follow(self, address: str) -> None:
        self._pv[pvs.STOP.name].put(1, wait=True, timeout=30)
        self._pv[pvs.INPUT_STREAM.name].put(address, wait=True, timeout=30)
        self._pv[pvs.START.name].put(1, wait=True, timeout=30)

    def close(self) -> None:
        if hasattr(self, "counter"):
            self.counter.close()
        stop_process(self.proc)
        self._log.close()


def run_window(ioc: RunningIoc, rate: float, seconds: float, height: int, width: int,
               warmup: float = 3.0, compression: str | None = None) -> dict[str, Any]:
    """Point the IOC at a camera running at `rate` and measure a steady window."""
    with SimulatorProcess(_simulator_args(rate, height, width, True, compression)) as camera:
        ioc.follow(camera.address)
        deadline = time.monotonic() + 30
        while ioc.value(pvs.N_PROCESSED) == 0 or time.monotonic() < deadline - 30 + warmup:
            if time.monotonic() > deadline:
                raise click.ClickException("the IOC processed nothing within 30 s")
            time.sleep(0.2)
        start = ioc.sample()
        time.sleep(seconds)
        end = ioc.sample()
    processed = end.processed - start.processed
    elapsed = end.time - start.time
    achieved = processed / elapsed
    lost = end.lost - start.lost
    return {
        "rate_hz": achieved,
        "requested_hz": rate,
        "lost": lost,
        "errors": end.errors - start.errors,
        "out_dropped": end.out_dropped - start.out_dropped,
        "out_received": end.received - start.received,
        "cpu_ms_per_frame": 1e3 * (end.cpu - start.cpu) / max(processed, 1),
        # The IOC's own code (decode, process, records, output); the rest of its CPU is the
        # kernel's TCP receive and send of the frames.
        "user_cpu_ms_per_frame": 1e3 * (end.user_cpu - start.user_cpu) / max(processed, 1),
        "seconds": elapsed,
        # Kept up: nothing lost and (within 2%, for timer jitter) the requested rate achieved.
        "sustained": lost == 0 and achieved >= 0.98 * rate,
    }


@contextmanager
def running_ioc(forward_image: bool = True, rest_port: int = 0) -> Iterator[RunningIoc]:
    ca_port, pva_port = free_port(pair=True), free_port(pair=True)
    env = loopback_epics_env(ca_port, pva_port)
    os.environ.update(env)  # for pyepics in this process, before its CA context starts
    with tempfile.TemporaryDirectory(prefix="psss-bench-e2e-") as tmp:
        ioc = RunningIoc(Path(tmp), {**os.environ, **env}, forward_image, rest_port)
        try:
            yield ioc
        finally:
            ioc.close()


def _highest_lossless_rate(ioc: RunningIoc, ceiling: float, max_steps: int, height: int,
                           width: int, step_seconds: float,
                           quiet: bool) -> dict[str, Any] | None:
    """The highest rate tried that the IOC kept with no loss, in at most `max_steps` windows.

    First ask for (nearly) the ceiling: what the IOC achieves is its throughput. Then step down
    from there until a rate is kept, and spend the steps left halving the gap to the lowest
    rate that was not kept.
    """
    def trial(requested: float) -> dict[str, Any]:
        window = run_window(ioc, requested, step_seconds, height, width)
        if not quiet:
            click.echo(f"  tried {window['requested_hz']:.0f} Hz: "
                       f"{window['rate_hz']:.1f} Hz, lost {window['lost']}", err=True)
        return window

    first = trial(0.95 * ceiling)
    steps = 1
    if first["sustained"]:
        return first
    throughput = min(first["rate_hz"], 0.95 * ceiling)
    failed = first["requested_hz"]
    best: dict[str, Any] | None = None
    for fraction in (0.97, 0.92, 0.85, 0.75, 0.6, 0.45):
        if steps >= max_steps:
            return None
        window = trial(fraction * throughput)
        steps += 1
        if window["sustained"]:
            best = window
            break
        failed = window["requested_hz"]
    while best is not None and steps < max_steps and failed > 1.03 * best["requested_hz"]:
        window = trial(0.5 * (best["requested_hz"] + failed))
        steps += 1
        if window["sustained"]:
            best = window
        else:
            failed = window["requested_hz"]
    return best


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per case and line.")
@click.option("--duration", default=60.0, show_default=True, help="Seconds of the 100 Hz run.")
@click.option("--step-seconds", default=10.0, show_default=True,
              help="Seconds per rate tried for the lossless maximum.")
@click.option("--height", default=2016, show_default=True)
@click.option("--width", default=2560, show_default=True)
@click.option("--rate", default=100.0, show_default=True, help="Rate of the steady run (Hz).")
@click.option("--max-steps", default=7, show_default=True,
              help="Most rates tried in the search for the lossless maximum.")
@click.option("--forward-image/--no-forward-image", default=True, show_default=True,
              help="IOC forwards the image in its output stream (the legacy contract).")
@click.option("--compression", type=click.Choice(["none", BSLZ4]), default="none",
              show_default=True,
              help="Also run the steady case with the camera sending frames compressed so, "
                   "and compare its CPU per frame with the uncompressed run's.")
@click.option("--background/--no-background", default=True, show_default=True,
              help="The IOC subtracts the camera's dark frame.")
@click.option("--roi", type=(int, int), default=None, metavar="YMIN YMAX",
              help="ROI rows the IOC sums [default: the whole image].")
@click.option("--view-phase/--no-view-phase", default=True, show_default=True,
              help="Also run the steady case with the image view off (IMAGE_RATE 0) and "
                   "report view_vs_no_view, the CPU per frame with the view at its default "
                   "over the CPU per frame without it (one more --duration).")
def e2e(as_json: bool, duration: float, step_seconds: float, height: int, width: int,
        rate: float, max_steps: int, forward_image: bool, compression: str, background: bool,
        roi: tuple[int, int] | None, view_phase: bool) -> None:
    """End to end: simulated camera -> IOC -> output consumer; loss, CPU, max lossless rate."""
    if min(duration, step_seconds, rate) <= 0 or height < 8 or width < 8 or max_steps < 0:
        raise click.BadParameter("durations, rate must be > 0, steps >= 0, frames at least "
                                 "8 x 8")
    packed = None if compression == "none" else compression
    ceiling_before = measure_ceiling(height, width, step_seconds) if max_steps else 0.0
    floor, floor_user = measure_transport_floor(rate, height, width, step_seconds,
                                                forward_image)
    if packed:
        packed_floor, packed_floor_user = measure_transport_floor(
            rate, height, width, step_seconds, forward_image, packed)
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    with running_ioc(forward_image) as ioc:
        dark = write_background(ioc.workdir / "dark.h5", height, width) if background else None
        ioc.configure(dark, roi)
        view_rate = ioc.image_rate()  # the IOC's default: a fresh IOC, nothing restored
        steady = run_window(ioc, rate, duration, height, width)
        rows.append({"case": f"rate_{rate:g}hz", **steady, "ratio": steady["rate_hz"] / rate,
                     "floor_cpu_ms_per_frame": floor,
                     "floor_user_cpu_ms_per_frame": floor_user,
                     "cpu_vs_floor": steady["cpu_ms_per_frame"] / floor,
                     "image_rate_hz": view_rate})
        if view_phase:
            ioc.set_image_rate(0.0)
            try:
                window = run_window(ioc, rate, duration, height, width)
            finally:
                ioc.set_image_rate(view_rate)
            rows.append({"case": f"rate_{rate:g}hz_no_view", **window,
                         "ratio": window["rate_hz"] / rate,
                         "floor_cpu_ms_per_frame": floor,
                         "floor_user_cpu_ms_per_frame": floor_user,
                         "cpu_vs_floor": window["cpu_ms_per_frame"] / floor,
                         "image_rate_hz": 0.0,
                         "view_cpu_ms_per_frame": steady["cpu_ms_per_frame"],
                         "no_view_cpu_ms_per_frame": window["cpu_ms_per_frame"],
                         "view_vs_no_view":
                             steady["cpu_ms_per_frame"] / window["cpu_ms_per_frame"]})
        if packed:
            window = run_window(ioc, rate, duration, height, width, compression=packed)
            rows.append({"case": f"rate_{rate:g}hz_{packed}", **window,
                         "ratio": window["rate_hz"] / rate,
                         "compressed_vs_plain":
                             window["cpu_ms_per_frame"] / steady["cpu_ms_per_frame"],
                         "floor_cpu_ms_per_frame": packed_floor,
                         "floor_user_cpu_ms_per_frame": packed_floor_user,
                         "cpu_vs_floor": window["cpu_ms_per_frame"] / packed_floor})
        if max_steps:
            best = _highest_lossless_rate(ioc, ceiling_before, max_steps, height, width,
                                          step_seconds, as_json)
    image = "image forwarded" if forward_image else "image not forwarded"
    rows_summed = f"ROI rows [{roi[0]}, {roi[1]})" if roi else "whole image"
    title = (f"bench e2e ({height} x {width}, {image}, "
             f"{'background' if background else 'no background'}, {rows_summed}, "
             f"image view at {view_rate:g} Hz; ratios measured in this run)")
    if not max_steps:
        emit(rows, as_json, title=title)
        return
    # The machine's other load moves the ceiling: measure it on both sides of the IOC's run.
    ceiling_after = measure_ceiling(height, width, step_seconds)
    ceiling = 0.5 * (ceiling_before + ceiling_after)
    rows.append({"case": "ceiling", "rate_hz": ceiling, "lost": 0, "ratio": 1.0,
                 "before_hz": ceiling_before, "after_hz": ceiling_after})
    if best is None:
        rows.append({"case": "max_lossless", "rate_hz": 0.0, "lost": None, "ratio": 0.0})
    else:
        rows.append({"case": "max_lossless", **best, "ratio": best["requested_hz"] / ceiling})
    emit(rows, as_json, title=title)
