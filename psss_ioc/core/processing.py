"""The spectrum of one camera frame: background subtraction, row sum over the ROI, Gaussian fit.

Pure functions on arrays: no I/O, no EPICS, no ZeroMQ. ``Settings`` is immutable and validated
when built; ``process(image, settings)`` makes one pass over the ROI rows only, with no
full-frame temporaries, in a compiled kernel that releases the GIL.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from psss_ioc.core.background import validate as validate_background
from psss_ioc.core.fit import (
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_MIN_SNR,
    FWHM_PER_SIGMA,
    FitResult,
    FitStatus,
    analyse_on_axis,
    fit_axis,
    fit_spectrum,
    result_of,
)

__all__ = [
    "FWHM_PER_SIGMA",
    "AveragedResult",
    "FitStatus",
    "FrameMismatchError",
    "Mismatch",
    "Result",
    "RunningAverage",
    "Settings",
    "process",
    "spectrum",
    "warm_up",
]


class Mismatch(StrEnum):
    """Why settings do not fit a frame: the kinds of refusal of one settings-versus-frame
    check (`Settings.mismatches`). The first three name settings the operator chose (and
    `fields` the `Settings` fields each covers); IMAGE is a frame nothing can be made of."""

    ROI = "roi"
    BACKGROUND = "background_shape"
    AXIS = "axis_length"
    IMAGE = "image"

    @property
    def fields(self) -> tuple[str, ...]:
        return _MISMATCH_FIELDS[self]


_MISMATCH_FIELDS = {Mismatch.ROI: ("roi",), Mismatch.BACKGROUND: ("background", "background_name"),
                    Mismatch.AXIS: ("axis", "axis_poly"), Mismatch.IMAGE: ()}
SETTING_MISMATCHES = (Mismatch.ROI, Mismatch.BACKGROUND, Mismatch.AXIS)


class FrameMismatchError(ValueError):
    """The settings do not fit this frame; ``kind`` is a `Mismatch`."""

    def __init__(self, kind: Mismatch, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# The read-only copies the settings own, by id (an entry goes when its array does). A new
# Settings made from another (dataclasses.replace for a ROI put) shares them instead of
# copying and re-validating a multi-MB background on every change of an unrelated field.
_FROZEN: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def _is_frozen(array: Any) -> bool:
    return (
        isinstance(array, np.ndarray)
        and _FROZEN.get(id(array)) is array
        and not array.flags.writeable
    )


def _frozen_copy(array: np.ndarray) -> np.ndarray:
    out = np.array(array, copy=True)
    out.setflags(write=False)
    _FROZEN[id(out)] = out
    return out


class FramePlan(NamedTuple):
    """Settings resolved for one frame shape and dtype (see `Settings.plan_for`)."""

    rows: tuple[int, int]  # [ymin, ymax)
    background: np.ndarray | None  # in the dtype the kernel pairs with the image's
    axis: np.ndarray  # the energy axis, or the column index
    spectrum_dtype: np.dtype
    # The camera's case (see `_is_camera_case`): its dark frame as the uint16 kernel reads
    # it, compacted where it compacts, else as it is (see `CompactBackground`). None otherwise.
    compact_background: CompactBackground | None
    # `analyse_on_axis`'s arguments after the spectrum and curve: the prepared axis (values,
    # normalised, numbers), fit_enabled, min_snr, max_iterations.
    fit_args: tuple[Any, ...]
    # The kernels' saturation arguments for this image dtype (`_saturation_arguments`):
    # (threshold, lowest pixel value), and whether the count means anything (else it is 0).
    saturation: tuple[Any, Any]
    counts_saturation: bool


@dataclass(frozen=True)
class Settings:
    """One consistent set of processing settings; build a new one to change anything.

    - ``roi``: rows ``[ymin, ymax)`` summed into the spectrum, or None for the whole image;
      ``ymax == 0`` means "to the last row" (the EPICS convention of the limit records).
    - ``background``: dark frame subtracted as ``max(image - background, 0)``, or None.
    - ``background_name``: where the background came from (reported, not used).
    - ``axis``: energy (eV) of each column, strictly monotonic, or None for the column index.
    - ``axis_poly``: ``(c0, c1, c2)``, the energy axis ``E = c0 + c1 x + c2 x^2`` of the column
      index x = 0..width-1 (finite; not with ``axis``). A polynomial that is not strictly
      monotonic (or not finite) over a frame's width is a `Mismatch.AXIS` for that frame.
    - ``fit_enabled``: fit a Gaussian to each spectrum.
    - ``min_snr``: peak height over the robust noise below which a spectrum is "low signal".
    - ``saturation_level``: a pixel of the ROI rows whose raw value (before the background is
      subtracted) is at or above it counts as saturated (`Result.n_saturated`); >= 0. None:
      the top of the image dtype (65535 for uint16, ``iinfo.max`` for any integer type); for
      float images None counts nothing (they have no top). A level above the dtype's range
      counts nothing.
    """

    roi: tuple[int, int] | None = None
    background: np.ndarray | None = field(default=None, repr=False, compare=False)
    background_name: str = ""
    axis: np.ndarray | None = field(default=None, repr=False, compare=False)
    axis_poly: tuple[float, float, float] | None = None
    fit_enabled: bool = True
    min_snr: float = DEFAULT_MIN_SNR
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    saturation_level: int | float | None = None
    # Derived once per settings change, never per frame: background per image dtype, and
    # what process() needs per frame shape and dtype.
    _background_cache: dict[Any, np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _plans: dict[Any, FramePlan] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The last frame's (shape, dtype, plan): a frame like it skips all checks and lookups.
    _recent: list[tuple[tuple[int, ...], np.dtype, FramePlan]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.roi is not None:
            set_(self, "roi", _validated_roi(self.roi))
        if self.background is not None:
            set_(self, "background", _validated_background(self.background))
        if self.axis is not None:
            set_(self, "axis", _validated_axis(self.axis))
        if self.axis_poly is not None:
            set_(self, "axis_poly", _validated_axis_poly(self.axis_poly))
            if self.axis is not None:
                raise ValueError("energy axis: give its values or a polynomial, not both")
        if not isinstance(self.fit_enabled, bool | np.bool_):
            raise ValueError(f"fit_enabled must be true or false, not {self.fit_enabled!r}")
        set_(self, "fit_enabled", bool(self.fit_enabled))
        if not (isinstance(self.min_snr, int | float) and math.isfinite(self.min_snr)):
            raise ValueError(f"min_snr must be a finite number, not {self.min_snr!r}")
        if self.min_snr < 0:
            raise ValueError(f"min_snr must not be negative, got {self.min_snr}")
        if not isinstance(self.max_iterations, int) or not 1 <= self.max_iterations <= 10_000:
            raise ValueError(f"max_iterations must be 1..10000, not {self.max_iterations!r}")
        if self.saturation_level is not None:
            set_(self, "saturation_level", _validated_saturation_level(self.saturation_level))

    def describe(self) -> dict[str, Any]:
        """The legacy ``processing_parameters`` form: background name and ROI."""
        roi = list(self.roi) if self.roi is not None else None
        return {"background": self.background_name, "roi": roi}

    def mismatches(self, shape: tuple[int, ...]) -> dict[Mismatch, str]:
        """Every way these settings do not fit a frame of `shape`, with the reason; empty
        when they fit. The one settings-versus-frame check: the pipeline resolves the
        settings for a frame size with it (`resolve_for_frame`), the IOC asks it whether a
        setting written fits the frames, and `plan_for` refuses with it."""
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            return {Mismatch.IMAGE: f"image must be 2-D and non-empty, got {shape}"}
        height, width = shape
        found: dict[Mismatch, str] = {}
        ymin, ymax = roi_rows(self.roi, height)
        if ymax > height or ymin >= ymax:  # (ymin, 0) with ymin >= height: no row left
            rows = f"[{ymin}, {ymax})" if self.roi is None or self.roi[1] else f"from {ymin}"
            found[Mismatch.ROI] = f"ROI rows {rows} exceed the image height {height}"
        if self.background is not None and self.background.shape != shape:
            found[Mismatch.BACKGROUND] = (f"background shape {self.background.shape} differs "
                                          f"from image shape {shape}")
        if reason := self._axis_of(width)[1]:
            found[Mismatch.AXIS] = reason
        return found

    def check_frame(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The ROI rows for a frame of `shape`; FrameMismatchError (the first of
        `mismatches`) if these settings do not fit it."""
        for kind, reason in self.mismatches(shape).items():
            raise FrameMismatchError(kind, reason)
        return roi_rows(self.roi, shape[0])

    def plan_for(self, shape: tuple[int, ...], image_dtype: np.dtype) -> FramePlan:
        """What process() needs for frames of this shape and dtype, checked once (cached).

        Raises FrameMismatchError as `check_frame` does.
        """
        plan = self._plans.get((shape, image_dtype))
        if plan is None:
            ymin, ymax = self.check_frame(shape)
            background = self.background_for(image_dtype)
            bg_dtype = background.dtype if background is not None else None
            out_dtype = np.dtype(spectrum_dtype(image_dtype, bg_dtype, ymax - ymin))
            axis = self.axis_for(shape[1])
            compact = None
            if background is not None and _is_camera_case(image_dtype, bg_dtype, out_dtype):
                compact = _compacted(background)
            plan = FramePlan(
                (ymin, ymax),
                background,
                axis,
                out_dtype,
                compact,
                (*fit_axis(axis), self.fit_enabled, float(self.min_snr), self.max_iterations),
                *_saturation_arguments(image_dtype, self.saturation_level),
            )
            _remember(self._plans, (shape, image_dtype), plan)
        return plan

    def axis_for(self, width: int) -> np.ndarray:
        """The axis of frames `width` columns wide (read-only, cached): ``axis``, the
        polynomial's values over the columns, or the column index. FrameMismatchError
        (`Mismatch.AXIS`) when it does not fit that width."""
        axis, reason = self._axis_of(width)
        if axis is None:
            raise FrameMismatchError(Mismatch.AXIS, reason)
        return axis

    def _axis_of(self, width: int) -> tuple[np.ndarray | None, str]:
        """(`axis_for`'s axis, "") or (None, why there is none for this width)."""
        if self.axis_poly is not None:
            return _polynomial_axis(self.axis_poly, width)
        if self.axis is None:
            return _column_axis(width), ""
        if self.axis.shape[0] != width:
            return None, (f"energy axis has {self.axis.shape[0]} values but the image has "
                          f"{width} columns")
        return self.axis, ""

    def background_for(self, image_dtype: np.dtype) -> np.ndarray | None:
        """The background in the dtype the kernel pairs with this image dtype (cached)."""
        if self.background is None:
            return None
        cached = self._background_cache.get(image_dtype)
        if cached is None:
            cached = _kernel_background(self.background, image_dtype)
            self._background_cache[image_dtype] = cached
        return cached


def roi_rows(roi: tuple[int, int] | None, height: int) -> tuple[int, int]:
    """The rows ``[ymin, ymax)`` a ROI setting means for an image of `height` rows."""
    if roi is None:
        return 0, height
    ymin, ymax = roi
    return ymin, ymax if ymax else height


class Resolution(NamedTuple):
    """The settings a frame of some shape is processed with, and what was refused."""

    settings: Settings
    refused: dict[Mismatch, str]  # the requested value's reason, per kind


def resolve_for_frame(requested: Settings, fallback: Settings,
                      shape: tuple[int, ...]) -> Resolution | None:
    """`requested`, with each setting that does not fit frames of `shape` (ROI, background,
    axis) taken from `fallback` (the settings the last frame used), else unset (the whole
    image, no background, the column index: these fit any frame). None: the frame itself is
    unusable (`Mismatch.IMAGE`).

    The requested settings are not changed: a value refused for one image size is in force
    again by itself when the camera returns to a size it fits.
    """
    refused = requested.mismatches(shape)
    if Mismatch.IMAGE in refused:
        return None
    if not refused:
        return Resolution(requested, refused)
    fields = [f for kind in refused for f in kind.fields]
    settings = replace(requested, **{f: getattr(fallback, f) for f in fields})
    still = settings.mismatches(shape)
    if still:
        default = Settings()
        settings = replace(settings, **{f: getattr(default, f) for kind in still
                                        for f in kind.fields})
    return Resolution(settings, refused)


def _validated_roi(roi: Any) -> tuple[int, int]:
    if isinstance(roi, str | bytes):
        raise ValueError(f"ROI must be a pair [ymin, ymax], not {roi!r}")
    try:
        ymin, ymax = roi
    except (TypeError, ValueError):
        raise ValueError(f"ROI must be a pair [ymin, ymax], not {roi!r}") from None
    for name, value in (("ymin", ymin), ("ymax", ymax)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"ROI {name} must be a whole number, not {value!r}")
    ymin, ymax = int(ymin), int(ymax)
    if ymin < 0:
        raise ValueError(f"ROI ymin must not be negative, got {ymin}")
    if ymax < 0:
        raise ValueError(f"ROI ymax must not be negative, got {ymax}")
    if ymax and ymin >= ymax:
        raise ValueError(f"ROI ymin ({ymin}) must be less than ymax ({ymax})")
    return ymin, ymax


def _validated_background(background: Any) -> np.ndarray:
    if _is_frozen(background) and background.ndim == 2:
        return background  # validated when it was frozen, and nobody can change it
    array = validate_background(background)  # BackgroundError (a ValueError) saying why not
    if array.dtype == np.float16:  # numba has no float16
        array = array.astype(np.float32)
    return _frozen_copy(array.astype(array.dtype.newbyteorder("="), copy=False))


def _validated_axis(axis: Any) -> np.ndarray:
    if _is_frozen(axis) and axis.ndim == 1 and axis.dtype == np.float64:
        return axis  # validated when it was frozen, and nobody can change it
    try:
        array = np.asarray(axis, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("energy axis must be numbers") from None
    if array.ndim != 1:
        raise ValueError(f"energy axis must be 1-D, got {array.ndim} dimensions")
    if array.size < 2:
        raise ValueError("energy axis needs at least 2 values")
    if not np.isfinite(array).all():
        raise ValueError("energy axis has NaN or infinite values")
    steps = np.diff(array)
    if not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError("energy axis must be strictly increasing or strictly decreasing")
    return _frozen_copy(array)


def _validated_saturation_level(level: Any) -> int | float:
    if isinstance(level, bool | np.bool_) or not isinstance(level, int | float | np.number):
        raise ValueError(f"saturation level must be a number, not {level!r}")
    if isinstance(level, complex | np.complexfloating) or not math.isfinite(level):
        raise ValueError(f"saturation level must be a finite number, not {level}")
    if level < 0:
        raise ValueError(f"saturation level must not be negative, got {level}")
    return int(level) if isinstance(level, int | np.integer) else float(level)


def _saturation_arguments(image_dtype: np.dtype,
                          level: int | float | None) -> tuple[tuple[Any, Any], bool]:
    """The kernels' (threshold, lowest pixel value) for images of `image_dtype`, and whether
    their count means anything (False: `Result.n_saturated` is 0). A pixel p counts when
    p >= threshold: for integer images ceil(level) in the image dtype (the same pixels as
    p >= level), for floats the level in float64 (NaN never counts)."""
    if image_dtype.kind == "f":
        low = image_dtype.type(-np.inf)
        if level is None:  # a float image has no top: nothing counts
            return (np.float64(np.inf), low), False
        return (np.float64(level), low), True
    info = np.iinfo(image_dtype)
    threshold = info.max if level is None else math.ceil(level)
    if threshold > info.max:  # no pixel of this dtype reaches it
        return (image_dtype.type(info.max), image_dtype.type(info.min)), False
    return (image_dtype.type(max(threshold, info.min)), image_dtype.type(info.min)), True


def _validated_axis_poly(coefficients: Any) -> tuple[float, float, float]:
    if isinstance(coefficients, str | bytes):
        raise ValueError(f"energy axis polynomial must be (c0, c1, c2), not {coefficients!r}")
    try:
        values = tuple(coefficients)
    except TypeError:
        raise ValueError(f"energy axis polynomial must be (c0, c1, c2), not {coefficients!r}"
                         ) from None
    if len(values) != 3:
        raise ValueError(f"energy axis polynomial needs 3 coefficients (c0, c1, c2), got "
                         f"{len(values)}")
    for name, value in zip(("c0", "c1", "c2"), values, strict=True):
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
            raise ValueError(f"energy axis polynomial {name} must be a number, not {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"energy axis polynomial {name} must be finite, not {value}")
    c0, c1, c2 = (float(v) for v in values)
    if c1 == 0.0 and c2 == 0.0:
        raise ValueError(f"energy axis polynomial {polynomial_text((c0, c1, c2))} is "
                         "constant: c1 or c2 must not be 0")
    return c0, c1, c2


def polynomial_text(coefficients: tuple[float, float, float]) -> str:
    """E.g. "E = 9000 + 0.5 x - 0.0001 x^2"."""
    c0, c1, c2 = coefficients
    return (f"E = {c0:g} {'-' if c1 < 0 else '+'} {abs(c1):g} x "
            f"{'-' if c2 < 0 else '+'} {abs(c2):g} x^2")


# The axes of the polynomials in use, by (coefficients, width): (axis, "") or (None, why not).
# Settings made from one another share them (so does a RunningAverage, which restarts on a new
# axis object); the last few only (`_remember`).
_POLY_AXES: dict[tuple[tuple[float, float, float], int], tuple[np.ndarray | None, str]] = {}


def _polynomial_axis(coefficients: tuple[float, float, float],
                     width: int) -> tuple[np.ndarray | None, str]:
    """E = c0 + c1 x + c2 x^2 over the columns x = 0..width-1, and "" (cached); or None and
    the reason it is no axis (not finite, or not strictly monotonic over that width)."""
    key = (coefficients, width)
    cached = _POLY_AXES.get(key)
    if cached is None:
        cached = _evaluate_axis_poly(coefficients, width)
        _remember(_POLY_AXES, key, cached)
    return cached


def _evaluate_axis_poly(coefficients: tuple[float, float, float],
                        width: int) -> tuple[np.ndarray | None, str]:
    c0, c1, c2 = coefficients
    x = np.arange(width, dtype=np.float64)
    with np.errstate(all="ignore"):
        axis = c0 + c1 * x + c2 * (x * x)
    name = f"energy axis {polynomial_text(coefficients)}"
    finite = np.isfinite(axis)
    if not finite.all():
        return None, (f"{name} is not finite from column {int(np.argmin(finite))} of {width}: "
                      "no axis")
    steps = np.diff(axis)
    if steps.size:
        direction = np.sign(steps[0])
        wrong = np.flatnonzero(np.sign(steps) != direction) if direction else np.zeros(1, int)
        if wrong.size:
            column = int(wrong[0])
            if direction and steps[column]:
                return None, f"{name} turns at column {column} of {width}: not monotonic"
            return None, (f"{name} has equal values at columns {column} and {column + 1} of "
                          f"{width}: not strictly monotonic")
    axis.setflags(write=False)
    return axis, ""


def _kernel_background(background: np.ndarray, image_dtype: np.dtype) -> np.ndarray:
    """Pair the background with the image dtype so the kernel's arithmetic is exact.

    numba mixes uint64 with signed integers into float64, so a uint64 image gets a uint64
    background (negative dark values clipped to 0). Everything else is used as loaded.
    """
    if background.dtype.kind == "f" or image_dtype.kind == "f":
        return background  # float arithmetic anyway
    if image_dtype == np.uint64 and background.dtype != np.uint64:
        return np.clip(background, 0, None).astype(np.uint64)
    if image_dtype.kind == "i" and background.dtype == np.uint64:
        return np.clip(background, 0, np.iinfo(np.int64).max).astype(np.int64)
    return background


# Outlying dark pixels beyond this share of the frame: the background is used as it is
# (each is corrected apart, out of the vector loop: past this share the corrections cost
# what the byte saved per pixel gains; docs/performance.md, "Kernels").
MAX_OUTLIER_FRACTION = 1 / 512


class CompactBackground(NamedTuple):
    """A uint16 dark frame as one base level plus one byte per pixel, exactly.

    A dark frame spans a few tens of counts around its pedestal, so one byte per pixel holds
    it: the kernel then reads three bytes per pixel instead of four, and on the camera's
    frames its time is the time to read them. Pixels outside the 256-count window (hot or
    dead ones) are listed apart with their true values, row by row, and corrected while their
    row is still in cache.

    A dark frame that does not compact is held in the same form, as it is: base 0, its
    uint16 values as the offsets, no outliers. One kernel then reads both (`_compacted`).
    """

    base: int  # the window is [base, base + 255]
    offsets: np.ndarray  # uint8, background - base clipped to the window, C order
    row_starts: np.ndarray  # int64, height + 1: row r's outliers are [row_starts[r], [r + 1])
    columns: np.ndarray  # int64, the outliers' columns, row by row
    values: np.ndarray  # uint16, the outliers' true background


# The compact forms of the frozen backgrounds in use, by id (an entry goes when its array
# does): Settings made from one another share their background, and a change of ROI or fit
# options must not compact a full dark frame again (a histogram and a pass over all pixels,
# in the worker thread).
_COMPACTED: dict[int, CompactBackground | None] = {}


def _compacted(background: np.ndarray) -> CompactBackground:
    """The camera's uint16 dark frame as its kernel reads it: `compact_background` of it
    (once per frozen array), or where it does not compact, the frame as it is."""
    if not _is_frozen(background):
        compact = compact_background(background)
    else:
        key = id(background)
        if key not in _COMPACTED:
            _COMPACTED[key] = compact_background(background)
            weakref.finalize(background, _COMPACTED.pop, key, None)
        compact = _COMPACTED[key]
    # The as-is form is made anew, never kept in _COMPACTED: it holds the background itself,
    # which would then never be collected.
    return compact if compact is not None else _as_is(background)


def _as_is(background: np.ndarray) -> CompactBackground:
    """A uint16 dark frame in the compact form without compacting it: base 0, no outliers."""
    no_outliers = np.zeros(background.shape[0] + 1, dtype=np.int64)
    return CompactBackground(
        0, background, no_outliers, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint16)
    )


def compact_background(background: np.ndarray) -> CompactBackground | None:
    """`background` (uint16, 2-D) as a `CompactBackground`, or None when more than
    MAX_OUTLIER_FRACTION of its pixels lie outside the best 256-count window."""
    if background.dtype != np.uint16 or background.ndim != 2 or background.size == 0:
        return None
    counts = np.bincount(background.ravel(), minlength=1 << 16)
    cumulative = np.concatenate(([0], np.cumsum(counts)))
    in_window = cumulative[256:] - cumulative[:-256]  # [b]: pixels in [b, b + 255]
    base = int(np.argmax(in_window))
    if background.size - int(in_window[base]) > background.size * MAX_OUTLIER_FRACTION:
        return None
    top = base + 255
    offsets = np.ascontiguousarray((np.clip(background, base, top) - base).astype(np.uint8))
    rows, columns = np.nonzero((background < base) | (background > top))  # row by row
    row_starts = np.searchsorted(rows, np.arange(background.shape[0] + 1)).astype(np.int64)
    compact = CompactBackground(
        base, offsets, row_starts, columns.astype(np.int64), background[rows, columns]
    )
    for array in compact[1:]:
        array.setflags(write=False)  # shared by every Settings on this background
    return compact


def spectrum_dtype(image_dtype: np.dtype, background_dtype: np.dtype | None, rows: int) -> Any:
    """The accumulator: exact for integers, float64 when anything is a float."""
    if image_dtype.kind == "f" or (background_dtype is not None and background_dtype.kind == "f"):
        return np.float64
    if image_dtype == np.uint64:
        return np.uint64
    unsigned_sum = image_dtype.kind == "u" or background_dtype is not None
    if unsigned_sum and image_dtype.itemsize <= 2:
        max_pixel = 2 ** (8 * image_dtype.itemsize) - 1
        if image_dtype.kind == "i":
            max_pixel = 2 ** (8 * image_dtype.itemsize)  # e.g. 32767 - (-32768)
        if background_dtype is not None and background_dtype.kind == "i":
            max_pixel += 2 ** (8 * background_dtype.itemsize - 1)
        if max_pixel * rows < 2**32:
            return np.uint32
    if unsigned_sum and image_dtype.kind == "u":
        return np.uint64
    return np.int64


# The kernels below are written so that LLVM vectorises them: `max(p, q) - q` is a clipped
# difference that never leaves the unsigned range, and for uint16 the explicit narrowing lets
# LLVM use a saturating 16-bit subtract before widening (numba would otherwise widen both
# operands to int64 first). `out` stays in L1.
#
# The integer kernels walk several parts of the ROI at once (with a background its two
# halves, rows k and k + half; without, its four quarters): one core reads memory faster
# with more streams in flight, and each pass adds several rows to `out` for one load and
# store of it. Integer sums are exact, so the order does not matter. A variant is kept only
# where it gains measurably on the camera's frames (docs/performance.md, "Kernels").


@njit(cache=True, nogil=True)
def _sum_rows_minus_compact_background(  # type: ignore[no-untyped-def]
    image, base, offsets, row_starts, columns, values, ymin, ymax, out, saturation
):
    """out[c] += max(image[r, c] - background[r, c], 0) for r in [ymin, ymax): the camera's
    uint16 frame and dark frame, the latter as a `CompactBackground` (offsets uint8, or the
    uint16 frame itself with base 0 and no outliers), into a uint32 `out`. Returns the
    number of pixels >= `saturation` (uint16) in those rows (see `_count_saturated`)."""
    # max(p - (base + o), 0) as two saturating 16-bit subtractions, of base then of o: the
    # same value, without widening base + o past 16 bits.
    width = image.shape[1]
    half = (ymax - ymin) // 2
    level = np.uint16(base)
    saturated = 0
    for k in range(ymin, ymin + half):
        row, dark = image[k], offsets[k]
        row2, dark2 = image[k + half], offsets[k + half]
        top = np.uint16(0)
        for c in range(width):
            raw, raw2 = row[c], row2[c]
            p = np.uint16(max(raw, level) - level)
            p2 = np.uint16(max(raw2, level) - level)
            d, d2 = np.uint16(dark[c]), np.uint16(dark2[c])
            first = np.uint32(np.uint16(max(p, d) - d))
            second = np.uint32(np.uint16(max(p2, d2) - d2))
            out[c] += first + second
            top = max(top, max(raw, raw2))
        if top >= saturation:
            saturated += _count_saturated(row, saturation) + _count_saturated(row2, saturation)
        _correct_outliers(row, k, base, offsets, row_starts, columns, values, out)
        _correct_outliers(row2, k + half, base, offsets, row_starts, columns, values, out)
    for r in range(ymin + 2 * half, ymax):  # the odd row out
        row, dark = image[r], offsets[r]
        for c in range(width):
            p = np.uint16(max(row[c], level) - level)
            d = np.uint16(dark[c])
            out[c] += np.uint16(max(p, d) - d)
        saturated += _count_saturated(row, saturation)
        _correct_outliers(row, r, base, offsets, row_starts, columns, values, out)
    return saturated


@njit(cache=True, nogil=True)
def _count_saturated(row, saturation):  # type: ignore[no-untyped-def]
    """The pixels of `row` >= `saturation` (NaN is not).

    Each kernel keeps the largest raw pixel of the rows it adds (one vector max per vector
    of pixels, which on the camera's frames costs next to nothing) and calls this only for
    the rows whose largest pixel reaches the level: their pixels are counted while the row is
    still in L1, so the frame is still read from memory once, and a frame without saturated
    pixels costs no count at all. The count is a 16-bit vector sum per 32768 pixels."""
    n = 0
    width = row.shape[0]
    for start in range(0, width, 32768):
        count = np.uint16(0)
        for c in range(start, min(width, start + 32768)):
            count = np.uint16(count + np.uint16(row[c] >= saturation))
        n += count
    return n


@njit(cache=True, nogil=True)
def _correct_outliers(row, r, base, offsets, row_starts, columns, values, out):  # type: ignore[no-untyped-def]
    """Swap the clipped window's share of row r's outlying dark pixels for the true one."""
    for i in range(row_starts[r], row_starts[r + 1]):
        c = columns[i]
        pixel = np.int64(row[c])
        used = max(pixel - (np.int64(offsets[r, c]) + base), 0)
        true = max(pixel - np.int64(values[i]), 0)
        out[c] = np.uint32(np.int64(out[c]) + true - used)  # the sum so far is >= 0: exact


@njit(cache=True, nogil=True)
def _sum_rows_minus_background_int(  # type: ignore[no-untyped-def]
    image, background, ymin, ymax, out, saturation, low
):
    """out[c] += max(image[r, c] - background[r, c], 0), any integer dtypes (numba widens).
    Returns the pixels >= `saturation` in those rows (`low`: the dtype's lowest value)."""
    width = image.shape[1]
    half = (ymax - ymin) // 2
    saturated = 0
    for k in range(ymin, ymin + half):
        row, dark = image[k], background[k]
        row2, dark2 = image[k + half], background[k + half]
        top = low
        for c in range(width):
            out[c] += (max(row[c], dark[c]) - dark[c]) + (max(row2[c], dark2[c]) - dark2[c])
            top = max(top, max(row[c], row2[c]))
        if top >= saturation:
            saturated += _count_saturated(row, saturation) + _count_saturated(row2, saturation)
    for r in range(ymin + 2 * half, ymax):
        row, dark = image[r], background[r]
        for c in range(width):
            out[c] += max(row[c], dark[c]) - dark[c]
        saturated += _count_saturated(row, saturation)
    return saturated


@njit(cache=True, nogil=True)
def _sum_rows_minus_background_float(  # type: ignore[no-untyped-def]
    image, background, ymin, ymax, out, saturation, low
):
    """out[c] += max(image[r, c] - background[r, c], 0) in float64; NaN propagates.
    Returns the pixels >= `saturation` in those rows (`low`: the dtype's lowest value)."""
    width = image.shape[1]
    saturated = 0
    for r in range(ymin, ymax):
        row = image[r]
        dark = background[r]
        top = low
        for c in range(width):
            p = row[c]
            d = np.float64(p) - np.float64(dark[c])
            out[c] += d if not d <= 0.0 else 0.0
            top = p if p > top else top  # a NaN pixel is never the top
        if top >= saturation:
            saturated += _count_saturated(row, saturation)
    return saturated


@njit(cache=True, nogil=True)
def _sum_rows(image, ymin, ymax, out, in_order, saturation, low):  # type: ignore[no-untyped-def]
    """out[c] += image[r, c] for r in [ymin, ymax); returns the pixels >= `saturation` in
    those rows (`low`: the dtype's lowest value).

    Integers (exact in any order): the four quarters of the ROI at once. Without a
    background the accumulator's load and store weigh as much as the image's bytes; four
    rows per pass divide them by four. ``in_order`` (floats: the order of a float sum is
    part of its result): front to back, one row per pass.
    """
    width = image.shape[1]
    quarter = 0 if in_order else (ymax - ymin) // 4
    saturated = 0
    for k in range(ymin, ymin + quarter):
        a, b = image[k], image[k + quarter]
        c_, d = image[k + 2 * quarter], image[k + 3 * quarter]
        top = low
        for c in range(width):
            out[c] += (out.dtype.type(a[c]) + out.dtype.type(b[c])) + (
                out.dtype.type(c_[c]) + out.dtype.type(d[c])
            )
            top = max(top, max(max(a[c], b[c]), max(c_[c], d[c])))  # integers only
        if top >= saturation:
            saturated += (_count_saturated(a, saturation) + _count_saturated(b, saturation)
                          + _count_saturated(c_, saturation) + _count_saturated(d, saturation))
    for r in range(ymin + 4 * quarter, ymax):  # in order: all rows; else up to three left
        row = image[r]
        top = low
        for c in range(width):
            p = row[c]
            out[c] += p
            top = p if p > top else top  # a NaN pixel is never the top
        if top >= saturation:
            saturated += _count_saturated(row, saturation)
    return saturated


def spectrum(image: np.ndarray, settings: Settings) -> np.ndarray:
    """Background-subtracted, clipped row sum over the ROI: exact for integer images."""
    image = _kernel_image(image)
    return _planned_spectrum(image, settings.plan_for(image.shape, image.dtype))[0]


def _planned_spectrum(image: np.ndarray, plan: FramePlan) -> tuple[np.ndarray, int]:
    """The spectrum by the plan's kernel, and the saturated pixels of its rows."""
    if (image.dtype.itemsize == 8 and image.dtype.kind in "iu"
            and plan.spectrum_dtype.kind in "iu"):  # (a float background: a float64 sum)
        _check_64_bit_sum(image, plan)
    out = np.zeros(image.shape[1], dtype=plan.spectrum_dtype)
    if plan.compact_background is not None:
        saturated = _sum_rows_minus_compact_background(
            image, *plan.compact_background, *plan.rows, out, plan.saturation[0])
    else:
        saturated = _add_rows(image, plan.background, *plan.rows, out, *plan.saturation)
    return out, saturated if plan.counts_saturation else 0


def _check_64_bit_sum(image: np.ndarray, plan: FramePlan) -> None:
    """64-bit integer pixels can overflow the 64-bit sum (no wider exact accumulator exists):
    refuse the frame unless its ROI's extremes prove the sum exact. Smaller integer images
    cannot overflow their accumulator (`spectrum_dtype`); the camera's are uint16."""
    ymin, ymax = plan.rows
    rows = image[ymin:ymax]
    high, low = int(rows.max()), int(rows.min())
    info = np.iinfo(plan.spectrum_dtype)
    if plan.background is not None:  # each term is max(p - q, 0), computed in the sum's dtype
        high, low = high - int(plan.background.min()), 0
        if high > info.max:
            raise FrameMismatchError(
                Mismatch.IMAGE, f"pixel minus background up to {high} overflows a 64-bit "
                "integer: the frame cannot be summed exactly")
    n = ymax - ymin
    if high * n > info.max or low * n < info.min:
        raise FrameMismatchError(
            Mismatch.IMAGE, f"{image.dtype} pixels up to {max(high, -low)} over {n} rows "
            "overflow the 64-bit sum: the frame cannot be summed exactly")


def _add_rows(
    image: np.ndarray, background: np.ndarray | None, ymin: int, ymax: int, out: np.ndarray,
    saturation: Any, low: Any,
) -> int:
    """The kernel for these dtypes: out[c] += the clipped difference of rows [ymin, ymax);
    returns their pixels >= `saturation` (`FramePlan.saturation`)."""
    if background is None:
        return _sum_rows(image, ymin, ymax, out, out.dtype.kind == "f", saturation, low)
    if out.dtype == np.float64:
        return _sum_rows_minus_background_float(image, background, ymin, ymax, out,
                                                saturation, low)
    # the camera's uint16 case has its own kernel (`FramePlan.compact_background`)
    return _sum_rows_minus_background_int(image, background, ymin, ymax, out, saturation, low)


def _is_camera_case(image_dtype: Any, background_dtype: Any, spectrum_dtype: Any) -> bool:
    """uint16 frame and background into a uint32 spectrum: the camera's, fastest kernel."""
    return bool(image_dtype == background_dtype == np.uint16 and spectrum_dtype == np.uint32)


def _kernel_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise FrameMismatchError(Mismatch.IMAGE, f"image must be a numpy array, got {type(image)}")
    if image.dtype.kind not in "uif":
        raise FrameMismatchError(Mismatch.IMAGE, f"image dtype {image.dtype} is not numeric")
    if not image.dtype.isnative:  # numba works on native byte order only
        image = image.astype(image.dtype.newbyteorder("="))
    if image.dtype == np.float16:
        image = image.astype(np.float32)
    return image


_COLUMN_AXES: dict[int, np.ndarray] = {}
# Per-shape caches keep the last few shapes only: a stream whose image size changes every frame
# (a broken or hostile camera) must not grow the IOC's memory without bound.
SHAPES_KEPT = 4


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """cache[key] = value, dropping the oldest entries beyond SHAPES_KEPT."""
    while len(cache) >= SHAPES_KEPT:
        del cache[next(iter(cache))]
    cache[key] = value


def _column_axis(width: int) -> np.ndarray:
    axis = _COLUMN_AXES.get(width)
    if axis is None:
        axis = np.arange(width, dtype=np.float64)
        axis.setflags(write=False)
        _remember(_COLUMN_AXES, width, axis)
    return axis


class Result(NamedTuple):
    """Everything computed from one frame; ``fit`` holds the fit and the moments (its values
    are NaN unless ``fit.ok``). Immutable: a named tuple, cheap to make once per frame."""

    spectrum: np.ndarray
    axis: np.ndarray
    roi: tuple[int, int]
    fit: FitResult
    # pixels of the ROI rows at or above `Settings.saturation_level` (raw values, before the
    # background), counted by the spectrum's kernel
    n_saturated: int


def process(image: np.ndarray, settings: Settings) -> Result:
    """Spectrum and fit of one frame.

    Raises FrameMismatchError (a ValueError with ``kind``) when the settings do not fit the
    frame; a bad spectrum (NaN, no signal) is not an error but a fit status.
    """
    # The steady state: a frame of the shape and dtype of the last one goes straight to its
    # plan. Every line of Python here runs from cold caches (the previous frame streamed
    # megabytes through them), so the checks and lookups below are left out for it.
    recent = settings._recent
    if recent and type(image) is np.ndarray:
        shape, dtype, plan = recent[0]
        if image.shape == shape and (image.dtype is dtype or image.dtype == dtype):
            return _process_planned(image, plan)
    image = _kernel_image(image)
    plan = settings.plan_for(image.shape, image.dtype)
    recent[:] = [(image.shape, image.dtype, plan)]
    return _process_planned(image, plan)


def _process_planned(image: np.ndarray, plan: FramePlan) -> Result:
    out, saturated = _planned_spectrum(image, plan)
    curve = np.empty(out.shape[0])
    analysis = analyse_on_axis(out.astype(np.float64, copy=False), curve, *plan.fit_args)
    return Result(out, plan.axis, plan.rows, result_of(analysis, curve), saturated)


def warm_up() -> None:
    """Load (or, the first time, compile and cache) the kernels for the camera's uint16 frames.

    numba caches compiled code on disk (``cache=True``), so only the very first start after an
    install compiles; calling this at IOC start keeps even that off the first frame.
    """
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, (8, 64), dtype=np.uint16)
    image[3:5, 30:34] += 5000
    dark = np.full(image.shape, 10, dtype=np.uint16)
    wide_dark = rng.integers(0, 5000, image.shape, dtype=np.uint16)  # does not compact
    for settings in (
        Settings(),
        Settings(background=dark, axis=np.linspace(1.0, 2.0, 64)),
        Settings(background=wide_dark),
    ):
        result = process(image, settings)
        RunningAverage(2).add(result)


class AveragedResult(NamedTuple):
    """Mean spectrum of the last ``count`` shots and its ``fit`` (immutable, as `Result`)."""

    spectrum: np.ndarray
    axis: np.ndarray
    count: int
    fit: FitResult


class RunningAverage:
    """Mean of the last N spectra (a ring buffer with an exact running sum) and its fit.

    Integer spectra are summed in int64 (exact, no drift); float spectra in float64, re-summed
    from the buffer once per lap to stop rounding drift. A change of width or axis restarts it.
    Not thread-safe: the pipeline's worker thread owns it.
    """

    def __init__(self, n: int, *, min_snr: float = DEFAULT_MIN_SNR) -> None:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= 100_000:
            raise ValueError(f"average length must be 1..100000 shots, not {n!r}")
        self.n = int(n)
        self.min_snr = min_snr
        self.reset()

    def reset(self) -> None:
        self._buffer: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._axis: np.ndarray | None = None
        self._count = 0
        self._next = 0

    def add(self, result: Result, *, fit_enabled: bool = True) -> AveragedResult:
        values = result.spectrum
        exact = values.dtype.kind in "ui"
        acc_dtype = np.int64 if exact else np.float64
        if (
            self._buffer is None
            or self._buffer.shape[1] != values.shape[0]
            or self._buffer.dtype != acc_dtype
            or self._axis is not result.axis
        ):
            self._buffer = np.zeros((self.n, values.shape[0]), dtype=acc_dtype)
            self._sum = np.zeros(values.shape[0], dtype=acc_dtype)
            self._axis = result.axis
            self._count = 0
            self._next = 0
        assert self._sum is not None
        slot = self._buffer[self._next]
        if self._count == self.n:
            self._sum -= slot
        slot[:] = values
        self._sum += slot
        self._count = min(self._count + 1, self.n)
        self._next = (self._next + 1) % self.n
        if not exact and self._next == 0:
            self._sum = self._buffer[: self._count].sum(axis=0)
        mean = self._sum / self._count
        fit = fit_spectrum(result.axis, mean, enabled=fit_enabled, min_snr=self.min_snr)
        return AveragedResult(mean, result.axis, self._count, fit)
