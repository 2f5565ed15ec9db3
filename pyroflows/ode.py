"""Backend-neutral pieces of the ODE solves behind ``ffjord``: solver names, time grids, tolerances.

A solver name means the same Runge-Kutta tableau on both backends (torch: the
torchdiffeq method of that name; JAX: the diffrax solver with that tableau), and a
fixed-step solve visits the same time points, so the two backends give the same
numbers to rounding.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SOLVERS", "FIXED_STEP", "TABLEAUX", "ACTIVATIONS", "ESTIMATORS", "NOISES", "time_grid", "tolerances",
    "hollow_mask",
]

#: name -> (kind, order). "rk4" is the 3/8 rule (torchdiffeq's "rk4"); "dopri5" and
#: "bosh3" carry an embedded error estimate and adapt their steps to atol/rtol.
SOLVERS = {
    "rk4": ("fixed", 4),
    "midpoint": ("fixed", 2),
    "euler": ("fixed", 1),
    "dopri5": ("adaptive", 5),
    "bosh3": ("adaptive", 3),
}
FIXED_STEP = tuple(name for name, (kind, _) in SOLVERS.items() if kind == "fixed")

#: Butcher tableaux ``(a rows, b, c)`` of the fixed-step solvers: stage i evaluates
#: ``f(t0 + c_i h, y0 + h sum_j a_ij k_j)`` and the step is ``y0 + h sum_i b_i k_i``.
#: These are torchdiffeq's methods of the same names ("rk4" is Kutta's 3/8 rule).
TABLEAUX = {
    "euler": ((), (1.0,), (0.0,)),
    "midpoint": (((0.5,),), (0.0, 1.0), (0.0, 0.5)),
    "rk4": (((1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), (1 / 8, 3 / 8, 3 / 8, 1 / 8), (0.0, 1 / 3, 2 / 3, 1.0)),
}

#: Smooth activations of the dynamics network: the divergence needs their derivative.
ACTIVATIONS = ("tanh", "softplus", "silu")
ESTIMATORS = ("hutchinson", "exact", "hollow")
NOISES = ("gaussian", "rademacher")


def time_grid(time_length: float, num_steps: int) -> np.ndarray:
    """The ``num_steps + 1`` solver times ``T k / n`` of a fixed-step solve, in float64."""
    return float(time_length) * np.arange(num_steps + 1, dtype=np.float64) / num_steps


def tolerances(atol: float, rtol: float, eps: float) -> tuple[float, float]:
    """``(atol, rtol)`` floored at 64 machine epsilons of the state's dtype.

    An adaptive solver asked for less than its arithmetic can resolve shrinks its step
    until it underflows; float32 therefore runs at about 8e-6 at best.
    """
    floor = 64.0 * float(eps)
    return max(float(atol), floor), max(float(rtol), floor)


def hollow_mask(dim: int, width: int) -> np.ndarray:
    """Boolean (dim, width, dim + 1) mask of a hollow conditioner's first layer.

    Group i (``width`` units) reads every input but ``x_i``; the last input, time, is
    read by all groups. So the conditioner's output ``h_i`` does not depend on ``x_i``.
    """
    keep = ~np.eye(dim, dim + 1, dtype=bool)
    return np.broadcast_to(keep[:, None, :], (dim, width, dim + 1)).copy()
