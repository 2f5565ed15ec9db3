"""Neural networks the flows use, as equinox modules: an MLP for couplings and MADE.

Mirrors ``pyroflows.torch.nn``: the same layer layout (``net`` holds linear layers and
activations at the same indices as torch's ``nn.Sequential``), the same masks, the same
initialisation scheme, and a zero output layer. Networks act on one unbatched vector.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ACTIVATIONS", "Activation", "MaskedLinear", "MLP", "MADE", "made_degrees", "host_rng"]


def host_rng(key) -> np.random.Generator:
    """A numpy generator seeded by a JAX key, for initial weights.

    Builders draw initial weights on the host: every eager JAX op on a new shape
    compiles, and a flow has many shapes, so host-side initialisation builds a flow in
    milliseconds instead of seconds. The key still determines the weights.
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU's default
    "silu": jax.nn.silu,
}


class Activation(eqx.Module):
    name: str = eqx.field(static=True)

    def __init__(self, name: str):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
        self.name = name

    def __call__(self, x):
        return ACTIVATIONS[self.name](x)


class MaskedLinear(eqx.Module):
    """``(W * mask) @ x + b``; ``mask=None`` is a plain linear layer. ``W`` is (out, in) as in torch."""

    weight: jax.Array
    bias: jax.Array
    mask: jax.Array | None

    def __init__(self, in_features: int, out_features: int, mask=None, zero: bool = False, *, key):
        if mask is None:
            fan_in = in_features
        else:
            mask = np.asarray(mask, dtype=bool)
            fan_in = int(mask.sum(-1).max()) if mask.size else 0
        self.mask = None if mask is None else jnp.asarray(mask)
        if zero:
            weight, bias = np.zeros((out_features, in_features)), np.zeros(out_features)
        else:
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            rng = host_rng(key)
            weight = rng.uniform(-bound, bound, (out_features, in_features))
            bias = rng.uniform(-bound, bound, out_features)
        self.weight = jnp.asarray(weight, dtype=float)
        self.bias = jnp.asarray(bias, dtype=float)

    def __call__(self, x):
        w = self.weight if self.mask is None else jnp.where(self.mask, self.weight, 0.0)
        return w @ x + self.bias


def _run(net, x):
    for layer in net:
        x = layer(x)
    return x


class MLP(eqx.Module):
    """A fully connected network with a zero output layer; ``in_features`` may be 0."""

    net: tuple

    def __init__(self, in_features: int, hidden_dims, out_features: int, activation_name: str = "relu", *, key):
        sizes = [in_features, *hidden_dims]
        keys = jax.random.split(key, len(sizes))
        layers = []
        for k, (a, b) in zip(keys, zip(sizes[:-1], sizes[1:])):
            layers += [MaskedLinear(a, b, key=k), Activation(activation_name)]
        layers.append(MaskedLinear(sizes[-1], out_features, zero=True, key=keys[-1]))
        self.net = tuple(layers)

    def __call__(self, x):
        return _run(self.net, x)


def made_degrees(dim: int, hidden_dims):
    """MADE degrees (Germain et al. 2015): inputs 1..dim, hidden units cycling through 1..dim-1."""
    top = max(dim - 1, 1)
    return [np.arange(1, dim + 1)] + [np.arange(h) % top + 1 for h in hidden_dims]


class MADE(eqx.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015, arXiv:1502.03509).

    Maps ``(dim,)`` to ``(dim, num_params)``; the parameters of coordinate i depend only
    on coordinates ``< i``. The output layer starts at zero.
    """

    net: tuple
    dim: int = eqx.field(static=True)
    num_params: int = eqx.field(static=True)

    def __init__(self, dim: int, hidden_dims, num_params: int, activation_name: str = "relu", *, key):
        self.dim, self.num_params = dim, num_params
        degrees = made_degrees(dim, hidden_dims)
        keys = jax.random.split(key, len(degrees))
        layers = []
        for k, d_in, d_out in zip(keys, degrees[:-1], degrees[1:]):
            mask = d_out[:, None] >= d_in[None, :]
            layers += [MaskedLinear(len(d_in), len(d_out), mask, key=k), Activation(activation_name)]
        out_degrees = np.repeat(np.arange(1, dim + 1), num_params)
        mask = out_degrees[:, None] > degrees[-1][None, :]
        layers.append(MaskedLinear(len(degrees[-1]), dim * num_params, mask, zero=True, key=keys[-1]))
        self.net = tuple(layers)

    def __call__(self, x):
        return _run(self.net, x).reshape(self.dim, self.num_params)
