"""The held-out scaling fit FVU(m) = a·m^-b + c: it recovers known parameters from noisy synthetic
curves inside its bootstrap intervals, tells data from its null, and answers bad curves with a
reason instead of a crash."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sparsefeat.fit import CurveFit, compare_fits, fit_loss_curve, size_within_floor

SIZES = [8, 16, 32, 64, 128, 256, 512]


def row_errors(a: float, b: float, c: float, sizes=SIZES, n: int = 4000, seed: int = 0) -> list[np.ndarray]:
    """Per-row held-out squared errors whose expected mean at size m is a·m^-b + c: a floor part
    shared by a row at every size (hard rows stay hard) plus a part that shrinks with m."""
    rng = np.random.default_rng(seed)
    hard = rng.exponential(size=n)
    return [c * hard + a * m ** -b * rng.exponential(size=n) for m in sizes]


def strict_json(fit) -> dict:
    return json.loads(json.dumps(fit.to_json(), allow_nan=False))


@pytest.mark.parametrize("a, b, c", [(2.0, 0.5, 0.1), (1.0, 1.0, 0.3), (5.0, 0.3, 0.02), (0.5, 0.8, 0.0)])
def test_recovers_known_parameters_from_row_errors_within_its_intervals(a, b, c):
    fit = fit_loss_curve(SIZES, row_errors=row_errors(a, b, c), n_boot=200, seed=1)
    assert fit.ok and fit.reason is None and fit.interval_method == "rows" and fit.n_boot == 200
    assert fit.warnings == [] and fit.residual_rms < 0.05  # a power law within its row noise
    assert fit.exponent.contains(b), fit.exponent
    assert fit.floor.contains(c), fit.floor
    assert fit.amplitude.contains(a), fit.amplitude
    # informative, not merely wide: the exponent is pinned to within ±25%
    assert fit.exponent.high - fit.exponent.low < 0.5 * b
    if c > 0:
        assert fit.size_within_5pct.contains(size_within_floor(a, b, c))
    else:
        assert fit.floor.low == 0.0  # a zero floor is reported as exactly 0, not 1e-20


def test_a_noise_free_curve_is_fitted_exactly():
    m = np.array([4, 8, 16, 32, 64, 128, 256, 512, 1024], dtype=float)
    for a, b, c in [(3.0, 0.7, 0.05), (0.2, 0.25, 0.4), (1.0, 1.5, 0.0)]:
        fit = fit_loss_curve(m, a * m ** -b + c, n_boot=20)
        assert fit.ok
        assert fit.exponent.value == pytest.approx(b, rel=1e-4)
        assert fit.amplitude.value == pytest.approx(a, rel=1e-4)
        assert fit.floor.value == pytest.approx(c, abs=1e-6)
        np.testing.assert_allclose(fit.predict(m), a * m ** -b + c, rtol=1e-5)


def test_residual_bootstrap_without_row_errors_brackets_the_truth():
    m = np.array([4, 8, 16, 32, 64, 128, 256, 512, 1024], dtype=float)
    y = (2.0 * m ** -0.5 + 0.1) * np.exp(np.random.default_rng(3).normal(0, 0.01, m.shape))
    fit = fit_loss_curve(m, y, n_boot=200, seed=0)
    assert fit.ok and fit.interval_method == "residuals"
    assert fit.exponent.contains(0.5) and fit.floor.contains(0.1) and fit.amplitude.contains(2.0)


@pytest.mark.slow
def test_interval_coverage_is_near_its_nominal_level():
    """Over independent draws the 95% intervals hold the truth most of the time: row bootstrap
    (measured 39/40) and the cruder residual bootstrap with 9 sizes (measured ~85%)."""
    a, b, c = 1.0, 0.7, 0.2
    rows = [fit_loss_curve(SIZES, row_errors=row_errors(a, b, c, n=2000, seed=s), n_boot=100, seed=s)
            for s in range(12)]
    assert sum(f.exponent.contains(b) and f.floor.contains(c) for f in rows) >= 9
    m = np.array([4, 8, 16, 32, 64, 128, 256, 512, 1024], dtype=float)
    resid = [fit_loss_curve(m, (a * m ** -b + c) * np.exp(np.random.default_rng(s).normal(0, 0.01, m.shape)),
                            n_boot=100, seed=s) for s in range(12)]
    assert sum(f.exponent.contains(b) for f in resid) >= 8


def test_curves_that_are_not_power_laws_within_their_noise_are_flagged():
    errors = row_errors(1.0, 0.6, 0.2)
    zigzag = [e * (1.15 if k % 2 else 1.0) for k, e in enumerate(errors)]  # optimisation noise, not rows
    fit = fit_loss_curve(SIZES, row_errors=zigzag, n_boot=50)
    assert fit.ok and any("departs from the fit" in w for w in fit.warnings)
    rng = np.random.default_rng(0)
    step = [(0.5 if m == SIZES[0] else 0.05) * rng.exponential(size=2000) for m in SIZES]  # one drop, then flat
    fit = fit_loss_curve(SIZES, row_errors=step, n_boot=50)
    assert fit.ok and any("drops in one step" in w for w in fit.warnings)
    assert strict_json(fit)["warnings"] == fit.warnings
    cmp = compare_fits(fit, fit_loss_curve(SIZES, row_errors=errors, n_boot=50))
    assert cmp.warnings and all(w.startswith("data: ") for w in cmp.warnings)


def test_whole_documents_are_resampled_when_rows_are_grouped():
    rng = np.random.default_rng(0)
    n, docs = 4000, 40
    groups = np.repeat(np.arange(docs), n // docs)
    doc_factor = rng.lognormal(0, 0.5, docs)[groups]  # rows of one document are alike
    errors = [e * doc_factor for e in row_errors(1.0, 0.6, 0.2, n=n)]
    by_row = fit_loss_curve(SIZES, row_errors=errors, n_boot=200)
    by_doc = fit_loss_curve(SIZES, row_errors=errors, groups=groups, n_boot=200)
    assert by_doc.interval_method == "documents" and by_row.interval_method == "rows"
    width = lambda e: e.high - e.low  # noqa: E731
    assert width(by_doc.floor) > 2 * width(by_row.floor)  # 40 documents are not 4000 independent rows
    assert by_doc.exponent.value == by_row.exponent.value  # the point fit is the same curve


def test_values_given_beside_row_errors_set_the_scale():
    errors = row_errors(1.0, 0.6, 0.2)
    plain = fit_loss_curve(SIZES, row_errors=errors, n_boot=50)
    scaled = fit_loss_curve(SIZES, [2 * float(np.mean(e)) for e in errors], row_errors=errors, n_boot=50)
    assert scaled.floor.value == pytest.approx(2 * plain.floor.value, rel=1e-6)
    assert scaled.floor.low == pytest.approx(2 * plain.floor.low, rel=1e-6)
    assert scaled.exponent.value == pytest.approx(plain.exponent.value, rel=1e-6)


def test_size_within_five_percent_of_the_floor():
    a, b, c = 2.0, 0.5, 0.1
    m5 = size_within_floor(a, b, c)
    assert a * m5 ** -b == pytest.approx(0.05 * c)
    assert size_within_floor(a, b, 0.0) == math.inf
    m = np.array(SIZES, dtype=float)
    pure = fit_loss_curve(m, 0.5 * m ** -0.8, n_boot=50)  # a pure power law never levels off
    assert pure.floor.value == 0 and pure.size_within_5pct.value is None
    noisy = fit_loss_curve(SIZES, row_errors=row_errors(0.5, 0.8, 0.0), n_boot=50)
    assert noisy.floor.low == 0 and noisy.size_within_5pct.high == math.inf  # a floor that may be 0: unbounded
    out = strict_json(noisy)["size_within_5pct"]
    assert out["high"] is None and out["low"] > max(SIZES)


def test_to_json_is_strict_and_names_exponent_and_floor_with_intervals():
    out = strict_json(fit_loss_curve(SIZES, row_errors=row_errors(1.0, 0.6, 0.2), n_boot=50))
    assert out["ok"] is True and out["model"] == "a * m^-b + c"
    for key in ("exponent", "floor", "amplitude", "size_within_5pct"):
        assert set(out[key]) == {"value", "low", "high"}
    assert out["exponent"]["low"] < out["exponent"]["value"] < out["exponent"]["high"]
    assert out["sizes"] == SIZES and len(out["fitted"]) == len(SIZES)


@pytest.mark.parametrize("sizes, values, reason", [
    ([8, 16], [0.5, 0.4], "needs at least 3"),
    ([], [], "needs at least 3"),
    ([8, 16, 32, 64], [0.3, 0.3, 0.3, 0.3], "flat"),
    ([8, 16, 32, 64], [0.5, math.nan, 0.3, 0.2], "NaN"),
    ([8, 16, 32, 64], [0.5, 0.4, math.inf, 0.2], "NaN or infinite"),
    ([8, 16, 32, 64], [0.2, 0.3, 0.4, 0.5], "does not fall"),
    ([8, 8, 16, 32], [0.5, 0.4, 0.3, 0.2], "distinct"),
    ([8, 16, 32, 64], [0.5, 0.4, 0.0, 0.3], "positive"),
    ([8, 16, 32], [0.5, 0.4], "3 sizes but 2"),
])
def test_degenerate_curves_give_no_fit_and_a_reason(sizes, values, reason):
    fit = fit_loss_curve(sizes, values, n_boot=20)
    assert isinstance(fit, CurveFit) and not fit.ok and reason in fit.reason
    out = strict_json(fit)
    assert out["exponent"] is None and out["floor"] is None and reason in out["reason"]


def test_row_errors_with_nan_or_no_rows_give_no_fit():
    errors = row_errors(1.0, 0.6, 0.2, sizes=SIZES[:4])
    errors[2][5] = np.nan
    assert "NaN" in fit_loss_curve(SIZES[:4], row_errors=errors).reason
    assert not fit_loss_curve(SIZES[:3], row_errors=[np.zeros(0)] * 3).ok
    assert "no loss values" in fit_loss_curve(SIZES).reason


def test_three_sizes_without_row_errors_fit_but_say_there_are_no_intervals():
    m = np.array([8, 32, 128], dtype=float)
    fit = fit_loss_curve(m, 1.0 * m ** -0.5 + 0.1)
    assert fit.ok and fit.exponent.low is None and "no intervals" in fit.reason
    assert strict_json(fit)["exponent"]["low"] is None


def test_unsorted_sizes_are_fitted_in_size_order():
    errors = row_errors(1.0, 0.6, 0.2)
    order = [3, 0, 6, 1, 5, 2, 4]
    shuffled = fit_loss_curve([SIZES[i] for i in order], row_errors=[errors[i] for i in order], n_boot=30)
    plain = fit_loss_curve(SIZES, row_errors=errors, n_boot=30)
    assert shuffled.sizes == SIZES and shuffled.exponent.value == pytest.approx(plain.exponent.value)


# --------------------------------------------------------------------------------------------
# Data against its null
# --------------------------------------------------------------------------------------------


def test_comparison_with_the_null_separates_a_steeper_curve_and_not_a_twin():
    data = fit_loss_curve(SIZES, row_errors=row_errors(2.0, 0.8, 0.05, seed=1), n_boot=200, seed=1)
    null = fit_loss_curve(SIZES, row_errors=row_errors(1.0, 0.3, 0.2, seed=2), n_boot=200, seed=2)
    cmp = compare_fits(data, null)
    assert cmp.reason is None
    assert cmp.exponent_difference.contains(0.5) and cmp.exponent_difference.low > 0
    assert cmp.floor_difference.contains(-0.15) and cmp.floor_difference.high < 0
    twin = fit_loss_curve(SIZES, row_errors=row_errors(1.0, 0.3, 0.2, seed=3), n_boot=200, seed=3)
    same = compare_fits(twin, null)
    assert same.exponent_difference.contains(0.0) and same.floor_difference.contains(0.0)
    out = json.loads(json.dumps(cmp.to_json(), allow_nan=False))
    assert set(out["exponent_difference"]) == {"value", "low", "high"} and out["null"]["ok"] is True


def test_comparison_with_a_failed_fit_says_which_side_failed():
    data = fit_loss_curve(SIZES, row_errors=row_errors(1.0, 0.6, 0.2), n_boot=20)
    null = fit_loss_curve([8, 16], [0.5, 0.4])
    cmp = compare_fits(data, null)
    assert cmp.exponent_difference is None and "no fit of the null" in cmp.reason and "at least 3" in cmp.reason


def test_three_sizes_with_row_errors_warn_that_the_fit_is_exact():
    """Three sizes for three parameters: the row bootstrap gives tight intervals around a curve that
    passes through every point; the fit must say so instead of looking precise."""
    errors = row_errors(1.0, 0.6, 0.2)
    exact = fit_loss_curve(SIZES[:3], row_errors=errors[:3], n_boot=30)
    assert exact.ok and any("3 sizes for 3 parameters" in w for w in exact.warnings)
    wide = fit_loss_curve(SIZES, row_errors=errors, n_boot=30)
    assert not any("parameters" in w for w in wide.warnings)
