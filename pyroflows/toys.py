"""Toy targets, written once: 2-D data sets (numpy samplers) and unnormalised log-densities.

The log-densities are written against a small array namespace, so the torch and the
JAX backends (``pyroflows.torch.targets``, ``pyroflows.jax.targets``) evaluate the same
formula.

Data sets (as in FFJORD's experiments, Grathwohl et al. 2018, arXiv:1810.01367):
``8gaussians`` (entropy 2.8313 nats) and ``checkerboard`` (uniform on 8 squares of area
4: entropy log 32 = 3.4657 nats).

Energies (log p = -U): ``u1`` ... ``u4`` of Rezende & Mohamed 2015 (arXiv:1505.05770,
Table 1), the double well ``u(x) = x1^4 - 6 x1^2 - 0.5 x1 + x2^2 / 2`` of Wu, Kohler
& Noe 2020 (arXiv:2002.06707), with log Z = 10.2935 and P(x1 < 0) = 0.1557, and the
banana ``u(x) = x1^2 / 8 + (x2 - (x1^2 - 4) / 4)^2 / 2``: the twisted Gaussian of Haario,
Saksman & Tamminen 1999, scaled to 2-D unit size (``x1 ~ N(0, 2^2)``,
``x2 | x1 ~ N((x1^2 - 4) / 4, 1)``; the twist has unit Jacobian, so log Z = log(4 pi)).

Example:
    >>> from pyroflows import toys
    >>> sorted(toys.DATASETS), sorted(toys.ENERGIES)
    (['8gaussians', 'checkerboard'], ['banana', 'double_well', 'u1', 'u2', 'u3', 'u4'])
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "DATASETS",
    "ENERGIES",
    "DATA_ENTROPY",
    "sample_dataset",
    "log_density",
    "DOUBLE_WELL_LOG_Z",
    "DOUBLE_WELL_P_LEFT",
    "BANANA_LOG_Z",
    "namespace",
]

DATA_ENTROPY: dict[str, float] = {"8gaussians": 2.8313, "checkerboard": math.log(32.0)}
"""The differential entropy (nats) of each data set: the best possible mean NLL of a fit."""
DOUBLE_WELL_LOG_Z: float = 10.2935
"""``log Z`` of the double-well energy (numerical quadrature)."""
DOUBLE_WELL_P_LEFT: float = 0.1557
"""The double well's probability mass at ``x1 < 0`` (its smaller mode)."""
BANANA_LOG_Z: float = math.log(4 * math.pi)
"""``log Z`` of the banana energy, exact."""


def _eight_gaussians(n, rng):
    angles = np.arange(8) * (np.pi / 4)
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], -1)
    points = centers[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, 2))
    return points / 1.414


def _checkerboard(n, rng):
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], -1)


DATASETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
}
"""The samplers ``sampler(n, rng) -> (n, 2)`` of the data sets, by name."""


def sample_dataset(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points of a 2-D toy data set, float64 of shape ``(n, 2)``.

    Args:
        name: ``"8gaussians"`` or ``"checkerboard"``.
        n: the number of points.
        seed: the seed of the numpy generator; the same seed gives the same points.

    Returns:
        The points, float64 of shape ``(n, 2)``.

    Raises:
        ValueError: an unknown data set (the message lists the valid names).

    Example:
        >>> x = sample_dataset("checkerboard", 1000, seed=0)
        >>> x.shape, x.dtype.name
        ((1000, 2), 'float64')
        >>> bool((abs(x) <= 4).all())
        True
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](int(n), np.random.default_rng(seed))


# --------------------------------------------------------------------------- energies
def namespace(backend: str) -> types.SimpleNamespace:
    """The array functions the energies use, from torch or jax.numpy.

    Args:
        backend: ``"torch"`` or ``"jax"``.

    Returns:
        A namespace with ``sin``, ``exp``, ``logaddexp``, ``sigmoid`` and ``norm`` (the
        Euclidean norm over the last axis).

    Raises:
        ValueError: an unknown backend.

    Example:
        >>> import torch
        >>> namespace("torch").exp is torch.exp
        True
    """
    if backend == "torch":
        import torch

        return types.SimpleNamespace(
            sin=torch.sin,
            exp=torch.exp,
            logaddexp=torch.logaddexp,
            sigmoid=torch.sigmoid,
            norm=lambda z: torch.linalg.vector_norm(z, dim=-1),
        )
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return types.SimpleNamespace(
            sin=jnp.sin,
            exp=jnp.exp,
            logaddexp=jnp.logaddexp,
            sigmoid=jax.nn.sigmoid,
            norm=lambda z: jnp.linalg.norm(z, axis=-1),
        )
    raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'jax'")


def _w1(z, xp):
    return xp.sin(2 * math.pi * z[..., 0] / 4)


def _u1(z, xp):
    ring = 0.5 * ((xp.norm(z) - 2) / 0.4) ** 2
    return ring - xp.logaddexp(-0.5 * ((z[..., 0] - 2) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2) / 0.6) ** 2)


def _u2(z, xp):
    return 0.5 * ((z[..., 1] - _w1(z, xp)) / 0.4) ** 2


def _u3(z, xp):
    w2 = 3 * xp.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)
    d = z[..., 1] - _w1(z, xp)
    return -xp.logaddexp(-0.5 * (d / 0.35) ** 2, -0.5 * ((d + w2) / 0.35) ** 2)


def _u4(z, xp):
    w3 = 3 * xp.sigmoid((z[..., 0] - 1) / 0.3)
    d = z[..., 1] - _w1(z, xp)
    return -xp.logaddexp(-0.5 * (d / 0.4) ** 2, -0.5 * ((d + w3) / 0.35) ** 2)


def _double_well(z, xp):
    x1 = z[..., 0]
    return x1**4 - 6 * x1**2 - 0.5 * x1 + 0.5 * z[..., 1] ** 2


def _banana(z, xp):
    x1 = z[..., 0]
    return x1**2 / 8 + 0.5 * (z[..., 1] - 0.25 * (x1**2 - 4)) ** 2


ENERGIES: dict[str, Callable[[Any, types.SimpleNamespace], Any]] = {
    "u1": _u1,
    "u2": _u2,
    "u3": _u3,
    "u4": _u4,
    "double_well": _double_well,
    "banana": _banana,
}
"""The energies ``U(z, xp)`` by name, written against an array namespace (``namespace``)."""


def log_density(name: str, backend: str) -> Callable[[Any], Any]:
    """The unnormalised log-density ``-U`` of a 2-D energy, on ``(..., 2)`` arrays of ``backend``.

    Args:
        name: a key of ``ENERGIES``.
        backend: ``"torch"`` or ``"jax"``: the kind of array the function takes.

    Returns:
        ``log_p(z)``: ``-U(z)`` of shape ``(...)`` for ``z`` of shape ``(..., 2)``; it raises
        ``ValueError`` when the last dimension is not 2.

    Raises:
        ValueError: an unknown energy or backend.

    Example:
        >>> import torch
        >>> log_p = log_density("banana", "torch")
        >>> log_p(torch.tensor([[0.0, 1.0], [2.0, 0.0]])).tolist()
        [-2.0, -0.5]
    """
    if name not in ENERGIES:
        raise ValueError(f"unknown energy {name!r}; choose one of {sorted(ENERGIES)}")
    energy, xp = ENERGIES[name], namespace(backend)

    def log_p(z):
        if z.shape[-1] != 2:
            raise ValueError(f"the {name} energy is defined on R^2; got last dimension {z.shape[-1]}")
        return -energy(z, xp)

    log_p.__name__ = name
    return log_p
