"""Coupling layers: NICE's additive coupling and RealNVP's affine coupling.

NICE: Dinh, Krueger & Bengio 2015, arXiv:1410.8516. RealNVP: Dinh, Sohl-Dickstein &
Bengio 2017, arXiv:1605.08803. The first ``dim // 2`` coordinates pass through and
condition an MLP that moves the rest; permutations between layers swap the roles.
"""

from __future__ import annotations

import torch

from ..flows import register_flow
from ..nn import MLP
from .base import ElementwiseAffine, FlowTransform, interleave, soft_clamp

__all__ = ["AdditiveCoupling", "AffineCoupling"]


class _Coupling(FlowTransform):
    def __init__(self, dim: int, hidden_dims, params_per_coordinate: int, activation: str = "relu"):
        super().__init__(dim)
        self.split = dim // 2
        self.conditioner = MLP(self.split, hidden_dims, params_per_coordinate * (dim - self.split), activation)

    def _halves(self, x):
        return x[..., : self.split], x[..., self.split :]


class AdditiveCoupling(_Coupling):
    """NICE coupling ``y_b = x_b + t(x_a)``, ``y_a = x_a``: volume preserving (log-det 0)."""

    def __init__(self, dim: int, hidden_dims=(64, 64), activation: str = "relu"):
        super().__init__(dim, hidden_dims, 1, activation)

    def call_and_ladj(self, x):
        xa, xb = self._halves(x)
        return torch.cat([xa, xb + self.conditioner(xa)], -1), x.new_zeros(x.shape[:-1])

    def inverse_and_ladj(self, y):
        ya, yb = self._halves(y)
        return torch.cat([ya, yb - self.conditioner(ya)], -1), y.new_zeros(y.shape[:-1])


class AffineCoupling(_Coupling):
    """RealNVP coupling ``y_b = x_b * exp(s(x_a)) + t(x_a)``, ``y_a = x_a``.

    The log-scale is soft-clamped, ``s = bound * tanh(s_raw / bound)``, so no layer can
    scale by more than ``exp(bound)``.
    """

    def __init__(self, dim: int, hidden_dims=(64, 64), activation: str = "relu", log_scale_bound: float = 5.0):
        super().__init__(dim, hidden_dims, 2, activation)
        self.log_scale_bound = float(log_scale_bound)

    def _shift_log_scale(self, xa):
        out = self.conditioner(xa)
        n = self.dim - self.split
        return out[..., :n], soft_clamp(out[..., n:], self.log_scale_bound)

    def call_and_ladj(self, x):
        xa, xb = self._halves(x)
        shift, s = self._shift_log_scale(xa)
        return torch.cat([xa, xb * torch.exp(s) + shift], -1), s.sum(-1)

    def inverse_and_ladj(self, y):
        ya, yb = self._halves(y)
        shift, s = self._shift_log_scale(ya)
        return torch.cat([ya, (yb - shift) * torch.exp(-s)], -1), -s.sum(-1)


@register_flow("nice")
def nice(dim, num_layers, hidden_dims, activation, permutation):
    blocks = [AdditiveCoupling(dim, hidden_dims, activation) for _ in range(num_layers)]
    return interleave(blocks, dim, permutation) + [ElementwiseAffine(dim)]


@register_flow("realnvp")
def realnvp(dim, num_layers, hidden_dims, activation, permutation, log_scale_bound):
    blocks = [AffineCoupling(dim, hidden_dims, activation, log_scale_bound) for _ in range(num_layers)]
    return interleave(blocks, dim, permutation)
