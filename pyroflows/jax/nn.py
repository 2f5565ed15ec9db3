"""Equinox mirrors of ``pyroflows.torch.nn`` (documented there), the networks of the JAX flows.

What differs: each network maps ONE unbatched vector, and takes ``key=`` for its
initial weights, which ``host_rng`` draws on the host. ``net`` keeps torch's layer
indices, so a torch ``state_dict`` key names the same array here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..ode import ACTIVATIONS as ODE_ACTIVATIONS
from ..ode import hollow_mask
from ..structure import made_masks

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "MaskedLinear",
    "MLP",
    "MADE",
    "host_rng",
    "spectral_norm",
    "SpectralNormLinear",
    "LipSwish",
    "LipschitzMLP",
    "smooth_activation",
    "TimeMLP",
    "GroupedLinear",
    "HollowMLP",
]


def host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a JAX key, for initial weights.

    Builders draw initial weights on the host: every eager JAX op on a new shape
    compiles, and a flow has many shapes, so host-side initialisation builds a flow in
    milliseconds instead of seconds. The key still determines the weights.

    Args:
        key: a JAX PRNG key.

    Returns:
        A ``numpy.random.Generator`` seeded by the key's data.

    Example:
        >>> a, b = host_rng(jax.random.key(0)), host_rng(jax.random.key(0))
        >>> bool(a.uniform() == b.uniform())
        True
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


#: The activations by name, as functions (``pyroflows.torch.nn.ACTIVATIONS`` holds modules).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU's default
    "silu": jax.nn.silu,
}


class Activation(eqx.Module):
    """An activation by name, kept as a static field: JAX mirror of ``pyroflows.torch.nn.activation``.

    Raises:
        ValueError: ``name`` is not a key of ``ACTIVATIONS``.

    Example:
        >>> Activation("relu")(jnp.array([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """

    name: str = eqx.field(static=True)

    def __init__(self, name: str):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.name](x)


class MaskedLinear(eqx.Module):
    """``(W * mask) @ x + b`` for one vector: JAX mirror of ``pyroflows.torch.nn.MaskedLinear``.

    ``W`` is ``(out, in)`` as in torch; the mask is a boolean constant.

    Args:
        key: seeds the initial weights (unused with ``zero=True``).

    Example:
        >>> MaskedLinear(3, 2, mask=np.ones((2, 3)), key=jax.random.key(0))(jnp.ones(3)).shape
        (2,)
    """

    weight: jax.Array
    bias: jax.Array
    mask: jax.Array | None

    def __init__(
        self, in_features: int, out_features: int, mask: np.ndarray | None = None, zero: bool = False, *, key: jax.Array
    ):
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

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight if self.mask is None else jnp.where(self.mask, self.weight, 0.0)
        return w @ x + self.bias


def _run(net, x):
    for layer in net:
        x = layer(x)
    return x


class MLP(eqx.Module):
    """A fully connected network with a zero output layer: JAX mirror of ``pyroflows.torch.nn.MLP``.

    Args:
        key: seeds the initial weights.

    Example:
        >>> net = MLP(2, [8], 3, key=jax.random.key(0))
        >>> out = net(jnp.ones(2))
        >>> out.shape, bool((out == 0).all())
        ((3,), True)
    """

    net: tuple

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        out_features: int,
        activation_name: str = "relu",
        *,
        key: jax.Array,
    ):
        sizes = [in_features, *hidden_dims]
        keys = jax.random.split(key, len(sizes))
        layers = []
        for k, (a, b) in zip(keys, zip(sizes[:-1], sizes[1:])):
            layers += [MaskedLinear(a, b, key=k), Activation(activation_name)]
        layers.append(MaskedLinear(sizes[-1], out_features, zero=True, key=keys[-1]))
        self.net = tuple(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _run(self.net, x)


class MADE(eqx.Module):
    """Masked autoencoder, ``(dim,) -> (dim, num_params)``: JAX mirror of ``pyroflows.torch.nn.MADE``.

    Germain et al. 2015, arXiv:1502.03509.

    Args:
        key: seeds the initial weights.

    Example:
        >>> made = MADE(3, [8], 2, key=jax.random.key(0))
        >>> made = eqx.tree_at(lambda m: m.net[-1].weight, made, jnp.ones((6, 8)))
        >>> jac = jax.jit(jax.jacfwd(lambda x: made(x)[:, 0]))(jnp.ones(3))
        >>> bool((jnp.triu(jac) == 0).all())  # output i reads inputs < i only
        True
    """

    net: tuple
    dim: int = eqx.field(static=True)
    num_params: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int],
        num_params: int,
        activation_name: str = "relu",
        context_dim: int = 0,
        *,
        key: jax.Array,
    ):
        self.dim, self.num_params = dim, num_params
        masks = made_masks(dim, hidden_dims, num_params, context_dim)
        keys = jax.random.split(key, len(masks))
        layers = []
        for k, mask in zip(keys, masks[:-1]):
            layers += [MaskedLinear(mask.shape[1], mask.shape[0], mask, key=k), Activation(activation_name)]
        layers.append(MaskedLinear(masks[-1].shape[1], masks[-1].shape[0], masks[-1], zero=True, key=keys[-1]))
        self.net = tuple(layers)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        return _run(self.net, x if context is None else jnp.concatenate([x, context])).reshape(
            self.dim, self.num_params
        )


# --------------------------------------------------------------------------- Lipschitz networks (residual)
def spectral_norm(weight: jax.Array, power_iterations: int) -> jax.Array:
    """The largest singular value of ``weight``: JAX mirror of ``pyroflows.torch.nn.spectral_norm``.

    The ``log2 N`` squarings of the Gram matrix run in a ``fori_loop``. Miyato et al.
    2018, arXiv:1802.05957.

    Example:
        >>> round(float(spectral_norm(jnp.array([[3.0, 0.0], [0.0, 1.0]]), 64)), 4)
        3.0
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
    """A linear layer with spectral norm at most ``coeff``: JAX mirror of ``pyroflows.torch.nn.SpectralNormLinear``.

    Behrmann et al. 2019, arXiv:1811.00995.

    Args:
        key: seeds the initial weights (those of a ``MaskedLinear`` with the same key).

    Example:
        >>> layer = SpectralNormLinear(3, 3, coeff=0.5, key=jax.random.key(0))
        >>> bool(jnp.linalg.norm(layer.normalized_weight(), ord=2) <= 0.5 + 1e-3)
        True
    """

    weight: jax.Array
    bias: jax.Array
    coeff: float = eqx.field(static=True)
    power_iterations: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coeff: float = 0.97,
        power_iterations: int = 4096,
        zero: bool = False,
        *,
        key: jax.Array,
    ):
        self.coeff, self.power_iterations = float(coeff), int(power_iterations)
        init = MaskedLinear(in_features, out_features, zero=zero, key=key)  # the same initial weights
        self.weight, self.bias = init.weight, init.bias

    def normalized_weight(self) -> jax.Array:
        """``W_hat = W / max(1, sigma(W) / coeff)``.

        Example:
            >>> layer = SpectralNormLinear(2, 2, coeff=1.0, key=jax.random.key(0))
            >>> layer = eqx.tree_at(lambda m: m.weight, layer, 2 * jnp.eye(2))
            >>> layer.normalized_weight().round(3).tolist()
            [[1.0, 0.0], [0.0, 1.0]]
        """
        return self.weight / jnp.maximum(spectral_norm(self.weight, self.power_iterations) / self.coeff, 1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.normalized_weight() @ x + self.bias


_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class LipSwish(eqx.Module):
    """The activation ``z sigmoid(beta z) / 1.1``: JAX mirror of ``pyroflows.torch.nn.LipSwish``.

    Chen et al. 2019, arXiv:1906.02735.

    Example:
        >>> [round(v, 3) for v in LipSwish()(jnp.array([0.0, 10.0])).tolist()]
        [0.0, 9.09]
    """

    beta: jax.Array

    def __init__(self) -> None:
        self.beta = jnp.asarray(_SOFTPLUS_INV_ONE, dtype=float)

    def value_and_slope(self, z: jax.Array, beta: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The activation and its derivative at ``z``, elementwise.

        Example:
            >>> value, slope = LipSwish().value_and_slope(jnp.zeros(1))
            >>> value.tolist(), round(float(slope[0]), 4)
            ([0.0], 0.4545)
        """
        beta = jax.nn.softplus(self.beta) if beta is None else beta
        s = jax.nn.sigmoid(beta * z)
        return z * s / 1.1, s * (1.0 + beta * z * (1.0 - s)) / 1.1

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.value_and_slope(z)[0]


class LipschitzMLP(eqx.Module):
    """A residual branch ``g`` with ``Lip(g) <= coeff``: JAX mirror of ``pyroflows.torch.nn.LipschitzMLP``.

    Behrmann et al. 2019, arXiv:1811.00995; Chen et al. 2019, arXiv:1906.02735.

    Args:
        key: seeds the initial weights.

    Example:
        >>> g = LipschitzMLP(2, [8], key=jax.random.key(0))
        >>> g = eqx.tree_at(lambda m: m.net[-1].weight, g, jnp.ones((2, 8)))
        >>> @jax.jit
        ... def both_jacobians(x):
        ...     weights = g.weights()
        ...     return LipschitzMLP.jacobian(weights, g.forward_and_slopes(x, weights)[1]), jax.jacfwd(g)(x)
        >>> jac, autodiff = both_jacobians(jnp.array([0.3, -0.2]))
        >>> bool(jnp.allclose(jac, autodiff, atol=1e-6))
        True
    """

    net: tuple

    def __init__(
        self, dim: int, hidden_dims: Sequence[int], coeff: float = 0.97, power_iterations: int = 4096, *, key: jax.Array
    ):
        sizes = [dim, *hidden_dims, dim]
        keys = jax.random.split(key, len(sizes) - 1)
        layers = []
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
            if i:
                layers.append(LipSwish())
            layers.append(SpectralNormLinear(a, b, coeff, power_iterations, zero=i == len(sizes) - 2, key=k))
        self.net = tuple(layers)

    def weights(self) -> tuple[list[tuple[jax.Array, jax.Array]], list[jax.Array]]:
        """``(linear, betas)``: ``[(W_hat, b), ...]`` and the activations' ``beta``, evaluated once.

        Example:
            >>> linear, betas = LipschitzMLP(2, [4, 4], key=jax.random.key(0)).weights()
            >>> [w.shape for w, _ in linear], len(betas)
            ([(4, 2), (4, 4), (2, 4)], 2)
        """
        linear = [(m.normalized_weight(), m.bias) for m in self.net[0::2]]
        betas = [jax.nn.softplus(m.beta) for m in self.net[1::2]]
        return linear, betas

    def forward_and_slopes(
        self, x: jax.Array, weights: tuple | None = None, slopes: bool = True
    ) -> tuple[jax.Array, list[jax.Array]]:
        """``g(x)`` for one vector and the activation slopes at ``x``.

        Example:
            >>> y, slopes = LipschitzMLP(2, [4], key=jax.random.key(0)).forward_and_slopes(jnp.zeros(2))
            >>> y.tolist(), [s.shape for s in slopes]
            ([0.0, 0.0], [(4,)])
        """
        linear, betas = self.weights() if weights is None else weights
        out = []
        for i, (w, b) in enumerate(linear):
            x = w @ x + b
            if i < len(betas):
                x, s = self.net[2 * i + 1].value_and_slope(x, betas[i])
                if slopes:
                    out.append(s)
        return x, out

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_and_slopes(x, slopes=False)[0]

    @staticmethod
    def jvp(weights: tuple, slopes: list[jax.Array], v: jax.Array) -> jax.Array:
        """``J_g v`` for one vector ``v`` at the point whose ``slopes`` are given.

        Example:
            >>> g = LipschitzMLP(2, [4], key=jax.random.key(0))
            >>> weights = g.weights()
            >>> slopes = g.forward_and_slopes(jnp.zeros(2), weights)[1]
            >>> LipschitzMLP.jvp(weights, slopes, jnp.ones(2)).tolist()  # the zero output layer
            [0.0, 0.0]
        """
        linear, _ = weights
        for i, (w, _) in enumerate(linear):
            v = w @ v
            if i < len(slopes):
                v = v * slopes[i]
        return v

    @staticmethod
    def jacobian(weights: tuple, slopes: list[jax.Array]) -> jax.Array:
        """The dense ``J_g``, shape ``(dim, dim)``, at the point whose ``slopes`` are given.

        Example:
            >>> g = LipschitzMLP(3, [4], key=jax.random.key(0))
            >>> weights = g.weights()
            >>> LipschitzMLP.jacobian(weights, g.forward_and_slopes(jnp.zeros(3), weights)[1]).shape
            (3, 3)
        """
        linear, _ = weights
        jac = linear[0][0]
        for (w, _), s in zip(linear[1:], slopes):
            jac = w @ (s[:, None] * jac)
        return jac


# --------------------------------------------------------------------------- ODE dynamics (ffjord)
def smooth_activation(name: str, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sigma(a), sigma'(a))``: JAX mirror of ``pyroflows.torch.nn.smooth_activation``.

    Example:
        >>> value, slope = smooth_activation("softplus", jnp.zeros(1))
        >>> round(float(value[0]), 4), float(slope[0])
        (0.6931, 0.5)
    """
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
    """Dynamics ``f(x, t)`` with forward-mode tangents: JAX mirror of ``pyroflows.torch.nn.TimeMLP``.

    ``__call__(t, x, tangents=None)`` takes one vector ``x`` and tangents of shape
    ``(k, dim)``, and returns ``(f, JV)`` with the rows ``J v_j``.

    Args:
        key: seeds the initial weights.

    Example:
        >>> f = TimeMLP(2, [8], key=jax.random.key(0))
        >>> value, jv = f(0.5, jnp.ones(2), jnp.eye(2))
        >>> value.shape, jv.shape
        ((2,), (2, 2))
    """

    layers: tuple
    activation_name: str = eqx.field(static=True)

    def __init__(self, dim: int, hidden_dims: Sequence[int], activation_name: str = "tanh", *, key: jax.Array):
        sizes = [dim, *hidden_dims, dim]
        last = len(sizes) - 2
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            MaskedLinear(a + 1, b, zero=i == last, key=k)
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
        )
        self.activation_name = activation_name

    def __call__(
        self, t: jax.Array | float, x: jax.Array, tangents: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
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
    """``groups`` linear maps ``out[g] = W[g] @ in[g] + b[g]``: JAX mirror of ``pyroflows.torch.nn.GroupedLinear``.

    Args:
        key: seeds the initial weights.

    Example:
        >>> layer = GroupedLinear(3, 2, 4, key=jax.random.key(0))
        >>> layer(jnp.ones((3, 2))).shape, layer(jnp.ones(2), shared_input=True).shape
        ((3, 4), (3, 4))
    """

    weight: jax.Array
    bias: jax.Array
    mask: jax.Array | None

    def __init__(
        self, groups: int, in_features: int, out_features: int, mask: np.ndarray | None = None, *, key: jax.Array
    ):
        mask = None if mask is None else np.asarray(mask, dtype=bool)
        fan_in = in_features if mask is None else int(mask.sum(-1).max())
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        rng = host_rng(key)
        self.weight = jnp.asarray(rng.uniform(-bound, bound, (groups, out_features, in_features)), dtype=float)
        self.bias = jnp.asarray(rng.uniform(-bound, bound, (groups, out_features)), dtype=float)
        self.mask = None if mask is None else jnp.asarray(mask)

    def masked_weight(self) -> jax.Array:
        """The weights ``(groups, out, in)`` with the mask applied.

        Example:
            >>> mask = np.array([[[False, True]], [[True, False]]])
            >>> (GroupedLinear(2, 2, 1, mask, key=jax.random.key(0)).masked_weight() == 0).tolist()
            [[[True, False]], [[False, True]]]
        """
        return self.weight if self.mask is None else jnp.where(self.mask, self.weight, 0.0)

    def __call__(self, x: jax.Array, shared_input: bool = False) -> jax.Array:
        pattern = "goi,i->go" if shared_input else "goi,gi->go"
        return jnp.einsum(pattern, self.masked_weight(), x) + self.bias


class HollowMLP(eqx.Module):
    """Hollow dynamics with an exact divergence: JAX mirror of ``pyroflows.torch.nn.HollowMLP``.

    ``__call__(t, x, tangents=None)`` takes one vector and returns ``(f, JV, divergence)``.
    Chen & Duvenaud 2019, arXiv:1912.03579.

    Args:
        key: seeds the initial weights.

    Example:
        >>> f = HollowMLP(3, [8], key=jax.random.key(0))
        >>> f = eqx.tree_at(lambda m: m.w_out, f, jnp.ones((3, 8)))  # leave the zero start
        >>> @jax.jit
        ... def divergence_and_trace(x):
        ...     return f(0.3, x)[2], jnp.trace(jax.jacfwd(lambda v: f(0.3, v)[0])(x))
        >>> divergence, trace = divergence_and_trace(jnp.array([0.1, -0.4, 0.7]))
        >>> bool(jnp.allclose(divergence, trace, atol=1e-5))
        True
    """

    layers: tuple
    w_in: jax.Array
    w_out: jax.Array
    b_out: jax.Array
    activation_name: str = eqx.field(static=True)

    def __init__(self, dim: int, hidden_dims: Sequence[int], activation_name: str = "tanh", *, key: jax.Array):
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

    def __call__(
        self, t: jax.Array | float, x: jax.Array, tangents: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
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
