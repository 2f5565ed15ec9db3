"""Continuous normalizing flows: FFJORD (Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud 2018,
"FFJORD: Free-form continuous dynamics for scalable reversible generative models", arXiv:1810.01367).

The map is the flow of an ODE ``dx/dt = f(x, t)`` from ``t = 0`` to ``T``; its
log-determinant is ``integral_0^T tr(df/dx) dt`` (instantaneous change of variables,
Chen et al. 2018, arXiv:1806.07366), integrated with ``x`` in one augmented ODE solved
by torchdiffeq.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from ...ode import FIXED_STEP, time_grid, tolerances
from ...registry import SPECS
from ..flows import register_flow
from ..nn import HollowMLP, TimeMLP
from .base import FlowTransform

__all__ = ["CNF"]


class _Dynamics(nn.Module):
    """The augmented right-hand side in solver time ``s`` in [0, T].

    State ``(x, log-det[, integral |f|^2, integral |df/dx|_F^2])``. ``sign=+1`` is the
    forward map (``t = s``); ``sign=-1`` runs the same ODE backwards (``t = T - s``,
    derivatives negated), so both directions integrate over increasing ``s``.
    """

    def __init__(self, layer, sign, noise):
        super().__init__()
        self.net = layer.net
        self.estimator, self.sign, self.noise = layer.estimator, sign, noise
        self.time_length = layer.time_length
        self.regularized = layer.regularized

    def forward(self, s, state):
        x = state[0]
        t = s if self.sign > 0 else self.time_length - s
        eye = None
        if self.estimator == "exact" or (self.estimator == "hollow" and self.regularized):
            eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        if self.estimator == "hollow":
            f, jv, div = self.net(t, x, eye)
        elif self.estimator == "exact":
            f, jv = self.net(t, x, eye)  # row j is J e_j, the j-th column of J
            div = torch.diagonal(jv, dim1=-2, dim2=-1).sum(-1)
        else:
            e = self.noise
            f, jv = self.net(t, x, e.unsqueeze(-2))
            div = (jv[..., 0, :] * e).sum(-1)
        out = (self.sign * f, self.sign * div)
        if self.regularized:
            out = out + ((f * f).sum(-1), (jv * jv).sum((-2, -1)))
        return out


class CNF(FlowTransform):
    r"""A continuous normalizing flow layer (FFJORD): the flow of an ODE ``dx/dt = f(x, t)``.

    Forward (noise to sample): ``y = x(T)`` for ``dx/dt = f(x, t)``, ``x(0) = x``, with
    ``log|det dy/dx| = integral_0^T tr(df/dx)(x(t), t) dt``. The inverse integrates the
    same ODE from ``T`` back to ``0`` and returns ``-`` that integral along its path.

    Dynamics: ``TimeMLP`` (``t`` concatenated to every layer's input) or, for
    ``estimator="hollow"``, ``HollowMLP`` (Chen & Duvenaud 2019). Both start at ``f = 0``,
    the identity map.

    Log-det estimators (the divergence ``tr(df/dx)`` at each evaluation):

    - ``"hutchinson"``: ``e^T (df/dx) e`` with one probe ``e`` per sample (``noise``:
      standard normal or Rademacher, from torch's global generator), held for the whole
      solve, so the log-det is an unbiased estimate; one Jacobian-vector product per
      evaluation (forward mode, alongside the values).
    - ``"exact"``: the full trace, ``dim`` Jacobian-vector products per evaluation.
    - ``"hollow"``: hollow dynamics, whose divergence ``sum_i d tau_i / d x_i`` is exact.

    Solvers (``pyroflows.ode.SOLVERS``): fixed-step ``rk4`` (3/8 rule), ``midpoint``,
    ``euler`` on the grid ``T k / num_steps``, or adaptive ``dopri5``, ``bosh3`` with
    ``atol``, ``rtol`` (floored at 64 machine epsilons). ``adjoint=True`` backpropagates by
    torchdiffeq's ``odeint_adjoint``. The log-det is that of the ODE's flow: it matches the
    Jacobian of the computed map, and the inverse round-trips, to the solver's accuracy.
    With the defaults (rk4, 8 steps) that was 1e-9 to 3e-7 on the conformance and parity
    suites' perturbed networks and 1e-5 on the stronger dynamics of the solver test
    (tests/torch/test_ffjord.py); raise ``num_steps`` or use ``dopri5`` for stiffer flows.

    Regularisers (RNODE, Finlay et al. 2020): with ``kinetic_energy`` or
    ``jacobian_norm`` above 0, each solve also integrates ``|f|^2`` and ``|df/dx|_F^2``
    (Hutchinson: ``|(df/dx) e|^2``; exact and hollow: the full norm) and stores their
    weighted sum per sample in ``regularization``; ``call_ladj_and_regularization(x)``
    returns it with the map.

    Args:
        dim: size of the vectors.
        hidden_dims: hidden widths of ``f`` (default (64, 64); for ``"hollow"`` the widths
            of each coordinate's conditioner).
        **options: the options of ``ffjord``: ``estimator``, ``noise``, ``activation``,
            ``solver``, ``num_steps``, ``atol``, ``rtol``, ``adjoint``, ``time_length``,
            ``kinetic_energy``, ``jacobian_norm`` (defaults and checks:
            ``pyroflows.registry.describe("ffjord")``).

    Raises:
        ValueError: an unknown option or a bad value.

    References:
        Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud 2018, "FFJORD: Free-form
        continuous dynamics for scalable reversible generative models", arXiv:1810.01367.
        Chen, Rubanova, Bettencourt & Duvenaud 2018, "Neural Ordinary Differential
        Equations", arXiv:1806.07366.
        Chen & Duvenaud 2019, "Neural Networks with Cheap Differential Operators",
        arXiv:1912.03579.
        Finlay, Jacobsen, Nurbekyan & Oberman 2020, "How to train your neural ODE: the
        world of Jacobian and kinetic regularization", arXiv:2002.02798.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = CNF(2, hidden_dims=(8,), estimator="exact", num_steps=4).double()
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> y, ladj = layer.call_and_ladj(x)  # f starts at 0: the identity
        >>> bool(torch.equal(y, x)), ladj.abs().max().item()
        (True, 0.0)
    """

    numerical_inverse = True

    def __init__(self, dim: int, hidden_dims: Sequence[int] | None = None, **options: Any):
        config = SPECS["ffjord"].resolve(dim, None, hidden_dims, options)
        super().__init__(dim)
        for name in SPECS["ffjord"].options:
            setattr(self, name, config[name])
        self.regularized = self.kinetic_energy > 0 or self.jacobian_norm > 0
        network = HollowMLP if self.estimator == "hollow" else TimeMLP
        self.net = network(dim, config["hidden_dims"], self.activation)
        self.regularization = None

    def _probe(self, x):
        if self.noise == "gaussian":
            return torch.randn(x.shape, dtype=x.dtype, device=x.device)
        return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1

    def _solve(self, x, sign):
        noise = self._probe(x) if self.estimator == "hutchinson" else None
        dynamics = _Dynamics(self, sign, noise)
        zero = x.new_zeros(x.shape[:-1])
        state = (x, zero) + ((zero, zero) if self.regularized else ())
        if self.solver in FIXED_STEP:
            grid, atol, rtol = time_grid(self.time_length, self.num_steps), self.atol, self.rtol
        else:
            grid = [0.0, self.time_length]
            atol, rtol = tolerances(self.atol, self.rtol, torch.finfo(x.dtype).eps)
        grid = torch.as_tensor(grid, dtype=x.dtype, device=x.device)
        if self.adjoint:
            out = odeint_adjoint(
                dynamics,
                state,
                grid,
                method=self.solver,
                atol=atol,
                rtol=rtol,
                adjoint_params=tuple(self.net.parameters()),
            )
        else:
            out = odeint(dynamics, state, grid, method=self.solver, atol=atol, rtol=rtol)
        final = [o[-1] for o in out]
        if self.regularized:
            self.regularization = self.kinetic_energy * final[2] + self.jacobian_norm * final[3]
        return final[0], final[1]

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._solve(x, 1.0)

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._solve(y, -1.0)

    def call_ladj_and_regularization(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|, regularizer)``: the regulariser is 0 unless a weight is above 0."""
        y, ladj = self._solve(x, 1.0)
        reg = self.regularization if self.regularized else torch.zeros_like(ladj)
        return y, ladj, reg

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, estimator={self.estimator!r}, solver={self.solver!r}, "
            f"num_steps={self.num_steps}, time_length={self.time_length}"
        )


@register_flow("ffjord")
def ffjord(dim: int, num_layers: int, hidden_dims: Sequence[int] | None, **options: Any) -> list[CNF]:
    """The ``ffjord`` family: ``num_layers`` ``CNF`` layers.

    Example:
        >>> [layer.estimator for layer in ffjord(2, 1, (8,), estimator="exact")]
        ['exact']
    """
    return [CNF(dim, hidden_dims, **options) for _ in range(num_layers)]
