"""Glow's step of flow for vectors (JAX mirror of torch): ActNorm, LU-parametrised
invertible linear map, affine coupling. Kingma & Dhariwal 2018, arXiv:1807.03039.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.scipy.linalg import solve_triangular

from ..flows import register_flow
from ..nn import host_rng
from .base import ElementwiseAffine, FlowTransform, soft_clamp
from .coupling import AffineCoupling

__all__ = ["ActNorm", "InvertibleLinear", "initialize_actnorm"]


class ActNorm(ElementwiseAffine):
    """Per-coordinate affine map ``y = loc + exp(log_scale) * x`` with data-dependent initialisation.

    JAX modules are immutable, so the initialisation is explicit:
    ``initialize_actnorm(flow, data)`` returns the flow with every uninitialised ActNorm
    set so that the inverse maps ``data`` (as it arrives at that layer) to zero mean and
    unit variance per coordinate, as torch's ActNorm does on its first inverse call.
    """

    initialized: jax.Array

    def __init__(self, dim: int, log_scale_bound: float = 5.0):
        super().__init__(dim, log_scale_bound)
        self.initialized = jnp.asarray(False)

    def initialize(self, y):
        """This layer with its weights set from data ``y`` of shape ``(n, dim)``."""
        flat = jnp.reshape(y, (-1, self.dim))
        bound = 0.99 * self.log_scale_bound
        log_std = jnp.clip(jnp.log(jnp.maximum(jnp.std(flat, 0, ddof=1), 1e-6)), -bound, bound)
        raw = self.log_scale_bound * jnp.arctanh(log_std / self.log_scale_bound)
        new = eqx.tree_at(lambda m: (m.loc, m.unconstrained_log_scale), self, (flat.mean(0), raw))
        return eqx.tree_at(lambda m: m.initialized, new, jnp.asarray(True))


def initialize_actnorm(flow, data):
    """Run ``data`` backwards through ``flow`` and initialise each uninitialised ``ActNorm`` on the way."""
    x = jnp.reshape(data, (-1, flow.dim))
    parts = list(flow.parts)
    for i in reversed(range(len(parts))):
        layer = parts[i]
        if isinstance(layer, ActNorm) and not bool(layer.initialized):
            parts[i] = layer = layer.initialize(x)
        x = jax.vmap(lambda v: layer.inverse_and_ladj(v)[0])(x)
    return eqx.tree_at(lambda f: f.parts, flow, tuple(parts))


class InvertibleLinear(FlowTransform):
    """``y = W x`` with ``W = P L (U + diag(sign * exp(log_s)))`` (Glow's LU parametrisation).

    ``P`` and the signs are fixed; log|det W| = sum(log_s) with ``log_s`` soft-clamped.
    Initialised at a random rotation.
    """

    permutation: jax.Array
    diag_sign: jax.Array
    lower_mask: jax.Array
    upper_mask: jax.Array
    lower: jax.Array
    upper: jax.Array
    unconstrained_log_s: jax.Array
    log_scale_bound: float = eqx.field(static=True)

    def __init__(self, dim: int, log_scale_bound: float = 5.0, *, key):
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

    def weight(self):
        p, lower, upper, _ = self._factors()
        return p @ lower @ upper

    def call_and_ladj(self, x):
        p, lower, upper, log_s = self._factors()
        return p @ (lower @ (upper @ x)), log_s.sum()

    def inverse_and_ladj(self, y):
        p, lower, upper, log_s = self._factors()
        z = solve_triangular(lower, p.T @ y, lower=True, unit_diagonal=True)
        return solve_triangular(upper, z, lower=False), -log_s.sum()


@register_flow("glow")
def glow(dim, num_layers, hidden_dims, activation, log_scale_bound, *, key):
    layers = []
    for k in jax.random.split(key, num_layers):
        k1, k2 = jax.random.split(k)
        # Forward order, noise to data: the inverse (data side) meets ActNorm first, as in Glow.
        layers += [
            AffineCoupling(dim, hidden_dims, activation, log_scale_bound, key=k1),
            InvertibleLinear(dim, log_scale_bound, key=k2),
            ActNorm(dim, log_scale_bound),
        ]
    return layers
