"""JAX mirror of ``pyroflows.torch.transforms.glow``: ActNorm, the LU-parametrised linear map, Glow.

ActNorm's data-dependent start is explicit here (``initialize_actnorm``), as equinox
modules are immutable. Kingma & Dhariwal 2018, arXiv:1807.03039.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.scipy.linalg import solve_triangular

from ..flows import register_flow
from ..nn import host_rng
from .base import ElementwiseAffine, Flow, FlowTransform, soft_clamp
from .conditioners import conditioned_layer

__all__ = ["ActNorm", "InvertibleLinear", "initialize_actnorm"]


class ActNorm(ElementwiseAffine):
    """Affine map with a data-dependent start: JAX mirror of ``pyroflows.torch.transforms.ActNorm``.

    Immutable: ``initialize`` returns a new layer and ``initialize_actnorm(flow, data)``
    a new flow, where torch initialises on the first inverse call. Kingma & Dhariwal
    2018, arXiv:1807.03039.

    Example:
        >>> layer = ActNorm(2).initialize(jnp.array([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]]))
        >>> layer.loc.tolist(), bool(layer.initialized)
        ([2.0, 3.0], True)
    """

    initialized: jax.Array

    def __init__(self, dim: int, log_scale_bound: float = 5.0):
        super().__init__(dim, log_scale_bound)
        self.initialized = jnp.asarray(False)

    def initialize(self, y: jax.Array) -> ActNorm:
        """This layer with its weights set from data ``y`` of shape ``(n, dim)`` (a copy).

        Example:
            >>> layer = ActNorm(1).initialize(jnp.array([[1.0], [3.0]]))
            >>> z = jax.vmap(lambda v: layer.inverse_and_ladj(v)[0])(jnp.array([[1.0], [3.0]]))
            >>> [round(v, 4) for v in z[:, 0].tolist()]  # zero mean, unit (sample) variance
            [-0.7071, 0.7071]
        """
        flat = jnp.reshape(y, (-1, self.dim))
        bound = 0.99 * self.log_scale_bound
        log_std = jnp.clip(jnp.log(jnp.maximum(jnp.std(flat, 0, ddof=1), 1e-6)), -bound, bound)
        raw = self.log_scale_bound * jnp.arctanh(log_std / self.log_scale_bound)
        new = eqx.tree_at(lambda m: (m.loc, m.unconstrained_log_scale), self, (flat.mean(0), raw))
        return eqx.tree_at(lambda m: m.initialized, new, jnp.asarray(True))


def initialize_actnorm(flow: Flow, data: jax.Array) -> Flow:
    """Run ``data`` backwards through ``flow`` and initialise each uninitialised ``ActNorm`` on the way.

    Each ``ActNorm`` is set from the data as it arrives at that layer, so that its
    inverse maps it to zero mean and unit variance per coordinate; layers already
    initialised are kept. Call it on the training data before a maximum-likelihood fit.

    Args:
        flow: a flow with ``parts`` (what ``build_flow`` returns).
        data: points, shape ``(..., dim)``.

    Returns:
        A copy of ``flow`` with its ``ActNorm`` layers initialised.

    Example:
        >>> data = jnp.array([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]])
        >>> flow = initialize_actnorm(Flow([ActNorm(2)], 2), data)
        >>> z = jax.vmap(lambda y: flow.inverse_and_ladj(y)[0])(data)
        >>> [round(v, 4) for v in z.std(0, ddof=1).tolist()]
        [1.0, 1.0]
    """
    parts = list(flow.parts)
    pending = [i for i, p in enumerate(parts) if isinstance(p, ActNorm) and not bool(p.initialized)]
    if not pending:
        return flow
    x = jnp.reshape(data, (-1, flow.dim))
    for i in range(len(parts) - 1, pending[0] - 1, -1):  # no pass below the last one to set
        layer = parts[i]
        if i in pending:
            parts[i] = layer = layer.initialize(x)
        if i > pending[0]:
            x = jax.vmap(lambda v: layer.inverse_and_ladj(v)[0])(x)
    return eqx.tree_at(lambda f: f.parts, flow, tuple(parts))


class InvertibleLinear(FlowTransform):
    """``y = W x``, ``W = P L U``: JAX mirror of ``pyroflows.torch.transforms.InvertibleLinear``.

    ``P`` (boolean), the masks (boolean) and the signs (int8) are constants. Kingma &
    Dhariwal 2018, arXiv:1807.03039.

    Args:
        key: draws the initial rotation.

    Example:
        >>> layer = InvertibleLinear(3, key=jax.random.key(0))
        >>> ladj = layer.call_and_ladj(jnp.zeros(3))[1]
        >>> bool(jnp.isclose(ladj, jnp.linalg.slogdet(layer.weight())[1], atol=1e-5))
        True
    """

    permutation: jax.Array
    diag_sign: jax.Array
    lower_mask: jax.Array
    upper_mask: jax.Array
    lower: jax.Array
    upper: jax.Array
    unconstrained_log_s: jax.Array
    log_scale_bound: float = eqx.field(static=True)

    def __init__(self, dim: int, log_scale_bound: float = 5.0, *, key: jax.Array):
        self.dim = int(dim)
        self.log_scale_bound = float(log_scale_bound)
        q, _ = np.linalg.qr(host_rng(key).standard_normal((dim, dim)))
        p, lower, upper = scipy.linalg.lu(q)
        diag = np.diagonal(upper)
        log_s = np.clip(np.log(np.abs(diag)), -0.99 * log_scale_bound, 0.99 * log_scale_bound)
        lower_mask, upper_mask = np.tril(np.ones((dim, dim), bool), -1), np.triu(np.ones((dim, dim), bool), 1)
        self.permutation = jnp.asarray(p > 0.5)
        self.diag_sign = jnp.asarray(np.where(diag < 0, -1, 1).astype(np.int8))
        self.lower_mask, self.upper_mask = jnp.asarray(lower_mask), jnp.asarray(upper_mask)
        self.lower = jnp.asarray(np.where(lower_mask, lower, 0.0), dtype=float)
        self.upper = jnp.asarray(np.where(upper_mask, upper, 0.0), dtype=float)
        self.unconstrained_log_s = jnp.asarray(log_scale_bound * np.arctanh(log_s / log_scale_bound), dtype=float)

    def _factors(self):
        log_s = soft_clamp(self.unconstrained_log_s, self.log_scale_bound)
        dtype = log_s.dtype
        lower = jnp.where(self.lower_mask, self.lower, 0.0) + jnp.eye(self.dim, dtype=dtype)
        upper = jnp.where(self.upper_mask, self.upper, 0.0) + jnp.diag(self.diag_sign.astype(dtype) * jnp.exp(log_s))
        return self.permutation.astype(dtype), lower, upper, log_s

    def weight(self) -> jax.Array:
        """The matrix ``W = P L U``, shape ``(dim, dim)``.

        Example:
            >>> w = InvertibleLinear(2, key=jax.random.key(0)).weight()  # a rotation at initialisation
            >>> bool(jnp.allclose(w @ w.T, jnp.eye(2), atol=1e-5))
            True
        """
        p, lower, upper, _ = self._factors()
        return p @ lower @ upper

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(W x, sum(log_s))`` for one vector.

        Example:
            >>> y, ladj = InvertibleLinear(2, key=jax.random.key(0)).call_and_ladj(jnp.zeros(2))
            >>> y.shape, ladj.shape
            ((2,), ())
        """
        p, lower, upper, log_s = self._factors()
        return p @ (lower @ (upper @ x)), log_s.sum()

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(W^-1 y, -sum(log_s))`` for one vector, by two triangular solves.

        Example:
            >>> layer = InvertibleLinear(3, key=jax.random.key(0))
            >>> x = jnp.array([0.3, -1.2, 0.5])
            >>> bool(jnp.allclose(layer.inverse_and_ladj(layer.call_and_ladj(x)[0])[0], x, atol=1e-5))
            True
        """
        p, lower, upper, log_s = self._factors()
        z = solve_triangular(lower, p.T @ y, lower=True, unit_diagonal=True)
        return solve_triangular(upper, z, lower=False), -log_s.sum()


@register_flow("glow")
def glow(
    dim: int, num_layers: int, hidden_dims: Sequence[int], activation: str, *, key: jax.Array, **options: Any
) -> list[FlowTransform]:
    """The layers of ``build_flow("glow", ...)``: JAX mirror of ``pyroflows.torch.transforms.glow.glow``.

    Example:
        >>> [type(layer).__name__ for layer in glow(2, 1, (8,), "relu", log_scale_bound=5.0, key=jax.random.key(0))]
        ['Coupling', 'InvertibleLinear', 'ActNorm']
    """
    layers = []
    for k in jax.random.split(key, num_layers):
        k1, k2 = jax.random.split(k)
        # Forward order, noise to data: the inverse (data side) meets ActNorm first, as in Glow.
        layers += [
            conditioned_layer("glow", dim, hidden_dims, activation, key=k1, **options),
            InvertibleLinear(dim, options["log_scale_bound"], key=k2),
            ActNorm(dim, options["log_scale_bound"]),
        ]
    return layers
