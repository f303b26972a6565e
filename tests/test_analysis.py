"""Tests for gbn_jax.research.analysis against closed forms and synthetic curves."""

import json
import math

import numpy as np
import pytest

from gbn_jax.research import analysis


def _ols_reference(u, d):
    """Closed-form simple regression d = a + b u: estimates and textbook standard errors."""
    n = u.size
    u_bar, d_bar = u.mean(), d.mean()
    s_uu = np.sum((u - u_bar) ** 2)
    b = np.sum((u - u_bar) * (d - d_bar)) / s_uu
    a = d_bar - b * u_bar
    s2 = np.sum((d - a - b * u) ** 2) / (n - 2)
    se_b = math.sqrt(s2 / s_uu)
    se_a = math.sqrt(s2 * (1.0 / n + u_bar**2 / s_uu))
    return a, b, se_a, se_b


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("fit_fn", "transform"), [(analysis.fit_log, np.log), (analysis.fit_sqrt, np.sqrt)]
)
def test_linear_fits_match_closed_form_regression(seed, fit_fn, transform):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(1.0, 1e4, size=200))
    a, b = rng.normal(size=2) * 3
    d = a + b * transform(t) + rng.normal(scale=0.3, size=t.size)
    fit = fit_fn(t, d)
    ref_a, ref_b, ref_se_a, ref_se_b = _ols_reference(transform(t), d)
    np.testing.assert_allclose(
        [fit.params["a"], fit.params["b"]], [ref_a, ref_b], rtol=1e-8, atol=1e-10
    )
    np.testing.assert_allclose([fit.stderr["a"], fit.stderr["b"]], [ref_se_a, ref_se_b], rtol=1e-8)
    # Simple regression: R^2 is the squared correlation of the regressor and the data.
    np.testing.assert_allclose(fit.r_squared, np.corrcoef(transform(t), d)[0, 1] ** 2, rtol=1e-10)
    # And the truth lies within a few standard errors.
    assert abs(fit.params["a"] - a) < 5 * fit.stderr["a"]
    assert abs(fit.params["b"] - b) < 5 * fit.stderr["b"]
    np.testing.assert_allclose(fit.predict(t), ref_a + ref_b * transform(t), rtol=1e-8, atol=1e-8)


def test_standard_error_matches_spread_over_repeated_noise():
    rng = np.random.default_rng(3)
    t = np.geomspace(1.0, 1e5, 60)
    a, b, noise = 1.3, 0.7, 0.2
    fits = [
        analysis.fit_log(t, a + b * np.log(t) + rng.normal(scale=noise, size=t.size))
        for _ in range(400)
    ]
    spread = np.std([f.params["b"] for f in fits])
    reported = np.mean([f.stderr["b"] for f in fits])
    # Known noise level: the exact standard error of b is noise / sqrt(S_uu).
    exact = noise / math.sqrt(np.sum((np.log(t) - np.log(t).mean()) ** 2))
    assert reported == pytest.approx(exact, rel=0.05)
    assert spread == pytest.approx(exact, rel=0.15)


def test_standard_errors_shrink_with_more_data():
    rng = np.random.default_rng(4)

    def fit_with(n):
        t = np.geomspace(1.0, 1e4, n)
        return analysis.fit_log(t, 0.5 + 2.0 * np.log(t) + rng.normal(scale=0.5, size=n))

    small, large = fit_with(30), fit_with(3000)
    # Standard errors scale like 1/sqrt(n): a 100x larger sample gives ~10x smaller errors.
    assert large.stderr["b"] < small.stderr["b"] / 5
    assert large.stderr["a"] < small.stderr["a"] / 5


@pytest.mark.parametrize("model", ["log", "sqrt", "power_law", "log_power_fixed", "log_power_free"])
def test_noiseless_curve_is_recovered_exactly_with_unit_r_squared(model):
    rng = np.random.default_rng(5)
    t = np.geomspace(2.0, 1e6, 80)
    a, b = rng.uniform(0.5, 2.0, size=2)
    p = rng.uniform(0.8, 2.5)
    if model == "log":
        fit, expected = analysis.fit_log(t, a + b * np.log(t)), {"a": a, "b": b}
    elif model == "sqrt":
        fit, expected = analysis.fit_sqrt(t, a + b * np.sqrt(t)), {"a": a, "b": b}
    elif model == "power_law":
        fit, expected = analysis.fit_power_law(t, a * t**p), {"c": a, "alpha": p}
    elif model == "log_power_fixed":
        d = a + b * np.log(t) ** p
        fit, expected = analysis.fit_log_power(t, d, exponent=p), {"a": a, "b": b, "p": p}
    else:
        d = a + b * np.log(t) ** p
        fit, expected = analysis.fit_log_power(t, d), {"a": a, "b": b, "p": p}
    for name, value in expected.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-6), name
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)
    assert fit.num_points == t.size


def test_power_law_on_log_t_measures_the_ultra_slow_exponent():
    rng = np.random.default_rng(6)
    t = np.geomspace(10.0, 1e7, 100)
    nu = rng.uniform(0.8, 2.2)
    d = 1.7 * np.log(t) ** nu * np.exp(rng.normal(scale=0.02, size=t.size))
    fit = analysis.fit_power_law(np.log(t), d)
    assert abs(fit.params["alpha"] - nu) < 5 * fit.stderr["alpha"]
    assert fit.params["alpha"] == pytest.approx(nu, abs=0.05)
    # The same data read as a power of t give a small, wrong-looking exponent.
    assert analysis.fit_power_law(t, d).params["alpha"] < 0.3


def test_free_log_power_exponent_has_calibrated_uncertainty():
    rng = np.random.default_rng(7)
    t = np.geomspace(10.0, 1e6, 150)
    a, b, p, noise = 0.4, 0.3, 1.6, 0.3
    fits = [
        analysis.fit_log_power(t, a + b * np.log(t) ** p + rng.normal(scale=noise, size=t.size))
        for _ in range(60)
    ]
    estimates = np.array([f.params["p"] for f in fits])
    assert np.mean(estimates) == pytest.approx(p, abs=0.05)
    assert np.std(estimates) == pytest.approx(np.mean([f.stderr["p"] for f in fits]), rel=0.3)


def test_log_fit_beats_sqrt_fit_on_log_data_and_vice_versa():
    rng = np.random.default_rng(8)
    t = np.geomspace(1.0, 1e5, 100)
    log_data = 1.0 + 2.0 * np.log(t) + rng.normal(scale=0.1, size=t.size)
    sqrt_data = 1.0 + 0.05 * np.sqrt(t) + rng.normal(scale=0.1, size=t.size)
    assert analysis.fit_log(t, log_data).r_squared > analysis.fit_sqrt(t, log_data).r_squared
    assert analysis.fit_sqrt(t, sqrt_data).r_squared > analysis.fit_log(t, sqrt_data).r_squared


def test_select_range_and_fit_range_arguments():
    rng = np.random.default_rng(9)
    t = np.arange(1.0, 10001.0)
    d = rng.normal(size=t.size)
    kept_t, kept_d = analysis.select_range(t, d, t_min=10, t_max=100)
    np.testing.assert_array_equal(kept_t, np.arange(10.0, 101.0))
    np.testing.assert_array_equal(kept_d, d[9:100])
    (late,) = analysis.select_range(t, last_decades=2)
    np.testing.assert_array_equal(late, np.arange(100.0, 10001.0))
    fit = analysis.fit_log(t, 3.0 + np.log(t) + d, t_min=100, t_max=5000)
    assert fit.t_range == (100.0, 5000.0)
    assert fit.num_points == 4901


def test_unsorted_input_gives_the_same_fit():
    rng = np.random.default_rng(10)
    t = rng.uniform(1.0, 1e3, size=50)
    d = 2.0 * np.sqrt(t) + rng.normal(size=t.size)
    order = np.argsort(t)
    shuffled, ordered = analysis.fit_sqrt(t, d), analysis.fit_sqrt(t[order], d[order])
    assert shuffled.params == pytest.approx(ordered.params)
    assert shuffled.t_range == (t.min(), t.max())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: analysis.fit_log([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]), "t must be > 0"),
        (lambda: analysis.fit_log([-1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]), "t must be > 0"),
        (lambda: analysis.fit_sqrt([-1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]), "t >= 0"),
        (lambda: analysis.fit_log([1.0, 2.0], [1.0, 2.0]), "at least 3 points"),
        (lambda: analysis.fit_log([1.0, 2.0, 3.0], [1.0, 2.0]), "shape"),
        (lambda: analysis.fit_log([1.0, 2.0, 3.0], [1.0, math.nan, 2.0]), "finite"),
        (lambda: analysis.fit_log([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]), "distinct"),
        (lambda: analysis.fit_power_law([1.0, 2.0, 3.0], [1.0, 0.0, 2.0]), "d must be > 0"),
        (lambda: analysis.fit_log_power([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]), "t > 1"),
        (lambda: analysis.fit_log_power([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]), "at least 4"),
        (lambda: analysis.fit_log_power([2.0, 3.0, 4.0], [1, 2, 3], exponent=-1.0), "exponent"),
        (lambda: analysis.fit_log(np.arange(1.0, 9.0), np.arange(8.0), t_min=5, t_max=2), "t_min"),
        (lambda: analysis.fit_log(np.arange(1.0, 9.0), np.arange(8.0), t_min=50), "No points"),
        (lambda: analysis.select_range([1.0, 10.0], t_min=1.0, last_decades=1), "last_decades"),
        (lambda: analysis.fit_log(np.ones((3, 2)), np.ones((3, 2))), "one-dimensional"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_read_metrics_filters_deduplicates_and_sorts(tmp_path):
    rng = np.random.default_rng(11)
    distances = rng.uniform(0.1, 10.0, size=6)
    lines = [
        json.dumps({"step": 100, "epoch": 0.5, "loss": 2.0, "weight_distance": distances[0]}),
        json.dumps({"step": 100, "epoch": 0.5, "eval_accuracy": 0.3}),  # No distance: skipped.
        json.dumps({"step": 200, "epoch": 1.0, "weight_distance": distances[1]}),
        json.dumps({"step": 300, "epoch": 1.5, "weight_distance": distances[2]}),
        # Resumed from the checkpoint at step 200: step 300 is logged again and wins.
        json.dumps({"step": 300, "epoch": 1.5, "weight_distance": distances[3]}),
        json.dumps({"step": 400, "weight_distance": distances[4]}),  # No epoch: nan.
        '{"step": 500, "weight_dist',  # Truncated by a crash: ignored.
    ]
    _write_lines(tmp_path / "metrics.jsonl", lines)
    metrics = analysis.read_metrics(tmp_path)
    np.testing.assert_array_equal(metrics["step"], [100, 200, 300, 400])
    np.testing.assert_array_equal(metrics["weight_distance"], distances[[0, 1, 3, 4]])
    np.testing.assert_array_equal(metrics["epoch"][:3], [0.5, 1.0, 1.5])
    assert math.isnan(metrics["epoch"][3])
    # The file path works as well as the directory.
    same = analysis.read_metrics(tmp_path / "metrics.jsonl", keys=("weight_distance",))
    np.testing.assert_array_equal(same["weight_distance"], metrics["weight_distance"])


def test_read_metrics_feeds_a_log_fit(tmp_path):
    rng = np.random.default_rng(12)
    steps = np.unique(np.geomspace(1, 1e5, 120).astype(int))
    d = 0.8 + 1.1 * np.log(steps) + rng.normal(scale=0.05, size=steps.size)
    _write_lines(
        tmp_path / "metrics.jsonl",
        [
            json.dumps({"step": int(s), "weight_distance": float(v)})
            for s, v in zip(steps, d, strict=True)
        ],
    )
    metrics = analysis.read_metrics(tmp_path)
    fit = analysis.fit_log(metrics["step"], metrics["weight_distance"])
    assert fit.params["b"] == pytest.approx(1.1, abs=5 * fit.stderr["b"])


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        analysis.read_metrics(tmp_path)
    _write_lines(tmp_path / "metrics.jsonl", ['{"step": 1, "loss": 1.0}', "oops", '{"step": 2}'])
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2:"):
        analysis.read_metrics(tmp_path)
    _write_lines(tmp_path / "metrics.jsonl", ['{"step": 1, "loss": 1.0}'])
    with pytest.raises(ValueError, match="weight_distance"):
        analysis.read_metrics(tmp_path)
