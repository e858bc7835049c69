"""`psss-ioc bench stream`: CameraSource receive rate vs the transport ceiling, side by side.

One simulator process streams pre-encoded frames as fast as it can (PUSH, tcp loopback).
Against that same stream we alternate, `--rounds` times: a bare pyzmq
``recv_multipart(copy=False)`` loop (the ceiling: ZeroMQ + TCP, no bsread at all) and
`CameraSource.receive()` (psi-bsread's socket handling + our decoding: headers, checks, image
as a numpy array). Medians of the rounds, ratio = ours / ceiling. Uncompressed and
bitshuffle_lz4: for the latter the ceiling moves fewer bytes and ours also decompresses the
whole image (`Frame.image`; the IOC itself decodes only the ROI rows).
``*_cpu_ms`` is the receiving process's CPU time per frame (all its threads, including
ZeroMQ's I/O thread): the cost of receiving, whatever limits the rate.

Then, without sockets, the decoding of a bitshuffle_lz4 frame: the rows of an ROI centred on
the frame (`--roi-rows`, 700 and 300 by default) against the whole frame, both from the
received bytes (block layout checked, blocks decompressed), medians of `--frames` decodes;
``ratio`` = ROI / whole.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import click
import numpy as np
import zmq

from psss_ioc.bench.report import emit, median
from psss_ioc.streams import bsread_wire as wire
from psss_ioc.streams.channels import image_channel_for
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera, SimulatorProcess
from psss_ioc.streams.stream import CameraSource

PREFIX = "BENCH-PSSS"
QUEUE_SIZE = 20  # receive high-water mark, the same for both loops


def bare_rate(address: str, frames: int, warmup: int) -> tuple[float, float, float]:
    """(frames/s, CPU ms per frame, MB per message) of a bare pyzmq PULL loop."""
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.set_hwm(QUEUE_SIZE)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(address)
    try:
        for _ in range(warmup):
            sock.recv_multipart(copy=False)
        nbytes = 0
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(frames):
            parts = sock.recv_multipart(copy=False)
            nbytes += sum(len(p) for p in parts)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        sock.close(0)
        context.term()
    return frames / elapsed, cpu / frames * 1e3, nbytes / frames / 1e6


def ours_rate(address: str, frames: int, warmup: int, profile: cProfile.Profile | None = None,
              decode_threads: int = 1) -> tuple[float, float]:
    """(frames/s, CPU ms per frame) of CameraSource.receive() on the same stream, the whole
    image decoded."""
    with CameraSource(address, "PULL", image_channel_for(PREFIX), receive_timeout=30.0,
                      queue_size=QUEUE_SIZE, decode_threads=decode_threads) as source:
        def receive() -> None:
            frame = source.receive()
            if frame is None:
                raise RuntimeError("no frame from the simulator")
            frame.image  # noqa: B018 - a compressed image is decoded when asked for

        for _ in range(warmup):
            receive()
        if profile is not None:
            profile.enable()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(frames):
            receive()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if profile is not None:
            profile.disable()
        if source.counters.skipped:
            raise RuntimeError(f"frames skipped: {source.counters.last_error}")
    return frames / elapsed, cpu / frames * 1e3


def run_case(height: int, width: int, compression: str, frames: int, rounds: int, warmup: int,
             profile: bool, decode_threads: int = 1) -> dict[str, object]:
    args = ["--rate", "0", "--height", str(height), "--width", str(width), "--compression",
            compression, "--pool", "8", "--seed", "1", "--prefix", PREFIX]
    ceiling: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    wire_mb = 0.0
    with SimulatorProcess(args) as sim:
        for _ in range(rounds):
            hz, cpu_ms, wire_mb = bare_rate(sim.address, frames, warmup)
            ceiling.append((hz, cpu_ms))
            ours.append(ours_rate(sim.address, frames, warmup, decode_threads=decode_threads))
        if profile:
            _profile(sim.address, frames, warmup, compression)
    ours_hz, ceiling_hz = median([m[0] for m in ours]), median([m[0] for m in ceiling])
    return {
        "case": f"{height}x{width} uint16 {compression}",
        "ours_hz": round(ours_hz, 1),
        "ceiling_hz": round(ceiling_hz, 1),
        "ratio": round(ours_hz / ceiling_hz, 3),
        "ours_cpu_ms": round(median([m[1] for m in ours]), 3),
        "ceiling_cpu_ms": round(median([m[1] for m in ceiling]), 3),
        "wire_mb": round(wire_mb, 3),
        "frames": frames,
        "rounds": rounds,
    }


def decode_cases(height: int, width: int, roi_rows: tuple[int, ...], repeats: int,
                 decode_threads: int = 1) -> list[dict[str, object]]:
    """The ROI rows of a bitshuffle_lz4 frame against the whole frame, from the received
    bytes each time (block layout checked, then the blocks decompressed). The cases take
    turns, so that the machine's other load weighs on all of them alike."""
    image = SimulatedCamera(SimConfig(height=height, width=width, pool=1, seed=1)).images[0]
    spec = wire.ChannelSpec.for_array("x", image, wire.BSLZ4)
    raw = wire.encode_value(spec, image)

    def decode(rows: tuple[int, int]) -> np.ndarray:
        blocks = wire.Bslz4Blocks(raw, image.dtype, image.size)
        return wire.Bslz4Image(raw, blocks, image.shape, decode_threads).rows(*rows)

    heights = [min(max(n, 1), height) for n in roi_rows]
    cases = [(0, height)] + [((height - n) // 2, (height - n) // 2 + n) for n in heights]
    times: list[list[float]] = [[] for _ in cases]
    for i in range(repeats + 1):  # the first round warms up
        for case, samples in zip(cases, times, strict=True):
            start = time.perf_counter()
            decode(case)
            if i:
                samples.append(time.perf_counter() - start)
    full_ms = median(times[0]) * 1e3
    rows_out: list[dict[str, object]] = []
    for n, rows, samples in zip(heights, cases[1:], times[1:], strict=True):
        roi_ms = median(samples) * 1e3
        rows_out.append({
            "case": f"decode {n} of {height} rows bitshuffle_lz4",
            "roi_ms": roi_ms,
            "full_ms": full_ms,
            "ratio": roi_ms / full_ms,
            "rows": list(rows),
            "decode_threads": decode_threads,
            "frames": repeats,
        })
    return rows_out


def _profile(address: str, frames: int, warmup: int, compression: str) -> None:
    prof = cProfile.Profile()
    ours_rate(address, frames, warmup, prof)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    sys.stderr.write(f"--- CameraSource.receive profile, {compression} ---\n{out.getvalue()}")


@click.command("stream")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per case.")
@click.option("--frames", type=int, default=400, show_default=True,
              help="Frames timed per measurement.")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Alternating ceiling/ours measurements per case (median reported).")
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--height", type=int, default=2016, show_default=True)
@click.option("--width", type=int, default=2560, show_default=True)
@click.option("--compression", "compressions", multiple=True,
              type=click.Choice(["none", "bitshuffle_lz4"]),
              default=("none", "bitshuffle_lz4"), show_default=True)
@click.option("--profile", is_flag=True, help="Also print a cProfile of receive() to stderr.")
@click.option("--roi-rows", "roi_rows", type=int, multiple=True, default=(700, 300),
              show_default=True, help="ROI heights whose decoding is timed against the frame's.")
@click.option("--decode-threads", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Threads that decode a compressed frame's blocks (the IOC uses 1).")
def stream(as_json: bool, frames: int, rounds: int, warmup: int, height: int, width: int,
           compressions: tuple[str, ...], profile: bool, roi_rows: tuple[int, ...],
           decode_threads: int) -> None:
    """CameraSource receive rate vs a bare pyzmq recv_multipart loop (tcp loopback); ROI-only
    decoding of a bitshuffle_lz4 frame vs the whole frame."""
    rows = [run_case(height, width, c, frames, rounds, warmup, profile, decode_threads)
            for c in compressions]
    if roi_rows:
        rows += decode_cases(height, width, roi_rows, frames, decode_threads)
    emit(rows, as_json, title="bench stream: CameraSource vs bare pyzmq (same stream, one run); "
         "ROI rows vs whole frame decoded")
