"""Backend-neutral pieces of the ODE solves behind ``ffjord``: solver names, time grids, tolerances.

A solver name means the same Runge-Kutta tableau on both backends (torch: the
torchdiffeq method of that name; JAX: the diffrax solver with that tableau), and a
fixed-step solve visits the same time points, so the two backends give the same
numbers to rounding.

Example:
    >>> from pyroflows import ode
    >>> ode.SOLVERS["dopri5"]
    ('adaptive', 5)
    >>> ode.FIXED_STEP
    ('rk4', 'midpoint', 'euler')
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SOLVERS",
    "FIXED_STEP",
    "TABLEAUX",
    "ACTIVATIONS",
    "ESTIMATORS",
    "NOISES",
    "time_grid",
    "tolerances",
    "hollow_mask",
]

SOLVERS: dict[str, tuple[str, int]] = {
    "rk4": ("fixed", 4),
    "midpoint": ("fixed", 2),
    "euler": ("fixed", 1),
    "dopri5": ("adaptive", 5),
    "bosh3": ("adaptive", 3),
}
"""Solver name -> ``(kind, order)``. ``"rk4"`` is the 3/8 rule (torchdiffeq's ``"rk4"``);
``"dopri5"`` and ``"bosh3"`` carry an embedded error estimate and adapt their steps to
``atol``/``rtol``."""

FIXED_STEP: tuple[str, ...] = tuple(name for name, (kind, _) in SOLVERS.items() if kind == "fixed")
"""The fixed-step solvers (``num_steps`` steps over ``[0, T]``)."""

TABLEAUX: dict[str, tuple] = {
    "euler": ((), (1.0,), (0.0,)),
    "midpoint": (((0.5,),), (0.0, 1.0), (0.0, 0.5)),
    "rk4": (((1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), (1 / 8, 3 / 8, 3 / 8, 1 / 8), (0.0, 1 / 3, 2 / 3, 1.0)),
}
"""Butcher tableaux ``(a rows, b, c)`` of the fixed-step solvers: stage i evaluates
``f(t0 + c_i h, y0 + h sum_j a_ij k_j)`` and the step is ``y0 + h sum_i b_i k_i``. These
are torchdiffeq's methods of the same names (``"rk4"`` is Kutta's 3/8 rule)."""

ACTIVATIONS: tuple[str, ...] = ("tanh", "softplus", "silu")
"""Smooth activations of the dynamics network: the divergence needs their derivative."""

ESTIMATORS: tuple[str, ...] = ("hutchinson", "exact", "hollow")
"""How ``ffjord`` gets the trace of ``df/dx``: a Hutchinson estimate, the exact trace, or
hollow dynamics whose divergence is exact in one pass."""

NOISES: tuple[str, ...] = ("gaussian", "rademacher")
"""Distributions of the Hutchinson probe."""


def time_grid(time_length: float, num_steps: int) -> np.ndarray:
    """The ``num_steps + 1`` solver times ``T k / n`` of a fixed-step solve, in float64.

    Both backends step through these exact times, so their fixed-step solves agree.

    Args:
        time_length: the integration time ``T``.
        num_steps: the number of steps ``n``.

    Returns:
        A float64 array of shape ``(num_steps + 1,)`` from 0 to ``T``.

    Example:
        >>> time_grid(1.0, 4).tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    return float(time_length) * np.arange(num_steps + 1, dtype=np.float64) / num_steps


def tolerances(atol: float, rtol: float, eps: float) -> tuple[float, float]:
    """``(atol, rtol)`` floored at 64 machine epsilons of the state's dtype.

    An adaptive solver asked for less than its arithmetic can resolve shrinks its step
    until it underflows; float32 therefore runs at about 8e-6 at best.

    Args:
        atol: the requested absolute tolerance.
        rtol: the requested relative tolerance.
        eps: the machine epsilon of the state's dtype.

    Returns:
        ``(atol, rtol)``, each at least ``64 * eps``.

    Example:
        >>> import numpy as np
        >>> atol, rtol = tolerances(1e-9, 1e-5, np.finfo(np.float32).eps)
        >>> round(atol, 9), rtol
        (7.629e-06, 1e-05)
    """
    floor = 64.0 * float(eps)
    return max(float(atol), floor), max(float(rtol), floor)


def hollow_mask(dim: int, width: int) -> np.ndarray:
    """Boolean (dim, width, dim + 1) mask of a hollow conditioner's first layer.

    Group i (``width`` units) reads every input but ``x_i``; the last input, time, is
    read by all groups. So the conditioner's output ``h_i`` does not depend on ``x_i``.

    Args:
        dim: the state's size.
        width: hidden units per group.

    Returns:
        The mask, ``True`` where a unit reads an input.

    References:
        Chen & Duvenaud 2019, "Neural networks with cheap differential operators",
        arXiv:1912.03579.

    Example:
        >>> mask = hollow_mask(2, 1)
        >>> mask.shape
        (2, 1, 3)
        >>> mask[:, 0, :].tolist()  # group 0 skips x_0, group 1 skips x_1, both read t
        [[False, True, True], [True, False, True]]
    """
    keep = ~np.eye(dim, dim + 1, dtype=bool)
    return np.broadcast_to(keep[:, None, :], (dim, width, dim + 1)).copy()
