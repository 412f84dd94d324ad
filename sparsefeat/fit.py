"""Scaling fits of the held-out loss against dictionary size, with bootstrap intervals.

The model (Gao et al. 2024 fit loss against size with an irreducible term; we fit the *held-out*
curve of a sweep on a reused cache):

    FVU(m) = a · m^(−b) + c,      a > 0, b > 0, c ≥ 0

b is the exponent, c the floor (the loss no dictionary size removes), a the amplitude. Derived:
the size at which the fit comes within 5% of its floor, a · m^(−b) = 0.05 · c, that is

    m_5% = (a / (0.05 · c))^(1/b)         (None when c ≈ 0: the fit never levels off)

Fitting is in log space, minimising Σ_k (log y_k − log(a · m_k^(−b) + c))², so every size weighs
the same whatever its loss. Start: a grid over c in [0, min y), each with the log-linear least
squares of log(y − c) = log a − b · log m; the best grid point is refined with
`scipy.optimize.least_squares` under the bounds above. Sizes are divided by their geometric mean
inside the fit, which decorrelates a and b; the reported a is for m itself.

Intervals are bootstrap percentile intervals. Given the per-row held-out squared errors of each
size (`row_errors`, the results file's `row_sse/test`, the same test rows at every size), rows are
resampled with the same indices at every size (paired, since a hard row is hard at every size), or
whole documents when `groups` gives each row's document, and the curve recomputed as
y*_k = y_k · mean(resampled errors_k) / mean(errors_k). Without row errors, log-space residuals of
the fit are resampled (scaled by sqrt(K / (K − 3)) for the three fitted parameters), which needs at
least 4 sizes. A power law is not evidence of features: a Gaussian's curve falls as one too. Compare
the fit with that of the matched null (`compare_fits`).

What the intervals do not cover: row bootstraps measure each point's evaluation noise, not how well
each size trained, so a curve that zigzags with optimisation noise gets tight, wrong intervals. The
fit says so in `warnings` when its log residuals exceed LACK_OF_FIT times the row noise, and when
b ≥ STEP_EXPONENT (a drop in one step, then flat: no power law). On small toy sweeps (d = 32,
sizes 4..128, 3000 steps) most curves drew one of these warnings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .results import json_ready

WITHIN_FLOOR = 0.05  # "within 5% of the floor": a · m^(−b) = WITHIN_FLOOR · c
MIN_SIZES = 3  # three parameters
MIN_SIZES_RESIDUALS = 4  # the residual bootstrap needs at least one degree of freedom
EXPONENT_BOUNDS = (1e-4, 20.0)
FLOOR_ZERO = 1e-6  # a floor below this share of the smallest loss counts as zero (no m_5%)
_GRID = 60


@dataclass
class Estimate:
    """A fitted number and its bootstrap interval (None: no interval could be drawn; for `low`/`high`
    of a size, None also stands for "unbounded")."""

    value: float | None
    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict:
        return json_ready(dict(value=self.value, low=self.low, high=self.high))

    def contains(self, x: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= x <= self.high


@dataclass
class CurveFit:
    """FVU(m) = a · m^(−b) + c fitted to one held-out curve. `ok` False: no fit, `reason` says why."""

    ok: bool
    reason: str | None = None  # why there is no fit, or what is missing (e.g. intervals)
    exponent: Estimate | None = None  # b
    floor: Estimate | None = None  # c
    amplitude: Estimate | None = None  # a
    size_within_5pct: Estimate | None = None  # m_5%; value None when the floor is ≈ 0
    sizes: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    fitted: list[float] = field(default_factory=list)  # the fit at each size
    interval_method: str | None = None  # "rows", "documents", "residuals" or None
    residual_rms: float | None = None  # RMS of log(y) − log(fit): how far the curve is from the model
    warnings: list[str] = field(default_factory=list)  # reasons to distrust an existing fit
    confidence: float = 0.95
    n_boot: int = 0  # replicates that gave a fit
    samples: np.ndarray | None = field(default=None, repr=False)  # [n_boot, 3]: b, c, a per replicate

    def predict(self, m) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        return self.amplitude.value * m ** (-self.exponent.value) + self.floor.value

    def to_json(self) -> dict:
        def est(e):
            return None if e is None else e.to_json()
        return json_ready(dict(
            ok=self.ok, reason=self.reason, model="a * m^-b + c", exponent=est(self.exponent),
            floor=est(self.floor), amplitude=est(self.amplitude), size_within_5pct=est(self.size_within_5pct),
            sizes=self.sizes, values=self.values, fitted=self.fitted, interval_method=self.interval_method,
            residual_rms=self.residual_rms, warnings=self.warnings, confidence=self.confidence,
            n_boot=self.n_boot))


def _no_fit(reason: str, sizes=(), values=()) -> CurveFit:
    return CurveFit(ok=False, reason=reason, sizes=[int(s) for s in sizes],
                    values=[float(v) for v in values])


# --------------------------------------------------------------------------------------------
# The least-squares fit of one curve
# --------------------------------------------------------------------------------------------


def _grid_start(x: np.ndarray, logy: np.ndarray) -> np.ndarray | None:
    """(log a, b, c) in scaled sizes x: over a grid of c in [0, min y), the log-linear fit of
    log(y − c) on log x; the grid point with the smallest log-space error of the full model."""
    y = np.exp(logy)
    cs = np.min(y) * (1 - np.geomspace(1, 1e-3, _GRID))  # 0 .. 0.999·min y, denser near min y
    lx = np.log(x)
    best, best_err = None, math.inf
    for c in cs:
        ly = np.log(y - c)
        slope, intercept = np.polyfit(lx, ly, 1)
        b = float(np.clip(-slope, *EXPONENT_BOUNDS))
        pred = np.log(np.exp(intercept) * x ** (-b) + c)
        err = float(np.sum((logy - pred) ** 2))
        if np.isfinite(err) and err < best_err:
            best, best_err = np.array([intercept, b, c]), err
    return best


def _fit_scaled(x: np.ndarray, logy: np.ndarray, start: np.ndarray | None = None) -> np.ndarray | None:
    """(log a, b, c) minimising Σ (log y − log(a x^−b + c))² in scaled sizes x, or None."""
    from scipy.optimize import least_squares

    start = _grid_start(x, logy) if start is None else start
    if start is None:
        return None
    ymax = float(np.exp(logy.max()))
    lower, upper = [-np.inf, EXPONENT_BOUNDS[0], 0.0], [np.inf, EXPONENT_BOUNDS[1], ymax]
    start = np.clip(start, np.nextafter(lower, upper), np.nextafter(upper, lower))

    def residuals(p):
        return logy - np.log(np.exp(p[0]) * x ** (-p[1]) + p[2])

    try:
        sol = least_squares(residuals, start, bounds=(lower, upper), method="trf", x_scale="jac",
                            max_nfev=2000)
    except (ValueError, FloatingPointError):
        return None
    return sol.x if np.all(np.isfinite(sol.x)) and np.all(np.isfinite(sol.fun)) else None


def _natural(p: np.ndarray, scale: float, zero: float) -> tuple[float, float, float]:
    """(b, c, a) for sizes m = scale · x from the scaled parameters (log a_x, b, c). A floor at or
    below `zero` is 0: the bounded solver stops just inside its bound, not on it."""
    log_a, b, c = p
    return float(b), float(c) if c > zero else 0.0, float(math.exp(log_a + b * math.log(scale)))


def size_within_floor(a: float, b: float, c: float, share: float = WITHIN_FLOOR) -> float:
    """The size m where a · m^(−b) = share · c: (a / (share · c))^(1/b); inf when c is 0."""
    if c <= 0 or b <= 0:
        return math.inf
    log_m = (math.log(a) - math.log(share * c)) / b
    return math.inf if log_m > 700 else float(math.exp(log_m))  # a near-flat curve (b → 0) never gets there


# --------------------------------------------------------------------------------------------
# Bootstrap replicates of the curve
# --------------------------------------------------------------------------------------------


def _row_curves(values: np.ndarray, row_errors: Sequence[np.ndarray], groups: np.ndarray | None,
                n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """[n_boot, K] resampled curves from per-row errors (paired rows, or whole documents)."""
    errors = [np.asarray(e, dtype=np.float64) for e in row_errors]
    means = np.array([e.mean() for e in errors])
    paired = len({e.shape[0] for e in errors}) == 1
    curves = np.empty((n_boot, len(errors)))
    if paired and groups is not None and len(groups) == errors[0].shape[0]:
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.stack([np.bincount(inverse, weights=e) for e in errors])  # [K, G]
        counts = np.bincount(inverse).astype(np.float64)
        for i in range(n_boot):
            pick = np.bincount(rng.integers(0, counts.shape[0], counts.shape[0]), minlength=counts.shape[0])
            curves[i] = (sums @ pick) / (counts @ pick)
        method = "documents"
    elif paired:
        stacked = np.stack(errors)  # [K, n]
        n = stacked.shape[1]
        for i in range(n_boot):
            pick = np.bincount(rng.integers(0, n, n), minlength=n)
            curves[i] = stacked @ pick / n
        method = "rows"
    else:  # sizes evaluated on different rows: resample each on its own
        for k, e in enumerate(errors):
            curves[:, k] = e[rng.integers(0, e.shape[0], (n_boot, e.shape[0]))].mean(axis=1)
        method = "rows"
    return values * curves / means, method


def _residual_curves(logy: np.ndarray, fitted_log: np.ndarray, n_boot: int,
                     rng: np.random.Generator) -> np.ndarray:
    """[n_boot, K] curves: the fit times resampled log-space residuals (inflated for 3 parameters)."""
    k = logy.shape[0]
    resid = (logy - fitted_log) * math.sqrt(k / (k - 3))
    resid -= resid.mean()
    return np.exp(fitted_log + resid[rng.integers(0, k, (n_boot, k))])


def _interval(samples: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    """Percentile interval; "inverted_cdf" so that infinite samples (m_5% when c = 0) stay infinite."""
    samples = samples[~np.isnan(samples)]
    if samples.shape[0] == 0:
        return None, None
    lo, hi = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2], method="inverted_cdf")
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# The public fit
# --------------------------------------------------------------------------------------------


def _check_curve(sizes, values) -> str | None:
    if len(sizes) != len(values):
        return f"{len(sizes)} sizes but {len(values)} loss values"
    if len(sizes) < MIN_SIZES:
        return f"{len(sizes)} sizes: a fit of a·m^-b + c needs at least {MIN_SIZES}"
    if not (np.all(np.isfinite(sizes)) and np.all(np.isfinite(values))):
        return "the curve holds NaN or infinite values"
    if np.any(sizes <= 0) or len(np.unique(sizes)) != len(sizes):
        return "sizes must be positive and distinct"
    if np.any(values <= 0):
        return "the loss must be positive at every size (the fit is in log space)"
    if np.ptp(values) <= 1e-9 * np.max(values):
        return f"the curve is flat at {float(values[0]):.4g}: no power law to fit"
    if values[-1] >= values[0]:
        return "the held-out loss does not fall from the smallest to the largest size"
    return None


def fit_loss_curve(sizes: Sequence[float], values: Sequence[float] | None = None, *,
                   row_errors: Sequence[np.ndarray] | None = None, groups: np.ndarray | None = None,
                   n_boot: int = 500, confidence: float = 0.95, seed: int = 0) -> CurveFit:
    """Fit FVU(m) = a · m^(−b) + c to a held-out curve, with bootstrap intervals (see the module).

    `values[k]`: the held-out loss (e.g. test FVU) at `sizes[k]`; omitted, it is the mean of
    `row_errors[k]`. `row_errors[k]`: per-row held-out squared errors at size k (the same rows at
    every size when the arrays have one length); `groups`: each row's document, to resample whole
    documents. Never raises on bad curves: a CurveFit with ok=False and the reason comes back.
    """
    order = np.argsort(np.asarray(sizes, dtype=np.float64)) if len(sizes) else np.zeros(0, int)
    m = np.asarray(sizes, dtype=np.float64)[order]
    if values is None:
        if row_errors is None:
            return _no_fit("no loss values and no row errors given", sizes)
        values = [float(np.mean(e)) if len(e) else math.nan for e in row_errors]
    if len(values) != len(sizes):
        return _no_fit(f"{len(sizes)} sizes but {len(values)} loss values", sizes, values)
    y = np.asarray(values, dtype=np.float64)[order]
    if row_errors is not None:
        if len(row_errors) != len(sizes):
            return _no_fit(f"{len(sizes)} sizes but {len(row_errors)} arrays of row errors", sizes, values)
        row_errors = [np.asarray(row_errors[i], dtype=np.float64) for i in order]
        if any(e.shape[0] == 0 or not np.all(np.isfinite(e)) for e in row_errors):
            return _no_fit("row errors are empty or hold NaN", m, y)
    reason = _check_curve(m, y)
    if reason:
        return _no_fit(reason, m, y)

    scale = float(np.exp(np.log(m).mean()))
    x, logy = m / scale, np.log(y)
    p = _fit_scaled(x, logy)
    if p is None:
        return _no_fit("the least-squares fit did not converge", m, y)
    zero = FLOOR_ZERO * float(y.min())
    b, c, a = _natural(p, scale, zero)
    fitted_log = np.log(np.exp(p[0]) * x ** (-p[1]) + p[2])

    rng = np.random.default_rng(seed)
    method, note = None, None
    if row_errors is not None:
        curves, method = _row_curves(y, row_errors, groups, n_boot, rng)
    elif len(m) >= MIN_SIZES_RESIDUALS:
        curves, method = _residual_curves(logy, fitted_log, n_boot, rng), "residuals"
    else:
        curves = np.zeros((0, len(m)))
        note = (f"no intervals: {len(m)} sizes and no row errors (the residual bootstrap needs "
                f"{MIN_SIZES_RESIDUALS} sizes)")
    samples = []
    for curve in curves:
        if np.all(curve > 0):
            q = _fit_scaled(x, np.log(curve), start=p)
            if q is not None:
                samples.append(_natural(q, scale, zero))
    samples = np.asarray(samples, dtype=np.float64).reshape(-1, 3)
    if method is not None and samples.shape[0] < 0.9 * n_boot:
        note = f"only {samples.shape[0]} of {n_boot} bootstrap replicates gave a fit"

    def estimate(value, column):
        if samples.shape[0] == 0:
            return Estimate(value)
        return Estimate(value, *_interval(column, confidence))

    warnings = _warnings(b, logy, fitted_log, curves if method in ("rows", "documents") else None)
    m5 = None if c == 0 else size_within_floor(a, b, c)
    m5_samples = np.array([size_within_floor(sa, sb, sc) for sb, sc, sa in samples])
    return CurveFit(ok=True, reason=note, exponent=estimate(b, samples[:, 0]), floor=estimate(c, samples[:, 1]),
                    amplitude=estimate(a, samples[:, 2]), size_within_5pct=estimate(m5, m5_samples),
                    sizes=[int(v) if float(v).is_integer() else float(v) for v in m], values=y.tolist(),
                    fitted=np.exp(fitted_log).tolist(), interval_method=method if samples.shape[0] else None,
                    residual_rms=float(np.sqrt(np.mean((logy - fitted_log) ** 2))), warnings=warnings,
                    confidence=confidence, n_boot=int(samples.shape[0]), samples=samples)


LACK_OF_FIT = 3.0  # residuals this many times the row noise: the curve is not a·m^-b + c
STEP_EXPONENT = 5.0  # each doubling of m cuts the excess over the floor 32-fold: a step, not a power law


def _warnings(b: float, logy: np.ndarray, fitted_log: np.ndarray, row_curves: np.ndarray | None) -> list[str]:
    """What makes a fit's intervals too narrow to trust. Row bootstraps measure the evaluation
    noise of each point only, not how well training converged: a curve that zigzags with
    optimisation noise, or drops in one step and stays flat, gets a tight but meaningless interval."""
    out = []
    if len(logy) <= MIN_SIZES:  # as many sizes as parameters: the curve is matched exactly
        out.append(f"{len(logy)} sizes for 3 parameters: the fit passes through every point, so its "
                   "intervals say nothing about the shape; sweep at least 5 sizes to read b and c")
    if b >= STEP_EXPONENT:
        out.append(f"exponent {b:.3g}: the curve drops in one step and stays flat, not as a power law")
    if row_curves is not None and row_curves.shape[0] > 1 and np.all(row_curves > 0):
        noise = float(np.median(np.std(np.log(row_curves), axis=0)))
        worst = float(np.max(np.abs(logy - fitted_log)))
        if worst > LACK_OF_FIT * max(noise, 1e-12):
            out.append(f"the curve departs from the fit by up to {worst:.1%} (log), {worst / max(noise, 1e-12):.0f}x "
                       "its row noise: training noise or another shape; the intervals cover row noise only")
    return out


# --------------------------------------------------------------------------------------------
# Data against its matched null
# --------------------------------------------------------------------------------------------


@dataclass
class FitComparison:
    """A curve's fit beside its matched null's: differences data − null with bootstrap intervals
    (the two bootstraps are independent, so replicate i of one is paired with replicate i of the
    other). A steeper exponent or a lower floor than the null's is what features would add; a
    power law alone is not (a Gaussian's curve falls as one too)."""

    data: CurveFit
    null: CurveFit
    exponent_difference: Estimate | None = None  # b_data − b_null
    floor_difference: Estimate | None = None  # c_data − c_null
    reason: str | None = None

    @property
    def warnings(self) -> list[str]:
        """Either side's warnings, named by side: they bear on the difference too."""
        return [f"data: {w}" for w in self.data.warnings] + [f"null: {w}" for w in self.null.warnings]

    def to_json(self) -> dict:
        def est(e):
            return None if e is None else e.to_json()
        return json_ready(dict(data=self.data.to_json(), null=self.null.to_json(),
                               exponent_difference=est(self.exponent_difference),
                               floor_difference=est(self.floor_difference), reason=self.reason,
                               warnings=self.warnings))


def compare_fits(data: CurveFit, null: CurveFit, confidence: float = 0.95) -> FitComparison:
    """Exponent and floor of `data` minus those of `null`, with intervals when both have samples."""
    if not (data.ok and null.ok):
        which = "data" if not data.ok else "null"
        reason = (data if not data.ok else null).reason
        return FitComparison(data, null, reason=f"no fit of the {which}: {reason}")
    db = data.exponent.value - null.exponent.value
    dc = data.floor.value - null.floor.value
    n = min(data.n_boot, null.n_boot)
    if n == 0:
        return FitComparison(data, null, Estimate(db), Estimate(dc),
                             reason="no intervals: a fit without bootstrap replicates")
    diff = data.samples[:n] - null.samples[:n]
    return FitComparison(data, null, Estimate(db, *_interval(diff[:, 0], confidence)),
                         Estimate(dc, *_interval(diff[:, 1], confidence)))
