"""BackgroundAcquisition: the exact mean of N raw frames, its progress, its refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from psss_ioc.pipeline.acquire import AcquisitionAborted, BackgroundAcquisition


def reference_mean(frames: list[np.ndarray]) -> np.ndarray:
    """Integer frames: np.rint of the exact mean (int64 sum; |sum| < 2**53, so the float64
    quotient is correctly rounded and a tie is a tie), in the frames' dtype. Float frames:
    the float64 sum in order, over N."""
    if frames[0].dtype.kind == "f":
        total = np.zeros(frames[0].shape, dtype=np.float64)
        for frame in frames:
            total += frame
        return total / len(frames)
    total = np.sum(np.stack(frames).astype(np.int64), axis=0)
    return np.rint(total / len(frames)).astype(frames[0].dtype)


DTYPES = st.sampled_from([np.uint16, np.int32, np.float32, np.uint8, np.int16, np.uint32,
                          np.int64, np.uint64, np.float64])


@st.composite
def frame_stacks(draw: st.DrawFn) -> list[np.ndarray]:
    n = draw(st.integers(1, 20))
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, max_side=12))
    dtype = np.dtype(draw(DTYPES))
    if dtype.kind == "f":
        elements = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)
    else:
        # often near the dtype's ends, and often small values that make ties (k + 0.5)
        info = np.iinfo(dtype)
        low, high = int(info.min), int(info.max)
        if dtype.itemsize == 8:  # the divmod path; within what the int64 reference sums
            low, high = max(low, -(2**40)), 2**40
        elements = st.one_of(st.integers(low, high),
                             st.sampled_from([low, high, 0, 1, 2, 3]))
    return [draw(hnp.arrays(dtype, shape, elements=elements)) for _ in range(n)]


@settings(max_examples=300, deadline=None)
@given(frame_stacks())
def test_result_is_the_rounded_mean_in_the_frames_dtype(frames: list[np.ndarray]) -> None:
    acq = BackgroundAcquisition(len(frames))
    progress = []
    for frame in frames:
        assert not acq.done
        progress.append(acq.add(frame))
        assert acq.shape == frame.shape
    assert acq.done and acq.n_added == len(frames)
    assert progress == [100.0 * (k + 1) / len(frames) for k in range(len(frames))]
    assert progress[-1] == 100.0
    got = acq.result()
    expected = reference_mean(frames)
    want_dtype = np.float64 if frames[0].dtype.kind == "f" else frames[0].dtype
    assert got.dtype == want_dtype and got.shape == frames[0].shape
    np.testing.assert_array_equal(got, expected)


def test_ties_round_half_to_even() -> None:
    frames = [np.array([[0, 1, 2, 3, 0, 65535]], np.uint16),
              np.array([[1, 2, 3, 4, 3, 65534]], np.uint16)]
    acq = BackgroundAcquisition(2)
    for frame in frames:
        acq.add(frame)
    # means 0.5 1.5 2.5 3.5 1.5 65534.5
    assert acq.result().tolist() == [[0, 2, 2, 4, 2, 65534]]
    neg = BackgroundAcquisition(2)
    neg.add(np.array([[-1, -3, -2]], np.int32))
    neg.add(np.array([[0, 0, -1]], np.int32))
    assert neg.result().tolist() == [[0, -2, -2]]  # -0.5 -1.5 -1.5


def test_camera_frames_stay_uint16_and_exact_over_many_frames() -> None:
    acq = BackgroundAcquisition(10000)
    top = np.full((2, 3), 65535, np.uint16)
    for _ in range(9999):
        acq.add(top)
    assert acq.progress == pytest.approx(99.99)
    acq.add(np.array([[65535, 0, 65535], [0, 65535, 65535]], np.uint16))
    got = acq.result()
    assert got.dtype == np.uint16
    # (9999 * 65535 + 0) / 10000 = 65528.4465 -> 65528
    assert got.tolist() == [[65535, 65528, 65535], [65528, 65535, 65535]]


def test_big_endian_frames_give_native_uint16() -> None:
    acq = BackgroundAcquisition(2)
    acq.add(np.array([[1, 300]], ">u2"))
    acq.add(np.array([[2, 301]], "<u2"))
    got = acq.result()
    assert got.dtype == np.uint16 and got.tolist() == [[2, 300]]


def test_64_bit_frames_exact_or_refused() -> None:
    acq = BackgroundAcquisition(3)
    big = np.iinfo(np.int64).max // 3
    for k in range(3):
        acq.add(np.array([[big, -big, k]], np.int64))
    assert acq.result().tolist() == [[big, -big, 1]]
    over = BackgroundAcquisition(3)
    over.add(np.array([[2**62]], np.int64))
    with pytest.raises(AcquisitionAborted, match="overflow a 64-bit integer"):
        over.add(np.array([[2**62]], np.int64))
    assert over.aborted is not None and not over.done


def test_a_shape_change_aborts() -> None:
    acq = BackgroundAcquisition(5)
    assert acq.add(np.zeros((4, 6), np.uint16)) == 20.0
    with pytest.raises(AcquisitionAborted, match=r"image size changed from 4 x 6 to 6 x 4: "
                                                 r".* after 1 of 5 frames") as e:
        acq.add(np.zeros((6, 4), np.uint16))
    assert isinstance(e.value, ValueError)
    assert not acq.done and acq.aborted == str(e.value)
    with pytest.raises(AcquisitionAborted):  # over: a frame of the first size does not revive it
        acq.add(np.zeros((4, 6), np.uint16))
    with pytest.raises(AcquisitionAborted):
        acq.result()


def test_a_dtype_change_aborts() -> None:
    acq = BackgroundAcquisition(3)
    acq.add(np.zeros((2, 2), np.uint16))
    with pytest.raises(AcquisitionAborted, match="image type changed from uint16 to float32"):
        acq.add(np.zeros((2, 2), np.float32))


@pytest.mark.parametrize(("frame", "reason"), [
    (np.zeros(5, np.uint16), "2-D"), (np.zeros((2, 2, 2), np.uint16), "2-D"),
    (np.zeros((0, 3), np.uint16), "2-D"), (np.zeros((2, 2), bool), "numeric"),
])
def test_a_first_frame_that_is_no_image_aborts(frame: np.ndarray, reason: str) -> None:
    acq = BackgroundAcquisition(2)
    with pytest.raises(AcquisitionAborted, match=reason):
        acq.add(frame)


@pytest.mark.parametrize("n", [0, -1, 10001, 10**9, 2.5, True, "10"])
def test_n_out_of_range_is_refused(n: object) -> None:
    with pytest.raises(ValueError, match="number of frames"):
        BackgroundAcquisition(n)  # type: ignore[arg-type]


def test_bounds_of_n_are_accepted_and_more_frames_are_refused() -> None:
    assert BackgroundAcquisition(10000).n == 10000
    acq = BackgroundAcquisition(np.int64(1))
    assert acq.shape is None and acq.progress == 0.0
    with pytest.raises(RuntimeError, match="0 of its 1"):
        acq.result()
    assert acq.add(np.ones((2, 3), np.float32)) == 100.0
    with pytest.raises(RuntimeError, match="already has its 1 frames"):
        acq.add(np.ones((2, 3), np.float32))
    assert acq.result().dtype == np.float64 and acq.result().tolist() == [[1.0] * 3] * 2
