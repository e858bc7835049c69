"""The spectrum kernel, Settings validation and per-frame checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psss_ioc.core.fit import fit_spectrum
from psss_ioc.core.processing import (
    MAX_OUTLIER_FRACTION,
    FitStatus,
    FrameMismatchError,
    Mismatch,
    RunningAverage,
    Settings,
    compact_background,
    process,
    resolve_for_frame,
    spectrum,
)
from psss_ioc.streams.simulate import SimConfig, SimulatedCamera

INTEGER_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]


def _random_image(rng: np.random.Generator, dtype, shape=(37, 53)) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.uniform(-100, 60000, shape).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
    assert dtype.itemsize == 8 or hi == info.max
    image = rng.integers(lo, hi, shape, dtype=dtype, endpoint=True)
    # Extremes must be exact too: 0 / min and max pixels (64-bit types accumulate in 64 bits,
    # so their test pixels stay below 2**40 where a sum cannot overflow).
    image.flat[:: max(1, image.size // 7)] = hi
    image.flat[3 :: max(1, image.size // 5)] = 0 if dtype.kind == "u" else lo
    return image


def _reference(image, background, ymin, ymax) -> np.ndarray:
    """The definition, in exact Python-object / int64 arithmetic."""
    if image.dtype.kind == "f" or (background is not None and background.dtype.kind == "f"):
        img = image.astype(np.float64)
        diff = img if background is None else img - background.astype(np.float64)
        if background is not None:
            diff = np.where(diff > 0, diff, 0)
        return diff[ymin:ymax].astype(np.float64).sum(axis=0)
    wide = image.astype(object) if image.dtype in (np.uint64, np.int64) else image.astype(np.int64)
    if background is not None:
        wide = wide - background.astype(wide.dtype)
        wide = np.where(wide > 0, wide, 0)
    return wide[ymin:ymax].sum(axis=0)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
@pytest.mark.parametrize("with_background", [False, True])
@pytest.mark.parametrize("roi", [None, (0, 1), (0, 37), (36, 37), (5, 20), (3, 13), (2, 4)])
def test_integer_spectrum_is_exact(dtype, with_background, roi):
    rng = np.random.default_rng(abs(hash((np.dtype(dtype).str, with_background, roi))) % 2**32)
    image = _random_image(rng, dtype)
    background = _random_image(rng, dtype) // 3 if with_background else None
    if background is not None and np.dtype(dtype).kind == "i":
        background = np.abs(background)
    settings = Settings(roi=roi, background=background)
    ymin, ymax = roi if roi else (0, image.shape[0])
    got = spectrum(image, settings)
    expected = _reference(image, background, ymin, ymax)
    assert got.dtype.kind in "ui"
    assert [int(v) for v in got] == [int(v) for v in expected]


def test_uint16_full_height_spectrum_uses_uint32_and_is_exact():
    image = np.full((2160, 64), 65535, dtype=np.uint16)
    image[::2] = 0
    got = spectrum(image, Settings())
    assert got.dtype == np.uint32
    assert (got == 65535 * 1080).all()


def test_uint16_many_rows_widens_past_uint32():
    image = np.full((70000, 3), 65535, dtype=np.uint16)
    got = spectrum(image, Settings())
    assert got.dtype == np.uint64
    assert (got == 65535 * 70000).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_background", [False, True])
def test_float_spectrum_matches_float64_reference(dtype, with_background):
    rng = np.random.default_rng(7)
    image = _random_image(rng, dtype)
    background = (_random_image(rng, dtype) / 2).astype(dtype) if with_background else None
    got = spectrum(image, Settings(roi=(2, 30), background=background))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, _reference(image, background, 2, 30), rtol=1e-12)


def test_integer_image_with_float_background_gives_float_spectrum():
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    background = np.full((3, 4), 2.5)
    got = spectrum(image, Settings(background=background))
    np.testing.assert_allclose(got, np.clip(image - 2.5, 0, None).sum(axis=0))


def test_non_contiguous_and_big_endian_images():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 65535, (40, 60), dtype=np.uint16)
    background = rng.integers(0, 2000, (20, 30), dtype=np.uint16)
    strided = base[::2, ::2]
    assert not strided.flags.c_contiguous
    expected = _reference(np.ascontiguousarray(strided), background, 0, 20)
    assert list(spectrum(strided, Settings(background=background))) == list(expected)
    big_endian = np.ascontiguousarray(strided).astype(">u2")
    assert list(spectrum(big_endian, Settings(background=background))) == list(expected)
    fortran = np.asfortranarray(strided)
    assert list(spectrum(fortran, Settings(background=background))) == list(expected)


def test_nan_pixel_propagates_and_fit_reports_invalid_input():
    image = np.ones((10, 20))
    image[4, 7] = np.nan
    result = process(image, Settings())
    assert np.isnan(result.spectrum[7])
    assert np.isfinite(np.delete(result.spectrum, 7)).all()
    assert result.fit.status is FitStatus.INVALID_INPUT
    assert "non-finite" in result.fit.reason
    assert np.isnan(result.fit.center) and np.isnan(result.fit.fwhm)


# --- Settings validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"roi": (5, 5)}, "less than ymax"),
        ({"roi": (9, 3)}, "less than ymax"),
        ({"roi": (-1, 3)}, "negative"),
        ({"roi": (1.5, 3)}, "whole number"),
        ({"roi": (True, 3)}, "whole number"),
        ({"roi": (1, 2, 3)}, "pair"),
        ({"roi": "12"}, "pair"),
        ({"background": np.zeros(5)}, "2-D"),
        ({"background": np.zeros((2, 2, 2))}, "2-D"),
        ({"background": np.zeros((0, 4))}, "empty"),
        ({"background": np.array([["a", "b"]])}, "numeric"),
        ({"background": np.array([[np.nan, 1.0]])}, "NaN"),
        ({"axis": [1.0, 2.0, 2.0, 3.0]}, "strictly"),
        ({"axis": [1.0, 3.0, 2.0]}, "strictly"),
        ({"axis": [1.0, np.nan, 3.0]}, "NaN"),
        ({"axis": [[1.0, 2.0]]}, "1-D"),
        ({"axis": [1.0]}, "at least 2"),
        ({"axis": ["a", "b"]}, "numbers"),
        ({"min_snr": -1.0}, "negative"),
        ({"min_snr": float("nan")}, "finite"),
        ({"fit_enabled": "yes"}, "true or false"),
        ({"max_iterations": 0}, "max_iterations"),
    ],
)
def test_bad_settings_raise_readable_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Settings(**kwargs)


def test_settings_are_immutable_and_copy_their_arrays():
    axis = np.linspace(1.0, 2.0, 4)
    background = np.zeros((2, 4), dtype=np.uint16)
    settings = Settings(axis=axis, background=background)
    axis[0] = 100.0
    background[0, 0] = 7
    assert settings.axis is not None and settings.axis[0] == 1.0
    assert settings.background is not None and settings.background[0, 0] == 0
    with pytest.raises(AttributeError):
        settings.roi = (1, 2)  # type: ignore[misc]
    with pytest.raises(ValueError):
        settings.axis[1] = 5.0


def test_describe_is_the_legacy_processing_parameters():
    assert Settings(roi=(100, 200), background_name="bg.h5").describe() == {
        "background": "bg.h5",
        "roi": [100, 200],
    }


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        (Settings(roi=(5, 11)), "roi"),
        (Settings(background=np.zeros((10, 19))), "background_shape"),
        (Settings(axis=np.arange(19.0)), "axis_length"),
    ],
)
def test_per_frame_mismatches_raise_typed_errors(settings, kind):
    image = np.ones((10, 20), dtype=np.uint16)
    with pytest.raises(FrameMismatchError) as caught:
        process(image, settings)
    assert caught.value.kind == kind
    assert str(caught.value)


@pytest.mark.parametrize("image", [np.ones(5), np.ones((0, 4)), np.array([["x"]]), [[1, 2]]])
def test_bad_images_raise_typed_errors(image):
    with pytest.raises(FrameMismatchError) as caught:
        process(image, Settings())
    assert caught.value.kind == "image"


# --- process() end to end ---------------------------------------------------------------


def _line_image(center: float, sigma: float, height=32, width=400, rows=(8, 20), amplitude=500):
    x = np.arange(width, dtype=np.float64)
    profile = amplitude * np.exp(-((x - center) ** 2) / (2 * sigma**2))
    image = np.full((height, width), 100.0)
    image[rows[0] : rows[1]] += profile
    return image


def test_process_finds_the_line_with_background_and_axis():
    image = _line_image(center=180.0, sigma=12.0)
    background = np.full(image.shape, 100.0)
    axis = np.linspace(9000.0, 9399.0, 400)  # 1 eV per column
    result = process(image, Settings(roi=(8, 20), background=background, axis=axis))
    assert result.fit.status is FitStatus.OK, result.fit.reason
    assert result.fit.center == pytest.approx(9180.0, rel=1e-9)
    assert result.fit.fwhm == pytest.approx(12.0 * 2.354820045, rel=1e-6)
    assert result.fit.amplitude == pytest.approx(12 * 500, rel=1e-6)
    assert result.fit.offset == pytest.approx(0.0, abs=1e-6)
    assert result.fit.com == pytest.approx(9180.0, abs=0.5)
    assert result.roi == (8, 20)
    assert result.fit.curve is not None and result.fit.curve.shape == (400,)
    assert result.axis is axis or np.array_equal(result.axis, axis)


def test_roi_outside_the_signal_rows_gives_low_signal_not_a_fake_fit():
    image = _line_image(center=180.0, sigma=12.0)
    result = process(image, Settings(roi=(25, 30)))
    assert result.fit.status is FitStatus.LOW_SIGNAL
    assert np.isnan(result.fit.center)


def test_fit_disabled_still_gives_spectrum_and_moments():
    result = process(_line_image(180.0, 12.0), Settings(fit_enabled=False))
    assert result.fit.status is FitStatus.DISABLED
    assert np.isnan(result.fit.center)
    assert result.fit.com == pytest.approx(180.0, abs=0.5)


def _dark_frame(rng: np.random.Generator, shape, outliers: int = 0, pedestal: int = 100):
    """A camera dark frame: a pedestal with pixel and column patterns, and `outliers` hot
    (and, on a high pedestal, dead) pixels outside any 256-count window around it."""
    dark = pedestal + rng.normal(0, 1.5, shape) + rng.normal(0, 2.0, shape[1])
    dark = np.clip(np.rint(dark), 0, 65535).astype(np.uint16)
    where = rng.choice(dark.size, outliers, replace=False)
    far = [v for v in (0, pedestal + 400, pedestal + 5000, 65535) if abs(v - pedestal) > 300]
    far = [v for v in far if v <= 65535]
    dark.flat[where] = rng.choice(far, outliers)
    return dark


@pytest.mark.parametrize("roi", [None, (0, 1), (3, 5), (3, 6), (10, 25), (31, 32)])
@pytest.mark.parametrize("with_axis", [False, True])
@pytest.mark.parametrize("fit_enabled", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_camera_frames_give_the_results_of_spectrum_then_fit(
    roi, with_axis, fit_enabled, contiguous
):
    """uint16 frame and a dark frame: process() = spectrum() then fit_spectrum()."""
    rng = np.random.default_rng(5)
    line = _line_image(180.0, 12.0, rows=(0, 32)) * 40
    frame = rng.poisson(line + 100).astype(np.uint16)
    frame[rng.random(frame.shape) < 0.01] = 65535
    background = _dark_frame(rng, frame.shape, outliers=20)
    if not contiguous:
        frame = np.repeat(frame, 2, axis=1)[:, ::2]
        assert not frame.flags.c_contiguous
    axis = np.linspace(9400.0, 9001.0, 400) if with_axis else None  # decreasing eV
    settings = Settings(roi=roi, background=background, axis=axis, fit_enabled=fit_enabled)
    assert settings.plan_for(frame.shape, frame.dtype).compact_background is not None
    result = process(frame, settings)
    ymin, ymax = roi if roi else (0, frame.shape[0])
    expected = spectrum(frame, settings)
    assert result.spectrum.dtype == np.uint32
    assert [int(v) for v in result.spectrum] == [
        int(v) for v in _reference(frame, background, ymin, ymax)
    ]
    assert np.array_equal(result.spectrum, expected)
    fit = fit_spectrum(result.axis, expected, enabled=fit_enabled)
    assert result.fit.status is fit.status and result.fit.reason == fit.reason
    # The same code compiled into two callers: numba inlines it, and the sums' reassociation
    # (fastmath, what vectorises them) may then round differently in the last bits, so the LM
    # may stop one step apart. Its stop (chi2 to 1.5e-8, MINPACK's) leaves the width to
    # ~1e-4 relative on these noisy lines: far inside the fit's statistical error.
    for name in ("center", "fwhm", "amplitude", "offset", "chi2_reduced"):
        np.testing.assert_allclose(getattr(result.fit, name), getattr(fit, name), 1e-3,
                                   err_msg=name)
    for name in ("com", "rms"):
        np.testing.assert_allclose(getattr(result.fit, name), getattr(fit, name), 1e-12,
                                   err_msg=name)
    if fit.curve is None:
        assert result.fit.curve is None
    else:
        np.testing.assert_allclose(result.fit.curve, fit.curve, 0, atol=1e-3 * fit.amplitude)
    if fit_enabled and roi in (None, (10, 25)):
        assert result.fit.ok, result.fit.reason


def test_compact_background_holds_the_dark_frame_exactly():
    rng = np.random.default_rng(3)
    dark = _dark_frame(rng, (60, 300), outliers=25, pedestal=1000)
    dark[0, 0], dark[-1, -1], dark[7, 299] = 65535, 0, 3000  # at the corners and a row's end
    compact = compact_background(dark)
    assert compact is not None
    assert compact.offsets.dtype == np.uint8 and compact.offsets.flags.c_contiguous
    rebuilt = compact.offsets.astype(np.int64) + compact.base
    for r in range(dark.shape[0]):
        span = slice(compact.row_starts[r], compact.row_starts[r + 1])
        rebuilt[r, compact.columns[span]] = compact.values[span]
    assert np.array_equal(rebuilt, dark)
    n_outliers = int(compact.row_starts[-1])
    assert n_outliers == int(((dark < compact.base) | (dark > compact.base + 255)).sum())
    assert n_outliers <= 30  # the window sits on the pedestal, not on an outlier
    with pytest.raises(ValueError):
        compact.offsets[0, 0] = 1  # read-only, as the settings it belongs to
    assert not any(array.flags.writeable for array in compact[1:])


def test_settings_made_from_settings_share_the_compact_background():
    import gc

    from psss_ioc.core import processing

    rng = np.random.default_rng(8)
    frame = rng.poisson(300, (40, 600)).astype(np.uint16)
    first = Settings(roi=(0, 40), background=_dark_frame(rng, frame.shape, outliers=3))
    second = dataclasses.replace(first, roi=(5, 30), fit_enabled=False)
    compact = first.plan_for(frame.shape, frame.dtype).compact_background
    assert compact is not None
    assert second.plan_for(frame.shape, frame.dtype).compact_background is compact
    key = id(first.background)
    assert key in processing._COMPACTED
    del first, second, compact
    gc.collect()
    assert key not in processing._COMPACTED  # goes with its background


def test_a_dark_frame_that_does_not_compact_is_read_as_it_is_and_not_kept_alive():
    import gc
    import weakref

    rng = np.random.default_rng(6)
    frame = rng.poisson(300, (20, 64)).astype(np.uint16)
    settings = Settings(background=rng.integers(0, 5000, frame.shape, dtype=np.uint16))
    held = settings.plan_for(frame.shape, frame.dtype).compact_background
    assert held is not None and held.base == 0 and held.offsets is settings.background
    assert held.row_starts[-1] == 0  # no outliers
    gone = weakref.ref(settings.background)
    del settings, held
    gc.collect()
    assert gone() is None


def test_dark_frames_that_do_not_compact_are_used_as_they_are():
    rng = np.random.default_rng(4)
    wide = rng.integers(0, 5000, (20, 64), dtype=np.uint16)
    too_many = _dark_frame(rng, (20, 64), outliers=int(20 * 64 * MAX_OUTLIER_FRACTION) + 1)
    just_enough = _dark_frame(rng, (20, 64), outliers=int(20 * 64 * MAX_OUTLIER_FRACTION))
    assert compact_background(wide) is None
    assert compact_background(too_many) is None
    assert compact_background(just_enough) is not None
    assert compact_background(wide.astype(np.int32)) is None  # the camera's uint16 only
    frame = rng.poisson(300, (20, 64)).astype(np.uint16)
    frame[5, :] = 65535
    for dark in (wide, too_many, just_enough, np.full((20, 64), 65535, np.uint16)):
        for roi in (None, (0, 1), (5, 6), (2, 19)):
            ymin, ymax = roi if roi else (0, 20)
            result = process(frame, Settings(roi=roi, background=dark))
            assert [int(v) for v in result.spectrum] == [
                int(v) for v in _reference(frame, dark, ymin, ymax)
            ]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    height=st.integers(1, 24),
    width=st.integers(1, 300),
    outliers=st.integers(0, 8),
    pedestal=st.sampled_from([0, 100, 30000, 65400]),
)
def test_spectrum_with_a_compact_background_is_exact(seed, height, width, outliers, pedestal):
    """Outliers anywhere (first, odd and last rows, both ends of a row), pedestals at the
    ends of the uint16 range, any ROI: the spectrum equals the int64 definition."""
    rng = np.random.default_rng(seed)
    outliers = min(outliers, int(height * width * MAX_OUTLIER_FRACTION))  # still compacts
    dark = _dark_frame(rng, (height, width), outliers, pedestal)
    frame = rng.integers(0, 65535, (height, width), dtype=np.uint16, endpoint=True)
    frame[rng.random(frame.shape) < 0.5] = pedestal + 3
    ymin = int(rng.integers(0, height))
    ymax = int(rng.integers(ymin + 1, height + 1))
    settings = Settings(roi=(ymin, ymax), background=dark)
    assert settings.plan_for(frame.shape, frame.dtype).compact_background is not None
    expected = [int(v) for v in _reference(frame, dark, ymin, ymax)]
    assert [int(v) for v in spectrum(frame, settings)] == expected
    assert [int(v) for v in process(frame, settings).spectrum] == expected


def test_results_are_immutable():
    frame = np.ones((4, 8), np.uint16)
    result = process(frame, Settings(background=np.zeros_like(frame)))
    averaged = RunningAverage(2).add(result)
    for obj, name in ((result, "spectrum"), (result.fit, "center"), (averaged, "count")):
        with pytest.raises(AttributeError):
            setattr(obj, name, 1)
    with pytest.raises(AttributeError):
        result.extra = 1  # type: ignore[attr-defined]
    assert result.fit.status is FitStatus.LOW_SIGNAL and result.roi == (0, 4)


def test_one_settings_object_keeps_checking_frames_that_differ_from_the_last():
    """The steady-state shortcut (same shape and dtype as the last frame) skips no check."""
    rng = np.random.default_rng(9)
    frame = rng.integers(0, 4000, (40, 64), dtype=np.uint16)
    settings = Settings(roi=(5, 30), background=np.full(frame.shape, 7, np.uint16))
    first = process(frame, settings)
    assert np.array_equal(process(frame, settings).spectrum, first.spectrum)
    with pytest.raises(FrameMismatchError) as caught:
        process(frame[:20], settings)  # ROI beyond this frame's height
    assert caught.value.kind == "roi"
    with pytest.raises(FrameMismatchError) as caught:
        process(frame[:, :32], settings)
    assert caught.value.kind == "background_shape"
    swapped = frame.astype(frame.dtype.newbyteorder(">"))
    assert np.array_equal(process(swapped, settings).spectrum, first.spectrum)
    assert np.array_equal(process(frame, settings).spectrum, first.spectrum)
    wide = frame.astype(np.int32)
    assert [int(v) for v in process(wide, settings).spectrum] == [
        int(v) for v in first.spectrum
    ]
    with pytest.raises(FrameMismatchError):
        process(frame.tolist(), settings)  # type: ignore[arg-type]
    assert np.array_equal(process(frame, settings).spectrum, first.spectrum)


# --- property tests ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    center=st.floats(60.0, 300.0),
    sigma=st.floats(3.0, 25.0),
    shift=st.integers(-40, 40),
)
def test_shifting_the_line_shifts_the_centre(center, sigma, shift):
    a = process(_line_image(center, sigma), Settings(roi=(8, 20)))
    b = process(_line_image(center + shift, sigma), Settings(roi=(8, 20)))
    assert a.fit.ok and b.fit.ok
    assert b.fit.center - a.fit.center == pytest.approx(shift, abs=1e-6)
    assert b.fit.fwhm == pytest.approx(a.fit.fwhm, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(center=st.floats(60.0, 300.0), sigma=st.floats(3.0, 25.0), scale=st.floats(1e-3, 1e4))
def test_scaling_counts_leaves_centre_and_fwhm(center, sigma, scale):
    image = _line_image(center, sigma)
    a = process(image, Settings(roi=(8, 20)))
    b = process(image * scale, Settings(roi=(8, 20)))
    assert a.fit.ok and b.fit.ok
    assert b.fit.center == pytest.approx(a.fit.center, rel=1e-9)
    assert b.fit.fwhm == pytest.approx(a.fit.fwhm, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(row=st.integers(0, 15), seed=st.integers(0, 2**32 - 1))
def test_roi_of_one_row_equals_that_row(row, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 65535, (16, 50), dtype=np.uint16)
    background = rng.integers(0, 65535, (16, 50), dtype=np.uint16)
    got = spectrum(image, Settings(roi=(row, row + 1), background=background))
    expected = np.clip(image[row].astype(np.int64) - background[row], 0, None)
    assert list(got) == list(expected)


# --- running average ----------------------------------------------------------------------


def test_running_average_is_the_mean_of_the_last_n():
    average = RunningAverage(3)
    rng = np.random.default_rng(1)
    images = [_line_image(150.0 + k, 10.0) + rng.normal(0, 1, (32, 400)) for k in range(5)]
    results = [process(image.round().astype(np.uint16), Settings()) for image in images]
    for k, result in enumerate(results):
        averaged = average.add(result)
        window = [r.spectrum for r in results[max(0, k - 2) : k + 1]]
        assert averaged.count == len(window)
        np.testing.assert_array_equal(averaged.spectrum, np.mean(window, axis=0))
    assert averaged.fit.status is FitStatus.OK
    assert averaged.fit.center == pytest.approx(153.0, abs=0.05)


def test_running_average_restarts_on_width_change_and_rejects_bad_length():
    average = RunningAverage(4)
    average.add(process(np.ones((4, 10), dtype=np.uint16), Settings()))
    out = average.add(process(np.ones((4, 12), dtype=np.uint16), Settings()))
    assert out.count == 1 and out.spectrum.shape == (12,)
    for bad in (0, -3, 1.5, True, 10**6):
        with pytest.raises(ValueError):
            RunningAverage(bad)  # type: ignore[arg-type]


def test_settings_made_from_settings_share_the_frozen_arrays():
    # A ROI put builds new settings with dataclasses.replace: the multi-MB background and the
    # axis must be shared, not copied and re-validated on every put.
    dark = np.full((64, 32), 7, dtype=np.uint16)
    axis = np.linspace(100.0, 200.0, 32)
    first = Settings(background=dark, axis=axis)
    second = dataclasses.replace(first, roi=(3, 9))
    assert second.background is first.background and second.axis is first.axis
    assert not second.background.flags.writeable and not second.axis.flags.writeable


def test_arrays_the_settings_do_not_own_are_still_copied():
    dark = np.full((8, 8), 7, dtype=np.uint16)
    settings = Settings(background=dark)
    dark[:] = 100  # the caller's array: changing it must not change the settings
    assert (settings.background == 7).all()
    base = np.full((8, 8), 5, dtype=np.uint16)
    view = base.view()
    view.setflags(write=False)  # read-only, but a view of memory somebody else may change
    from_view = Settings(background=view)
    base[:] = 50
    assert (from_view.background == 5).all()
    owned = settings.background
    owned.setflags(write=True)  # made writable again: no longer trusted as frozen
    again = Settings(background=owned)
    assert again.background is not owned
    owned[:] = 1
    assert (again.background == 7).all()


def test_a_shared_frozen_array_is_validated_like_any_other():
    axis_settings = Settings(axis=np.linspace(1.0, 2.0, 16))
    with pytest.raises(ValueError, match="2-D"):
        Settings(background=axis_settings.axis)  # a frozen 1-D axis is no background


# --- energy axis polynomial ---------------------------------------------------------------


def test_the_polynomial_gives_the_axis_and_the_fit_in_ev():
    image = _line_image(center=180.0, sigma=12.0)
    poly = (9000.0, 0.5, 0.0)  # 0.5 eV per column
    settings = Settings(roi=(8, 20), axis_poly=poly)
    result = process(image, settings)
    x = np.arange(400.0)
    np.testing.assert_array_equal(result.axis, 9000.0 + 0.5 * x + 0.0 * x * x)
    assert not result.axis.flags.writeable
    assert result.fit.ok and result.fit.center == pytest.approx(9090.0, rel=1e-9)
    assert result.fit.fwhm == pytest.approx(0.5 * 12.0 * 2.354820045, rel=1e-6)
    # the axis is made once per (polynomial, width): settings made from settings share it
    assert settings.axis_for(400) is result.axis
    assert dataclasses.replace(settings, roi=(9, 20)).axis_for(400) is result.axis
    quadratic = Settings(axis_poly=(9000, -0.25, 1e-4)).axis_for(400)  # ints accepted
    np.testing.assert_allclose(quadratic, 9000 - 0.25 * x + 1e-4 * x * x, rtol=0, atol=1e-9)


def test_the_polynomial_leaves_describe_and_the_column_axis_alone():
    settings = Settings(roi=(1, 5), background_name="bg.h5", axis_poly=(1.0, 2.0, 3.0))
    assert settings.describe() == {"background": "bg.h5", "roi": [1, 5]}
    assert settings.axis_poly == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(Settings().axis_for(5), np.arange(5.0))
    with pytest.raises(FrameMismatchError) as caught:
        Settings(axis=np.arange(4.0)).axis_for(5)
    assert caught.value.kind == "axis_length"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axis": np.arange(4.0), "axis_poly": (0.0, 1.0, 0.0)}, "not both"),
        ({"axis_poly": (0.0, 1.0)}, "3 coefficients"),
        ({"axis_poly": (0.0, 1.0, 0.0, 0.0)}, "3 coefficients"),
        ({"axis_poly": "123"}, r"\(c0, c1, c2\)"),
        ({"axis_poly": 5.0}, r"\(c0, c1, c2\)"),
        ({"axis_poly": (0.0, float("nan"), 0.0)}, "c1 must be finite"),
        ({"axis_poly": (float("inf"), 1.0, 0.0)}, "c0 must be finite"),
        ({"axis_poly": (0.0, 1.0, "x")}, "c2 must be a number"),
        ({"axis_poly": (0.0, True, 0.0)}, "c1 must be a number"),
        ({"axis_poly": (5.0, 0.0, 0.0)}, "constant"),
    ],
)
def test_bad_polynomials_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Settings(**kwargs)


def test_a_polynomial_that_turns_within_the_width_is_an_axis_mismatch():
    settings = Settings(axis_poly=(9000.0, 0.5, -1e-4))  # turns at x = 2500
    assert Mismatch.AXIS.fields == ("axis", "axis_poly")
    assert settings.mismatches((10, 2500)) == {}
    assert settings.mismatches((10, 2560)) == {
        Mismatch.AXIS: "energy axis E = 9000 + 0.5 x - 0.0001 x^2 turns at column 2500 of "
                       "2560: not monotonic"}
    frame = np.ones((10, 2560), np.uint16)
    with pytest.raises(FrameMismatchError, match="turns at column 2500") as caught:
        process(frame, settings)
    assert caught.value.kind == Mismatch.AXIS
    assert process(frame[:, :2500], settings).axis.shape == (2500,)
    flat = Settings(axis_poly=(1.0, 1e-300, 0.0)).mismatches((2, 5))[Mismatch.AXIS]
    assert "equal values at columns 0 and 1 of 5: not strictly monotonic" in flat
    huge = Settings(axis_poly=(0.0, 1.0, 1e308)).mismatches((2, 5))[Mismatch.AXIS]
    assert "not finite from column 2 of 5" in huge


def test_the_pipeline_keeps_the_last_good_polynomial_for_frames_it_does_not_fit():
    good = Settings(axis_poly=(9000.0, 0.5, 0.0))
    bad = dataclasses.replace(good, roi=(1, 4), axis_poly=(9000.0, 0.5, -1e-4))
    resolution = resolve_for_frame(bad, good, (10, 2560))
    assert resolution is not None
    assert set(resolution.refused) == {Mismatch.AXIS}
    assert resolution.settings.axis_poly == good.axis_poly and resolution.settings.roi == (1, 4)
    assert resolve_for_frame(bad, good, (10, 2000)).settings is bad  # it fits narrower frames
    # a fallback that does not fit either: the column index
    external = Settings(axis=np.arange(2560.0) * 2)
    fallback = resolve_for_frame(bad, external, (10, 2000))
    assert fallback is not None and fallback.settings.axis_poly == bad.axis_poly
    neither = resolve_for_frame(bad, Settings(axis_poly=bad.axis_poly), (10, 2560))
    assert neither is not None and neither.settings.axis is None
    assert neither.settings.axis_poly is None
    # an external axis refused for its length falls back to a polynomial that fits
    wrong_length = Settings(axis=np.arange(100.0))
    assert resolve_for_frame(wrong_length, good, (10, 2560)).settings.axis_poly == good.axis_poly


@settings(max_examples=200, deadline=None)
@given(
    c0=st.floats(-1e4, 1e4),
    c1=st.floats(-10.0, 10.0),
    c2=st.floats(-1e-2, 1e-2),
    width=st.integers(2, 3000),
)
def test_a_polynomial_fits_a_width_exactly_when_it_is_strictly_monotonic_over_it(
    c0, c1, c2, width
):
    try:
        settings = Settings(axis_poly=(c0, c1, c2))
    except ValueError:
        assert c1 == 0 and c2 == 0
        return
    x = np.arange(width, dtype=np.float64)
    values = c0 + c1 * x + c2 * (x * x)
    steps = np.diff(values)
    monotonic = bool((steps > 0).all() or (steps < 0).all())
    reason = settings.mismatches((3, width)).get(Mismatch.AXIS)
    assert (reason is None) == monotonic
    if monotonic:
        np.testing.assert_array_equal(settings.axis_for(width), values)
    elif "turns at column" in reason:
        column = int(reason.split("turns at column ")[1].split()[0])
        assert (np.sign(steps[:column]) == np.sign(steps[0])).all()
        assert np.sign(steps[column]) == -np.sign(steps[0])


# --- saturated pixels ----------------------------------------------------------------------

SATURATION_DTYPES = [*INTEGER_DTYPES, *FLOAT_DTYPES]


def _expected_saturated(image: np.ndarray, level, ymin: int, ymax: int) -> int:
    """The definition: raw pixels of the ROI rows at or above the level (None: the dtype's
    top; nothing for floats)."""
    if level is None:
        if image.dtype.kind == "f":
            return 0
        level = np.iinfo(image.dtype).max
    rows = image[ymin:ymax]
    if rows.dtype.kind in "iu":  # exact: no float rounding of 64-bit pixels
        return sum(int(p) >= level for p in rows.ravel().tolist())
    return int((rows.astype(np.float64) >= level).sum())


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(SATURATION_DTYPES),
    background=st.sampled_from([None, "same", "uint16", "float32", "compact"]),
    height=st.integers(1, 24),
    width=st.integers(1, 90),
    level_choice=st.sampled_from(["none", "pixel", "pixel-1", "pixel+1", "pixel+0.5",
                                  "pixel-0.5", "zero", "huge"]),
    n_top=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_saturated_pixels_are_counted_exactly_by_every_kernel(
    dtype, background, height, width, level_choice, n_top, seed
):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if background == "compact":
        dtype = np.dtype(np.uint16)
    image = _random_image(rng, dtype, (height, width))
    if dtype.kind == "f":
        top = 65504 if dtype == np.float16 else np.finfo(dtype).max
    else:  # 64-bit pixels at the top would overflow the sum (the frame is refused)
        top = 2**40 if dtype.itemsize == 8 else np.iinfo(dtype).max
    image.flat[rng.choice(image.size, min(n_top, image.size), replace=False)] = top
    if dtype.kind == "f" and image.size > 3:
        image.flat[rng.integers(0, image.size)] = np.nan  # never counts
    if background is None:
        dark = None
    elif background == "compact":
        dark = _dark_frame(rng, (height, width), 0, 100)
    else:
        dark_dtype = dtype if background == "same" else np.dtype(background)
        dark = _random_image(rng, dark_dtype, (height, width))
        if dark_dtype.kind == "f":
            dark = np.nan_to_num(dark, nan=0.0)
        if dtype.itemsize == 8 and dtype.kind in "iu":
            dark = np.clip(dark, 0, 1000).astype(dark_dtype)  # keep the 64-bit sum exact
    pixel = float(image.flat[rng.integers(0, image.size)])
    if not np.isfinite(pixel):
        pixel = 1000.0
    pixel = abs(pixel)
    level = {"none": None, "pixel": pixel, "pixel-1": max(pixel - 1, 0.0),
             "pixel+1": pixel + 1, "pixel+0.5": pixel + 0.5,
             "pixel-0.5": max(pixel - 0.5, 0.0), "zero": 0, "huge": 1e30}[level_choice]
    if level is not None and level_choice != "huge" and float(level).is_integer():
        level = int(level)  # whole numbers as int: exact for 64-bit pixels
    ymin = int(rng.integers(0, height))
    ymax = int(rng.integers(ymin + 1, height + 1))
    settings = Settings(roi=(ymin, ymax), background=dark, saturation_level=level)
    if background == "compact":
        assert settings.plan_for(image.shape, image.dtype).compact_background is not None
    result = process(image, settings)
    assert result.n_saturated == _expected_saturated(image, level, ymin, ymax)
    assert type(result.n_saturated) is int


def test_the_camera_case_counts_the_saturated_pixels_of_the_simulator():
    camera = SimulatedCamera(SimConfig(height=256, width=320, pool=3, seed=4, saturate=37))
    y0, y1 = camera.band
    for image, truth in zip(camera.images, camera.truths, strict=True):
        for roi, background in (((y0, y1), camera.background), ((0, 0), None),
                                ((y0 + 1, y1 - 1), camera.background)):
            settings = Settings(roi=roi, background=background)
            ymin, ymax = roi[0], roi[1] or image.shape[0]
            expected = int((image[ymin:ymax] >= 65535).sum())
            assert process(image, settings).n_saturated == expected
        assert process(image, Settings(roi=(y0, y1))).n_saturated == truth.saturated == 37
        # the background changes the spectrum, never the count of raw pixels at the top
        below = Settings(roi=(y0, y1), background=camera.background, saturation_level=65534.5)
        assert process(image, below).n_saturated == 37


def test_saturation_levels_at_the_edges():
    image = np.array([[0, 1, 65535], [65534, 65535, 7]], dtype=np.uint16)
    levels = (None, 0, 0.5, 1, 65534, 65534.5, 65535, 65535.5, 65536, 10**30)
    count = [process(image, Settings(saturation_level=level)).n_saturated for level in levels]
    assert count == [2, 6, 5, 5, 3, 2, 2, 0, 0, 0]
    floats = image.astype(np.float32)
    floats[0, 0] = np.inf
    assert process(floats, Settings()).n_saturated == 0  # floats have no top
    assert process(floats, Settings(saturation_level=65535)).n_saturated == 3  # inf counts
    assert process(floats, Settings(saturation_level=65534.5)).n_saturated == 3
    signed = np.array([[-5, 127, 3]], dtype=np.int8)
    assert process(signed, Settings()).n_saturated == 1
    assert process(signed, Settings(saturation_level=0)).n_saturated == 2


def test_rows_wider_than_a_16_bit_count():
    image = np.full((3, 70_001), 65535, dtype=np.uint16)
    assert process(image, Settings(roi=(1, 3))).n_saturated == 2 * 70_001
    dark = np.full(image.shape, 100, dtype=np.uint16)
    assert process(image, Settings(background=dark)).n_saturated == 3 * 70_001


@pytest.mark.parametrize(
    ("level", "message"),
    [(-1, "negative"), (-0.5, "negative"), (float("nan"), "finite"), (float("inf"), "finite"),
     (True, "number"), ("65535", "number"), ([1], "number")],
)
def test_bad_saturation_levels_are_refused(level, message):
    with pytest.raises(ValueError, match=message):
        Settings(saturation_level=level)


def test_saturation_level_is_kept_as_given():
    assert Settings(saturation_level=np.uint16(4000)).saturation_level == 4000
    assert type(Settings(saturation_level=np.uint16(4000)).saturation_level) is int
    assert Settings(saturation_level=np.float32(0.5)).saturation_level == 0.5
    assert Settings(saturation_level=None).saturation_level is None


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_a_64_bit_image_with_a_float_background_is_summed_in_float64(dtype):
    image = np.arange(12, dtype=dtype).reshape(3, 4)
    result = process(image, Settings(background=np.ones((3, 4), np.float32)))
    assert result.spectrum.dtype == np.float64
    np.testing.assert_array_equal(result.spectrum, [10.0, 12.0, 15.0, 18.0])
