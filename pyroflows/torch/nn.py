"""Neural networks the flows use: an MLP for couplings and MADE for autoregressive layers.

The last layer of both starts at zero, so a freshly built flow is (close to) the
identity and the guide or density it defines starts where its base distribution is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "activation", "MLP", "MADE", "made_degrees"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


def _uniform_init(weight: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class MaskedLinear(nn.Module):
    """``x @ (W * mask).T + b``; a mask of ones is a plain linear layer."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor | None = None, zero: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        if mask is None:
            self.mask = None
            fan_in = in_features
        else:
            self.register_buffer("mask", mask.to(self.weight.dtype))
            fan_in = int(mask.sum(-1).max().item()) if mask.numel() else 0
        if not zero:
            _uniform_init(self.weight, fan_in)
            _uniform_init(self.bias, fan_in)

    def forward(self, x):
        w = self.weight if self.mask is None else self.weight * self.mask
        return nn.functional.linear(x, w, self.bias)


class MLP(nn.Module):
    """A fully connected network; the output layer is initialised at zero.

    ``in_features`` may be 0 (a coupling on a 1-D input conditions on nothing): the
    network is then a learned constant.
    """

    def __init__(self, in_features: int, hidden_dims, out_features: int, activation_name: str = "relu"):
        super().__init__()
        sizes = [in_features, *hidden_dims]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [MaskedLinear(a, b), activation(activation_name)]
        layers.append(MaskedLinear(sizes[-1], out_features, zero=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def made_degrees(dim: int, hidden_dims) -> list[torch.Tensor]:
    """Degrees of MADE's units (Germain et al. 2015): inputs 1..dim, hidden units cyclic.

    Hidden degrees cycle through 1..dim-1 (deterministic, so both backends agree); an
    output of degree i may see hidden units of degree < i, a hidden unit of degree k
    the units of degree <= k below it.
    """
    degrees = [torch.arange(1, dim + 1)]
    top = max(dim - 1, 1)
    for h in hidden_dims:
        degrees.append(torch.arange(h) % top + 1)
    return degrees


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015, arXiv:1502.03509).

    Maps ``(..., dim)`` to ``(..., dim, num_params)``: the parameters of coordinate i
    depend only on coordinates ``< i`` (in the natural order; flows permute between
    layers instead). The output layer starts at zero.
    """

    def __init__(self, dim: int, hidden_dims, num_params: int, activation_name: str = "relu"):
        super().__init__()
        self.dim, self.num_params = dim, num_params
        degrees = made_degrees(dim, hidden_dims)
        layers = []
        for d_in, d_out in zip(degrees[:-1], degrees[1:]):
            mask = (d_out[:, None] >= d_in[None, :]).float()
            layers += [MaskedLinear(len(d_in), len(d_out), mask), activation(activation_name)]
        out_degrees = torch.arange(1, dim + 1).repeat_interleave(num_params)
        mask = (out_degrees[:, None] > degrees[-1][None, :]).float()
        layers.append(MaskedLinear(len(degrees[-1]), dim * num_params, mask, zero=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        out = self.net(x)
        return out.reshape(*out.shape[:-1], self.dim, self.num_params)
