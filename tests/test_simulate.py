"""The simulated camera: content matches its truth, rate is held, streams decode."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.optimize import curve_fit

from psss_ioc.streams.channels import image_channel_for
from psss_ioc.streams.simulate import (
    FWHM_PER_SIGMA,
    SimConfig,
    SimulatedCamera,
    Simulator,
    SimulatorProcess,
)
from psss_ioc.streams.stream import CameraSource, Frame

CHANNEL = image_channel_for("SARFE10-PSSS059")


def gaussian(x: np.ndarray, offset: float, amplitude: float, center: float, sigma: float
             ) -> np.ndarray:
    return offset + amplitude * np.exp(-0.5 * ((x - center) / sigma) ** 2)


def fit_spectrum(spectrum: np.ndarray) -> tuple[float, float]:
    """(centre, FWHM) of a Gaussian + offset fitted with scipy."""
    x = np.arange(spectrum.size, dtype=np.float64)
    y = spectrum.astype(np.float64)
    guess_center = float((x * y).sum() / y.sum())
    guess = [0.0, float(y.max()), guess_center, spectrum.size / 10]
    params, _ = curve_fit(gaussian, x, y, p0=guess)
    return float(params[2]), float(abs(params[3]) * FWHM_PER_SIGMA)


def receive(source: CameraSource, n: int) -> list[Frame]:
    frames = []
    for _ in range(n + 20):
        frame = source.receive()
        if frame is not None:
            frames.append(frame)
        if len(frames) == n:
            break
    return frames


def test_noiseless_frames_fit_to_their_true_centre(tmp_path: Path) -> None:
    truth_file, background_file = tmp_path / "truth.jsonl", tmp_path / "dark.h5"
    args = ["--count", "6", "--rate", "0", "--height", "40", "--width", "300", "--seed", "3",
            "--noise", "0", "--no-spikes", "--truth", str(truth_file),
            "--write-background", str(background_file)]
    with SimulatorProcess(args) as sim, CameraSource(sim.address, image_channel=CHANNEL,
                                                     receive_timeout=5.0) as source:
        frames = receive(source, 6)
        sim.wait(30)

    truths = {t["pulse_id"]: t for t in map(json.loads, truth_file.read_text().splitlines())}
    assert sorted(truths) == [f.pulse_id for f in frames] == [1, 2, 3, 4, 5, 6]
    with h5py.File(background_file) as f:
        dark = f["image"][()]
    assert dark.shape == (40, 300) and dark.dtype == np.uint16
    centres = set()
    for frame in frames:
        truth = truths[frame.pulse_id]
        y0, y1 = truth["band"]
        assert frame.image.shape == (40, 300) and frame.image.dtype == np.uint16
        spectrum = (frame.image[y0:y1].astype(np.int64) - dark[y0:y1]).sum(axis=0)
        np.testing.assert_array_equal(frame.image[:y0], dark[:y0])  # no signal outside the band
        center, fwhm = fit_spectrum(spectrum)
        assert center == pytest.approx(truth["center"], abs=0.01)
        assert fwhm == pytest.approx(truth["fwhm"], rel=2e-3)
        centres.add(round(truth["center"], 3))
    assert len(centres) == 6  # the centre jitters shot to shot


def test_realistic_noisy_frames() -> None:
    config = SimConfig(height=64, width=512, seed=1, pool=6)
    camera = SimulatedCamera(config)
    y0, y1 = camera.band
    for image, truth in zip(camera.images, camera.truths, strict=True):
        assert image.dtype == np.uint16 and image.shape == (64, 512)
        outside = image[: y0 - 1].astype(np.float64)
        assert abs(outside.mean() - config.pedestal) < 2 and 2 < outside.std() < 6
        spectrum = (image[y0:y1].astype(np.int64) - camera.background[y0:y1]).sum(axis=0)
        assert spectrum.sum() > 50 * (y1 - y0) * 512 * 0.01  # a real signal in the band
        centroid = float((np.arange(512) * spectrum).sum() / spectrum.sum())
        assert abs(centroid - truth.center) < truth.fwhm / 2
        # SASE spikes: many local maxima on the spectrum, not one smooth bump.
        smooth = np.convolve(spectrum, np.ones(3) / 3, mode="same")
        peaks = np.sum((smooth[1:-1] > smooth[:-2]) & (smooth[1:-1] > smooth[2:])
                       & (smooth[1:-1] > spectrum.max() * 0.2))
        assert peaks >= 4


def test_seed_makes_frames_reproducible() -> None:
    config = SimConfig(height=16, width=64, pool=3, seed=5)
    first, again = SimulatedCamera(config), SimulatedCamera(config)
    other = SimulatedCamera(SimConfig(height=16, width=64, pool=3, seed=6))
    for a, b, c in zip(first.images, again.images, other.images, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    assert first.truths == again.truths != other.truths
    np.testing.assert_array_equal(first.background, again.background)


@pytest.mark.parametrize(("mode", "source_mode", "compression", "dtype"),
                         [("PUSH", "PULL", "none", "uint16"),
                          ("PUB", "SUB", "bitshuffle_lz4", "float32")])
def test_cli_streams_frames_matching_its_truth(
    tmp_path: Path, mode: str, source_mode: str, compression: str, dtype: str
) -> None:
    truth_file = tmp_path / "truth.jsonl"
    args = ["--count", "20", "--rate", "200", "--height", "24", "--width", "96", "--mode", mode,
            "--compression", compression, "--dtype", dtype, "--prefix", "SIM-TEST",
            "--start-pulse-id", "5000", "--energy-axis", "9000", "9100",
            "--truth", str(truth_file)]
    with SimulatorProcess(args) as sim, CameraSource(sim.address, source_mode,
                                                     image_channel_for("SIM-TEST"),
                                                     receive_timeout=5.0) as source:
        frames = receive(source, 20)
        output = sim.wait(30)

    truths = [json.loads(line) for line in truth_file.read_text().splitlines()]
    ids = [f.pulse_id for f in frames]
    assert ids == [t["pulse_id"] for t in truths] and len(ids) == 20
    assert ids == list(range(ids[0], ids[0] + 20)) and ids[0] >= 5000
    assert {(f.image.shape, f.image.dtype.name) for f in frames} == {((24, 96), dtype)}
    assert all(f.timestamp[0] > 1.6e9 for f in frames)  # real timestamps
    assert truths[0]["center_ev"] == pytest.approx(9000 + truths[0]["center"] * 100 / 95)
    assert "sent 20 frames" in output
    assert source.counters.skipped == 0


def test_rate_is_held(tmp_path: Path) -> None:
    """100 Hz for 1.5 s: judged on the frames' own timestamps (set when sent)."""
    args = ["--count", "150", "--rate", "100", "--height", "16", "--width", "64", "--pool", "2"]
    with SimulatorProcess(args) as sim, CameraSource(sim.address, image_channel=CHANNEL,
                                                     receive_timeout=5.0) as source:
        frames = receive(source, 150)
        output = sim.wait(30)

    assert len(frames) == 150
    seconds = [f.timestamp[0] + f.timestamp[1] * 1e-9 for f in frames]
    rate = (len(frames) - 1) / (seconds[-1] - seconds[0])
    assert rate == pytest.approx(100, rel=0.15)
    reported = float(re.search(r"sent 150 frames in [\d.]+ s: ([\d.]+) Hz", output).group(1))
    assert reported == pytest.approx(100, rel=0.15)


def test_pub_without_subscriber_drops_until_stopped() -> None:
    sim = Simulator(SimConfig(height=8, width=16, pool=1), port=0, mode="PUB",
                    host="127.0.0.1", rate=500)
    stop = threading.Event()
    with sim:
        runner = threading.Thread(target=sim.run, kwargs={"stop": stop})
        runner.start()
        stop.wait(0.2)
        stop.set()
        runner.join(10)

    assert not runner.is_alive()
    assert sim.stats.sent == 0 and sim.stats.dropped > 10
    assert math.isnan(sim.stats.rate)
