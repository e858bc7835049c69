"""Taking a background from the camera: the mean of the next N raw frames (numpy only).

`BackgroundAcquisition(n)` is fed raw frames one by one (`add`, which returns the progress
in %) until `done`; `result()` is then their mean:

- integer frames (uint16 from the camera, any other integer dtype too): the exact mean
  rounded to the nearest integer, a tie (a mean of exactly k + 0.5) to the even one, as
  ``np.rint`` rounds; in the frames' dtype, so the camera's uint16 frames give a uint16
  background and the compact dark-frame fast path of the processing applies to it;
- floating-point frames: the float64 mean (the frames summed in float64 in the order they
  came, divided by N).

Exact: integer frames are summed in integers, never in floating point. The accumulator is the
narrowest that cannot overflow: frames of 8 or 16 bits in 32 bits (N <= 10000 frames of
65535 sum to at most 655 350 000 < 2**32), frames of 32 bits in 64; 64-bit frames in 64 bits
too, with each frame's extremes checked first: an acquisition whose sum would overflow is
aborted (the processing refuses such frames for the same reason). The rounded mean of frames
of up to 32 bits is the float64 quotient rounded by ``np.rint`` (exact: their sum is below
2**53, see `_rounded_mean_by_rows`); of 64-bit frames it is computed in integers (divmod).

Cost on the camera's 2016 x 2560 uint16 frames (2 cores, docs/performance.md): `add` 2.4 ms
(a uint64 accumulator took 4.3 ms), `result` 6 ms.

The first frame fixes the shape and the dtype. A frame of another shape or dtype (the camera
was reconfigured), or one that is not a 2-D numeric array, aborts the acquisition:
`add` raises `AcquisitionAborted` (a ValueError) with the reason, and so does every later call
of `add` or `result`; the caller keeps the background it had.

One thread feeds an acquisition (the pipeline's worker); it holds no lock.
"""

from __future__ import annotations

import numpy as np

MIN_FRAMES = 1
MAX_FRAMES = 10000


class AcquisitionAborted(ValueError):
    """The acquisition is over without a result; the message says why."""


def _accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """The narrowest dtype that sums MAX_FRAMES frames of `dtype` exactly."""
    if dtype.kind == "f":
        return np.dtype(np.float64)
    if dtype.itemsize <= 2:  # |value| <= 65535: 10000 of them fit 32 bits
        return np.dtype(np.uint32 if dtype.kind == "u" else np.int32)
    return np.dtype(np.uint64 if dtype.kind == "u" else np.int64)


def _shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(str(s) for s in shape)


class BackgroundAcquisition:
    """The mean of the next `n` raw frames (1..10000)."""

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise ValueError(f"the number of frames must be a whole number, got {n!r}")
        if not MIN_FRAMES <= n <= MAX_FRAMES:
            raise ValueError(f"the number of frames must be {MIN_FRAMES}..{MAX_FRAMES}, "
                             f"got {n}")
        self._n = int(n)
        self._added = 0
        self._acc: np.ndarray | None = None
        self._dtype: np.dtype | None = None
        self._aborted: str | None = None
        # 64-bit integer frames: bounds of the sum so far, to abort before it could overflow
        self._high = 0
        self._low = 0

    @property
    def n(self) -> int:
        """The frames this acquisition averages."""
        return self._n

    @property
    def n_added(self) -> int:
        """The frames added so far."""
        return self._added

    @property
    def done(self) -> bool:
        """All `n` frames are in: `result()` is ready."""
        return self._added == self._n and self._aborted is None

    @property
    def progress(self) -> float:
        """Frames added, in % of `n` (0..100)."""
        return 100.0 * self._added / self._n

    @property
    def aborted(self) -> str | None:
        """Why the acquisition was aborted, or None."""
        return self._aborted

    @property
    def shape(self) -> tuple[int, int] | None:
        """The frames' (rows, columns), fixed by the first frame; None before it."""
        return None if self._acc is None else (self._acc.shape[0], self._acc.shape[1])

    @property
    def dtype(self) -> np.dtype | None:
        """The frames' dtype, fixed by the first frame; None before it."""
        return self._dtype

    def _abort(self, reason: str) -> AcquisitionAborted:
        self._aborted = reason
        self._acc = None  # the accumulator's memory goes at once
        return AcquisitionAborted(reason)

    def add(self, image: np.ndarray) -> float:
        """Add one raw frame; returns the progress (0..100 %).

        Raises AcquisitionAborted (the acquisition is then over) for a frame of another shape
        or dtype than the first, one that is not a 2-D numeric array, or 64-bit pixels whose
        sum would overflow; RuntimeError when all `n` frames are already in.
        """
        if self._aborted is not None:
            raise AcquisitionAborted(self._aborted)
        if self._added == self._n:
            raise RuntimeError(f"the acquisition already has its {self._n} frames")
        image = np.asarray(image)
        if self._acc is None:
            if image.ndim != 2 or image.size == 0:
                raise self._abort(f"a background needs 2-D frames, got shape "
                                  f"{list(image.shape)}")
            if image.dtype.kind not in "uif":
                raise self._abort(f"a background needs numeric frames, got {image.dtype}")
            self._dtype = image.dtype.newbyteorder("=")
            self._acc = np.zeros(image.shape, dtype=_accumulator_dtype(image.dtype))
        elif image.shape != self._acc.shape:
            raise self._abort(f"image size changed from {_shape_text(self._acc.shape)} to "
                              f"{_shape_text(image.shape)}: background acquisition aborted "
                              f"after {self._added} of {self._n} frames")
        elif image.dtype.newbyteorder("=") != self._dtype:
            raise self._abort(f"image type changed from {self._dtype} to {image.dtype}: "
                              f"background acquisition aborted after {self._added} of "
                              f"{self._n} frames")
        acc = self._acc
        if acc.dtype.itemsize == 8 and acc.dtype.kind in "iu" and image.dtype.itemsize == 8:
            self._high += max(int(image.max()), 0)
            self._low += min(int(image.min()), 0)
            info = np.iinfo(acc.dtype)
            if self._high > info.max or self._low < info.min:
                raise self._abort(f"{image.dtype} pixels up to {max(self._high, -self._low)} "
                                  f"summed over {self._added + 1} frames overflow a 64-bit "
                                  "integer: the background cannot be averaged exactly")
        np.add(acc, image, out=acc, casting="unsafe")  # widening only: exact
        self._added += 1
        return self.progress

    def result(self) -> np.ndarray:
        """The mean of the `n` frames (a new array); integer frames: rounded half to even,
        in their dtype; floating-point frames: float64."""
        if self._aborted is not None:
            raise AcquisitionAborted(self._aborted)
        if self._acc is None or self._added < self._n:
            raise RuntimeError(f"the acquisition has {self._added} of its {self._n} frames")
        assert self._dtype is not None
        if self._dtype.kind == "f":
            return self._acc / self._n
        if self._dtype.itemsize <= 4:
            return self._rounded_mean_by_rows()
        # 64-bit frames: the sum may exceed 2**53; floor division (also for negative sums),
        # then half to even on the remainder, all in integers
        quotient, remainder = np.divmod(self._acc, self._acc.dtype.type(self._n))
        twice = remainder * 2  # < 2 n: no overflow
        up = (twice > self._n) | ((twice == self._n) & (quotient % 2 == 1))
        quotient += up.astype(quotient.dtype)
        return quotient.astype(self._dtype)  # the mean of values of the dtype fits it

    def _rounded_mean_by_rows(self) -> np.ndarray:
        """np.rint(sum / n) in the frames' dtype, for frames of up to 32 bits.

        Exact: the sum is below 2**53 (10000 x 2**32), so the float64 quotient is the true one
        correctly rounded: a tie k + 0.5 is represented exactly, and any other mean lies at
        least 1 / (2 n) >= 5e-5 from a tie while the quotient's error is below 2**32 x 2**-53.
        Done in blocks of rows that stay in the cache (6 ms for the camera's frame instead of
        70 ms by integer divmod)."""
        assert self._acc is not None and self._dtype is not None
        acc = self._acc
        out = np.empty(acc.shape, dtype=self._dtype)
        rows = max(1, (1 << 19) // (8 * acc.shape[1]))  # ~0.5 MB of float64 per block
        block = np.empty((rows, acc.shape[1]), dtype=np.float64)
        for start in range(0, acc.shape[0], rows):
            part = acc[start:start + rows]
            buf = block[: part.shape[0]]
            np.divide(part, self._n, out=buf)
            np.rint(buf, out=buf)
            out[start:start + rows] = buf  # within the dtype's range: a mean of its values
        return out
