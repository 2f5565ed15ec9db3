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
