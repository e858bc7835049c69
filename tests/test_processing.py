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
    RunningAverage,
    Settings,
    compact_background,
    process,
    spectrum,
)

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
