"""Gaussian-plus-offset fit of a spectrum: compiled Levenberg-Marquardt, moments, fit status.

Model: ``offset + amplitude * exp(-(x - center)**2 / (2 * sigma**2))``,
FWHM = 2 * sqrt(2 ln 2) * |sigma|.

Everything that runs per frame is compiled with numba (``nogil=True`` so the IOC's other
threads run meanwhile, ``cache=True`` so a production start does not pay the compilation).
The fit works in normalised coordinates (x scaled to about [-0.5, 0.5], y to [-1, 1]) so that
axis units (eV or column index) and count levels (a few counts to 1e9) condition it equally.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic

from psss_ioc.core.fit_status import FitStatus

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
DEFAULT_MIN_SNR = 5.0
DEFAULT_MAX_ITERATIONS = 50
MIN_POINTS = 5
_ROBUST_SAMPLES = 512


class Reason(enum.IntEnum):
    """Why a fit has its status. Each reason carries its `status` and its `text` (the
    FitResult's ``reason``). The compiled code returns its value (``Reason.FLAT.value``):
    numba returns no strings cheaply, and an enum member or a named tuple costs a Python
    call each to box (microseconds per frame, from cold caches)."""

    status: FitStatus
    text: str

    def __new__(cls, value: int, status: FitStatus, text: str) -> Reason:
        member = int.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.text = text
        return member

    FITTED = 0, FitStatus.OK, ""
    NON_FINITE_SPECTRUM = 1, FitStatus.INVALID_INPUT, "spectrum has non-finite values"
    NON_FINITE_AXIS = 2, FitStatus.INVALID_INPUT, "energy axis has non-finite values"
    TOO_FEW_POINTS = 3, FitStatus.INVALID_INPUT, "too few points to fit"
    FLAT = 4, FitStatus.LOW_SIGNAL, "flat spectrum: no signal"
    BELOW_SNR = 5, FitStatus.LOW_SIGNAL, "peak below the signal-to-noise threshold"
    ITERATION_LIMIT = 6, FitStatus.NOT_CONVERGED, "iteration limit reached"
    AMPLITUDE_NOT_POSITIVE = 7, FitStatus.NOT_CONVERGED, "fitted amplitude is not positive"
    CENTER_OUTSIDE_AXIS = 8, FitStatus.NOT_CONVERGED, "fitted centre lies outside the energy axis"
    NARROWER_THAN_A_BIN = (
        9, FitStatus.NOT_CONVERGED, "fitted width is narrower than one bin (hot pixel?)"
    )
    DIVERGED = 10, FitStatus.NOT_CONVERGED, "fit diverged (non-finite parameters)"
    DISABLED = 11, FitStatus.DISABLED, "fit disabled"
    AXIS_WITHOUT_EXTENT = (
        12, FitStatus.INVALID_INPUT, "energy axis has no extent (all values equal)"
    )


class FitResult(NamedTuple):
    """Fit and moments of one spectrum. Fit values are NaN unless ``status`` is OK.

    A named tuple: immutable, and cheap to make (one per frame, in the IOC's worker thread).
    """

    status: FitStatus
    reason: str
    amplitude: float
    center: float
    sigma: float
    offset: float
    chi2_reduced: float
    iterations: int
    com: float
    rms: float
    curve: np.ndarray | None

    @property
    def fwhm(self) -> float:
        return FWHM_PER_SIGMA * abs(self.sigma)

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK


_REASON_OF_VALUE = tuple(Reason)  # Reason(value) without the enum call (`result_of`)
assert all(reason.value == value for value, reason in enumerate(_REASON_OF_VALUE))

# What the compiled `analyse` returns, a plain tuple (see `Reason`): (reason value, amplitude,
# center, sigma, offset, chi2_reduced, iterations, com, rms). `result_of` unpacks it by name;
# the fit values in it mean something only when the reason is FITTED.
Analysis = tuple[int, float, float, float, float, float, int, float, float]


# Compiled per-frame code: nogil so the IOC's other threads run meanwhile, cached on disk so
# a production start does not compile, and numpy's division semantics (x / 0 is inf or NaN,
# never an exception: bad data must give a fit status, not a raised error).
_COMPILED = {"cache": True, "nogil": True, "error_model": "numpy"}

# Loops over the spectrum may reassociate their sums so that LLVM vectorises them: a fastmath
# subset without the no-NaN/no-inf assumptions (NaN and inf still propagate and are checked).
_LOOP_MATH = {"reassoc", "contract", "arcp", "nsz"}


@njit(**_COMPILED)
def _robust_noise(y: np.ndarray) -> float:
    """Noise sigma from the median absolute first difference (insensitive to the line).

    Uses at most ~_ROBUST_SAMPLES neighbouring pairs spread over the spectrum: a median of
    that many estimates the noise about as well as the median of all, for a fraction of the
    cost (docs/performance.md, "Kernels").
    """
    n = y.shape[0]
    stride = max(1, (n - 1) // _ROBUST_SAMPLES)
    m = (n - 1 + stride - 1) // stride
    diffs = np.empty(m)
    for j in range(m):
        i = j * stride
        diffs[j] = abs(y[i + 1] - y[i])
    return 1.4826 * np.median(diffs) / math.sqrt(2.0)


@njit(**_COMPILED)
def _robust_baseline(y: np.ndarray) -> float:
    """Median of at most ~_ROBUST_SAMPLES evenly spread values: the spectrum's baseline."""
    stride = max(1, y.shape[0] // _ROBUST_SAMPLES)
    return np.median(y[::stride])


@njit(**_COMPILED, fastmath=_LOOP_MATH)
def _moments(x: np.ndarray, y: np.ndarray, baseline: float) -> tuple[float, float]:
    """Centre of mass and rms width of ``max(y - baseline, 0)``; NaN when there is none."""
    total = 0.0
    first = 0.0
    for i in range(y.shape[0]):
        w = max(y[i] - baseline, 0.0)
        total += w
        first += w * x[i]
    if total <= 0.0:
        return math.nan, math.nan
    com = first / total
    second = 0.0
    for i in range(y.shape[0]):
        w = max(y[i] - baseline, 0.0)
        second += w * (x[i] - com) ** 2
    return com, math.sqrt(second / total)


@njit(**_COMPILED, fastmath=_LOOP_MATH)
def _all_finite(values: np.ndarray) -> bool:
    """True when no value is NaN or infinite (inf * 0 and NaN * 0 are NaN; one vector pass)."""
    acc = 0.0
    for i in range(values.shape[0]):
        acc += values[i] * 0.0
    return acc == 0.0


# Fast exp for the fit's inner loop. libm's exp is an opaque call that stops LLVM from
# vectorising the loop; this one (Cody-Waite range reduction, degree-12 polynomial, 2**k built
# in the exponent bits; relative error ~2e-16 on [-700, 0]) vectorises with AVX2.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LOG2E = 1.4426950408889634
_ROUNDING_MAGIC = 6755399441055744.0  # 1.5 * 2**52: k + this holds k in its low bits
_EXP_MIN_ARG = -700.0
_TAIL_EXPONENT = -80.0  # exp(-80) ~ 2e-35 of the peak: below double precision of any sum


@intrinsic
def _float_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """Reinterpret a float64 as its int64 bit pattern."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], llvm_ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _bits_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """Reinterpret an int64 bit pattern as a float64."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], llvm_ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(**_COMPILED)
def _exp_nonpositive(v: float) -> float:
    """exp(v) for v <= 0 (values below -700 are taken as -700, i.e. ~1e-304)."""
    v = max(v, _EXP_MIN_ARG)
    # floor() survives the caller's fastmath flags (numba applies them to inlined callees
    # too); the classic (x + magic) - magic rounding would not. np.floor keeps k a float:
    # math.floor returns an int, and AVX2 has no vector int64 <-> float64 conversion: that
    # one call would make LLVM run the whole loop on scalars.
    k = np.floor(v * _LOG2E + 0.5)  # round(v / ln 2)
    shifted = k + _ROUNDING_MAGIC
    r = (v - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln(2) / 2
    poly = 1.0 / 479001600.0
    poly = poly * r + 1.0 / 39916800.0
    poly = poly * r + 1.0 / 3628800.0
    poly = poly * r + 1.0 / 362880.0
    poly = poly * r + 1.0 / 40320.0
    poly = poly * r + 1.0 / 5040.0
    poly = poly * r + 1.0 / 720.0
    poly = poly * r + 1.0 / 120.0
    poly = poly * r + 1.0 / 24.0
    poly = poly * r + 1.0 / 6.0
    poly = poly * r + 0.5
    poly = poly * r + 1.0
    poly = poly * r + 1.0
    # The low bits of `shifted` hold k; (k + 1023) << 52 is 2**k as a float64.
    two_to_k = _bits_float((_float_bits(shifted) + 1023) << 52)
    return poly * two_to_k


_TAIL = math.exp(_TAIL_EXPONENT)
_EPSILON = float(np.finfo(np.float64).eps)
# Recurrence steps of one lane between exact restarts: bounds the rounding the products
# gather to ~64**2 / 2 ulp (3e-13 relative).
_SWEEP_STEPS = 64


@njit(**_COMPILED)
def uniform_step(x: np.ndarray) -> float:
    """x's spacing if x[i] = x[0] + i * spacing up to the rounding of its values, else 0.

    "Up to rounding": within 1e-12 of a spacing plus 4 ulp of the largest value (a linspace
    in eV is uniform only that far). The recurrence evaluates the Gaussian on the ideal
    grid; a point off it by d changes the value by |x - c| d / s**2 relative: with s >= 4
    spacings, where the recurrence runs, about 1e-11 at most where the value matters.
    """
    n = x.shape[0]
    if n < 2:
        return 0.0
    spacing = (x[n - 1] - x[0]) / (n - 1)
    if not (math.isfinite(spacing) and spacing != 0.0):
        return 0.0
    tolerance = 1e-12 * abs(spacing) + 4.0 * _EPSILON * max(abs(x[0]), abs(x[n - 1]))
    for i in range(n):
        if not abs(x[i] - (x[0] + i * spacing)) <= tolerance:
            return 0.0
    return spacing


@njit(**_COMPILED, fastmath=_LOOP_MATH)
def _unit_gaussian_exact(  # type: ignore[no-untyped-def]
    x: np.ndarray, c: float, inv_s2: float, e_buf: np.ndarray
):
    """e_buf[i] = exp(-(x[i] - c)**2 / 2 s**2), exactly 0 below exp(-80)."""
    for i in range(x.shape[0]):
        dx = x[i] - c
        t = -0.5 * dx * dx * inv_s2
        # Far tails are exactly 0: products of tiny values would be denormals, which cost
        # ~100 cycles each (narrow lines are mostly tail).
        e = _exp_nonpositive(t)
        e_buf[i] = e if t > _TAIL_EXPONENT else 0.0


@njit(**_COMPILED, fastmath=_LOOP_MATH)
def _unit_gaussian(  # type: ignore[no-untyped-def]
    x: np.ndarray, c: float, s: float, e_buf: np.ndarray, spacing: float
):
    """As `_unit_gaussian_exact`; on a uniform axis (spacing ``spacing``, else 0) by recurrence.

    On a uniform grid the Gaussian needs no exp per point: going away from the centre by
    one spacing multiplies it by g, and g by a constant r, so two products per point replace
    the exp's ~20 operations. Four interleaved lanes (each moving 4 steps) keep the
    products independent; every `_SWEEP_STEPS` the lanes restart from exact values. Both
    sweeps start at the centre and move outwards, so the values only ever shrink (no
    overflow, and an underflow is a true 0).
    """
    n = x.shape[0]
    inv_s2 = 1.0 / (s * s)
    first = (c - x[0]) / spacing if spacing != 0.0 else math.nan
    # Narrow lines (s < 4 steps) fall off too fast for the recurrence to gain anything.
    if not math.isfinite(first) or 16.0 * spacing * spacing * inv_s2 > 1.0 or n < 16:
        _unit_gaussian_exact(x, c, inv_s2, e_buf)
        return
    # Points from `split` on lie beyond the centre in the direction of increasing index.
    split = 0 if first <= 0.0 else (n if first >= n else math.ceil(first))
    for direction in (1, -1):  # one call site: its code is inlined once, not twice
        start, count = (split, n - split) if direction == 1 else (split - 1, split)
        _gaussian_sweep(x[0] - c, spacing, inv_s2, e_buf, start, count, direction)


@njit(**_COMPILED, fastmath=_LOOP_MATH)
def _gaussian_sweep(  # type: ignore[no-untyped-def]
    u_first: float, spacing: float, inv_s2: float, e_buf: np.ndarray, start: int, count: int,
    direction: int,
):
    """Fill ``count`` points of e_buf from ``start`` in ``direction`` (away from the centre).

    ``u_first``: x[0] - c; point i lies at u_first + i * spacing.
    """
    lane = 4.0 * spacing * direction  # a lane's move per recurrence spacing
    ratio = _exp_nonpositive(-lane * lane * inv_s2)
    i = start
    left = count
    while left >= 4:
        steps = min(left // 4, _SWEEP_STEPS)
        u0 = u_first + i * spacing
        u1 = u0 + spacing * direction
        u2 = u1 + spacing * direction
        u3 = u2 + spacing * direction
        e0 = _exp_nonpositive(-0.5 * u0 * u0 * inv_s2)
        e1 = _exp_nonpositive(-0.5 * u1 * u1 * inv_s2)
        e2 = _exp_nonpositive(-0.5 * u2 * u2 * inv_s2)
        e3 = _exp_nonpositive(-0.5 * u3 * u3 * inv_s2)
        # g = exp(-((u + lane)**2 - u**2) / 2 s**2); u and lane share their sign: g <= 1.
        g0 = _exp_nonpositive(min(-0.5 * lane * (2.0 * u0 + lane) * inv_s2, 0.0))
        g1 = _exp_nonpositive(min(-0.5 * lane * (2.0 * u1 + lane) * inv_s2, 0.0))
        g2 = _exp_nonpositive(min(-0.5 * lane * (2.0 * u2 + lane) * inv_s2, 0.0))
        g3 = _exp_nonpositive(min(-0.5 * lane * (2.0 * u3 + lane) * inv_s2, 0.0))
        for m in range(steps):
            j = i + 4 * m * direction
            # Below exp(-80) is exactly 0, as in the exact pass (and no denormals).
            e0 = e0 if e0 > _TAIL else 0.0
            e1 = e1 if e1 > _TAIL else 0.0
            e2 = e2 if e2 > _TAIL else 0.0
            e3 = e3 if e3 > _TAIL else 0.0
            e_buf[j] = e0
            e_buf[j + direction] = e1
            e_buf[j + 2 * direction] = e2
            e_buf[j + 3 * direction] = e3
            e0 *= g0
            e1 *= g1
            e2 *= g2
            e3 *= g3
            g0 = g0 * ratio if g0 > _TAIL else 0.0
            g1 = g1 * ratio if g1 > _TAIL else 0.0
            g2 = g2 * ratio if g2 > _TAIL else 0.0
            g3 = g3 * ratio if g3 > _TAIL else 0.0
        i += 4 * steps * direction
        left -= 4 * steps
    for k in range(left):
        u = u_first + (i + k * direction) * spacing
        t = -0.5 * u * u * inv_s2
        e = _exp_nonpositive(t)
        e_buf[i + k * direction] = e if t > _TAIL_EXPONENT else 0.0


@njit(**_COMPILED, fastmath=_LOOP_MATH)
def _evaluate(
    x: np.ndarray, y: np.ndarray, p: np.ndarray, jtj: np.ndarray, jtr: np.ndarray,
    hess: np.ndarray, e_buf: np.ndarray, spacing: float,
) -> float:
    """chi2 at p, and J^T J, J^T r and the Hessian of chi2 / 2 there, without a Jacobian.

    The Hessian is J^T J - sum_i r_i d2f_i (the residuals' curvature term Gauss-Newton
    leaves out); for the Gaussian its extra entries need four more sums of r e dx^k.
    Three vectorised passes over L1-resident data (the Gaussian into `e_buf`, then two halves
    of the sums): one fused pass needs more vector registers than the CPU has and spills
    them at every point. ``spacing``: x's uniform spacing, or 0.
    """
    a, c, s, off = p[0], p[1], p[2], p[3]
    inv_s2 = 1.0 / (s * s)
    inv_s = 1.0 / s
    n = x.shape[0]
    _unit_gaussian(x, c, s, e_buf, spacing)
    # The distinct entries of the symmetric J^T J, and J^T r, as scalars (registers).
    s00 = s01 = s03 = s11 = s13 = 0.0
    r0 = r1 = r3 = t1 = 0.0
    chi2 = 0.0
    for i in range(n):
        e = e_buf[i]
        dx = x[i] - c
        r = y[i] - (off + a * e)
        g1 = a * e * dx * inv_s2  # d model / d centre
        chi2 += r * r
        s00 += e * e
        s01 += e * g1
        s03 += e
        s11 += g1 * g1
        s13 += g1
        r0 += e * r
        r1 += g1 * r
        r3 += r
        t1 += e * r * dx
    s02 = s12 = s22 = s23 = r2 = t2 = t3 = t4 = 0.0
    for i in range(n):
        e = e_buf[i]
        dx = x[i] - c
        r = y[i] - (off + a * e)
        g1 = a * e * dx * inv_s2
        g2 = g1 * dx * inv_s  # d model / d sigma
        s02 += e * g2
        s12 += g1 * g2
        s22 += g2 * g2
        s23 += g2
        r2 += g2 * r
        w = e * r * dx * dx
        t2 += w
        t3 += w * dx
        t4 += w * dx * dx
    jtj[0, 0] = s00
    jtj[0, 1] = jtj[1, 0] = s01
    jtj[0, 2] = jtj[2, 0] = s02
    jtj[0, 3] = jtj[3, 0] = s03
    jtj[1, 1] = s11
    jtj[1, 2] = jtj[2, 1] = s12
    jtj[1, 3] = jtj[3, 1] = s13
    jtj[2, 2] = s22
    jtj[2, 3] = jtj[3, 2] = s23
    jtj[3, 3] = float(x.shape[0])
    jtr[0] = r0
    jtr[1] = r1
    jtr[2] = r2
    jtr[3] = r3
    # sum_i r_i d2f_i/dp_j dp_k; f = off + a e, e = exp(-dx^2 / 2s^2): zero in the offset's
    # row and column and at (a, a).
    inv_s3 = inv_s2 * inv_s
    c01 = t1 * inv_s2
    c02 = t2 * inv_s3
    c11 = a * (t2 * inv_s2 - r0) * inv_s2
    c12 = a * (t3 * inv_s2 - 2.0 * t1) * inv_s3
    c22 = a * (t4 * inv_s2 - 3.0 * t2) * inv_s2 * inv_s2
    hess[:, :] = jtj
    hess[0, 1] = hess[1, 0] = s01 - c01
    hess[0, 2] = hess[2, 0] = s02 - c02
    hess[1, 1] = s11 - c11
    hess[1, 2] = hess[2, 1] = s12 - c12
    hess[2, 2] = s22 - c22
    return chi2


@njit(**_COMPILED)
def _solve4(
    m: np.ndarray, b: np.ndarray, out: np.ndarray, lower: np.ndarray, tmp: np.ndarray
) -> bool:
    """Solve the symmetric positive definite 4x4 system m @ out = b by Cholesky.

    ``lower`` (4x4) and ``tmp`` (4) are scratch: the solver runs at every LM step, where
    two allocations cost more than the 4x4 arithmetic.
    """
    for i in range(4):
        for j in range(i + 1):
            acc = m[i, j]
            for k in range(j):
                acc -= lower[i, k] * lower[j, k]
            if i == j:
                if not acc > 0.0:
                    return False
                lower[i, i] = math.sqrt(acc)
            else:
                lower[i, j] = acc / lower[j, j]
    for i in range(4):
        acc = b[i]
        for k in range(i):
            acc -= lower[i, k] * tmp[k]
        tmp[i] = acc / lower[i, i]
    for i in range(3, -1, -1):
        acc = tmp[i]
        for k in range(i + 1, 4):
            acc -= lower[k, i] * out[k]
        out[i] = acc / lower[i, i]
    return True


# Relative tolerances on chi2 and on the parameters (MINPACK's defaults, as curve_fit uses).
_FTOL = 1.5e-8
_XTOL = 1.5e-8


@njit(**_COMPILED)
def _predicted_decrease(jtj: np.ndarray, jtr: np.ndarray, step: np.ndarray) -> float:
    """Decrease of chi2 the local quadratic model predicts for the step: 2 d.g - d.H.d."""
    linear = 0.0
    quadratic = 0.0
    for j in range(4):
        linear += step[j] * jtr[j]
        for k in range(4):
            quadratic += step[j] * jtj[j, k] * step[k]
    return 2.0 * linear - quadratic


@njit(**_COMPILED)
def _levenberg_marquardt(
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    max_iterations: int,
    e_best: np.ndarray,
    spacing: float = 0.0,
) -> tuple[bool, int, float]:
    """Minimise chi2 in place on p. Returns (converged, iterations, chi2).

    ``spacing``: x's uniform spacing (`uniform_step`), or 0 for any axis.

    On return ``e_best`` holds the unit Gaussian at the final p (the fitted curve is
    ``p[3] + p[0] * e_best``), so the caller need not evaluate the model once more.
    """
    jtj = np.empty((4, 4))
    jtr = np.empty(4)
    hess = np.empty((4, 4))
    trial_jtj = np.empty((4, 4))
    trial_jtr = np.empty(4)
    trial_hess = np.empty((4, 4))
    damped = np.empty((4, 4))
    step = np.empty(4)
    trial = np.empty(4)
    lower = np.empty((4, 4))
    scratch = np.empty(4)
    lam = 1e-3
    e_trial = np.empty(x.shape[0])
    chi2 = _evaluate(x, y, p, jtj, jtr, hess, e_best, spacing)
    evaluations_left = 4 * max_iterations  # bounds the work on hopeless data
    for iteration in range(1, max_iterations + 1):
        accepted = False
        trial_chi2 = chi2
        while lam < 1e16 and evaluations_left > 0:
            # Newton's model where it is positive definite, else Gauss-Newton's J^T J. On a
            # spectrum a Gaussian describes only roughly (SASE spikes) the residuals stay
            # large, and Gauss-Newton then converges only linearly.
            model = hess
            solved = False
            for _ in range(2):
                for j in range(4):
                    for k in range(4):
                        damped[j, k] = model[j, k]
                    damped[j, j] = model[j, j] * (1.0 + lam) + 1e-300
                if _solve4(damped, jtr, step, lower, scratch):
                    solved = True
                    break
                model = jtj
            if solved:
                if lam <= 1e-3 and _predicted_decrease(model, jtr, step) <= _FTOL * chi2:
                    # Nearly undamped and the quadratic model promises nothing more:
                    # converged, without paying for one more evaluation to confirm it.
                    return True, iteration, chi2
                for j in range(4):
                    trial[j] = p[j] + step[j]
                if trial[2] != 0.0:
                    evaluations_left -= 1
                    trial_chi2 = _evaluate(
                        x, y, trial, trial_jtj, trial_jtr, trial_hess, e_trial, spacing
                    )
                    if trial_chi2 <= chi2:
                        accepted = True
                        break
            lam *= 10.0
        if not accepted:
            # No step lowers chi2 any more: p is a minimum to machine precision (unless the
            # evaluation budget ran out first).
            return evaluations_left > 0, iteration, chi2
        small_step = True
        for j in range(4):
            if abs(step[j]) > _XTOL * (abs(p[j]) + _XTOL):
                small_step = False
        decrease = chi2 - trial_chi2
        p[:] = trial
        jtj[:, :] = trial_jtj
        jtr[:] = trial_jtr
        hess[:, :] = trial_hess
        e_best[:] = e_trial
        chi2 = trial_chi2
        lam = max(lam * 0.1, 1e-12)
        if small_step or decrease <= _FTOL * chi2 or chi2 == 0.0:
            return True, iteration, chi2
    return False, max_iterations, chi2


@njit(**_COMPILED, fastmath=_LOOP_MATH)
def _start_values(  # type: ignore[no-untyped-def]
    x: np.ndarray, y: np.ndarray, baseline: float, noise: float, min_spacing: float, p: np.ndarray
):
    """Start values from the moments of the signal above the noise.

    Weights are ``y - (baseline + 2 noise)`` where positive: the threshold keeps the baseline's
    noise from biasing the moments, and the moments of the whole spectrum (not of its highest
    bin) describe a SASE spectrum's envelope rather than its tallest spike.
    """
    center, rms = _moments(x, y, baseline + 2.0 * noise)
    if math.isnan(center):  # cannot happen past the signal gate; keep the fit defined anyway
        center = x[np.argmax(y)]
        rms = min_spacing
    p[0] = y.max() - baseline
    p[1] = center
    p[2] = max(rms, min_spacing)
    p[3] = baseline


# Coarse-to-fine: most LM iterations run on the spectrum binned to about 128 points, a few
# more on about 512; the full-resolution LM then starts next to its minimum and needs only a
# step or two. The result is the full-resolution least-squares fit either way (the coarse
# passes only move the start).
_COARSE_LEVELS = (128, 512)


@njit(**_COMPILED)
def _coarse_fit(
    x: np.ndarray, y: np.ndarray, p: np.ndarray, max_iterations: int, spacing: float
) -> int:
    """Refine the start values p in place on binned copies; returns the iterations used."""
    iterations = 0
    for points in _COARSE_LEVELS:
        factor = x.shape[0] // points
        if factor >= 2:
            iterations += _binned_fit(x, y, p, max_iterations, factor, spacing * factor)
    return iterations


@njit(**_COMPILED)
def _binned_fit(
    x: np.ndarray, y: np.ndarray, p: np.ndarray, max_iterations: int, factor: int,
    spacing: float,
) -> int:
    """LM on y(x) averaged over ``factor`` neighbours; p moves only to a converged result.

    ``spacing``: the binned axis' uniform spacing, or 0.
    """
    m = x.shape[0] // factor
    xb = np.empty(m)
    yb = np.empty(m)
    for j in range(m):
        sx = 0.0
        sy = 0.0
        for i in range(j * factor, (j + 1) * factor):
            sx += x[i]
            sy += y[i]
        xb[j] = sx / factor
        yb[j] = sy / factor
    trial = p.copy()
    converged, iterations, _ = _levenberg_marquardt(
        xb, yb, trial, max_iterations, np.empty(m), spacing
    )
    finite = True
    for j in range(4):
        if not math.isfinite(trial[j]):
            finite = False
    if converged and finite and trial[2] != 0.0:
        p[:] = trial
    return iterations


# An axis' share of the fit, the same for every frame (`describe_axis`): an array indexed by
# these names. An array, not a named tuple: numba's dispatcher types an array argument in C,
# a tuple in Python (a few microseconds per frame). All NaN but _AXIS_FINITE (0) when the axis
# has non-finite values; the normalised axis is (x - x0) / x_scale.
_AXIS_FINITE = 0  # 1.0 when the axis is finite
_AXIS_X0 = 1  # the axis' midpoint
_AXIS_SCALE = 2  # its extent, x_scale
_AXIS_LO = 3
_AXIS_HI = 4
_AXIS_MIN_SPACING = 5  # the smallest step of the normalised axis
_AXIS_SPACING = 6  # the normalised axis' uniform spacing (`uniform_step`), or 0
_AXIS_NUMBERS = 7


class FitAxis(NamedTuple):
    """An energy axis prepared for fitting (see `fit_axis`)."""

    values: np.ndarray
    normalised: np.ndarray
    numbers: np.ndarray  # indexed by the _AXIS_* names


def fit_axis(x: np.ndarray) -> FitAxis:
    """Prepare an axis once for many fits on it.

    The derived arrays stay writable (not to be written): read-only arrays are a type of
    their own to numba, and would compile the whole fit a second time.
    """
    values = np.ascontiguousarray(x, dtype=np.float64)
    normalised = np.empty(values.shape[0])
    numbers = np.empty(_AXIS_NUMBERS)
    describe_axis(values, normalised, numbers)
    return FitAxis(values, normalised, numbers)


@njit(**_COMPILED)
def describe_axis(x: np.ndarray, xs: np.ndarray, numbers: np.ndarray) -> None:
    """Fill the normalised axis xs (when x is finite) and the axis' numbers (_AXIS_*)."""
    numbers[:] = math.nan
    numbers[_AXIS_FINITE] = 0.0
    if not _all_finite(x) or x.shape[0] < 1:
        return
    # Normalise so the fit is equally well conditioned for any units.
    x_lo = x.min()
    x_hi = x.max()
    x0 = 0.5 * (x_lo + x_hi)
    x_scale = x_hi - x_lo
    for i in range(x.shape[0]):
        xs[i] = (x[i] - x0) / x_scale
    min_spacing = np.inf
    for i in range(x.shape[0] - 1):
        d = abs(xs[i + 1] - xs[i])
        if 0.0 < d < min_spacing:
            min_spacing = d
    numbers[_AXIS_FINITE] = 1.0
    numbers[_AXIS_X0] = x0
    numbers[_AXIS_SCALE] = x_scale
    numbers[_AXIS_LO] = x_lo
    numbers[_AXIS_HI] = x_hi
    numbers[_AXIS_MIN_SPACING] = min_spacing
    numbers[_AXIS_SPACING] = uniform_step(x) / x_scale if x_scale > 0.0 else 0.0


@njit(**_COMPILED)
def analyse(
    x: np.ndarray,
    y: np.ndarray,
    fit_enabled: bool,
    min_snr: float,
    max_iterations: int,
    curve: np.ndarray,
) -> Analysis:
    """Moments and, if enabled and sensible, the Gaussian fit of y(x).

    When the fit succeeded (reason FITTED), ``curve`` holds the fitted model on x.
    """
    xs = np.empty(x.shape[0])
    numbers = np.empty(_AXIS_NUMBERS)
    describe_axis(x, xs, numbers)
    return analyse_on_axis(y, curve, x, xs, numbers, fit_enabled, min_snr, max_iterations)


@njit(**_COMPILED)
def _failed(reason: int, iterations: int, com: float, rms: float) -> Analysis:
    """The Analysis of a fit that gave no values (``reason``: a Reason's value)."""
    nan = math.nan
    return reason, nan, nan, nan, nan, nan, iterations, com, rms


@njit(**_COMPILED, fastmath=_LOOP_MATH)
def analyse_on_axis(
    y: np.ndarray,
    curve: np.ndarray,
    x: np.ndarray,
    xs: np.ndarray,
    numbers: np.ndarray,
    fit_enabled: bool,
    min_snr: float,
    max_iterations: int,
) -> Analysis:
    """`analyse` on an axis described once (`fit_axis`): x, its normalised xs and numbers.

    The arguments after ``curve`` are the same for every frame on one axis and settings.
    """
    nan = math.nan
    n = y.shape[0]
    if numbers[_AXIS_FINITE] != 1.0:
        return _failed(Reason.NON_FINITE_AXIS.value, 0, nan, nan)
    if not _all_finite(y):
        return _failed(Reason.NON_FINITE_SPECTRUM.value, 0, nan, nan)
    if n < MIN_POINTS:
        return _failed(Reason.TOO_FEW_POINTS.value, 0, nan, nan)
    baseline = _robust_baseline(y)
    com, rms = _moments(x, y, baseline)
    if not fit_enabled:
        return _failed(Reason.DISABLED.value, 0, com, rms)
    x0, x_scale = numbers[_AXIS_X0], numbers[_AXIS_SCALE]
    min_spacing, spacing = numbers[_AXIS_MIN_SPACING], numbers[_AXIS_SPACING]
    if not x_scale > 0.0:
        return _failed(Reason.AXIS_WITHOUT_EXTENT.value, 0, com, rms)
    ymin = y.min()
    ymax = y.max()
    if ymax <= ymin:
        return _failed(Reason.FLAT.value, 0, com, rms)
    noise = _robust_noise(y)
    if ymax - baseline <= min_snr * noise:
        return _failed(Reason.BELOW_SNR.value, 0, com, rms)

    # Normalise so the fit is equally well conditioned for any count level.
    y_scale = max(abs(ymax), abs(ymin))
    ys = y / y_scale

    # A single bin above half maximum is a hot pixel, not a line we can fit.
    half_raw = 0.5 * (ymin + ymax)
    above_half = 0
    for i in range(n):
        if y[i] > half_raw:
            above_half += 1
    if above_half < 2:
        return _failed(Reason.NARROWER_THAN_A_BIN.value, 0, com, rms)

    p = np.empty(4)
    _start_values(xs, ys, baseline / y_scale, noise / y_scale, min_spacing, p)
    coarse_iterations = _coarse_fit(xs, ys, p, max_iterations, spacing)
    unit_gaussian = np.empty(n)
    converged, iterations, chi2 = _levenberg_marquardt(
        xs, ys, p, max_iterations, unit_gaussian, spacing
    )
    iterations += coarse_iterations
    amplitude = p[0] * y_scale
    center = p[1] * x_scale + x0
    sigma = abs(p[2]) * x_scale
    offset = p[3] * y_scale
    dof = max(n - 4, 1)
    chi2_reduced = chi2 * y_scale * y_scale / dof
    for v in (amplitude, center, sigma, offset):
        if not math.isfinite(v):
            return _failed(Reason.DIVERGED.value, iterations, com, rms)
    if not converged:
        reason = Reason.ITERATION_LIMIT.value
    elif amplitude <= 0.0:
        reason = Reason.AMPLITUDE_NOT_POSITIVE.value
    elif center < numbers[_AXIS_LO] or center > numbers[_AXIS_HI]:
        reason = Reason.CENTER_OUTSIDE_AXIS.value
    elif abs(p[2]) * FWHM_PER_SIGMA < min_spacing:
        reason = Reason.NARROWER_THAN_A_BIN.value
    else:
        reason = Reason.FITTED.value
        for i in range(n):
            curve[i] = offset + amplitude * unit_gaussian[i]
    return reason, amplitude, center, sigma, offset, chi2_reduced, iterations, com, rms


def fit_spectrum(
    x: np.ndarray,
    y: np.ndarray,
    *,
    enabled: bool = True,
    min_snr: float = DEFAULT_MIN_SNR,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    with_curve: bool = True,
) -> FitResult:
    """Fit ``offset + A exp(-(x-c)^2 / 2 sigma^2)`` to y(x); never raises on bad data.

    A failed fit is reported with its status and reason and NaN parameters, never with the
    start guesses. ``x`` may be decreasing or non-uniform.
    """
    xf = np.ascontiguousarray(x, dtype=np.float64)
    yf = np.ascontiguousarray(y, dtype=np.float64)
    if xf.ndim != 1 or yf.ndim != 1 or xf.shape != yf.shape:
        return result_of(_failed(Reason.TOO_FEW_POINTS.value, 0, math.nan, math.nan), None)
    curve = np.empty(xf.shape[0])
    analysis = analyse(xf, yf, enabled, float(min_snr), int(max_iterations), curve)
    return result_of(analysis, curve if with_curve else None)


def result_of(analysis: Analysis, curve: np.ndarray | None) -> FitResult:
    """The FitResult of what `analyse` returned; `curve` is the array it filled (or None).

    Only a fitted result carries the fit's values: a failed fit never reports made-up ones.
    """
    value, amplitude, center, sigma, offset, chi2_reduced, iterations, com, rms = analysis
    reason = _REASON_OF_VALUE[value]
    if reason is not Reason.FITTED:
        nan = math.nan
        return FitResult(
            reason.status, reason.text, nan, nan, nan, nan, nan, iterations, com, rms, None
        )
    return FitResult(
        FitStatus.OK, "", amplitude, center, sigma, offset, chi2_reduced, iterations, com, rms,
        curve,
    )
