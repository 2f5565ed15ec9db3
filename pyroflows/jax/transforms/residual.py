"""JAX mirror of ``pyroflows.torch.transforms.residual``: invertible residual blocks.

References:
    Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen 2019, "Invertible residual
    networks", arXiv:1811.00995 (i-ResNet).
    Chen, Behrmann, Duvenaud & Jacobsen 2019, "Residual flows for invertible generative
    modeling", arXiv:1906.02735.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from ...registry import residual_block_options as block_options
from ..flows import register_flow
from ..nn import LipschitzMLP
from .base import ElementwiseAffine, FlowTransform

__all__ = ["ResidualBlock"]

_stop = jax.lax.stop_gradient


class ResidualBlock(FlowTransform):
    """A residual block ``x = y + g(y)`` from data to noise: JAX mirror of ``pyroflows.torch.transforms.ResidualBlock``.

    The same contraction ``g`` (a ``LipschitzMLP``), directions, fixed-point inverse (here
    in a ``lax.while_loop``) with one Newton step, and log-determinant estimators
    (``"exact"``, ``"truncated"``, ``"roulette"``) as torch, whose docstring gives the maths.

    The stochastic estimators take a ``key`` per vector (``call_and_ladj(x, key)``; the
    flow's ``EqxTransform`` splits one per batch row and layer, from an explicit key or
    ``numpyro.prng_key()``); the series length ``N`` and the probe ``v`` come from it. The
    maps alone (``forward_map``, ``inverse_map``, the transform's ``__call__`` and ``inv``
    without a key) need none. With ``neumann_gradient=True`` the series runs under
    ``stop_gradient`` (the gradient is Chen et al.'s Neumann-series estimate); without it
    the roulette series runs in a checkpointed while loop, which reverse mode
    differentiates but forward mode (``jvp``, ``jacfwd``) cannot.

    Args:
        dim: size of the vectors.
        hidden_dims: hidden widths of ``g``.
        key: seeds the initial weights.
        **options: the options of ``pyroflows.registry.SPECS["residual"]`` (``estimator``,
            ``num_terms``, ``lipschitz``, ...), with their defaults and checks.

    Raises:
        ValueError: an option ``pyroflows.registry.SPECS["residual"]`` rejects.

    Example:
        >>> layer = ResidualBlock(2, (8,), estimator="roulette", key=jax.random.key(0))
        >>> y, ladj = layer.inverse_and_ladj(jnp.array([0.5, -1.0]), key=jax.random.key(1))  # data -> noise
        >>> x = layer.forward_map(y)  # noise -> data, no key: the map draws no noise
        >>> [round(float(v), 4) for v in x], layer.is_stochastic
        ([0.5, -1.0], True)
    """

    g: LipschitzMLP
    estimator: str = eqx.field(static=True)
    num_terms: int = eqx.field(static=True)
    roulette_p: float = eqx.field(static=True)
    noise: str = eqx.field(static=True)
    neumann_gradient: bool = eqx.field(static=True)
    inverse_tol: float = eqx.field(static=True)
    max_inverse_iter: int = eqx.field(static=True)
    numerical_inverse = True

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (64, 64), *, key: jax.Array, **options: Any):
        opts = block_options(**options)
        self.dim = int(dim)
        self.estimator, self.num_terms, self.noise = opts["estimator"], opts["num_terms"], opts["noise"]
        self.roulette_p, self.neumann_gradient = opts["roulette_p"], opts["neumann_gradient"]
        self.inverse_tol, self.max_inverse_iter = opts["inverse_tol"], opts["max_inverse_iter"]
        self.g = LipschitzMLP(dim, hidden_dims, opts["lipschitz"], opts["power_iterations"], key=key)

    @property
    def is_stochastic(self) -> bool:
        """Whether the log-determinant draws noise (every estimator but ``"exact"``)."""
        return self.estimator != "exact"

    # --- log-determinant -----------------------------------------------------------------
    def _draws(self, key, y):
        """The probe ``v`` and the series length ``N`` (a float) for one vector."""
        if key is None:
            raise ValueError(
                f"ResidualBlock(estimator={self.estimator!r}) draws noise and needs a key: pass "
                "key=jax.random.key(...) to call_and_ladj / inverse_and_ladj, use "
                "flow.to_transform(key=...), or estimator='exact'"
            )
        # One uniform draw for the probe and the series length: one random-bits kernel to compile.
        lo = float(np.nextafter(np.array(-1.0, y.dtype), np.array(0.0, y.dtype)))
        u = jax.random.uniform(key, (self.dim + 1,), y.dtype, minval=lo, maxval=1.0)  # in (-1, 1)
        if self.noise == "gaussian":
            v = math.sqrt(2.0) * jax.scipy.special.erfinv(u[:-1])  # as jax.random.normal draws
        else:
            v = jnp.where(u[:-1] < 0, -1.0, 1.0).astype(y.dtype)
        if self.estimator == "truncated":
            return v, None
        uniform = 0.5 * (1.0 - u[-1])  # in (0, 1)
        return v, self.num_terms + jnp.floor(jnp.log(uniform) / math.log1p(-self.roulette_p))

    def _series(self, weights, slopes, y, key):
        v, terms = self._draws(key, y)
        n, log_q = self.num_terms, math.log1p(-self.roulette_p)
        neumann = self.neumann_gradient
        live = weights, slopes
        if neumann:
            weights, slopes = _stop(live)

        def body(state):
            k, power, value, w = state
            c = jnp.where(k % 2 == 1, 1.0, -1.0).astype(y.dtype)
            if terms is not None:  # [k <= N] / P(N >= k)
                c = c * jnp.where(k <= terms, jnp.exp(-jnp.maximum(k - n, 0) * log_q), 0.0).astype(y.dtype)
            w = w + c * power
            power = LipschitzMLP.jvp(weights, slopes, power)
            return k + 1, power, value + c * jnp.dot(v, power) / k, w

        zero = jnp.zeros((), y.dtype)
        state = (jnp.asarray(1), v, zero, jnp.zeros_like(v))
        if terms is None:
            _, _, value, w = jax.lax.fori_loop(0, n, lambda _, s: body(s), state)
        else:
            kind = "lax" if neumann else "checkpointed"  # reverse mode needs the checkpointed loop
            _, _, value, w = eqxi.while_loop(
                lambda s: s[0] <= terms, body, state, kind=kind, max_steps=None, checkpoints=None if neumann else 8
            )
        if not neumann:
            return value
        weights, slopes = live
        surrogate = jnp.dot(v, LipschitzMLP.jvp(weights, slopes, _stop(w)))
        return _stop(value) + (surrogate - _stop(surrogate))

    def _residual_and_log_det(self, y, weights, key):
        """``g(y)`` and ``log det(I + J_g(y))`` (estimated unless ``estimator="exact"``)."""
        out, slopes = self.g.forward_and_slopes(y, weights)
        if self.estimator == "exact":
            eye = jnp.eye(self.dim, dtype=y.dtype)
            return out, jnp.linalg.slogdet(eye + LipschitzMLP.jacobian(weights, slopes))[1]
        return out, self._series(weights, slopes, y, key)

    # --- the two directions -----------------------------------------------------------
    def inverse_and_ladj(self, y: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Data to noise in one pass, ``x = y + g(y)``, with ``log det(I + J_g)`` by the chosen estimator."""
        out, log_det = self._residual_and_log_det(y, self.g.weights(), key)
        return y + out, log_det

    def inverse_map(self, y: jax.Array) -> jax.Array:
        """``y + g(y)`` alone: no log-det, so no key for any estimator.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> block = ResidualBlock(2, (8,), estimator="roulette", key=jax.random.key(0))
            >>> block.inverse_map(jnp.ones(2)).shape
            (2,)
        """
        return y + self.g.forward_and_slopes(y, self.g.weights(), slopes=False)[0]

    def _fixed_point(self, x, weights):
        tol = max(self.inverse_tol, 8 * float(jnp.finfo(x.dtype).eps))
        g = _stop(self.g)
        x = _stop(x)

        def cond(state):
            i, _, converged = state
            return (i < self.max_inverse_iter) & ~converged

        def body(state):
            i, y, _ = state
            new = x - g.forward_and_slopes(y, weights, slopes=False)[0]
            return i + 1, new, jnp.all(jnp.abs(new - y) <= tol * (1 + jnp.abs(new)))

        return jax.lax.while_loop(cond, body, (jnp.asarray(0), x, jnp.asarray(False)))[1]

    def _solve(self, x, weights):
        fixed = _stop(weights)
        root = self._fixed_point(x, fixed)
        out, slopes = self.g.forward_and_slopes(root, weights)
        newton = jnp.eye(self.dim, dtype=x.dtype) + LipschitzMLP.jacobian(fixed, _stop(slopes))
        return root - jnp.linalg.solve(newton, root + out - x)

    def call_and_ladj(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Noise to data, solving ``y + g(y) = x`` (fixed point, one Newton step), with its log-determinant."""
        weights = self.g.weights()
        y = self._solve(x, weights)
        return y, -self._residual_and_log_det(y, weights, key)[1]

    def forward_map(self, x: jax.Array) -> jax.Array:
        """The solve of ``y + g(y) = x`` alone: no log-det, so no key for any estimator."""
        return self._solve(x, self.g.weights())


@register_flow("residual")
def residual(
    dim: int, num_layers: int, hidden_dims: Sequence[int], *, key: jax.Array, **options: Any
) -> list[FlowTransform]:
    """``ResidualBlock`` / ``ElementwiseAffine`` pairs: JAX mirror of ``pyroflows.torch.transforms.residual.residual``.

    Example:
        >>> [type(layer).__name__ for layer in residual(2, 1, (8,), key=jax.random.key(0))]
        ['ResidualBlock', 'ElementwiseAffine']
    """
    layers = []
    for k in jax.random.split(key, num_layers):
        # Read from data to noise, each block follows an elementwise affine map (the
        # ActNorm of Chen et al.), which sets the scale the contraction g works at.
        layers += [ResidualBlock(dim, hidden_dims, key=k, **options), ElementwiseAffine(dim)]
    return layers
