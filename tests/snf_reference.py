"""Independent references shared by both backends' stochastic-normalizing-flow tests:
the double well's gradient by hand, exact double-well and Gaussian samples, the conjugate
model's evidence in closed form, and Monte Carlo estimates with errors from the spread of
independent groups of paths."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

MEAN = np.array([1.0, -0.5])
COV = np.array([[1.0, 0.6], [0.6, 0.8]])
# conjugate model: mu ~ N(0, I_2), rows of OBS ~ N(mu, NOISE^2 I_2)
OBS = np.array([[0.5, -1.0], [1.2, -0.4], [-0.3, -1.3], [0.8, -0.7], [1.5, -0.2]])
NOISE = 0.5
POSTERIOR_MEAN = OBS.sum(0) / NOISE**2 / (1 + len(OBS) / NOISE**2)


def double_well_grad(y):
    """grad log p~ of u(x) = x1^4 - 6 x1^2 - 0.5 x1 + x2^2 / 2, by hand."""
    return np.stack([-(4 * y[:, 0] ** 3 - 12 * y[:, 0] - 0.5), -y[:, 1]], -1)


def langevin_log_ratio(y0, y1, e):
    """log N(y0; y1 + e g(y1), 2e) - log N(y1; y0 + e g(y0), 2e) for the double well (scipy)."""
    cov = 2 * e * np.eye(y0.shape[1])
    forward = [stats.multivariate_normal.logpdf(b, a + e * g, cov) for a, b, g in zip(y0, y1, double_well_grad(y0))]
    backward = [stats.multivariate_normal.logpdf(a, b + e * g, cov) for a, b, g in zip(y0, y1, double_well_grad(y1))]
    return np.subtract(backward, forward)


def double_well_samples(n, seed=0):
    """Exact draws: x1 by inverse CDF on a fine grid, x2 ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-3.5, 3.5, 20001)
    cdf = np.cumsum(np.exp(-(grid**4 - 6 * grid**2 - 0.5 * grid)))
    x1 = np.interp(rng.uniform(size=n), cdf / cdf[-1], grid)
    return np.stack([x1, rng.standard_normal(n)], -1)


def log_z_and_p_left(x, log_w, groups=20):
    """log mean weight and self-normalised P(x1 < 0), each with a standard error from the
    spread over independent groups of paths."""
    lw, left = log_w.reshape(groups, -1), (x[:, 0] < 0).reshape(groups, -1)
    w = np.exp(lw - lw.max())
    z = w.mean(1)
    log_z = lw.max() + math.log(z.mean())
    se_log_z = z.std(ddof=1) / math.sqrt(groups) / z.mean()
    p = (w * left).sum(1) / w.sum(1)
    w_all = np.exp(log_w - log_w.max())
    p_all = float((w_all * (x[:, 0] < 0)).sum() / w_all.sum())
    return log_z, se_log_z, p_all, p.std(ddof=1) / math.sqrt(groups)


def check_gaussian_moments(out):
    """Mean and covariance of N(MEAN, COV) within 4 standard errors of ``len(out)`` draws."""
    n = len(out)
    se_mean = np.sqrt(np.diag(COV) / n)
    np.testing.assert_array_less(np.abs(out.mean(0) - MEAN), 4 * se_mean)
    se_cov = np.sqrt((COV**2 + np.outer(np.diag(COV), np.diag(COV))) / n)
    np.testing.assert_array_less(np.abs(np.cov(out.T) - COV), 4 * se_cov)


def log_evidence(data=OBS):
    """Closed form: each coordinate of the data is N(0, NOISE^2 I + 1 1^T)."""
    n = data.shape[0]
    cov = NOISE**2 * np.eye(n) + np.ones((n, n))
    return sum(stats.multivariate_normal.logpdf(data[:, j], np.zeros(n), cov) for j in range(data.shape[1]))


def check_evidence_bound(log_w):
    """E[log w] is a lower bound on log p(x) (4 standard errors of slack), and the weights
    are unbiased, E[w] = p(x): their log-mean is log p(x) within 4 of its standard errors
    (delta method). Returns (elbo, iwelbo, se of iwelbo, exact)."""
    exact = log_evidence()
    elbo, se_elbo = log_w.mean(), log_w.std() / math.sqrt(log_w.size)
    w = np.exp(log_w - log_w.max())
    iwelbo, se_iwelbo = log_w.max() + math.log(w.mean()), w.std() / w.mean() / math.sqrt(w.size)
    assert elbo < exact + 4 * se_elbo
    assert se_iwelbo < 0.05 and abs(iwelbo - exact) < 4 * se_iwelbo
    return elbo, iwelbo, se_iwelbo, exact
