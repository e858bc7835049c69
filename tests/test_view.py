"""The operator's view (row profile, binned image) and the ROI suggestion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psss_ioc.core.view import (
    BAND_FRACTION,
    MIN_MARGIN_ROWS,
    frame_view,
    suggest_roi,
)
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera

INT32_MAX = np.iinfo(np.int32).max
ALL_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
              np.float16, np.float32, np.float64]


def _reference(image: np.ndarray, background: np.ndarray | None, b: int):
    """The definition: int64 for integers, float64 for floats; the binned image as numpy's
    reshape-sum of the cropped signal, clipped to int32 (rounded, for floats)."""
    floats = image.dtype.kind == "f" or (background is not None and background.dtype.kind == "f")
    signal = image.astype(np.float64 if floats else np.int64)
    if background is not None:
        signal = signal - background.astype(signal.dtype)
    signal = np.maximum(signal, 0)
    h, w = signal.shape[0] // b, signal.shape[1] // b
    binned = signal[: h * b, : w * b].reshape(h, b, w, b).sum(axis=(1, 3))
    if floats:
        binned = np.rint(binned)
    return signal.sum(axis=1).astype(np.float64), np.minimum(binned, INT32_MAX).astype(np.int32)


def _content(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    """Random pixels over the dtype's whole range, its extremes included (floats: whole
    numbers, so that any order of summing them is exact)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        top = 2048 if dtype == np.float16 else 70000  # whole numbers the dtype holds
        return rng.integers(-1000, top, shape).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)  # 64-bit: sums below 2**53
    image = rng.integers(lo, hi, shape, dtype=dtype, endpoint=True)
    if image.size:
        image.flat[:: max(1, image.size // 7)] = hi
        image.flat[3 :: max(1, image.size // 5)] = lo
    return image


def _check(image, background, b):
    view = frame_view(image, background, b)
    profile, binned = _reference(image, background, b)
    assert view.profile.dtype == np.float64 and view.image.dtype == np.int32
    assert view.image_bin == b
    assert view.profile.shape == (image.shape[0],)
    assert view.image.shape == (image.shape[0] // b, image.shape[1] // b)
    np.testing.assert_array_equal(view.profile, profile)
    np.testing.assert_array_equal(view.image, binned)


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from([np.uint16, np.int32, np.float32]),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    image_bin=st.one_of(st.integers(1, 9), st.integers(10, 60)),
    with_background=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_profile_and_binned_image_equal_the_int64_reference(
    dtype, height, width, image_bin, with_background, seed
):
    rng = np.random.default_rng(seed)
    image = _content(rng, dtype, (height, width))
    background = _content(rng, dtype, (height, width)) if with_background else None
    _check(image, background, image_bin)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("background_dtype", [None, "same", np.uint16, np.int64, np.float32])
@pytest.mark.parametrize("image_bin", [1, 2, 3, 8, 13])
def test_every_dtype_and_background_pairing(dtype, background_dtype, image_bin):
    rng = np.random.default_rng(image_bin)
    image = _content(rng, dtype, (29, 43))
    background = None
    if background_dtype is not None:
        bg_dtype = dtype if background_dtype == "same" else background_dtype
        background = _content(rng, bg_dtype, image.shape)
        if np.dtype(dtype) == np.uint64:  # the processing clips a uint64 frame's dark at 0
            background = np.clip(background, 0, None)
    _check(image, background, image_bin)


def test_the_camera_frame_with_its_dark_frame_at_the_default_bin():
    camera = SimulatedCamera(SimConfig(pool=1, seed=3, saturate=50))
    _check(camera.images[0], camera.background, 8)  # 2016 x 2560: 252 x 320
    assert frame_view(camera.images[0], None, 8).image.shape == (252, 320)


@pytest.mark.parametrize("image_bin", [41, 100, 10**6])
def test_a_bin_larger_than_a_side_gives_an_empty_axis(image_bin):
    image = np.arange(40 * 120, dtype=np.uint16).reshape(40, 120)
    view = frame_view(image, None, image_bin)
    assert view.image.shape == (0, 120 // image_bin)
    np.testing.assert_array_equal(view.profile, image.astype(np.int64).sum(axis=1))


def test_block_sums_above_int32_are_clipped():
    image = np.full((4, 4), 2**31 - 1, dtype=np.int64)
    view = frame_view(image, None, 2)
    assert (view.image == INT32_MAX).all()
    assert view.profile[0] == 4 * (2**31 - 1)


def test_nan_pixels_propagate_into_the_profile_and_leave_their_block_zero():
    image = np.ones((4, 6), dtype=np.float32)
    image[1, 4] = np.nan
    view = frame_view(image, np.zeros((4, 6), dtype=np.float32), 2)
    assert np.isnan(view.profile[1]) and not np.isnan(np.delete(view.profile, 1)).any()
    np.testing.assert_array_equal(view.image, [[4, 4, 0], [4, 4, 4]])


def test_float_blocks_round_to_the_nearest_integer():
    image = np.array([[0.25, 0.25], [0.75, 1.5]])  # block sum 2.75 -> 3
    assert frame_view(image, None, 2).image.tolist() == [[3]]
    assert frame_view(image * 0.2, None, 2).image.tolist() == [[1]]  # 0.55 -> 1


def test_non_contiguous_and_big_endian_frames():
    rng = np.random.default_rng(5)
    base = _content(rng, np.uint16, (30, 50))
    dark = _content(rng, np.uint16, (30, 50))
    _check(base[:, ::2], dark[:, ::2], 3)
    big = base.astype(">u2")
    view = frame_view(big, dark.astype(">u2"), 4)
    profile, binned = _reference(base, dark, 4)
    np.testing.assert_array_equal(view.profile, profile)
    np.testing.assert_array_equal(view.image, binned)


@pytest.mark.parametrize(
    ("image", "background", "image_bin", "message"),
    [
        (np.ones((4, 4), np.uint16), None, 0, "bin"),
        (np.ones((4, 4), np.uint16), None, 2.0, "bin"),
        (np.ones((4, 4), np.uint16), None, True, "bin"),
        (np.ones(4, np.uint16), None, 1, "2-D"),
        (np.ones((4, 4), np.uint16), np.ones((4, 5), np.uint16), 1, "shape"),
        (np.array([["x"]]), None, 1, "not numeric"),
    ],
)
def test_bad_input_is_refused_with_the_reason(image, background, image_bin, message):
    with pytest.raises(ValueError, match=message):
        frame_view(image, background, image_bin)


# ---------------------------------------------------------------- ROI suggestion


def _centre_rows(band: tuple[int, int]) -> tuple[int, int]:
    y0, y1 = band
    return (y0 + y1 - 1) // 2, (y0 + y1) // 2


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(64, 600),
    width=st.integers(64, 256),
    band_start=st.floats(0.0, 0.8),
    band_height=st.floats(0.03, 0.3),
    noise=st.sampled_from([0.0, 1.0, 3.0]),
    peak=st.floats(300.0, 5000.0),  # a band row >= ~30 x its noise
    dtype=st.sampled_from(["uint16", "int32", "float32"]),
    with_background=st.booleans(),
    n_profiles=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_the_suggested_roi_holds_the_band_of_simulated_frames(
    height, width, band_start, band_height, noise, peak, dtype, with_background, n_profiles,
    seed,
):
    band = (band_start, min(1.0, band_start + band_height))
    camera = SimulatedCamera(SimConfig(height=height, width=width, dtype=dtype, seed=seed,
                                       pool=n_profiles, noise=noise, peak=peak, band=band))
    background = camera.background if with_background else None
    profile = np.mean([frame_view(image, background, 8).profile for image in camera.images],
                      axis=0)
    suggestion = suggest_roi(profile)
    ymin, ymax = suggestion.rows
    first, end = suggestion.band
    assert 0 <= ymin <= first < end <= ymax <= height
    low, high = _centre_rows(camera.band)
    assert ymin <= low and high < ymax
    margin = max(MIN_MARGIN_ROWS, -(-(end - first) // 2))
    assert (ymin, ymax) == (max(0, first - margin), min(height, end + margin))
    assert f"ROI rows [{ymin}, {ymax})" in suggestion.text
    assert f"band rows [{first}, {end})" in suggestion.text


def test_the_camera_band_and_the_text():
    camera = SimulatedCamera(SimConfig(pool=2, seed=1))  # band rows [907, 1108)
    profile = np.mean([frame_view(i, camera.background, 8).profile for i in camera.images], 0)
    suggestion = suggest_roi(profile)
    y0, y1 = camera.band
    ymin, ymax = suggestion.rows
    assert ymin <= y0 and y1 <= ymax  # the whole band, not just its centre
    first, end = suggestion.band
    assert suggestion.text == (
        f"ROI rows [{ymin}, {ymax}): band rows [{first}, {end}) above "
        f"{BAND_FRACTION * 100:g} % of the peak over the median, widened by "
        f"{(end - first + 1) // 2} rows")


def test_a_band_at_the_edge_is_clipped_to_the_image():
    profile = np.zeros(100)
    profile[:3] = [50, 100, 50]
    suggestion = suggest_roi(profile)
    assert suggestion.band == (0, 3)
    assert suggestion.rows == (0, 3 + MIN_MARGIN_ROWS)
    assert "clipped to the image" in suggestion.text


def test_the_band_is_the_run_around_the_peak_only():
    profile = np.zeros(200)
    profile[20:30] = 60  # a lesser band elsewhere
    profile[100:120] = 100
    assert suggest_roi(profile).band == (100, 120)
    assert suggest_roi(profile, fraction=0.5).band == (100, 120)


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (np.full(100, 7.0), "flat"),
        (np.zeros(100), "flat"),
        (np.zeros(0), "no row profile"),
        (np.array([1.0, np.nan, 2.0]), "NaN"),
        (np.random.default_rng(0).normal(1000.0, 5.0, 2000), "noise"),
    ],
)
def test_no_band_raises_a_reason_an_operator_can_act_on(profile, message):
    with pytest.raises(ValueError, match=message):
        suggest_roi(profile)


def test_bad_options_are_refused():
    profile = np.r_[np.zeros(50), 100.0, np.zeros(50)]
    for kwargs in ({"fraction": 0.0}, {"fraction": 1.0}, {"min_margin": -1}):
        with pytest.raises(ValueError):
            suggest_roi(profile, **kwargs)


def test_warm_up_compiles_the_camera_kernels():
    from psss_ioc.core import view

    view.warm_up()
    assert view._view_minus_background.signatures and view._view_plain.signatures
