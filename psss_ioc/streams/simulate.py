"""A simulated PSSS camera: realistic `<prefix>:FPICTURE` frames streamed over bsread.

Content (`SimulatedCamera`): a fixed dark pedestal (level + column pattern + pixel pattern), a
horizontal band of signal rows, and along x a SASE-like spectrum: a Gaussian envelope whose
centre and width jitter shot to shot, modulated by random spikes, with Poisson noise on the
signal and Gaussian read noise. `noise=0` and `spikes=False` give noiseless frames whose
spectrum is exactly the envelope, so its fitted centre is the true centre.

Dark frames (``--dark``, `SimConfig.dark`): the camera with the beam off, for taking a
background: the dark pedestal plus the read noise (``3 * noise`` counts, Gaussian), rounded and
clipped to the dtype like any frame, and no band. Pool frame k is
``clip(rint(background + read_noise_k))``: over whole cycles of the pool their mean is the
pool's mean (what a background taken from them averages to), which tends to the dark frame
(`SimulatedCamera.background`) as ``3 * noise / sqrt(pool)``; with ``noise=0`` every dark frame
is the dark frame. Their truth has no centre or FWHM (null) and says ``"dark": true``.

Saturation (``--saturate N``, `SimConfig.saturate`): N pixels of each frame set to the top of
the dtype (65535 for uint16, the integer maximum for the other integer types, 65535.0 for
float frames, a 16-bit camera's top), at N distinct positions inside the band rows
``[y0, y1)`` drawn uniformly per pool frame from the seeded generator ``[seed, 2, k]`` (pool
frame k): reproducible for a seed, different from frame to frame, independent of the rest of
the content (the other pixels are those of the frame without ``--saturate``). A frame then has
N pixels at the top, or more where its content already reaches it (not with the default
`peak`); its truth says how many (``"saturated"``, over the whole frame).

Truth (`Truth`, ``--truth FILE.jsonl``): per pulse the envelope's centre and FWHM in column
units (pixels along x, column index 0 = first column) and the signal band rows ``[y0, y1)``;
with an energy axis also in eV. The background file (``--write-background FILE.h5``) is the
pedestal, dataset ``/image``, same dtype and shape as the frames.

Streaming (`Simulator`): frames are generated once into a pool and pre-encoded, so sending
costs a small JSON header per frame; the rate is held on an absolute schedule (no drift) and
a stall longer than 0.25 s (or 5 periods) re-anchors the schedule instead of bursting; shorter
ones are caught up.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import click
import numpy as np

from psss_ioc.core import background
from psss_ioc.core.fit import FWHM_PER_SIGMA
from psss_ioc.streams import bsread_wire as wire
from psss_ioc.streams.channels import DEFAULT_PREFIX, image_channel_for
from psss_ioc.streams.stream import SENDER_MODES, BoundSocket, SendStatus

DTYPES = ("uint16", "uint32", "int32", "float32", "float64")
DEFAULT_PORT = 9999


@dataclass(frozen=True)
class SimConfig:
    height: int = 2016
    width: int = 2560
    dtype: str = "uint16"
    seed: int = 0
    noise: float = 1.0  # 0: noiseless; otherwise Poisson signal + read noise of 3*noise counts
    spikes: bool = True  # SASE spikes on the envelope
    pool: int = 16  # distinct frames generated up front
    pedestal: float = 100.0  # dark level (counts)
    peak: float = 1000.0  # signal counts per pixel at the envelope peak, band centre
    band: tuple[float, float] = (0.45, 0.55)  # signal rows as fractions of the height
    energy_axis: tuple[float, float] | None = None  # eV at the first and last column
    dark: bool = False  # beam off: pedestal and read noise only, no band
    saturate: int = 0  # pixels per frame at the dtype's top, inside the band rows

    def __post_init__(self) -> None:
        if self.height < 2 or self.width < 8:
            raise ValueError("frames must be at least 2 rows x 8 columns")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.pool < 1 or self.noise < 0:
            raise ValueError("pool must be >= 1 and noise >= 0")
        if self.saturate < 0:
            raise ValueError("saturate must be >= 0 pixels")


@dataclass(frozen=True)
class Truth:
    center: float  # envelope centre, columns (NaN for a dark frame)
    fwhm: float  # envelope FWHM, columns (NaN for a dark frame)
    band: tuple[int, int]  # signal rows [y0, y1) (where they would be for a dark frame)
    dark: bool = False
    saturated: int | None = None  # pixels at the dtype's top (counted with --saturate only)

    def to_json(self, pulse_id: int, energy_axis: tuple[float, float] | None,
                width: int) -> dict[str, Any]:
        out: dict[str, Any] = {"pulse_id": pulse_id, "center": self.center, "fwhm": self.fwhm,
                               "band": list(self.band)}
        if self.dark:
            out.update(center=None, fwhm=None, dark=True)
        if self.saturated is not None:
            out["saturated"] = self.saturated
        if energy_axis is not None and not self.dark:
            step = (energy_axis[1] - energy_axis[0]) / (width - 1)
            out["center_ev"] = energy_axis[0] + self.center * step
            out["fwhm_ev"] = self.fwhm * abs(step)
        return out


class SimulatedCamera:
    """The frame pool, its truths and the matching dark frame (no sockets)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        y0 = int(config.height * config.band[0])
        self.band = (y0, max(int(config.height * config.band[1]), y0 + 2))
        band_pixels = (self.band[1] - self.band[0]) * config.width
        if config.saturate > band_pixels:
            raise ValueError(f"saturate {config.saturate} is more than the band's "
                             f"{band_pixels} pixels")
        self.background = self._pedestal(np.random.default_rng([config.seed, 0]))
        rng = np.random.default_rng([config.seed, 1])
        pairs = [self._dark_frame(rng) if config.dark else self._frame(rng)
                 for _ in range(config.pool)]
        if config.saturate:
            pairs = [self._saturated(k, image, truth) for k, (image, truth) in enumerate(pairs)]
        self.images = [image for image, _ in pairs]
        self.truths = [truth for _, truth in pairs]

    @property
    def top(self) -> int | float:
        """The value of a saturated pixel: the dtype's top (65535.0 for float frames)."""
        dtype = np.dtype(self.config.dtype)
        return 65535.0 if dtype.kind == "f" else int(np.iinfo(dtype).max)

    def _to_dtype(self, values: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.config.dtype)
        if dtype.kind == "f":
            return values.astype(dtype)
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), max(info.min, 0), info.max).astype(dtype)

    def _pedestal(self, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        pattern = rng.standard_normal((c.height, c.width), dtype=np.float32) * 1.5
        pattern += (rng.standard_normal(c.width) * 2.0).astype(np.float32)
        return self._to_dtype(pattern + np.float32(c.pedestal))

    def _spectrum(self, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
        """One shot along x: (relative intensity, centre, fwhm)."""
        w = self.config.width
        x = np.arange(w, dtype=np.float64)
        center = float(np.clip(w * 0.5 + rng.normal(0.0, w * 0.03), w * 0.3, w * 0.7))
        fwhm = float(w * 0.12 * (1.0 + 0.05 * rng.standard_normal()))
        sigma = fwhm / FWHM_PER_SIGMA
        envelope = np.exp(-0.5 * ((x - center) / sigma) ** 2)
        if not self.config.spikes:
            return envelope, center, fwhm
        # SASE: ~40 narrow modes under the envelope with exponentially distributed energies.
        modes = rng.normal(center, sigma, 40)
        weights = rng.exponential(1.0, 40)
        width = max(1.0, fwhm / 60.0)
        spikes = weights @ np.exp(-0.5 * ((x[None, :] - modes[:, None]) / width) ** 2)
        spikes /= max((spikes * envelope).sum() / envelope.sum(), 1e-12)
        return envelope * (0.2 + 0.8 * spikes), center, fwhm

    def _frame(self, rng: np.random.Generator) -> tuple[np.ndarray, Truth]:
        c = self.config
        spectrum, center, fwhm = self._spectrum(rng)
        y0, y1 = self.band
        rows = np.arange(y0, y1, dtype=np.float64)
        profile = np.exp(-0.5 * ((rows - (y0 + y1 - 1) / 2) / ((y1 - y0) / 4)) ** 2)
        signal = c.peak * profile[:, None] * spectrum[None, :]
        image = self.background.astype(np.float32)
        if c.noise > 0:
            signal = rng.poisson(signal).astype(np.float64)
            image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(3 * c.noise)
        image[y0:y1] += signal.astype(np.float32)
        return self._to_dtype(image), Truth(center, fwhm, (y0, y1))

    def _dark_frame(self, rng: np.random.Generator) -> tuple[np.ndarray, Truth]:
        """Beam off: the pedestal and the read noise, no band."""
        image = self.background.astype(np.float32)
        if self.config.noise > 0:
            image += (rng.standard_normal(image.shape, dtype=np.float32)
                      * np.float32(3 * self.config.noise))
        return self._to_dtype(image), Truth(math.nan, math.nan, self.band, dark=True)

    def _saturated(self, k: int, image: np.ndarray, truth: Truth) -> tuple[np.ndarray, Truth]:
        """Pool frame k with `saturate` distinct pixels of the band rows at the top."""
        y0, y1 = self.band
        width = self.config.width
        rng = np.random.default_rng([self.config.seed, 2, k])
        flat = rng.choice((y1 - y0) * width, size=self.config.saturate, replace=False)
        rows, columns = np.divmod(flat, width)
        image[y0 + rows, columns] = self.top
        return image, replace(truth, saturated=int(np.count_nonzero(image >= self.top)))

    def write_background(self, path: str | Path) -> Path:
        return background.save(path, self.background)


@dataclass
class SimStats:
    sent: int = 0
    dropped: int = 0  # PUB without subscriber, or PUSH queue full with drop_when_full
    first_pulse_id: int | None = None
    last_pulse_id: int | None = None
    first_time: float | None = None  # monotonic time of the first and last frame sent
    last_time: float | None = None

    @property
    def rate(self) -> float:
        """Achieved rate (Hz) between the first and the last frame sent."""
        if self.sent < 2 or self.first_time is None or self.last_time is None:
            return math.nan
        return (self.sent - 1) / max(self.last_time - self.first_time, 1e-9)

    def summary(self, requested: float) -> str:
        if self.sent < 2 or self.first_time is None or self.last_time is None:
            return f"sent {self.sent} frames, dropped {self.dropped}"
        wanted = f"requested {requested:g} Hz" if requested > 0 else "unthrottled"
        return (f"sent {self.sent} frames in {self.last_time - self.first_time:.2f} s: "
                f"{self.rate:.1f} Hz ({wanted}), dropped {self.dropped}")


@dataclass
class Simulator:
    """Streams the camera's pool over bsread (binds PUSH or PUB).

    `rate` 0 sends as fast as possible. PUSH waits for a consumer (as psi-bsread's Sender
    does) unless `drop_when_full`; PUB drops frames while nobody is subscribed. `port` 0
    binds a free port; `port` is the actual one after `open()`.
    """

    config: SimConfig = field(default_factory=SimConfig)
    port: int = DEFAULT_PORT
    mode: str = "PUSH"
    host: str = "*"
    rate: float = 100.0
    compression: str | None = None
    prefix: str = DEFAULT_PREFIX
    start_pulse_id: int = 1
    queue_size: int = 10
    drop_when_full: bool = False

    def __post_init__(self) -> None:
        self.camera = SimulatedCamera(self.config)
        spec = wire.ChannelSpec.for_array(image_channel_for(self.prefix), self.camera.images[0],
                                          self.compression)
        self._writer = wire.MessageWriter([spec])
        self._values = [wire.encode_value(spec, image) for image in self.camera.images]
        self._socket = BoundSocket(self.port, self.mode, self.host, self.queue_size)
        self.stats = SimStats()

    @property
    def endpoint(self) -> str:
        return self._socket.endpoint

    def open(self) -> int:
        self.port = self._socket.open()
        return self.port

    def close(self, linger: float = 5.0) -> None:
        """Close; queued frames get up to `linger` seconds to leave."""
        self._socket.close(linger)

    def __enter__(self) -> Simulator:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(0.0 if exc[0] is not None else 5.0)

    def run(
        self,
        count: int | None = None,
        stop: threading.Event | None = None,
        truth: IO[str] | None = None,
        progress: Callable[[SimStats], None] | None = None,
        progress_period: float = 1.0,
    ) -> SimStats:
        """Send until `count` frames are sent or `stop` is set; one truth line per frame."""
        stop = stop or threading.Event()
        period = 1.0 / self.rate if self.rate > 0 else 0.0
        pulse_id = self.start_pulse_id
        next_time: float | None = None
        next_progress = time.monotonic() + progress_period
        index = 0
        while (count is None or self.stats.sent < count) and not stop.is_set():
            if period:
                next_time = self._wait_for_slot(next_time, period, stop)
            k = index % len(self._values)
            if self._send(pulse_id, k, stop) and truth is not None:
                line = self.camera.truths[k].to_json(pulse_id, self.config.energy_axis,
                                                      self.config.width)
                truth.write(json.dumps(line) + "\n")
            pulse_id += 1
            index += 1
            if progress is not None and time.monotonic() >= next_progress:
                next_progress += progress_period
                progress(self.stats)
        return self.stats

    @staticmethod
    def _wait_for_slot(next_time: float | None, period: float, stop: threading.Event) -> float:
        """Sleep until the next slot of the schedule; returns the slot after it."""
        now = time.monotonic()
        if next_time is None or now - next_time > max(0.25, 5 * period):
            return now + period  # first frame, or stalled: re-anchor rather than burst
        if next_time > now:
            stop.wait(next_time - now)
        return next_time + period

    def _send(self, pulse_id: int, k: int, stop: threading.Event) -> bool:
        ns = time.time_ns()
        parts = self._writer.encode(pulse_id, (ns // 1_000_000_000, ns % 1_000_000_000),
                                    [self._values[k]])
        status = self._socket.send(parts)
        while status is SendStatus.FULL and not self.drop_when_full and not stop.is_set():
            status = self._socket.send(parts, timeout=0.2)
        stats = self.stats
        if status is not SendStatus.SENT:
            stats.dropped += 1
            return False
        stats.last_time = time.monotonic()
        if stats.sent == 0:
            stats.first_pulse_id, stats.first_time = pulse_id, stats.last_time
        stats.sent += 1
        stats.last_pulse_id = pulse_id
        return True


# ---------------------------------------------------------------------------------------------
# Running the simulator in another process (tests, demos, benchmarks)

_ENDPOINT = re.compile(rb"on (tcp://\S+):(\d+)")


class SimulatorProcess:
    """``python -m psss_ioc.streams.simulate ARGS`` on `port` of `host` (0: a free one);
    stop() or use `with`."""

    def __init__(self, args: Sequence[str], host: str = "127.0.0.1",
                 ready_timeout: float = 60.0, port: int = 0) -> None:
        cmd = [sys.executable, "-m", "psss_ioc.streams.simulate", "--host", host,
               "--port", str(port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        try:
            line = self._read_line(ready_timeout)
        except BaseException:  # Ctrl-C while it starts too: the caller has no object to stop
            self.stop(3.0)
            raise
        match = _ENDPOINT.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"simulator did not report its endpoint: {line!r}")
        self.port = int(match.group(2))
        self.address = f"tcp://{host}:{self.port}"

    def _read_line(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("simulator did not start in time")
            ready, _, _ = select.select([fd], [], [], remaining)
            chunk = os.read(fd, 4096) if ready else b""
            if ready and not chunk:
                raise RuntimeError(f"simulator exited with code {self.proc.wait()}")
            data += chunk
        self._rest = data.split(b"\n", 1)[1]
        return data.split(b"\n", 1)[0]

    def wait(self, timeout: float | None = None) -> str:
        """Wait for the end (e.g. after --count) and return the rest of its output."""
        out, _ = self.proc.communicate(timeout=timeout)
        return (self._rest + (out or b"")).decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> str:
        """Interrupt (SIGINT), wait, and return the rest of its output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Command line


def _progress_printer(requested: float) -> Callable[[SimStats], None] | None:
    if not sys.stderr.isatty():
        return None

    last = [time.monotonic(), 0]

    def show(stats: SimStats) -> None:
        now = time.monotonic()
        recent = (stats.sent - last[1]) / max(now - last[0], 1e-9)
        last[:] = [now, stats.sent]
        sys.stderr.write(f"\r{stats.summary(requested)}; now {recent:.1f} Hz   ")
        sys.stderr.flush()

    return show


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.command()
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True,
              help="Port to bind (0: any free port, reported on the first output line).")
@click.option("--host", default="*", show_default=True, help="Interface to bind.")
@click.option("--mode", type=click.Choice(SENDER_MODES, case_sensitive=False), default="PUSH",
              show_default=True)
@click.option("--rate", type=float, default=100.0, show_default=True,
              help="Frames per second (0: as fast as possible).")
@click.option("--count", type=int, default=None, help="Stop after N frames sent.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--height", type=int, default=2016, show_default=True)
@click.option("--width", type=int, default=2560, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="uint16", show_default=True)
@click.option("--compression", type=click.Choice(["none", wire.BSLZ4]), default="none",
              show_default=True)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="Camera prefix; the channel is <prefix>:FPICTURE.")
@click.option("--noise", type=float, default=1.0, show_default=True,
              help="Noise scale; 0 gives noiseless frames.")
@click.option("--spikes/--no-spikes", default=True, show_default=True,
              help="SASE spikes on the spectrum envelope.")
@click.option("--pool", type=int, default=16, show_default=True,
              help="Distinct frames generated up front (and cycled).")
@click.option("--energy-axis", type=(float, float), default=None,
              help="E_FIRST E_LAST: eV of the first and last column, adds eV to the truth.")
@click.option("--start-pulse-id", type=int, default=1, show_default=True)
@click.option("--queue-size", type=int, default=10, show_default=True)
@click.option("--drop-when-full", is_flag=True,
              help="PUSH: drop frames when the consumer is slow instead of waiting.")
@click.option("--dark", is_flag=True,
              help="Dark frames: the camera's pedestal and read noise only, no band (beam off, "
                   "for taking a background).")
@click.option("--saturate", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="N",
              help="Set N pixels per frame, inside the band rows, to the top of the dtype "
                   "(65535 for uint16) at positions seeded by --seed.")
@click.option("--write-background", "background_file", type=click.Path(dir_okay=False),
              default=None, help="Write the dark frame (HDF5 /image) to FILE.h5.")
@click.option("--truth", "truth_file", type=click.Path(dir_okay=False), default=None,
              help="Write pulse_id, centre, FWHM (columns) and band of each frame (JSON lines).")
def simulate(port: int, host: str, mode: str, rate: float, count: int | None, seed: int,
             height: int, width: int, dtype: str, compression: str, prefix: str, noise: float,
             spikes: bool, pool: int, energy_axis: tuple[float, float] | None,
             start_pulse_id: int, queue_size: int, drop_when_full: bool, dark: bool,
             saturate: int, background_file: str | None, truth_file: str | None) -> None:
    """Stream simulated PSSS camera frames (<prefix>:FPICTURE) over bsread."""
    try:
        config = SimConfig(height=height, width=width, dtype=dtype, seed=seed, noise=noise,
                           spikes=spikes, pool=pool, energy_axis=energy_axis, dark=dark,
                           saturate=saturate)
        sim = Simulator(config, port=port, mode=mode.upper(), host=host, rate=rate,
                        compression=None if compression == "none" else compression,
                        prefix=prefix, start_pulse_id=start_pulse_id, queue_size=queue_size,
                        drop_when_full=drop_when_full)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if background_file:
        sim.camera.write_background(background_file)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Python leaves SIGINT ignored when the parent ignored it (a background job of a shell
    # without a terminal): SimulatorProcess.stop() and Ctrl-C must still stop it.
    signal.signal(signal.SIGINT, _raise_interrupt)
    sim.open()
    content = ("dark frames" if dark else "frames") + (
        f", {saturate} pixels saturated" if saturate else "")
    click.echo(f"streaming {image_channel_for(prefix)} {height} x {width} {dtype} "
               f"({compression}) on {sim.endpoint} ({mode.upper()}): {content}")
    sys.stdout.flush()
    linger = 5.0
    truth = open(truth_file, "w") if truth_file else None  # noqa: SIM115 (closed below)
    try:
        sim.run(count=count, truth=truth, progress=_progress_printer(rate))
    except KeyboardInterrupt:
        linger = 0.0
    finally:
        sim.close(linger)
        if truth is not None:
            truth.close()
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    click.echo(sim.stats.summary(rate))


if __name__ == "__main__":
    simulate()
