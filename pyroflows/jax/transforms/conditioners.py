"""JAX mirror of ``pyroflows.torch.transforms.conditioners``: coupling and masked autoregressive layers.

Layers act on one unbatched vector, take ``key=`` for their initial weights and keep
the transformer as a static field; the sequential direction of an autoregressive layer
is a ``fori_loop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ...registry import SPECS
from ..flows import register_flow
from ..nn import MADE, MLP
from .base import ElementwiseAffine, FlowTransform, interleave
from .transformers import TRANSFORMERS, Transformer

__all__ = ["Coupling", "MaskedAutoregressive", "build_conditioned"]


class _Conditioned(FlowTransform):
    transformer: Transformer = eqx.field(static=True)
    context_dim: int = eqx.field(static=True, default=0)

    @property
    def numerical_inverse(self) -> bool:
        return self.transformer.numerical_inverse

    @property
    def inverse_tol(self) -> float:
        return self.transformer.inverse_tol


class Coupling(_Conditioned):
    """``y_a = x_a``, ``y_b = tau(x_b; theta(x_a))``: JAX mirror of ``pyroflows.torch.transforms.Coupling``.

    Dinh et al. 2015 (NICE), arXiv:1410.8516; Dinh et al. 2017 (Real NVP), arXiv:1605.08803.

    Args:
        key: a PRNG key for the initial weights.

    Example:
        >>> from pyroflows.jax.transforms.transformers import Affine
        >>> layer = Coupling(3, Affine(), hidden_dims=(8,), key=jax.random.key(0))
        >>> y, ladj = layer.call_and_ladj(jnp.ones(3))
        >>> y.shape, ladj.shape
        ((3,), ())
    """

    conditioner: MLP
    split: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        transformer: Transformer,
        hidden_dims: Sequence[int] = (64, 64),
        activation: str = "relu",
        context_dim: int = 0,
        *,
        key: jax.Array,
    ):
        self.dim, self.context_dim = int(dim), int(context_dim)
        self.transformer = transformer
        self.split = self.dim // 2
        out = transformer.num_params * (self.dim - self.split)
        self.conditioner = MLP(self.split + self.context_dim, hidden_dims, out, activation, key=key)

    def _map(self, v, inverse, context):
        va, vb = v[: self.split], v[self.split :]
        params = self.conditioner(va if context is None else jnp.concatenate([va, context]))
        params = params.reshape(self.transformer.num_params, self.dim - self.split).T
        vb, logd = (self.transformer.inverse if inverse else self.transformer.forward)(vb, params)
        return jnp.concatenate([va, vb]), logd.sum()

    def call_and_ladj(self, x: jax.Array, context: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for one vector (and one context vector of a conditional layer).

        Example:
            >>> from pyroflows.jax.transforms.transformers import Additive
            >>> layer = Coupling(2, Additive(), hidden_dims=(8,), key=jax.random.key(0))
            >>> y, ladj = layer.call_and_ladj(jnp.array([1.0, 2.0]))
            >>> y.tolist(), float(ladj)  # a fresh layer is the identity
            ([1.0, 2.0], 0.0)
        """
        return self._map(x, False, context)

    def inverse_and_ladj(self, y: jax.Array, context: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for one vector.

        Example:
            >>> from pyroflows.jax.transforms.transformers import Affine
            >>> layer = Coupling(2, Affine(), hidden_dims=(8,), key=jax.random.key(0))
            >>> layer = eqx.tree_at(lambda m: m.conditioner.net[-1].weight, layer, jnp.ones((2, 8)))
            >>> x = jnp.array([0.3, -1.2])
            >>> x_back, _ = layer.inverse_and_ladj(layer.call_and_ladj(x)[0])
            >>> bool(jnp.allclose(x_back, x, atol=1e-5))
            True
        """
        return self._map(y, True, context)


class MaskedAutoregressive(_Conditioned):
    """An autoregressive layer: JAX mirror of ``pyroflows.torch.transforms.MaskedAutoregressive``.

    The sequential direction is a ``fori_loop`` over coordinates whose carry holds the
    solved prefix, so compile time does not grow with ``dim``. Kingma et al. 2016 (IAF),
    arXiv:1606.04934; Papamakarios et al. 2017 (MAF), arXiv:1705.07057.

    Args:
        key: a PRNG key for the initial weights.

    Example:
        >>> from pyroflows.jax.transforms.transformers import Affine
        >>> layer = MaskedAutoregressive(3, Affine(), hidden_dims=(8,), reads="output", key=jax.random.key(0))
        >>> layer.inverse_and_ladj(jnp.ones(3))[0].shape
        (3,)
    """

    made: MADE
    reads: str = eqx.field(static=True)
    autoregressive = True

    def __init__(
        self,
        dim: int,
        transformer: Transformer,
        hidden_dims: Sequence[int] = (64, 64),
        activation: str = "relu",
        reads: str = "input",
        context_dim: int = 0,
        *,
        key: jax.Array,
    ):
        if reads not in ("input", "output"):
            raise ValueError(f"reads={reads!r} is not one of ['input', 'output']")
        self.dim, self.context_dim = int(dim), int(context_dim)
        self.transformer, self.reads = transformer, reads
        self.made = MADE(self.dim, hidden_dims, transformer.num_params, activation, self.context_dim, key=key)

    def get_permutation(self) -> jax.Array:
        """The order in which coordinates are generated: the natural one.

        Example:
            >>> from pyroflows.jax.transforms.transformers import Affine
            >>> MaskedAutoregressive(3, Affine(), hidden_dims=(8,), key=jax.random.key(0)).get_permutation().tolist()
            [0, 1, 2]
        """
        return jnp.arange(self.dim)

    def _parallel(self, v, inverse, context):
        out, logd = (self.transformer.inverse if inverse else self.transformer.forward)(v, self.made(v, context))
        return out, logd.sum()

    def _sequential(self, given, inverse, context):
        step = self.transformer.inverse if inverse else self.transformer.forward

        def body(i, carry):
            v, total = carry
            out, logd = step(given[i], self.made(v, context)[i])
            return v.at[i].set(out.astype(v.dtype)), total + logd.astype(total.dtype)

        return jax.lax.fori_loop(0, self.dim, body, (jnp.zeros_like(given), jnp.zeros((), given.dtype)))

    def call_and_ladj(self, x: jax.Array, context: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for one vector (a ``fori_loop`` with ``reads="output"``).

        Example:
            >>> from pyroflows.jax.transforms.transformers import Affine
            >>> layer = MaskedAutoregressive(3, Affine(), hidden_dims=(8,), reads="output", key=jax.random.key(0))
            >>> layer = eqx.tree_at(lambda m: m.made.net[-1].weight, layer, jnp.ones((6, 8)))
            >>> x = jnp.array([0.3, -1.2, 0.5])
            >>> x_back, _ = layer.inverse_and_ladj(layer.call_and_ladj(x)[0])
            >>> bool(jnp.allclose(x_back, x, atol=1e-5))
            True
        """
        return self._parallel(x, False, context) if self.reads == "input" else self._sequential(x, False, context)

    def inverse_and_ladj(self, y: jax.Array, context: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for one vector (a ``fori_loop`` with ``reads="input"``).

        Example:
            >>> from pyroflows.jax.transforms.transformers import Affine
            >>> layer = MaskedAutoregressive(2, Affine(), hidden_dims=(8,), key=jax.random.key(0))
            >>> x, ladj = layer.inverse_and_ladj(jnp.array([1.0, 2.0]))
            >>> x.tolist(), float(ladj)
            ([1.0, 2.0], 0.0)
        """
        return self._parallel(y, True, context) if self.reads == "output" else self._sequential(y, True, context)


def conditioned_layer(
    name: str,
    dim: int,
    hidden_dims: Sequence[int],
    activation: str,
    context_dim: int = 0,
    *,
    key: jax.Array,
    **options: Any,
) -> FlowTransform:
    """One layer of family ``name``: JAX mirror of ``pyroflows.torch.transforms.conditioners.conditioned_layer``.

    Example:
        >>> conditioned_layer("maf", 2, (8,), "relu", key=jax.random.key(0)).reads
        'output'
    """
    spec = SPECS[name]
    kind = options.pop("conditioner", spec.conditioner)
    transformer = TRANSFORMERS[spec.transformer](**options)
    if kind == "coupling":
        return Coupling(dim, transformer, hidden_dims, activation, context_dim, key=key)
    return MaskedAutoregressive(dim, transformer, hidden_dims, activation, spec.reads, context_dim, key=key)


def build_conditioned(
    name: str,
    dim: int,
    num_layers: int,
    hidden_dims: Sequence[int],
    activation: str,
    permutation: str,
    *,
    key: jax.Array,
    **options: Any,
) -> list[FlowTransform]:
    """The layers of family ``name``: JAX mirror of ``pyroflows.torch.transforms.build_conditioned``.

    Args:
        key: split between the layers and the random permutations.

    Example:
        >>> layers = build_conditioned("nice", 2, 2, (8,), "relu", "random", key=jax.random.key(0))
        >>> [type(layer).__name__ for layer in layers]
        ['Coupling', 'Permute', 'Coupling', 'ElementwiseAffine']
    """
    keys = jax.random.split(key, num_layers + 1)
    blocks = [conditioned_layer(name, dim, hidden_dims, activation, key=k, **options) for k in keys[:-1]]
    layers = interleave(blocks, dim, permutation, keys[-1])
    return layers + [ElementwiseAffine(dim)] if SPECS[name].final_scale else layers


for _name in ("nice", "realnvp", "iaf", "maf", "naf", "nsf"):
    register_flow(_name)(lambda _n=_name, **kw: build_conditioned(_n, **kw))
