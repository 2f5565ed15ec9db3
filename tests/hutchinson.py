"""Moments of a Hutchinson-type log-det estimate, shared by both backends' FFJORD tests.

With one probe ``e`` per estimate, held for the whole solve, the estimate is the quadratic
form ``q(e) = e^T M e`` of one matrix ``M`` (the quadrature of the Jacobians along the
path, which does not depend on ``e``). Its mean is ``tr M`` for any probe with
``E[e e^T] = I``; its variance is ``2 |S|_F^2`` for Gaussian probes and
``2 (|S|_F^2 - sum_i S_ii^2)`` for Rademacher ones, ``S`` the symmetric part of ``M``.
"""

from __future__ import annotations

import numpy as np


def probe_basis(dim: int) -> np.ndarray:
    """Probes ``e_i`` and ``e_i + e_j`` (i < j): the estimates on them give ``S`` exactly."""
    eye = np.eye(dim)
    return np.array([eye[i] for i in range(dim)] + [eye[i] + eye[j] for i in range(dim) for j in range(i + 1, dim)])


def symmetric_form(q, dim: int) -> np.ndarray:
    """``S`` from the estimates ``q`` on ``probe_basis(dim)``."""
    q = np.asarray(q, dtype=np.float64)
    s = np.diag(q[:dim])
    k = dim
    for i in range(dim):
        for j in range(i + 1, dim):
            s[i, j] = s[j, i] = 0.5 * (q[k] - q[i] - q[j])
            k += 1
    return s


def assert_one_probe_moments(estimates, exact: float, s: np.ndarray, noise: str) -> None:
    """Mean within 4 standard errors of ``exact`` (= tr S), variance > 0 and within 4
    standard errors of the one-probe variance. A probe redrawn at every solver
    evaluation would average over steps and have a much smaller variance."""
    est = np.asarray(estimates, dtype=np.float64)
    n = len(est)
    mean, var = est.mean(), est.var(ddof=1)
    assert var > 0 and abs(mean - exact) < 4 * np.sqrt(var / n), (mean, exact, var)
    assert abs(np.trace(s) - exact) < 1e-12 * (1 + abs(exact))
    expected = 2 * ((s**2).sum() - ((np.diag(s) ** 2).sum() if noise == "rademacher" else 0.0))
    d = est - mean
    se_var = np.sqrt(((d**2 - var) ** 2).mean() / n)
    assert abs(var - expected) < 4 * se_var, (var, expected, se_var)
