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

from psss_ioc.pipeline.acquire import BackgroundAcquisition
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


# --- dark frames (--dark) and saturated pixels (--saturate N), issue 18 ---------------------


def test_dark_frames_have_no_band_and_average_to_what_was_sent(tmp_path: Path) -> None:
    """Two cycles of a 4-frame pool of dark frames: each frame is the pool frame the simulator
    computes for it; their mean (and a background acquired from them) is the pool's mean, the
    dark frame within the read noise, with nothing in the band rows."""
    truth_file, background_file = tmp_path / "truth.jsonl", tmp_path / "dark.h5"
    args = ["--dark", "--count", "8", "--pool", "4", "--rate", "0", "--height", "40",
            "--width", "120", "--seed", "4", "--truth", str(truth_file),
            "--write-background", str(background_file)]
    with SimulatorProcess(args) as sim, CameraSource(sim.address, image_channel=CHANNEL,
                                                     receive_timeout=5.0) as source:
        frames = receive(source, 8)
        output = sim.wait(30)
    assert "sent 8 frames" in output
    camera = SimulatedCamera(SimConfig(height=40, width=120, seed=4, pool=4, dark=True))
    assert [f.pulse_id for f in frames] == list(range(1, 9))
    for frame in frames:
        np.testing.assert_array_equal(frame.image, camera.images[(frame.pulse_id - 1) % 4])
    with h5py.File(background_file) as f:
        dark = f["image"][()]
    np.testing.assert_array_equal(dark, camera.background)

    sent = np.stack([f.image for f in frames]).astype(np.int64)
    mean = sent.mean(axis=0)
    np.testing.assert_array_equal(mean, np.stack(camera.images).astype(np.int64).mean(axis=0))
    # no band: frame minus dark frame is read noise only, in the band rows as elsewhere
    residual = mean - dark
    y0, y1 = camera.band
    assert abs(residual.mean()) < 0.05 and abs(residual[y0:y1].mean()) < 0.2
    assert residual.std() == pytest.approx(3 / 2, rel=0.1)  # 3 counts of noise over 4 frames
    assert abs(residual[y0:y1].sum(axis=0).mean()) < 1.0  # no spectrum in the band

    acquisition = BackgroundAcquisition(8)
    for frame in frames:
        acquisition.add(frame.image)
    np.testing.assert_array_equal(acquisition.result(), np.rint(mean).astype(np.uint16))

    truths = [json.loads(line) for line in truth_file.read_text().splitlines()]
    assert [t["pulse_id"] for t in truths] == list(range(1, 9))
    assert all(t["dark"] and t["center"] is None and t["fwhm"] is None for t in truths)


def test_noiseless_dark_frames_are_the_dark_frame() -> None:
    camera = SimulatedCamera(SimConfig(height=16, width=64, pool=3, noise=0, dark=True))
    for image in camera.images:
        np.testing.assert_array_equal(image, camera.background)
    # the dark frame is the same one the frames with a band are made on
    lit = SimulatedCamera(SimConfig(height=16, width=64, pool=3, noise=0))
    np.testing.assert_array_equal(lit.background, camera.background)


def test_saturated_frames_have_n_pixels_at_the_top_inside_the_band(tmp_path: Path) -> None:
    truth_file = tmp_path / "truth.jsonl"
    args = ["--saturate", "5", "--count", "6", "--pool", "3", "--rate", "0", "--height", "40",
            "--width", "120", "--seed", "9", "--truth", str(truth_file)]
    with SimulatorProcess(args) as sim, CameraSource(sim.address, image_channel=CHANNEL,
                                                     receive_timeout=5.0) as source:
        frames = receive(source, 6)
        sim.wait(30)
    camera = SimulatedCamera(SimConfig(height=40, width=120, seed=9, pool=3, saturate=5))
    plain = SimulatedCamera(SimConfig(height=40, width=120, seed=9, pool=3))
    y0, y1 = camera.band
    positions = []
    for frame in frames:
        k = (frame.pulse_id - 1) % 3
        np.testing.assert_array_equal(frame.image, camera.images[k])
        at_top = np.argwhere(frame.image == 65535)
        assert len(at_top) == 5 and np.all((at_top[:, 0] >= y0) & (at_top[:, 0] < y1))
        # every other pixel is the frame's own content, as without --saturate
        differs = np.argwhere(frame.image != plain.images[k])
        np.testing.assert_array_equal(differs, at_top)
        positions.append(at_top.tolist())
    assert positions[0] != positions[1] != positions[2]  # other pixels each pool frame
    assert positions[:3] == positions[3:]  # the pool cycles
    truths = [json.loads(line) for line in truth_file.read_text().splitlines()]
    assert [t["saturated"] for t in truths] == [5] * 6


@pytest.mark.parametrize(("dtype", "top"), [("uint16", 65535), ("uint32", 2**32 - 1),
                                            ("int32", 2**31 - 1), ("float32", 65535.0)])
def test_saturation_is_the_top_of_the_dtype(dtype: str, top: float) -> None:
    camera = SimulatedCamera(SimConfig(height=20, width=32, dtype=dtype, pool=2, saturate=3,
                                       seed=1, dark=True))
    assert camera.top == top
    for image, truth in zip(camera.images, camera.truths, strict=True):
        assert image.dtype == np.dtype(dtype) and np.count_nonzero(image == top) == 3
        assert truth.saturated == 3 and truth.dark


def test_saturation_is_seeded_and_counts_a_band_that_saturates_by_itself() -> None:
    config = SimConfig(height=20, width=64, pool=2, saturate=4, seed=3)
    again = SimulatedCamera(config)
    for a, b in zip(SimulatedCamera(config).images, again.images, strict=True):
        np.testing.assert_array_equal(a, b)
    other = SimulatedCamera(SimConfig(height=20, width=64, pool=2, saturate=4, seed=4))
    assert not np.array_equal(np.argwhere(again.images[0] == 65535),
                              np.argwhere(other.images[0] == 65535))
    # a bright beam clips the band's centre already: at least N at the top, the truth says how many
    bright = SimulatedCamera(SimConfig(height=20, width=64, pool=2, saturate=4, seed=3,
                                       peak=1e6, noise=0))
    for image, truth in zip(bright.images, bright.truths, strict=True):
        assert truth.saturated == np.count_nonzero(image == 65535) > 4


def test_saturating_more_than_the_band_holds_is_refused() -> None:
    with pytest.raises(ValueError, match="more than the band's 64 pixels"):
        SimulatedCamera(SimConfig(height=20, width=32, saturate=65))
    with pytest.raises(ValueError, match=">= 0"):
        SimConfig(saturate=-1)
    SimulatedCamera(SimConfig(height=20, width=32, saturate=64, pool=1))  # the whole band
