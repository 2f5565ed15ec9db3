"""Coupling layers: NICE's additive coupling and RealNVP's affine coupling (JAX mirror of torch).

NICE: Dinh, Krueger & Bengio 2015, arXiv:1410.8516. RealNVP: Dinh, Sohl-Dickstein &
Bengio 2017, arXiv:1605.08803. The first ``dim // 2`` coordinates pass through and
condition an MLP that moves the rest; permutations between layers swap the roles.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..flows import register_flow
from ..nn import MLP
from .base import ElementwiseAffine, FlowTransform, interleave, soft_clamp

__all__ = ["AdditiveCoupling", "AffineCoupling"]


class _Coupling(FlowTransform):
    conditioner: MLP
    split: int = eqx.field(static=True)

    def __init__(self, dim, hidden_dims, params_per_coordinate, activation="relu", *, key):
        self.dim = int(dim)
        self.split = dim // 2
        self.conditioner = MLP(self.split, hidden_dims, params_per_coordinate * (dim - self.split), activation, key=key)


class AdditiveCoupling(_Coupling):
    """NICE coupling ``y_b = x_b + t(x_a)``, ``y_a = x_a``: volume preserving (log-det 0)."""

    def __init__(self, dim, hidden_dims=(64, 64), activation="relu", *, key):
        super().__init__(dim, hidden_dims, 1, activation, key=key)

    def call_and_ladj(self, x):
        xa, xb = x[: self.split], x[self.split :]
        return jnp.concatenate([xa, xb + self.conditioner(xa)]), jnp.zeros((), x.dtype)

    def inverse_and_ladj(self, y):
        ya, yb = y[: self.split], y[self.split :]
        return jnp.concatenate([ya, yb - self.conditioner(ya)]), jnp.zeros((), y.dtype)


class AffineCoupling(_Coupling):
    """RealNVP coupling ``y_b = x_b * exp(s(x_a)) + t(x_a)``, ``y_a = x_a``, with
    ``s = bound * tanh(s_raw / bound)``."""

    log_scale_bound: float = eqx.field(static=True)

    def __init__(self, dim, hidden_dims=(64, 64), activation="relu", log_scale_bound=5.0, *, key):
        super().__init__(dim, hidden_dims, 2, activation, key=key)
        self.log_scale_bound = float(log_scale_bound)

    def _shift_log_scale(self, xa):
        out = self.conditioner(xa)
        n = self.dim - self.split
        return out[:n], soft_clamp(out[n:], self.log_scale_bound)

    def call_and_ladj(self, x):
        xa, xb = x[: self.split], x[self.split :]
        shift, s = self._shift_log_scale(xa)
        return jnp.concatenate([xa, xb * jnp.exp(s) + shift]), s.sum()

    def inverse_and_ladj(self, y):
        ya, yb = y[: self.split], y[self.split :]
        shift, s = self._shift_log_scale(ya)
        return jnp.concatenate([ya, (yb - shift) * jnp.exp(-s)]), -s.sum()


@register_flow("nice")
def nice(dim, num_layers, hidden_dims, activation, permutation, *, key):
    keys = jax.random.split(key, num_layers + 1)
    blocks = [AdditiveCoupling(dim, hidden_dims, activation, key=k) for k in keys[:-1]]
    return interleave(blocks, dim, permutation, keys[-1]) + [ElementwiseAffine(dim)]


@register_flow("realnvp")
def realnvp(dim, num_layers, hidden_dims, activation, permutation, log_scale_bound, *, key):
    keys = jax.random.split(key, num_layers + 1)
    blocks = [AffineCoupling(dim, hidden_dims, activation, log_scale_bound, key=k) for k in keys[:-1]]
    return interleave(blocks, dim, permutation, keys[-1])
