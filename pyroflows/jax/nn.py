"""Neural networks the flows use, as equinox modules: MLP, MADE, ODE dynamics, Lipschitz networks.

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

from ..ode import ACTIVATIONS as ODE_ACTIVATIONS
from ..ode import hollow_mask

__all__ = ["ACTIVATIONS", "Activation", "MaskedLinear", "MLP", "MADE", "made_degrees", "host_rng",
           "spectral_norm", "SpectralNormLinear", "LipSwish", "LipschitzMLP",
           "smooth_activation", "TimeMLP", "GroupedLinear", "HollowMLP"]


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


# --------------------------------------------------------------------------- Lipschitz networks (residual)
def spectral_norm(weight, power_iterations: int):
    """The largest singular value of ``weight``, by power iteration, differentiable in ``weight``.

    Power iteration on the Gram matrix ``A`` (``W^T W`` or ``W W^T``, the smaller) for
    ``N = power_iterations`` steps (rounded up to a power of two), run as the matrix
    power ``P = A^N / tr(A^N)`` by ``log2 N`` squarings in a ``fori_loop``, each divided by
    its trace (no overflow; a zero matrix gives zero), from no start vector: the result
    is a function of ``W`` alone and needs no stored state. ``tr(W P W^T)`` is a weighted
    mean of the eigenvalues of ``A`` with weights ``lambda^N``, short of ``sigma_max^2`` by
    at most a relative ``(m - 1) / (e N)`` (``m`` the Gram matrix's size). ``P`` is held
    fixed for the gradient, as power-iteration vectors are in Miyato et al. 2018
    (arXiv:1802.05957).
    """
    w = jax.lax.stop_gradient(weight)
    tall = w.shape[1] <= w.shape[0]
    tiny = jnp.finfo(w.dtype).tiny

    def normalise(p):
        return p / jnp.maximum(jnp.trace(p), tiny)

    p = normalise(w.T @ w if tall else w @ w.T)
    p = jax.lax.fori_loop(0, max(int(power_iterations) - 1, 0).bit_length(), lambda _, p: normalise(p @ p), p)
    sq = ((weight @ p) * weight).sum() if tall else ((p @ weight) * weight).sum()
    # sqrt with a zero (not infinite) gradient at a zero matrix, e.g. an output layer at init
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


class SpectralNormLinear(eqx.Module):
    """A linear layer whose weight is scaled to spectral norm at most ``coeff``.

    ``W_hat = W / max(1, sigma(W) / coeff)`` (Behrmann et al. 2019, arXiv:1811.00995),
    ``sigma`` from ``spectral_norm``. ``zero=True`` starts the weight and bias at zero.
    """

    weight: jax.Array
    bias: jax.Array
    coeff: float = eqx.field(static=True)
    power_iterations: int = eqx.field(static=True)

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.97, power_iterations: int = 4096,
                 zero: bool = False, *, key):
        self.coeff, self.power_iterations = float(coeff), int(power_iterations)
        init = MaskedLinear(in_features, out_features, zero=zero, key=key)  # the same initial weights
        self.weight, self.bias = init.weight, init.bias

    def normalized_weight(self):
        return self.weight / jnp.maximum(spectral_norm(self.weight, self.power_iterations) / self.coeff, 1.0)

    def __call__(self, x):
        return self.normalized_weight() @ x + self.bias


_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class LipSwish(eqx.Module):
    """``LipSwish(z) = z sigmoid(beta z) / 1.1``, ``beta = softplus(raw)`` (Chen et al. 2019, arXiv:1906.02735).

    ``d/dz [z sigmoid(beta z)]`` lies in (-0.0998, 1.0998) for every ``beta > 0``, so the
    activation is 1-Lipschitz. ``beta`` starts at 1 (plain swish / 1.1).
    """

    beta: jax.Array

    def __init__(self):
        self.beta = jnp.asarray(_SOFTPLUS_INV_ONE, dtype=float)

    def value_and_slope(self, z, beta=None):
        beta = jax.nn.softplus(self.beta) if beta is None else beta
        s = jax.nn.sigmoid(beta * z)
        return z * s / 1.1, s * (1.0 + beta * z * (1.0 - s)) / 1.1

    def __call__(self, z):
        return self.value_and_slope(z)[0]


class LipschitzMLP(eqx.Module):
    """``g(x)``: spectrally normalised linear layers with LipSwish between them; ``Lip(g) <= coeff``.

    ``net`` alternates ``SpectralNormLinear`` and ``LipSwish`` (the torch layout); the
    output layer starts at zero. ``weights()`` evaluates the normalised weights once,
    and ``forward_and_slopes`` / ``jvp`` / ``jacobian`` reuse them: the Jacobian is
    ``W_L diag(s_{L-1}) ... diag(s_1) W_1`` with the activation slopes ``s``.
    """

    net: tuple

    def __init__(self, dim: int, hidden_dims, coeff: float = 0.97, power_iterations: int = 4096, *, key):
        sizes = [dim, *hidden_dims, dim]
        keys = jax.random.split(key, len(sizes) - 1)
        layers = []
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
            if i:
                layers.append(LipSwish())
            layers.append(SpectralNormLinear(a, b, coeff, power_iterations, zero=i == len(sizes) - 2, key=k))
        self.net = tuple(layers)

    def weights(self):
        """``(linear, betas)``: ``[(W_hat, b), ...]`` and the activations' ``beta``."""
        linear = [(m.normalized_weight(), m.bias) for m in self.net[0::2]]
        betas = [jax.nn.softplus(m.beta) for m in self.net[1::2]]
        return linear, betas

    def forward_and_slopes(self, x, weights=None, slopes=True):
        linear, betas = self.weights() if weights is None else weights
        out = []
        for i, (w, b) in enumerate(linear):
            x = w @ x + b
            if i < len(betas):
                x, s = self.net[2 * i + 1].value_and_slope(x, betas[i])
                if slopes:
                    out.append(s)
        return x, out

    def __call__(self, x):
        return self.forward_and_slopes(x, slopes=False)[0]

    @staticmethod
    def jvp(weights, slopes, v):
        """``J_g v`` at the point whose ``slopes`` are given."""
        linear, _ = weights
        for i, (w, _) in enumerate(linear):
            v = w @ v
            if i < len(slopes):
                v = v * slopes[i]
        return v

    @staticmethod
    def jacobian(weights, slopes):
        """The dense ``J_g``, shape ``(dim, dim)``."""
        linear, _ = weights
        jac = linear[0][0]
        for (w, _), s in zip(linear[1:], slopes):
            jac = w @ (s[:, None] * jac)
        return jac


# --------------------------------------------------------------------------- ODE dynamics (ffjord)
def smooth_activation(name: str, a):
    """``(sigma(a), sigma'(a))`` for the smooth activations of CNF dynamics (mirrors torch)."""
    if name == "tanh":
        h = jnp.tanh(a)
        return h, 1.0 - h * h
    s = jax.nn.sigmoid(a)
    if name == "softplus":
        return jnp.maximum(a, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(a))), s
    if name == "silu":
        return a * s, s * (1.0 + a * (1.0 - s))
    raise ValueError(f"unknown activation {name!r} for ODE dynamics; valid: {list(ODE_ACTIVATIONS)}")


class TimeMLP(eqx.Module):
    """Time-conditioned dynamics ``f(x, t)`` with forward-mode tangents, for one vector (mirrors torch).

    ``__call__(t, x, tangents=None)`` returns ``f(x, t)`` and, for tangents ``V`` of shape
    ``(k, dim)``, the rows ``J v_j``. ``t`` is concatenated to every layer's input; the
    output layer starts at zero.
    """

    layers: tuple
    activation_name: str = eqx.field(static=True)

    def __init__(self, dim: int, hidden_dims, activation_name: str = "tanh", *, key):
        sizes = [dim, *hidden_dims, dim]
        last = len(sizes) - 2
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            MaskedLinear(a + 1, b, zero=i == last, key=k)
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
        )
        self.activation_name = activation_name

    def __call__(self, t, x, tangents=None):
        h, v = x, tangents
        t = jnp.reshape(t, (1,)).astype(x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            a = layer(jnp.concatenate([h, t]))
            if v is not None:
                v = v @ layer.weight[:, :-1].T  # the time column carries no tangent
            if i < last:
                h, slope = smooth_activation(self.activation_name, a)
                v = None if v is None else v * slope
            else:
                h = a
        return h, v


class GroupedLinear(eqx.Module):
    """``groups`` independent linear maps ``out[g] = W[g] @ in[g] + b[g]`` (mirrors torch);
    with ``shared_input=True`` every group reads the same vector, ``mask`` removing inputs per group."""

    weight: jax.Array
    bias: jax.Array
    mask: jax.Array | None

    def __init__(self, groups: int, in_features: int, out_features: int, mask=None, *, key):
        mask = None if mask is None else np.asarray(mask, dtype=bool)
        fan_in = in_features if mask is None else int(mask.sum(-1).max())
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        rng = host_rng(key)
        self.weight = jnp.asarray(rng.uniform(-bound, bound, (groups, out_features, in_features)), dtype=float)
        self.bias = jnp.asarray(rng.uniform(-bound, bound, (groups, out_features)), dtype=float)
        self.mask = None if mask is None else jnp.asarray(mask)

    def masked_weight(self):
        return self.weight if self.mask is None else jnp.where(self.mask, self.weight, 0.0)

    def __call__(self, x, shared_input: bool = False):
        pattern = "goi,i->go" if shared_input else "goi,gi->go"
        return jnp.einsum(pattern, self.masked_weight(), x) + self.bias


class HollowMLP(eqx.Module):
    """Hollow dynamics ``f_i(x, t) = tau_i(x_i, h_i)``, ``h_i = c_i(x_{-i}, t)`` (Chen & Duvenaud 2019,
    arXiv:1912.03579), for one vector; mirrors torch's ``HollowMLP``.

    ``__call__(t, x, tangents=None)`` returns ``(f, rows J v_j, divergence)``, the
    divergence ``sum_i d tau_i / d x_i`` exact.
    """

    layers: tuple
    w_in: jax.Array
    w_out: jax.Array
    b_out: jax.Array
    activation_name: str = eqx.field(static=True)

    def __init__(self, dim: int, hidden_dims, activation_name: str = "tanh", *, key):
        sizes = [dim + 1, *hidden_dims]
        keys = jax.random.split(key, len(sizes))
        self.layers = tuple(
            GroupedLinear(dim, a, b, hollow_mask(dim, b) if i == 0 else None, key=k)
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
        )
        width = sizes[-1]
        self.w_in = jnp.asarray(host_rng(keys[-1]).uniform(-1.0, 1.0, (dim, width)), dtype=float)
        self.w_out = jnp.asarray(np.zeros((dim, width)), dtype=float)
        self.b_out = jnp.asarray(np.zeros(dim), dtype=float)
        self.activation_name = activation_name

    def __call__(self, t, x, tangents=None):
        name, v = self.activation_name, tangents
        h = jnp.concatenate([x, jnp.reshape(t, (1,)).astype(x.dtype)])
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            a = layer(h, shared_input=i == 0)
            if v is not None:
                w = layer.masked_weight()
                v = jnp.einsum("goi,ki->kgo", w[..., :-1], v) if i == 0 else jnp.einsum("goi,kgi->kgo", w, v)
            if i < last:
                h, slope = smooth_activation(name, a)
                v = None if v is None else v * slope
            else:
                h = a
        u = self.w_in * x[:, None] + h  # (dim, width)
        s, slope = smooth_activation(name, u)
        f = (self.w_out * s).sum(-1) + self.b_out
        divergence = (self.w_out * slope * self.w_in).sum()
        if v is not None:
            du = self.w_in * tangents[..., None] + v
            v = (self.w_out * slope * du).sum(-1)
        return f, v, divergence
