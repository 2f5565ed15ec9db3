"""Potentials U = -log density with closed-form gradients and Hessians, in numpy: the Laplace
problems of benchmarks/libraries.py that tests/test_laplace.py checks ``find_mode`` on too.

Each function returns ``(fg, hess)``: ``fg(x) -> (U, grad U)`` and ``hess(x) -> Hessian``.
"""

from __future__ import annotations

import numpy as np


def funnel(dim=10):
    """Neal's funnel, v ~ N(0, 3), x_i | v ~ N(0, e^(v/2)): U = v^2/18 + sum x_i^2 e^-v / 2 + (dim - 1) v / 2."""

    def fg(z):
        v, x = z[0], z[1:]
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(-v)
            f = v**2 / 18 + 0.5 * np.sum(x**2) * e + 0.5 * (dim - 1) * v
            return float(f), np.concatenate([[v / 9 - 0.5 * np.sum(x**2) * e + 0.5 * (dim - 1)], x * e])

    def hess(z):
        v, x = z[0], z[1:]
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(-v)
            h = np.diag(np.concatenate([[1 / 9 + 0.5 * np.sum(x**2) * e], np.full(dim - 1, e)]))
            h[0, 1:] = h[1:, 0] = -x * e
        return h

    return fg, hess


def gamma(raises: bool):
    """U = x - log x (a Gamma(2, 1) density, negated), minimum at 1; NaN or a ValueError for x <= 0.

    From x = 10 the full Newton step lands at x = -80, and a trust region grown on the way down
    reaches x < 0 too.
    """

    def fg(x):
        if raises and x[0] <= 0:
            raise ValueError("Expected parameter rate to satisfy the constraint GreaterThan(0)")
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(x[0] - np.log(x[0])), np.array([1 - 1 / x[0]])

    def hess(x):
        with np.errstate(divide="ignore"):
            return np.array([[1 / x[0] ** 2]])

    return fg, hess
