"""The compiled Gaussian fit against the truth and against scipy's curve_fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from scipy.optimize import curve_fit

from psss_ioc.core.fit import _LOOP_MATH, FWHM_PER_SIGMA, FitStatus, _exp_nonpositive, fit_spectrum


def model(x, amplitude, center, sigma, offset):
    return offset + amplitude * np.exp(-((x - center) ** 2) / (2 * sigma**2))


AXES = {
    "column index": np.arange(2560, dtype=np.float64),
    "eV increasing": np.linspace(11900.0, 12300.0, 2560),
    "eV decreasing": np.linspace(12300.0, 11900.0, 2560),
    "non-uniform": 11900.0 + 400.0 * np.linspace(0.0, 1.0, 2560) ** 1.3,
}


@pytest.mark.parametrize("axis_name", list(AXES))
@pytest.mark.parametrize("relative_center", [0.2, 0.5, 0.93])
@pytest.mark.parametrize("relative_width", [0.004, 0.03, 0.12])
def test_noiseless_lines_are_recovered_to_1e6(axis_name, relative_center, relative_width):
    x = AXES[axis_name]
    span = abs(x[-1] - x[0])
    center = min(x[0], x[-1]) + relative_center * span
    sigma = relative_width * span
    y = model(x, 3.0e5, center, sigma, 1200.0)
    result = fit_spectrum(x, y)
    assert result.status is FitStatus.OK, result.reason
    assert result.center == pytest.approx(center, rel=1e-6, abs=1e-6 * span)
    assert result.fwhm == pytest.approx(FWHM_PER_SIGMA * sigma, rel=1e-6)
    assert result.amplitude == pytest.approx(3.0e5, rel=1e-6)
    assert result.offset == pytest.approx(1200.0, rel=1e-5)
    np.testing.assert_allclose(result.curve, y, rtol=1e-6)


@pytest.mark.parametrize("snr", [5, 10, 30, 100, 300, 1000])
@pytest.mark.parametrize("seed", range(4))
def test_noisy_lines_agree_with_curve_fit(snr, seed):
    rng = np.random.default_rng(1000 * snr + seed)
    x = AXES["eV increasing"]
    amplitude, center, sigma, offset = 1000.0, rng.uniform(12000, 12200), rng.uniform(4, 30), 80
    y = model(x, amplitude, center, sigma, offset) + rng.normal(0, amplitude / snr, x.size)
    ours = fit_spectrum(x, y, min_snr=0.0)
    p0 = [amplitude, center + 2.0, sigma * 1.1, offset]
    reference, _ = curve_fit(model, x, y, p0=p0)
    assert ours.status is FitStatus.OK, ours.reason
    reference_fwhm = FWHM_PER_SIGMA * abs(reference[2])
    assert abs(ours.center - reference[1]) <= 0.01 * reference_fwhm
    assert ours.fwhm == pytest.approx(reference_fwhm, rel=0.01)


def test_very_low_and_very_high_counts():
    x = AXES["column index"]
    for amplitude in (1e-6, 3.0, 1e12):
        y = model(x, amplitude, 1234.5, 40.0, 0.1 * amplitude)
        result = fit_spectrum(x, y)
        assert result.status is FitStatus.OK, (amplitude, result.reason)
        assert result.center == pytest.approx(1234.5, rel=1e-8)
        assert result.fwhm == pytest.approx(40.0 * FWHM_PER_SIGMA, rel=1e-6)


def test_line_at_the_edge_of_the_window():
    x = AXES["column index"]
    y = model(x, 500.0, 2545.0, 30.0, 10.0)  # half of the line is outside
    result = fit_spectrum(x, y)
    assert result.status is FitStatus.OK, result.reason
    assert result.center == pytest.approx(2545.0, abs=1e-4)


def test_line_centred_outside_the_window_is_not_reported_as_a_fit():
    x = AXES["column index"]
    y = model(x, 500.0, 2700.0, 60.0, 10.0)
    result = fit_spectrum(x, y)
    assert result.status is not FitStatus.OK
    assert math.isnan(result.center)


@pytest.mark.parametrize(
    ("y", "status", "reason"),
    [
        (np.zeros(2560), FitStatus.LOW_SIGNAL, "flat"),
        (np.full(2560, 77.0), FitStatus.LOW_SIGNAL, "flat"),
        (np.random.default_rng(2).normal(100, 5, 2560), FitStatus.LOW_SIGNAL, "signal-to-noise"),
        (np.where(np.arange(2560) == 900, 1e6, 0.0), FitStatus.NOT_CONVERGED, "hot pixel"),
        (np.where(np.arange(2560) == 900, np.nan, 1.0), FitStatus.INVALID_INPUT, "non-finite"),
        (np.where(np.arange(2560) == 3, np.inf, 1.0), FitStatus.INVALID_INPUT, "non-finite"),
        (np.ones(3), FitStatus.INVALID_INPUT, "too few"),
        (-model(np.arange(2560.0), 500.0, 1e3, 30.0, 0.0), FitStatus.LOW_SIGNAL, "signal-to-noise"),
    ],
    ids=["zeros", "flat", "noise", "hot-pixel", "nan", "inf", "short", "dip"],
)
def test_failures_get_their_status_and_no_fake_values(y, status, reason):
    x = np.arange(y.size, dtype=np.float64)
    result = fit_spectrum(x, y)
    assert result.status is status
    assert reason in result.reason
    assert not result.ok
    for value in (result.center, result.fwhm, result.amplitude, result.offset, result.sigma):
        assert math.isnan(value)
    assert result.curve is None


def test_nan_in_axis_and_shape_mismatch_are_invalid_input():
    y = model(np.arange(100.0), 10.0, 50.0, 5.0, 0.0)
    axis = np.arange(100.0)
    axis[10] = np.nan
    assert fit_spectrum(axis, y).status is FitStatus.INVALID_INPUT
    assert fit_spectrum(np.arange(99.0), y).status is FitStatus.INVALID_INPUT


def test_disabled_fit_keeps_moments():
    x = np.arange(500.0)
    result = fit_spectrum(x, model(x, 10.0, 250.0, 20.0, 0.0), enabled=False)
    assert result.status is FitStatus.DISABLED
    assert result.com == pytest.approx(250.0, abs=1e-6)
    assert result.rms == pytest.approx(20.0, rel=0.01)


def test_iteration_limit_is_reported_as_not_converged():
    rng = np.random.default_rng(5)
    x = np.arange(2560.0)
    y = model(x, 100.0, 1200.0, 80.0, 0.0) + rng.normal(0, 2, x.size)
    result = fit_spectrum(x, y, max_iterations=1)
    assert result.status is FitStatus.NOT_CONVERGED
    assert "iteration limit" in result.reason


@njit(fastmath=_LOOP_MATH)
def _exp_of_each(v: np.ndarray) -> np.ndarray:
    out = np.empty(v.shape[0])
    for i in range(v.shape[0]):
        out[i] = _exp_nonpositive(v[i])
    return out


@settings(max_examples=60, deadline=None)
@given(
    v=st.lists(st.floats(-800.0, 0.0), min_size=1, max_size=64),
)
def test_vectorised_exp_in_the_model_matches_numpy(v):
    # The fit's exp in a loop compiled as the model's (where it vectorises), on exp(-x^2).
    x = np.sqrt(-np.asarray(v, dtype=np.float64))
    got = _exp_of_each(-(x**2))
    expected = np.exp(-(x**2))
    tiny = expected < 1e-300  # our exp stops at exp(-700) ~ 1e-304, harmless for fitting
    np.testing.assert_allclose(got[~tiny], expected[~tiny], rtol=1e-12)
    assert (got[tiny] < 1e-300).all()


@pytest.mark.parametrize("axis_name", list(AXES))
@pytest.mark.parametrize("relative_width", [0.004, 0.05])
def test_fitted_curve_is_the_model_at_the_fitted_parameters(axis_name, relative_width):
    # The curve comes from the fit's last accepted evaluation (normalised units), not from a
    # separate pass: it must still be the model on the caller's axis at the reported values.
    rng = np.random.default_rng(3)
    x = AXES[axis_name]
    span = abs(x[-1] - x[0])
    center = min(x[0], x[-1]) + 0.4 * span
    y = model(x, 5.0e4, center, relative_width * span, 300.0) + rng.normal(0, 50.0, x.size)
    result = fit_spectrum(x, y)
    assert result.status is FitStatus.OK, result.reason
    expected = model(x, result.amplitude, result.center, result.sigma, result.offset)
    np.testing.assert_allclose(result.curve, expected, rtol=1e-9, atol=1e-9 * result.amplitude)
    assert fit_spectrum(x, y, with_curve=False).curve is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 1000, 2559])
def test_any_non_finite_value_anywhere_is_invalid_input(bad, where):
    x = np.arange(2560.0)
    y = model(x, 100.0, 1200.0, 80.0, 5.0)
    y[where] = bad
    assert fit_spectrum(x, y).status is FitStatus.INVALID_INPUT
    axis = x.copy()
    axis[where] = bad
    assert fit_spectrum(axis, model(x, 100.0, 1200.0, 80.0, 5.0)).status is FitStatus.INVALID_INPUT


def test_uniform_step_detects_uniform_axes_only():
    from psss_ioc.core.fit import uniform_step

    assert uniform_step(np.arange(2560.0)) == 1.0
    assert uniform_step(np.linspace(12300.0, 11900.0, 2560)) == pytest.approx(-400.0 / 2559)
    assert uniform_step((np.arange(2560.0) - 1279.5) / 2559) == pytest.approx(1 / 2559)
    assert uniform_step(AXES["non-uniform"]) == 0.0
    bent = np.arange(2560.0)
    bent[1000] += 1e-9  # one point off the grid by a billionth of a step
    assert uniform_step(bent) == 0.0
    assert uniform_step(np.array([1.0])) == 0.0
    assert uniform_step(np.array([1.0, np.nan, 3.0])) == 0.0


@pytest.mark.parametrize("spacing_sign", [1.0, -1.0])
@pytest.mark.parametrize("center", [-3.0, 0.0, 0.37, 1279.5, 1280.2, 2559.0, 2700.0, 9e6])
@pytest.mark.parametrize("sigma", [3.9, 4.1, 30.0, 300.0, 5000.0, -120.0])
@pytest.mark.parametrize("n", [17, 130, 2560])
def test_gaussian_by_recurrence_equals_the_exact_one(spacing_sign, center, sigma, n):
    """The uniform-axis recurrence (Gaussian without exp per point) is exact to 1e-12."""
    from psss_ioc.core.fit import _unit_gaussian, _unit_gaussian_exact, uniform_step

    x = spacing_sign * np.arange(n, dtype=np.float64)
    c = spacing_sign * center
    fast = np.full(n, np.nan)
    exact = np.full(n, np.nan)
    _unit_gaussian(x, c, sigma, fast, uniform_step(x))
    _unit_gaussian_exact(x, c, 1.0 / (sigma * sigma), exact)
    assert np.isfinite(fast).all()  # every point written
    big = exact > 1e-30
    np.testing.assert_allclose(fast[big], exact[big], rtol=1e-12)
    assert (fast[~big] < 1e-29).all()


@pytest.mark.parametrize("axis", [np.ones(100), np.full(100, 12000.0)])
def test_axis_without_extent_is_invalid_input_not_an_exception(axis):
    y = model(np.arange(100.0), 100.0, 50.0, 5.0, 3.0)
    result = fit_spectrum(axis, y)
    assert result.status is FitStatus.INVALID_INPUT
    assert "no extent" in result.reason
    assert math.isnan(result.center)


def test_a_prepared_axis_gives_the_same_fit_and_leaves_the_callers_array_writable():
    from psss_ioc.core.fit import analyse_on_axis, fit_axis, result_of

    x = np.linspace(12300.0, 11900.0, 2560)
    y = model(x, 500.0, 12050.0, 30.0, 20.0) + np.random.default_rng(1).normal(0, 3, x.size)
    prepared = fit_axis(x)
    assert x.flags.writeable
    curve = np.empty(x.size)
    ours = result_of(
        analyse_on_axis(y, curve, x, prepared.normalised, prepared.numbers, True, 5.0, 50), curve
    )
    reference = fit_spectrum(x, y)
    assert ours.status is FitStatus.OK
    for name in ("center", "sigma", "amplitude", "offset", "chi2_reduced", "com", "rms"):
        assert getattr(ours, name) == getattr(reference, name), name
    np.testing.assert_array_equal(ours.curve, reference.curve)


def test_spiky_sase_spectra_converge_in_few_steps_to_the_least_squares_minimum():
    """A Gaussian describes a SASE spectrum only roughly: the residuals stay large, and
    Gauss-Newton alone converged linearly (up to 105 LM steps on the simulated camera's
    shots). With the residuals' curvature (Newton's model) a few steps reach the minimum
    that scipy's least_squares finds with tight tolerances."""
    from scipy.optimize import least_squares

    from psss_ioc.streams.simulate import SimConfig, SimulatedCamera

    camera = SimulatedCamera(SimConfig(height=200, width=2560, pool=24, seed=3))
    x = np.arange(2560, dtype=np.float64)
    for image in camera.images:
        y = np.clip(image.astype(np.int64) - camera.background, 0, None).sum(0).astype(float)
        result = fit_spectrum(x, y)
        assert result.status is FitStatus.OK, result.reason
        assert result.iterations <= 30  # all levels, coarse and full
        start = [result.amplitude, result.center, result.sigma, result.offset]
        best = least_squares(
            lambda p, y=y: model(x, *p) - y, start, method="lm", xtol=1e-15, ftol=1e-15
        ).x
        assert result.center == pytest.approx(best[1], abs=0.05)  # columns; line ~200 wide
        assert result.sigma == pytest.approx(best[2], rel=1e-3)
