"""Cases shared by both backends' residual-flow tests: a block with a large Jacobian, a
numpy reference of the residual map, and bad options."""

from __future__ import annotations

import math

import numpy as np

#: options that ``build_flow("residual", ...)`` and ``ResidualBlock`` must reject, and a
#: word the error message must contain
BAD_OPTIONS = [
    ({"estimator": "hutchinson"}, "estimator"),
    ({"noise": "uniform"}, "noise"),
    ({"lipschitz": 1.0}, "lipschitz"),
    ({"lipschitz": 0.0}, "lipschitz"),
    ({"roulette_p": 1.0}, "roulette_p"),
    ({"num_terms": 0}, "num_terms"),
    ({"neumann_gradient": "yes"}, "neumann_gradient"),
    ({"power_iterations": 0}, "power_iterations"),
    ({"inverse_tol": -1e-3}, "inverse_tol"),
    ({"max_inverse_iter": 2.5}, "max_inverse_iter"),
    ({"coefficient": 0.9}, "coefficient"),
]


def strong_weights(dim: int, seed: int = 0):
    """Weights and biases of a ``(dim, (8, 8), lipschitz=0.85)`` block whose ``J_g`` is close
    to 0.45 times a rotation (the series then needs many terms): identity-like layers,
    biases that put LipSwish in its near-linear range, a rotation in the middle layer so
    ``J_g`` is not symmetric, and a little noise."""
    rng = np.random.default_rng(seed)
    embed = np.zeros((8, dim))
    embed[:dim, :dim] = np.eye(dim)
    rot = np.eye(8)
    c, s = math.cos(0.5), math.sin(0.5)
    rot[:2, :2] = [[c, -s], [s, c]]
    weights = [w + 0.05 * rng.standard_normal(w.shape) for w in (embed, rot, embed.T)]
    return weights, [np.full(8, 2.0), np.full(8, 2.0), np.zeros(dim)]


def numpy_residual(ys, weights, biases, raw_betas, coeff):
    """``y + g(y)`` with every weight divided by ``max(1, sigma_max / coeff)`` (LAPACK's SVD)
    and LipSwish ``z sigmoid(softplus(raw) z) / 1.1`` between the layers."""
    h = np.asarray(ys, dtype=np.float64)
    for i, (w, b) in enumerate(zip(weights, biases)):
        w = np.asarray(w) / max(1.0, np.linalg.svd(np.asarray(w), compute_uv=False)[0] / coeff)
        h = h @ w.T + np.asarray(b)
        if i < len(raw_betas):
            beta = np.log1p(np.exp(float(raw_betas[i])))
            h = h / (1.0 + np.exp(-beta * h)) / 1.1
    return np.asarray(ys) + h
