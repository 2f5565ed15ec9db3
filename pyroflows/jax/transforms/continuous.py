"""Continuous normalizing flows: FFJORD (Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud 2018).

JAX mirror of ``pyroflows.torch.transforms.continuous``: the same dynamics, estimators,
solver names and time grids, for one unbatched vector. Fixed-step solves run the
solver's tableau (``pyroflows.ode.TABLEAUX``) in a ``lax.scan`` over the grid: that
compiles two to three times faster than ``diffrax.diffeqsolve`` and supports forward
and reverse mode (diffrax's default adjoint is reverse-only). Adaptive solvers and
``adjoint=True`` use ``diffrax.diffeqsolve``.

References:
    Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud 2018, "FFJORD: free-form
    continuous dynamics for scalable reversible generative models", arXiv:1810.01367.
    Finlay, Jacobsen, Nurbekyan & Oberman 2020, "How to train your neural ODE: the
    world of Jacobian and kinetic regularization", arXiv:2002.02798 (RNODE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ...ode import FIXED_STEP, TABLEAUX, time_grid, tolerances
from ...registry import SPECS
from ..flows import register_flow
from ..nn import HollowMLP, TimeMLP
from .base import FlowTransform

__all__ = ["CNF"]


def _interpolation(*, t0, t1, y0, y1, k):
    # Only the end point of a step is ever saved; no dense output is needed.
    del k
    return diffrax.LocalLinearInterpolation(t0=t0, t1=t1, y0=y0, y1=y1)


def _butcher(tableau) -> diffrax.ButcherTableau:
    a, b, c = tableau
    # no embedded error estimate: a fixed-step method
    return diffrax.ButcherTableau(
        c=np.array(c[1:]), b_sol=np.array(b), b_error=np.zeros(len(b)), a_lower=tuple(np.array(row) for row in a)
    )


class _RK38(diffrax.AbstractERK):
    """Kutta's 3/8 rule (torchdiffeq's "rk4"), for ``diffeqsolve`` with ``adjoint=True``."""

    tableau: ClassVar[diffrax.ButcherTableau] = _butcher(TABLEAUX["rk4"])
    interpolation_cls: ClassVar = staticmethod(_interpolation)

    def order(self, terms):
        return 4


_DIFFRAX_SOLVERS = {
    "rk4": _RK38,
    "midpoint": diffrax.Midpoint,
    "euler": diffrax.Euler,
    "dopri5": diffrax.Dopri5,
    "bosh3": diffrax.Bosh3,
}


class _Dynamics(eqx.Module):
    """The augmented right-hand side in solver time ``s`` (see torch's ``_Dynamics``).

    ``args = (net, noise)``, so ``BacksolveAdjoint`` differentiates the weights.
    """

    estimator: str | None = eqx.field(static=True)  # None: the map alone, state (x,)
    sign: float = eqx.field(static=True)
    time_length: float = eqx.field(static=True)
    regularized: bool = eqx.field(static=True)

    def __call__(self, s, state, args):
        net, noise = args
        x = state[0]
        t = s if self.sign > 0 else self.time_length - s
        if self.estimator is None:
            return (self.sign * net(t, x, None)[0],)
        eye = None
        if self.estimator == "exact" or (self.estimator == "hollow" and self.regularized):
            eye = jnp.eye(x.shape[-1], dtype=x.dtype)
        if self.estimator == "hollow":
            f, jv, div = net(t, x, eye)
        elif self.estimator == "exact":
            f, jv = net(t, x, eye)  # row j is J e_j
            div = jnp.trace(jv)
        else:
            f, jv = net(t, x, noise[None, :])
            div = (jv[0] * noise).sum()
        out = (self.sign * f, self.sign * div)
        if self.regularized:
            out = out + ((f * f).sum(), (jv * jv).sum())
        return out


def _fixed_step(dynamics, state, args, grid, tableau):
    """Explicit Runge-Kutta on the time grid, one ``lax.scan`` step per interval."""
    a, b, c = tableau

    def combine(y0, h, coeffs, ks):
        terms = [(w, k) for w, k in zip(coeffs, ks) if w != 0.0]
        if not terms:
            return y0
        return jax.tree.map(
            lambda y, *kk: y + h * sum(w * k for (w, _), k in zip(terms, kk)), y0, *[k for _, k in terms]
        )

    def step(y, times):
        t0, t1 = times
        h = t1 - t0
        ks = []
        for i, ci in enumerate(c):
            yi = combine(y, h, a[i - 1], ks) if i else y
            ks.append(dynamics(t0 + ci * h, yi, args))
        return combine(y, h, b, ks), None

    return jax.lax.scan(step, state, (grid[:-1], grid[1:]))[0]


class CNF(FlowTransform):
    r"""A continuous normalizing flow layer (FFJORD; Grathwohl, Chen et al. 2018).

    The same map, options and estimators as ``pyroflows.torch.transforms.CNF``: forward
    ``y = x(T)`` for ``dx/dt = f(x, t)`` with ``log|det dy/dx| = integral_0^T tr(df/dx) dt``,
    the inverse integrating from ``T`` back to ``0``.

    ``estimator="hutchinson"`` draws its probe from ``key`` (one per vector, held for
    the whole solve); ``call_and_ladj(x)`` without a key then raises. ``EqxTransform``
    passes a key per batch row. ``"exact"`` and ``"hollow"`` draw nothing. The maps
    alone (``forward_map``, ``inverse_map``, and the transform's ``__call__`` and
    ``inv`` without a key) integrate ``x`` only and need no key.

    Solvers: fixed-step ``rk4`` (3/8 rule), ``midpoint``, ``euler`` on the grid
    ``T k / num_steps`` (a ``lax.scan``; forward and reverse mode), or adaptive
    ``dopri5``, ``bosh3`` with ``diffrax.PIDController(rtol, atol)`` (reverse mode
    only, through ``RecursiveCheckpointAdjoint``). Each vector gets its own adaptive
    steps, where torch shares one step size across the batch, so adaptive solves agree
    between backends only to the tolerances. ``adjoint=True`` uses
    ``diffrax.BacksolveAdjoint`` (the same tableau; fixed steps of ``T / num_steps``).

    ``call_ladj_and_regularization(x, key=None)`` also returns the weighted RNODE
    regulariser ``kinetic_energy * int |f|^2 dt + jacobian_norm * int |df/dx|_F^2 dt``
    (Finlay et al. 2020), 0 when both weights are 0.

    Args:
        dim: size of the vectors.
        hidden_dims: hidden widths of the dynamics network (default: the family's).
        key: JAX key for the initial weights.
        **options: the options of ``ffjord`` (``estimator``, ``noise``, ``activation``,
            ``solver``, ``num_steps``, ``atol``, ``rtol``, ``adjoint``, ``time_length``,
            ``kinetic_energy``, ``jacobian_norm``; ``pyroflows.registry.SPECS["ffjord"]``),
            as torch's ``CNF`` takes them.

    Raises:
        ValueError: an option ``pyroflows.registry.SPECS["ffjord"]`` rejects.

    References:
        Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud 2018, "FFJORD: free-form
        continuous dynamics for scalable reversible generative models", arXiv:1810.01367.
        Finlay, Jacobsen, Nurbekyan & Oberman 2020, "How to train your neural ODE: the
        world of Jacobian and kinetic regularization", arXiv:2002.02798.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> layer = CNF(2, (8,), estimator="exact", solver="euler", num_steps=4, key=jax.random.key(0))
        >>> y, ladj = layer.call_and_ladj(jnp.array([0.5, -1.0]))
        >>> x, ildj = layer.inverse_and_ladj(y)
        >>> [round(float(v), 2) for v in x], abs(round(float(ladj + ildj), 2))
        ([0.5, -1.0], 0.0)
    """

    net: TimeMLP | HollowMLP
    activation: str = eqx.field(static=True)
    estimator: str = eqx.field(static=True)
    noise: str = eqx.field(static=True)
    solver: str = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    adjoint: bool = eqx.field(static=True)
    time_length: float = eqx.field(static=True)
    kinetic_energy: float = eqx.field(static=True)
    jacobian_norm: float = eqx.field(static=True)
    numerical_inverse: ClassVar[bool] = True
    stochastic: ClassVar[bool] = True

    def __init__(self, dim: int, hidden_dims: Sequence[int] | None = None, *, key: jax.Array, **options: Any):
        config = SPECS["ffjord"].resolve(dim, None, hidden_dims, options)
        self.dim = int(dim)
        for name in SPECS["ffjord"].options:
            setattr(self, name, config[name])
        network = HollowMLP if self.estimator == "hollow" else TimeMLP
        self.net = network(dim, config["hidden_dims"], self.activation, key=key)

    @property
    def is_stochastic(self) -> bool:
        """Whether the log-determinant draws noise (``estimator="hutchinson"``).

        Example:
            >>> import jax
            >>> CNF(2, (8,), estimator="hutchinson", key=jax.random.key(0)).is_stochastic
            True
        """
        return self.estimator == "hutchinson"

    @property
    def regularized(self) -> bool:
        """Whether a RNODE weight (``kinetic_energy``, ``jacobian_norm``) is above 0.

        Example:
            >>> import jax
            >>> CNF(2, (8,), kinetic_energy=0.1, key=jax.random.key(0)).regularized
            True
        """
        return self.kinetic_energy > 0 or self.jacobian_norm > 0

    def _probe(self, x, key):
        if key is None:
            raise ValueError(
                "CNF(estimator='hutchinson') draws a noise probe for its log-det and got no key: pass "
                "key=jax.random.key(...) to call_and_ladj / inverse_and_ladj, use flow.to_transform(key=...), "
                "or call it inside numpyro.handlers.seed; estimator='exact' or 'hollow' need no key"
            )
        if self.noise == "gaussian":
            return jax.random.normal(key, x.shape, x.dtype)
        return jax.random.rademacher(key, x.shape, x.dtype)

    def _solve(self, x, sign, key, log_det=True):
        # Without the log-det the state is x alone: no divergence, so no probe and no key.
        # (Adaptive solvers then choose their steps from x only, which moves the map within
        # the tolerances.)
        noise = self._probe(x, key) if self.is_stochastic and log_det else None
        regularized = self.regularized and log_det
        dynamics = _Dynamics(self.estimator if log_det else None, sign, self.time_length, regularized)
        zero = jnp.zeros((), x.dtype)
        state = ((x, zero) if log_det else (x,)) + ((zero, zero) if regularized else ())
        args = (self.net, noise)
        fixed = self.solver in FIXED_STEP
        if fixed and not self.adjoint:
            grid = jnp.asarray(time_grid(self.time_length, self.num_steps), x.dtype)
            final = _fixed_step(dynamics, state, args, grid, TABLEAUX[self.solver])
        else:
            if fixed:
                # Constant steps rather than StepTo: BacksolveAdjoint runs the controller
                # backwards in time, which a StepTo grid does not allow.
                dt0 = jnp.asarray(self.time_length / self.num_steps, x.dtype)
                controller, max_steps = diffrax.ConstantStepSize(), self.num_steps + 1
            else:
                atol, rtol = tolerances(self.atol, self.rtol, jnp.finfo(x.dtype).eps)
                dt0, controller, max_steps = None, diffrax.PIDController(rtol=rtol, atol=atol), 4096
            adjoint = diffrax.BacksolveAdjoint() if self.adjoint else diffrax.RecursiveCheckpointAdjoint()
            solution = diffrax.diffeqsolve(
                diffrax.ODETerm(dynamics),
                _DIFFRAX_SOLVERS[self.solver](),
                jnp.zeros((), x.dtype),
                jnp.asarray(self.time_length, x.dtype),
                dt0,
                state,
                args,
                stepsize_controller=controller,
                saveat=diffrax.SaveAt(t1=True),
                max_steps=max_steps,
                adjoint=adjoint,
            )
            final = jax.tree.map(lambda a: a[-1], solution.ys)
        if not log_det:
            return final[0], None, None
        reg = self.kinetic_energy * final[2] + self.jacobian_norm * final[3] if regularized else zero
        return final[0], final[1], reg

    def call_and_ladj(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``y = x(T)`` and ``integral_0^T tr(df/dx) dt``, for one vector."""
        return self._solve(x, 1.0, key)[:2]

    def inverse_and_ladj(self, y: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``x(0)`` from ``y = x(T)`` (the ODE backwards in time) and its log-determinant, for one vector."""
        return self._solve(y, -1.0, key)[:2]

    def forward_map(self, x: jax.Array) -> jax.Array:
        """``x(T)`` alone: the ODE without the log-det, so it needs no key for any estimator.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> layer = CNF(2, (8,), solver="euler", num_steps=4, key=jax.random.key(0))  # hutchinson
            >>> layer.forward_map(jnp.ones(2)).shape
            (2,)
        """
        return self._solve(x, 1.0, None, log_det=False)[0]

    def inverse_map(self, y: jax.Array) -> jax.Array:
        """``x(0)`` from ``y = x(T)`` alone (see ``forward_map``).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> layer = CNF(2, (8,), solver="euler", num_steps=4, key=jax.random.key(0))
            >>> layer.inverse_map(jnp.ones(2)).shape
            (2,)
        """
        return self._solve(y, -1.0, None, log_det=False)[0]

    def call_ladj_and_regularization(
        self, x: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``call_and_ladj`` plus the weighted RNODE regulariser (Finlay et al. 2020), for one vector.

        Args:
            x: one vector, shape ``(dim,)``.
            key: draws the Hutchinson probe (``estimator="hutchinson"`` only).

        Returns:
            ``(y, log|det dy/dx|, regularizer)``; the regulariser is 0 unless a weight is
            above 0.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> layer = CNF(2, (8,), estimator="exact", solver="euler", num_steps=4, kinetic_energy=0.1,
            ...             key=jax.random.key(0))
            >>> y, ladj, reg = layer.call_ladj_and_regularization(jnp.ones(2))
            >>> y.shape, ladj.shape, reg.shape
            ((2,), (), ())
        """
        return self._solve(x, 1.0, key)


@register_flow("ffjord")
def ffjord(dim: int, num_layers: int, hidden_dims: Sequence[int], *, key: jax.Array, **options: Any) -> list[CNF]:
    """The ``ffjord`` family's layers: JAX mirror of ``pyroflows.torch.transforms.continuous.ffjord``.

    Example:
        >>> [layer.solver for layer in ffjord(2, 2, (8,), solver="euler", key=jax.random.key(0))]
        ['euler', 'euler']
    """
    return [CNF(dim, hidden_dims, **options, key=k) for k in jax.random.split(key, num_layers)]
