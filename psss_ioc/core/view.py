"""The operator's view of a frame: the row profile and the binned image (background removed),
and the ROI that the band seen in the profile suggests.

`frame_view` makes one compiled pass (nogil, cached on disk like the processing kernels) over
the whole frame. The signal of a pixel is ``max(image - background, 0)``, or ``max(image, 0)``
without a background, with the background paired with the image dtype as the processing pairs
it (`processing._kernel_background`). From it:

- ``profile`` (float64, one value per image row): the row's sum over all columns;
- ``image`` (int32, ``(height // image_bin, width // image_bin)``): the sum over each
  ``image_bin`` x ``image_bin`` block. The rows and columns past the last whole block are
  cropped (at most ``image_bin - 1`` of each, at the bottom and the right); they still count in
  the profile. A bin larger than a side gives an empty (size 0) axis, not an error. A block
  sum above the int32 range is clipped to 2**31 - 1 (the signal is never negative).

Exactness: for integer images of up to 32 bits the sums are exact integers (uint32 where they
cannot overflow it, as on the camera's uint16 frames, else int64), i.e. equal to numpy's int64
reference. Float images, and 64-bit integer images (whose sums can overflow any integer type),
are summed in float64: exact while the values are whole numbers and the sums stay below 2**53.
The binned image of such images is the float64 block sum rounded to the nearest integer (half
to even, as ``np.rint``), clipped to int32; a block with a NaN pixel is 0 in the binned image,
and NaN in the profile of its rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from psss_ioc.core.processing import _kernel_background, _kernel_image

__all__ = [
    "BAND_FRACTION",
    "MARGIN_FRACTION",
    "MIN_MARGIN_ROWS",
    "MIN_PEAK_OVER_NOISE",
    "Suggestion",
    "View",
    "frame_view",
    "suggest_roi",
    "warm_up",
]

INT32_MAX = int(np.iinfo(np.int32).max)


class View(NamedTuple):
    profile: np.ndarray  # float64, one value per image row: sum over columns of max(image - bg, 0)
    image: np.ndarray  # int32 (height // bin, width // bin): bin x bin blocks summed (cropped)
    image_bin: int


def frame_view(image: np.ndarray, background: np.ndarray | None, image_bin: int) -> View:
    """The row profile and the `image_bin` x `image_bin` binned image of one frame's signal
    (see the module's docstring). ValueError for an image that is not 2-D numeric, a
    background of another shape or a bin below 1."""
    if isinstance(image_bin, bool) or not isinstance(image_bin, int | np.integer) or image_bin < 1:
        raise ValueError(f"image bin must be a whole number >= 1, not {image_bin!r}")
    b = int(image_bin)
    image = _kernel_image(image)  # native byte order, no float16; FrameMismatchError else
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    height, width = image.shape
    hb, wb = height // b, width // b
    profile = np.empty(height, dtype=np.float64)
    if background is not None:
        background = _kernel_image(np.asarray(background))
        if background.shape != image.shape:
            raise ValueError(f"background shape {background.shape} differs from image shape "
                             f"{image.shape}")
        background = _kernel_background(background, image.dtype)
    acc = _accumulator(image.dtype, None if background is None else background.dtype,
                       width, min(b, height))
    colacc = np.empty(width, dtype=acc)
    binned = np.empty((hb, wb), dtype=np.int32)
    if acc == np.float64:
        _view_float(image, background, b, colacc, binned, profile)
    elif background is None:
        _view_plain(image, b, colacc, binned, profile)
    else:
        # The difference in the narrowest type it fits: uint16 for the camera's frames (a
        # saturating 16-bit subtract that LLVM vectorises), else int64.
        narrow = image.dtype == background.dtype and image.dtype.kind == "u"
        signal = np.empty(0, dtype=image.dtype if narrow else np.int64)
        _view_minus_background(image, background, b, signal, colacc, binned, profile)
    return View(profile, binned, b)


def _accumulator(image_dtype: np.dtype, background_dtype: np.dtype | None, width: int,
                 rows: int) -> type:
    """uint32 where no sum can overflow it (a row's `width` pixels, a column's `rows`), int64
    for other integers of up to 32 bits, float64 for floats and 64-bit integers."""
    dtypes = [image_dtype] if background_dtype is None else [image_dtype, background_dtype]
    if any(d.kind == "f" or d.itemsize == 8 for d in dtypes):
        return np.float64
    top = int(np.iinfo(image_dtype).max)
    if background_dtype is not None:
        top -= min(int(np.iinfo(background_dtype).min), 0)
    elif image_dtype.kind == "i":
        return np.int64  # the uint32 cast would come before the clip at 0: keep it simple
    return np.uint32 if top * max(width, rows, 1) < 2**32 else np.int64


# The kernels: per row, the signal is added to a column accumulator (`colacc`, in L1) and to
# the row's total in one vectorised loop; every `b` rows the accumulator's blocks of `b`
# columns are summed into a row of the binned image and it restarts. The rows past the last
# whole block go into the profile only.


@njit(cache=True, nogil=True)
def _flush(colacc, b, r, binned):  # type: ignore[no-untyped-def]
    """After row r: when a whole band of b rows is in colacc, sum its blocks (int64 or
    float64, as colacc) into the binned row, in int32 (`_to_int32`), and restart colacc."""
    if (r + 1) % b == 0 and r // b < binned.shape[0]:
        out = binned[r // b]
        z = np.int64(0)  # z + v: v widened to int64, or float64 for a float64 colacc
        if b == 8:  # the default bin, unrolled: a quarter of the time of the loop below
            for j in range(out.shape[0]):
                c = colacc[8 * j : 8 * j + 8]
                out[j] = _to_int32(((z + c[0]) + (z + c[1])) + ((z + c[2]) + (z + c[3]))
                                   + (((z + c[4]) + (z + c[5])) + ((z + c[6]) + (z + c[7]))))
        else:
            for j in range(out.shape[0]):
                t = z + colacc.dtype.type(0)
                for k in range(j * b, j * b + b):
                    t += colacc[k]
                out[j] = _to_int32(t)
        colacc[:] = 0


@njit(cache=True, nogil=True)
def _to_int32(t):  # type: ignore[no-untyped-def]
    """A block sum (never negative) in int32: clipped to its top; a float rounded half to
    even, NaN as 0."""
    if t != t:
        return np.int32(0)
    if t >= INT32_MAX:
        return np.int32(INT32_MAX)
    return np.int32(np.rint(t))


@njit(cache=True, nogil=True)
def _view_plain(image, b, colacc, binned, profile):  # type: ignore[no-untyped-def]
    """Integer images without a background: signal max(p, 0), summed in colacc's dtype."""
    height, width = image.shape
    acc = colacc.dtype.type
    zero = image.dtype.type(0)
    colacc[:] = 0
    for r in range(height):
        row = image[r]
        total = acc(0)
        for c in range(width):
            s = acc(max(row[c], zero))
            colacc[c] += s
            total += s
        profile[r] = total
        _flush(colacc, b, r, binned)


@njit(cache=True, nogil=True)
def _view_minus_background(image, background, b, signal, colacc, binned, profile):  # type: ignore[no-untyped-def]
    """Integer images with an integer background: signal max(p, q) - q, computed in
    signal's dtype (exact: it is never negative and fits), summed in colacc's dtype."""
    height, width = image.shape
    acc = colacc.dtype.type
    narrow = signal.dtype.type
    colacc[:] = 0
    for r in range(height):
        row, dark = image[r], background[r]
        total = acc(0)
        for c in range(width):
            p, q = row[c], dark[c]
            s = acc(narrow(max(p, q) - q))
            colacc[c] += s
            total += s
        profile[r] = total
        _flush(colacc, b, r, binned)


@njit(cache=True, nogil=True)
def _view_float(image, background, b, colacc, binned, profile):  # type: ignore[no-untyped-def]
    """Floats and 64-bit integers, with or without a background (None), in float64; a NaN
    pixel propagates into its row's profile and its block."""
    height, width = image.shape
    colacc[:] = 0.0
    for r in range(height):
        row = image[r]
        total = 0.0
        if background is None:
            for c in range(width):
                d = np.float64(row[c])
                s = d if not d <= 0.0 else 0.0
                colacc[c] += s
                total += s
        else:
            dark = background[r]
            for c in range(width):
                d = np.float64(row[c]) - np.float64(dark[c])
                s = d if not d <= 0.0 else 0.0
                colacc[c] += s
                total += s
        profile[r] = total
        _flush(colacc, b, r, binned)


# ROI suggestion: the band is where the profile exceeds its median by more than BAND_FRACTION
# of (peak - median), the run of rows around the peak; the ROI is the band widened on each
# side by MARGIN_FRACTION of its height, at least MIN_MARGIN_ROWS. There is no band when the
# peak stands less than MIN_PEAK_OVER_NOISE times the row-to-row noise above the median.
BAND_FRACTION = 0.2
MARGIN_FRACTION = 0.5
MIN_MARGIN_ROWS = 4
MIN_PEAK_OVER_NOISE = 5.0


class Suggestion(NamedTuple):
    rows: tuple[int, int]  # the ROI [ymin, ymax), within [0, height)
    band: tuple[int, int]  # the band found [first, end)
    text: str  # what was chosen and why, for MESSAGE


def _robust_noise(profile: np.ndarray) -> float:
    """The profile's noise, robustly: the median absolute row-to-row difference scaled to a
    Gaussian's sigma (1.4826 / sqrt 2); a smooth band barely moves it."""
    if profile.shape[0] < 2:
        return 0.0
    return float(1.4826 / math.sqrt(2.0) * np.median(np.abs(np.diff(profile))))


def suggest_roi(profile: np.ndarray, *, fraction: float = BAND_FRACTION,
                margin_fraction: float = MARGIN_FRACTION, min_margin: int = MIN_MARGIN_ROWS,
                min_peak_over_noise: float = MIN_PEAK_OVER_NOISE) -> Suggestion:
    """The ROI around the band of `profile` (one value per image row, e.g. the mean of the
    last views' profiles). ValueError, saying why and what to check, when there is no band."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"band fraction must be between 0 and 1, not {fraction}")
    if not (margin_fraction >= 0.0 and min_margin >= 0):
        raise ValueError("the margin must not be negative")
    y = np.asarray(profile, dtype=np.float64)
    if y.ndim != 1 or y.shape[0] == 0:
        raise ValueError("no row profile yet: start processing and wait for a frame "
                         "(the view must be on, IMAGE_RATE above 0)")
    if not np.isfinite(y).all():
        raise ValueError("the row profile has NaN or infinite values: check the camera's "
                         "frames and the background")
    height = y.shape[0]
    median = float(np.median(y))
    peak_row = int(np.argmax(y))
    peak = float(y[peak_row])
    if not peak > median:
        raise ValueError("the row profile is flat: no band to put the ROI around (is the "
                         "beam on, and the background right?)")
    noise = _robust_noise(y)
    if peak - median < min_peak_over_noise * noise:
        raise ValueError(
            f"no band stands out of the noise: the peak (row {peak_row}) is "
            f"{(peak - median) / noise:.1f} times the row-to-row noise above the median, "
            f"less than {min_peak_over_noise:g} (is the beam on, and the background right?)")
    threshold = median + fraction * (peak - median)
    above = y > threshold
    first = peak_row
    while first > 0 and above[first - 1]:
        first -= 1
    end = peak_row + 1
    while end < height and above[end]:
        end += 1
    margin = max(min_margin, math.ceil(margin_fraction * (end - first)))
    ymin, ymax = max(0, first - margin), min(height, end + margin)
    clipped = " (clipped to the image)" if (ymin, ymax) != (first - margin, end + margin) else ""
    text = (f"ROI rows [{ymin}, {ymax}): band rows [{first}, {end}) above "
            f"{fraction * 100:g} % of the peak over the median, widened by {margin} rows"
            f"{clipped}")
    return Suggestion((ymin, ymax), (first, end), text)


def warm_up() -> None:
    """Load (or, the first time, compile and cache) the view's kernels for the camera's uint16
    frames, with and without a dark frame, at the default bin and another: call it at IOC
    start (after `processing.warm_up`) so that the first view does not compile them."""
    image = np.arange(8 * 64, dtype=np.uint16).reshape(8, 64)
    dark = np.full(image.shape, 10, dtype=np.uint16)
    for background in (None, dark):
        for image_bin in (8, 3):
            frame_view(image, background, image_bin)
