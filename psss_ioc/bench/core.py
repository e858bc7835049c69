"""`psss-ioc bench core`: process() against a numpy + curve_fit baseline and the memory bound.

On the same realistic frames (the simulated camera's pool, rotated so that no frame stays in
cache), per case it times, interleaved in one run:

1. ours: ``process(image, settings)`` end to end (kernel and fit);
2. the naive baseline: ``clip(image.astype(int32) - background, 0)[ymin:ymax].sum(0)`` plus
   ``scipy.optimize.curve_fit`` with an analytic Jacobian (start values from moments);
3. the memory-bandwidth reference: reading the same image and background bytes once (a
   compiled XOR over their 64-bit words, the cheapest loop that touches every byte), timed
   two ways, front to back and both halves at once; the faster of the two is the reference.

process() does not read the background as given: a dark frame of the camera's (uint16, within
a 256-count window but for a few pixels) is read as one byte per pixel (see
`processing.CompactBackground`), a quarter fewer bytes than the reference reads. So that the
figure keeps saying how close process() runs to memory speed, each case also reports
``kernel_bytes_fraction``: the time to read the bytes process() reads (image and compact
background, the same two ways) over process()'s time.

It also times the fit alone against curve_fit on 2560-point spectra.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
from numba import njit
from scipy.optimize import OptimizeWarning, curve_fit

from psss_ioc.bench.report import emit, median, percentile
from psss_ioc.core.fit import fit_spectrum
from psss_ioc.core.processing import Settings, process, spectrum
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera

SIZES = ((2016, 2560), (2160, 2560))
ROI_ROWS = {"full": None, "roi700": 700, "roi300": 300}


@dataclass(frozen=True)
class Case:
    name: str
    images: list[np.ndarray]
    background: np.ndarray
    roi: tuple[int, int]


def _gaussian(x: np.ndarray, a: float, c: float, s: float, off: float) -> np.ndarray:
    return off + a * np.exp(-((x - c) ** 2) / (2.0 * s * s))


def _gaussian_jacobian(x: np.ndarray, a: float, c: float, s: float, off: float) -> np.ndarray:
    e = np.exp(-((x - c) ** 2) / (2.0 * s * s))
    return np.stack([e, a * e * (x - c) / s**2, a * e * (x - c) ** 2 / s**3, np.ones_like(x)], 1)


def _curve_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """The baseline fit: scipy's curve_fit, analytic Jacobian, start values from moments."""
    baseline = float(np.median(y))
    weights = np.clip(y - baseline, 0, None)
    total = weights.sum()
    if total <= 0:
        return None
    center = float((weights * x).sum() / total)
    sigma = float(np.sqrt((weights * (x - center) ** 2).sum() / total))
    p0 = [float(y.max()) - baseline, center, max(sigma, 1e-3), baseline]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(_gaussian, x, y, p0=p0, jac=_gaussian_jacobian, maxfev=2000)
    except RuntimeError:
        return None
    return params


def baseline_process(image: np.ndarray, background: np.ndarray, roi: tuple[int, int]) -> Any:
    ymin, ymax = roi
    spectrum = np.clip(image.astype(np.int32) - background, 0, None)[ymin:ymax].sum(0)
    return _curve_fit(np.arange(spectrum.size, dtype=np.float64), spectrum.astype(np.float64))


@njit(cache=True, nogil=True)
def _touch_words(a: np.ndarray, b: np.ndarray) -> int:  # type: ignore[no-untyped-def]
    """XOR of all words of a and b (as many of each), read as four streams (both halves of each)."""
    half = a.shape[0] // 2
    front = np.uint64(0)
    back = np.uint64(0)
    for i in range(half):
        front ^= a[i] ^ b[i]
        back ^= a[half + i] ^ b[half + i]
    for i in range(2 * half, a.shape[0]):
        front ^= a[i] ^ b[i]
    return front ^ back


@njit(cache=True, nogil=True)
def _touch_words_in_order(a: np.ndarray, b: np.ndarray) -> int:  # type: ignore[no-untyped-def]
    """XOR of all words of a and b (as many of each), front to back (two streams)."""
    acc = np.uint64(0)
    for i in range(a.shape[0]):
        acc ^= a[i] ^ b[i]
    return acc


def _roi_words(array: np.ndarray, roi: tuple[int, int]) -> np.ndarray:
    """The ROI rows of a C-contiguous frame as its 64-bit words (a view, no copy).

    A one-byte-per-pixel frame gives 32-bit words: as many as a two-byte frame's 64-bit ones.
    """
    return array[roi[0] : roi[1]].reshape(-1).view(np.uint32 if array.itemsize == 1 else np.uint64)


def read_in_order(image: np.ndarray, background: np.ndarray, roi: tuple[int, int]) -> int:
    """The plain read: image and background rows front to back."""
    return int(_touch_words_in_order(_roi_words(image, roi), _roi_words(background, roi)))


def read_once(image: np.ndarray, background: np.ndarray, roi: tuple[int, int]) -> int:
    """Read the ROI rows of image and background once, both halves of both at once.

    On full frames from memory the fastest read found on the test machine: four streams
    were 8% faster than front to back (two), and eight streams no faster.
    """
    return int(_touch_words(_roi_words(image, roi), _roi_words(background, roi)))


def _timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1e3


def make_cases(n_frames: int, sizes=SIZES) -> list[Case]:  # type: ignore[no-untyped-def]
    cases = []
    for height, width in sizes:
        camera = SimulatedCamera(SimConfig(height=height, width=width, pool=n_frames, seed=7))
        centre = (camera.band[0] + camera.band[1]) // 2
        for label, rows in ROI_ROWS.items():
            if rows is None:
                roi = (0, height)
            else:
                ymin = max(0, centre - rows // 2)
                roi = (ymin, min(height, ymin + rows))
            cases.append(Case(f"{height}x{width}_{label}", camera.images, camera.background, roi))
    return cases


def kernel_background(settings: Settings, image: np.ndarray) -> np.ndarray:
    """The background as process() reads it for this frame: compacted, or as given."""
    plan = settings.plan_for(image.shape, image.dtype)
    if plan.compact_background is not None:
        return plan.compact_background.offsets
    assert plan.background is not None
    return plan.background


def run_case(case: Case, rounds: int, baseline_every: int) -> dict[str, Any]:
    settings = Settings(roi=case.roi, background=case.background)
    ours: list[float] = []
    kernel: list[float] = []
    reference: list[float] = []
    plain_read: list[float] = []
    own_bytes: list[float] = []
    own_bytes_in_order: list[float] = []
    baseline: list[float] = []
    frames = case.images
    background, roi = case.background, case.roi
    dark = kernel_background(settings, frames[0])
    process(frames[0], settings)  # compile / load the cache outside the timing
    for read in (read_once, read_in_order):
        read(frames[0], background, roi)
        read(frames[0], dark, roi)
    for r in range(rounds):
        for k, image in enumerate(frames):
            ours.append(_timed(lambda image=image: process(image, settings)))
            kernel.append(_timed(lambda image=image: spectrum(image, settings)))
            reference.append(_timed(lambda image=image: read_once(image, background, roi)))
            plain_read.append(_timed(lambda image=image: read_in_order(image, background, roi)))
            own_bytes.append(_timed(lambda image=image: read_once(image, dark, roi)))
            own_bytes_in_order.append(_timed(lambda image=image: read_in_order(image, dark, roi)))
            if (r * len(frames) + k) % baseline_every == 0:
                naive = _timed(lambda image=image: baseline_process(image, background, roi))
                baseline.append(naive)
    ours_median = median(ours)
    # The reference is the faster of the two ways of reading the bytes: both halves at once
    # wins on full frames from memory, front to back on ROIs partly still in cache.
    reference_ms = min(median(reference), median(plain_read))
    own_bytes_ms = min(median(own_bytes), median(own_bytes_in_order))
    return {
        "case": case.name,
        "rows": case.roi[1] - case.roi[0],
        "ours_ms_median": ours_median,
        "ours_ms_p99": percentile(ours, 99),
        "baseline_ms_median": median(baseline),
        "reference_ms_median": reference_ms,
        "speedup": median(baseline) / ours_median,
        "bandwidth_fraction": reference_ms / ours_median,
        "p99_over_median": percentile(ours, 99) / ours_median,
        "read_in_halves_ms_median": median(reference),
        "read_in_order_ms_median": median(plain_read),
        # The same, for the bytes process() reads (the compact background, see the docstring).
        "background_bytes_per_pixel": dark.itemsize,
        "read_own_bytes_ms_median": own_bytes_ms,
        "kernel_bytes_fraction": own_bytes_ms / ours_median,
        # Where the time goes: the spectrum kernel alone against the same memory reference.
        "kernel_ms_median": median(kernel),
        "kernel_bandwidth_fraction": reference_ms / median(kernel),
        "n_ours": len(ours),
        "n_baseline": len(baseline),
    }


def run_fit_case(n_spectra: int, repeats: int) -> dict[str, Any]:
    """The fit alone, ours vs curve_fit, on 2560-point realistic spectra (with noise)."""
    camera = SimulatedCamera(SimConfig(height=64, width=2560, pool=n_spectra, seed=11))
    x = np.arange(2560, dtype=np.float64)
    spectra = [
        np.clip(image.astype(np.int64) - camera.background, 0, None).sum(0).astype(np.float64)
        for image in camera.images
    ]
    fit_spectrum(x, spectra[0])
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(repeats):
        for y in spectra:
            ours.append(_timed(lambda y=y: fit_spectrum(x, y)))
            theirs.append(_timed(lambda y=y: _curve_fit(x, y)))
    return {
        "case": "fit_2560",
        "ours_ms_median": median(ours),
        "ours_ms_p99": percentile(ours, 99),
        "baseline_ms_median": median(theirs),
        "speedup": median(theirs) / median(ours),
        "n_ours": len(ours),
        "n_baseline": len(theirs),
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per case and line.")
@click.option("--frames", default=16, show_default=True, help="Distinct frames per size.")
@click.option("--rounds", default=6, show_default=True, help="Passes over the frames.")
@click.option(
    "--baseline-every",
    default=4,
    show_default=True,
    help="Time the (slow) baseline on every n-th frame.",
)
@click.option(
    "--size",
    "sizes",
    multiple=True,
    help="HEIGHTxWIDTH frames (repeatable); default 2016x2560 and 2160x2560.",
)
def core(as_json: bool, frames: int, rounds: int, baseline_every: int, sizes: tuple[str]) -> None:
    """Processing core: process() vs numpy + curve_fit, and vs the memory-bandwidth bound."""
    if frames < 1 or rounds < 1 or baseline_every < 1:
        raise click.BadParameter("--frames, --rounds and --baseline-every must be >= 1")
    try:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in sizes) or SIZES
    except ValueError:
        raise click.BadParameter("--size takes HEIGHTxWIDTH, e.g. 2016x2560") from None
    rows = [run_case(case, rounds, baseline_every) for case in make_cases(frames, shapes)]
    rows.append(run_fit_case(frames, rounds))
    emit(rows, as_json, title="bench core (times in ms; ratios measured in this run)")
