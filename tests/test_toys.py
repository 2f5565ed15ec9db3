"""Toy targets against closed forms and numerical integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from pyroflows import toys


def test_double_well_constants_by_quadrature():
    # separable: Z = (integral over x1) * sqrt(2 pi)
    f = lambda x: math.exp(-(x**4 - 6 * x**2 - 0.5 * x))  # noqa: E731
    z1 = integrate.quad(f, -10, 10)[0]
    left = integrate.quad(f, -10, 0)[0]
    assert abs(math.log(z1 * math.sqrt(2 * math.pi)) - toys.DOUBLE_WELL_LOG_Z) < 1e-4
    assert abs(left / z1 - toys.DOUBLE_WELL_P_LEFT) < 1e-4


def test_eight_gaussians_entropy_matches_its_mixture_density():
    x = toys.sample_dataset("8gaussians", 200_000, seed=1)
    angles = np.arange(8) * np.pi / 4
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], -1) / 1.414
    sd = 0.5 / 1.414
    log_p = np.log(np.mean([stats.multivariate_normal(c, sd**2).pdf(x) for c in centers], axis=0))
    assert abs(-log_p.mean() - toys.DATA_ENTROPY["8gaussians"]) < 0.01


def test_checkerboard_is_uniform_on_eight_squares():
    x = toys.sample_dataset("checkerboard", 80_000, seed=2)
    cells = np.floor(x / 2).astype(int)
    assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0) and np.all(np.abs(x) <= 4)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert len(counts) == 8 and np.all(np.abs(counts / len(x) - 1 / 8) < 0.005)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_energies_at_known_points(backend):
    if backend == "torch":
        import torch as xp

        arr = lambda a: xp.tensor(a, dtype=xp.float64)  # noqa: E731
    else:
        import jax.numpy as xp

        arr = lambda a: xp.asarray(a)  # noqa: E731
    u2 = toys.log_density("u2", backend)
    assert float(u2(arr([1.0, 0.0]))) == pytest.approx(-0.5 * (1 / 0.4) ** 2)
    assert float(u2(arr([0.0, 0.0]))) == 0.0
    z = np.array([[2.0, 0.0], [0.3, -1.2]])
    # U1 written out with numpy
    r = np.linalg.norm(z, axis=-1)
    u1 = 0.5 * ((r - 2) / 0.4) ** 2 - np.log(
        np.exp(-0.5 * ((z[:, 0] - 2) / 0.6) ** 2) + np.exp(-0.5 * ((z[:, 0] + 2) / 0.6) ** 2)
    )
    np.testing.assert_allclose(np.asarray(toys.log_density("u1", backend)(arr(z))), -u1, rtol=1e-6)
    with pytest.raises(ValueError, match="defined on R\\^2"):
        toys.log_density("u1", backend)(arr(np.zeros((3, 3))))
    with pytest.raises(ValueError, match="unknown energy"):
        toys.log_density("u9", backend)
