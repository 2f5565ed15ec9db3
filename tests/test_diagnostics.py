"""PSIS k-hat and ESS against closed forms (numpy only)."""

import math

import numpy as np
import pytest
from scipy import stats

from pyroflows.diagnostics import ess, gpd_fit, log_mean_exp, psis_khat, summarize_weights


def _gaussian_log_weights(s, n, seed):
    z = np.random.default_rng(seed).normal(0.0, s, n)
    return stats.norm.logpdf(z) - stats.norm.logpdf(z, 0.0, s)


@pytest.mark.parametrize("s", [0.5, 0.7, 0.9])
def test_khat_of_a_too_narrow_gaussian_proposal_is_one_minus_s_squared(s):
    # q = N(0, s^2), p = N(0, 1): P(w > t) ~ t^(-1/(1 - s^2)), so the Pareto shape is 1 - s^2.
    khats = [psis_khat(_gaussian_log_weights(s, 20_000, seed)) for seed in range(4)]
    assert abs(np.mean(khats) - (1 - s**2)) < 0.08


def test_gpd_fit_recovers_the_shape_of_pareto_samples():
    for k in (0.2, 0.6):
        x = stats.genpareto.rvs(k, scale=2.0, size=20_000, random_state=1)
        k_hat, sigma = gpd_fit(x)
        assert abs(k_hat - k) < 0.05 and abs(sigma - 2.0) < 0.15


def test_ess_and_log_mean_exp_against_direct_formulas():
    lw = np.random.default_rng(0).normal(size=500) * 2 + 700.0  # would overflow exp directly
    w = np.exp(lw - 700.0)
    assert math.isclose(ess(lw), w.sum() ** 2 / (w**2).sum(), rel_tol=1e-10)
    assert math.isclose(log_mean_exp(lw), 700.0 + math.log(w.mean()), rel_tol=1e-12)


def test_an_exact_proposal_has_full_ess_and_no_tail():
    out = summarize_weights(np.full(1000, -3.5))
    assert out["elbo"] == out["iwelbo"] == -3.5
    assert math.isclose(out["ess_fraction"], 1.0) and out["khat"] == -math.inf


def test_bad_log_weights_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="NaN"):
        ess([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="at least 25"):
        psis_khat(np.zeros(10))


def test_all_zero_weights_get_the_worst_scores_not_nan():
    # every draw of q lies where p has no mass: no weight at all
    for n in (10, 1000):
        lw = np.full(n, -np.inf)
        assert psis_khat(lw) == math.inf and ess(lw) == 0.0 and log_mean_exp(lw) == -math.inf
        out = summarize_weights(lw)
        assert out["khat"] == math.inf and out["ess"] == 0.0 and out["ess_fraction"] == 0.0
        assert out["elbo"] == out["iwelbo"] == -math.inf and out["num_samples"] == n


def test_zero_weights_among_positive_ones_count_in_n_but_not_in_the_tail_fit():
    base = _gaussian_log_weights(0.7, 20_000, 0)
    lw = np.random.default_rng(1).permutation(np.concatenate([base, np.full(2_000, -np.inf)]))
    n = lw.size
    # zero weights leave the sums alone: ESS unchanged, the mean weight scaled by n_finite / n
    assert math.isclose(ess(lw), ess(base), rel_tol=1e-12)
    assert math.isclose(log_mean_exp(lw), log_mean_exp(base) + math.log(20_000 / n), rel_tol=1e-12)
    # the tail has M(n) draws, all of them finite here: the fit is on their exceedances
    tail = math.ceil(3 * math.sqrt(n))
    top = np.sort(base - base.max())[-tail - 1 :]
    assert psis_khat(lw) == gpd_fit(np.exp(top[1:]) - np.exp(top[0]))[0]
    assert abs(psis_khat(lw) - (1 - 0.7**2)) < 0.15
    out = summarize_weights(lw)
    assert out["elbo"] == -math.inf and math.isfinite(out["iwelbo"]) and math.isfinite(out["khat"])


def test_equal_weights_on_a_subset_have_ess_equal_to_its_size():
    lw = np.full(1000, -np.inf)
    lw[:300] = 2.0
    assert math.isclose(ess(lw), 300.0, rel_tol=1e-12)
    assert psis_khat(lw) == -math.inf  # the 95 largest weights tie


def test_fewer_than_five_positive_weights_is_too_short_a_tail_and_scores_inf():
    lw = np.full(1000, -np.inf)
    lw[:3] = [0.0, 1.0, 2.0]
    w = np.exp([0.0, 1.0, 2.0])
    assert psis_khat(lw) == math.inf
    assert math.isclose(ess(lw), w.sum() ** 2 / (w**2).sum(), rel_tol=1e-12)


def test_a_few_large_weights_above_a_tie_score_inf():
    # q = p up to a constant except three draws with e^20 times the weight: they carry it all
    lw = np.zeros(1000)
    lw[[5, 50, 500]] = 20.0
    assert psis_khat(lw) == math.inf
    expected = (3 * math.exp(20) + 997) ** 2 / (3 * math.exp(40) + 997)
    assert math.isclose(ess(lw), expected, rel_tol=1e-12) and ess(lw) < 3.01


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_an_exact_guide_up_to_rounding_has_no_tail(dtype):
    # log w = log Z for every draw, computed with rounding: equal to a few units in the last place
    noise = np.random.default_rng(0).integers(-3, 4, 1000) * np.finfo(dtype).eps * 40.0
    lw = (np.float64(-40.0) + noise).astype(dtype)
    assert len(np.unique(lw)) > 5
    out = summarize_weights(lw)
    assert out["khat"] == -math.inf and math.isclose(out["ess_fraction"], 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("n", [21, 24])
def test_fewer_than_25_log_weights_are_refused_even_when_the_tail_rounds_up_to_5(n):
    # ceil(n / 5) is 5 from n = 21: the documented floor of 25 is what decides
    with pytest.raises(ValueError, match=f"at least 25 log-weights to fit a tail, got {n}"):
        psis_khat(np.random.default_rng(0).normal(size=n))
    assert math.isnan(summarize_weights(np.random.default_rng(0).normal(size=n))["khat"])


@pytest.mark.parametrize("n", [100, 400, 10_000])
def test_khat_equals_arviz_stats_psis_where_the_tail_sizes_agree(n):
    # The same estimator and prior (benchmarks/libraries.py): where both libraries take the
    # same number of tail draws, the same k-hat to rounding. arviz-stats is in the bench extra.
    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    for seed in range(3):
        lw = _gaussian_log_weights(0.7, n, seed)
        theirs = float(array_stats.psislw(-lw, r_eff=1)[1])  # it takes log-likelihoods: negate
        assert math.isclose(psis_khat(lw), theirs, rel_tol=1e-9, abs_tol=1e-12)
