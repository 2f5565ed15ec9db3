"""The Newton mode search and the Laplace factor behind ``AutoFlow(init_scale="laplace")``,
against closed forms (numpy only, so both backends share these answers)."""

import numpy as np
import pytest

from pyroflows.laplace import find_mode, laplace_scale_tril


def rosenbrock():
    # U = (1 - a)^2 + 100 (b - a^2)^2: minimum 0 at (1, 1), non-convex on the way there
    def fg(x):
        a, b = x
        f = (1 - a) ** 2 + 100 * (b - a**2) ** 2
        return f, np.array([-2 * (1 - a) - 400 * a * (b - a**2), 200 * (b - a**2)])

    def hess(x):
        a, b = x
        return np.array([[2 - 400 * b + 1200 * a**2, -400 * a], [-400 * a, 200.0]])

    return fg, hess


def test_newton_search_reaches_the_minimum_of_a_non_convex_function():
    fg, hess = rosenbrock()
    mode, h = find_mode(fg, hess, np.array([-1.2, 1.0]))
    np.testing.assert_allclose(mode, [1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(h, [[802.0, -400.0], [-400.0, 200.0]], rtol=1e-5)


def test_the_search_backs_off_where_the_density_is_zero():
    # U = x - log x (a Gamma(2, 1) log-density, negated): undefined for x <= 0, minimum at x = 1.
    # From x = 4 a full Newton step lands at x < 0; the line search must halve it.
    def fg(x):
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(x[0] - np.log(x[0])), np.array([1 - 1 / x[0]])

    mode, h = find_mode(fg, lambda x: np.array([[1 / x[0] ** 2]]), np.array([4.0]))
    np.testing.assert_allclose(mode, [1.0], atol=1e-7)
    np.testing.assert_allclose(h, [[1.0]], rtol=1e-6)


def test_laplace_factor_is_the_cholesky_factor_of_the_inverse_hessian():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    h = a @ a.T + 0.5 * np.eye(4)
    scale_tril = laplace_scale_tril(h)
    np.testing.assert_allclose(scale_tril @ scale_tril.T, np.linalg.inv(h), rtol=1e-10, atol=1e-12)
    assert np.allclose(scale_tril, np.tril(scale_tril)) and np.all(np.diag(scale_tril) > 0)


def test_failures_name_the_problem_and_the_fix():
    def unbounded(x):  # a density that grows without bound along x[0]
        return float(-x[0] + x[1] ** 2), np.array([-1.0, 2 * x[1]])

    with pytest.raises(ValueError, match="found no posterior mode after 30 Newton steps.*init_scale=0.1"):
        find_mode(unbounded, lambda x: np.diag([0.0, 2.0]), np.zeros(2), max_steps=30)
    with pytest.raises(ValueError, match="not finite at the init_loc_fn point"):
        find_mode(lambda x: (np.nan, np.zeros(1)), lambda x: np.eye(1), np.zeros(1))
    with pytest.raises(ValueError, match="not positive definite.*smallest eigenvalue -1"):
        laplace_scale_tril(np.diag([2.0, -1.0]))
