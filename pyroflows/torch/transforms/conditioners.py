"""Conditioners: the layers that give an element-wise transformer its parameters.

A family built from a conditioner and a transformer is named by its ``FlowSpec``
(``pyroflows.registry``): NICE is a coupling with an additive transformer, RealNVP a
coupling with an affine one, IAF and MAF masked autoregressive affine layers that read
their input and their output, NAF one with the deep sigmoidal transformer, NSF a
coupling or autoregressive spline. ``build_conditioned`` builds all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...registry import SPECS
from ..flows import register_flow
from ..nn import MADE, MLP
from .base import ElementwiseAffine, FlowTransform, interleave
from .transformers import TRANSFORMERS, Transformer

__all__ = ["Coupling", "MaskedAutoregressive", "build_conditioned"]


class _Conditioned(FlowTransform):
    """A layer whose element-wise ``transformer`` gets its parameters from a network."""

    @property
    def numerical_inverse(self) -> bool:
        """Whether the inverse is solved numerically (in either direction, per coordinate): the transformer's.

        Example:
            >>> from pyroflows.torch.transforms.transformers import DeepSigmoid
            >>> Coupling(2, DeepSigmoid(4), hidden_dims=(8,)).numerical_inverse
            True
        """
        return self.transformer.numerical_inverse

    @property
    def inverse_tol(self) -> float:
        """The relative tolerance of a numerical inverse: the transformer's (0 for a closed form).

        Example:
            >>> from pyroflows.torch.transforms.transformers import DeepSigmoid
            >>> MaskedAutoregressive(2, DeepSigmoid(4), hidden_dims=(8,)).inverse_tol
            1e-10
        """
        return self.transformer.inverse_tol


class Coupling(_Conditioned):
    """``y_a = x_a``, ``y_b = tau(x_b; theta(x_a))``: a coupling layer.

    The first ``dim // 2`` coordinates pass through and an MLP on them gives the
    transformer's parameters for the rest (``dim = 1``: a learned constant); builders
    permute between layers so the roles swap. The MLP's output is parameter-major
    (``num_params`` blocks of ``dim - dim // 2``) and starts at zero, so a fresh layer is
    the transformer at zero parameters. log|det J| = sum_b log tau'(x_b).

    Args:
        dim: the event size.
        transformer: the element-wise map, e.g. ``Affine()`` (RealNVP).
        hidden_dims: the MLP's hidden widths.
        activation: the MLP's non-linearity.
        context_dim: the size of the context of a conditional layer (0: none); the MLP
            reads ``x_a`` and the context.

    References:
        Dinh, Krueger & Bengio 2015, "NICE", arXiv:1410.8516; Dinh, Sohl-Dickstein &
        Bengio 2017, "Real NVP", arXiv:1605.08803.

    Example:
        >>> from pyroflows.torch.transforms.transformers import Affine
        >>> layer = Coupling(3, Affine(), hidden_dims=(8,))
        >>> y, ladj = layer.call_and_ladj(torch.ones(4, 3))
        >>> tuple(y.shape), tuple(ladj.shape)
        ((4, 3), (4,))
    """

    def __init__(
        self,
        dim: int,
        transformer: Transformer,
        hidden_dims: Sequence[int] = (64, 64),
        activation: str = "relu",
        context_dim: int = 0,
    ):
        super().__init__(dim)
        self.transformer, self.context_dim = transformer, int(context_dim)
        self.split = dim // 2
        out = transformer.num_params * (dim - self.split)
        self.conditioner = MLP(self.split + self.context_dim, hidden_dims, out, activation)

    def _map(self, v, inverse, context):
        va, vb = v[..., : self.split], v[..., self.split :]
        out = self.conditioner(va if context is None else torch.cat([va, context], -1)).unflatten(
            -1, (self.transformer.num_params, self.dim - self.split)
        )
        params = out.transpose(-1, -2)
        vb, logd = (self.transformer.inverse if inverse else self.transformer.forward)(vb, params)
        return torch.cat([va, vb], -1), logd.sum(-1)

    def call_and_ladj(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|)``: ``x_a`` kept, ``x_b`` transformed, in one pass (``context``: see ``Flow``).

        Example:
            >>> from pyroflows.torch.transforms.transformers import Additive
            >>> layer = Coupling(2, Additive(), hidden_dims=(8,))
            >>> y, ladj = layer.call_and_ladj(torch.tensor([[1.0, 2.0]]))
            >>> y.tolist(), ladj.tolist()  # a fresh layer is the identity
            ([[1.0, 2.0]], [0.0])
        """
        return self._map(x, False, context)

    def inverse_and_ladj(
        self, y: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|det dx/dy|)``: the same network pass, the transformer inverted.

        Example:
            >>> from pyroflows.torch.transforms.transformers import Affine
            >>> _ = torch.manual_seed(0)
            >>> layer = Coupling(2, Affine(), hidden_dims=(8,))
            >>> _ = torch.nn.init.normal_(layer.conditioner.net[-1].weight)  # leave the identity
            >>> x = torch.tensor([[0.3, -1.2]])
            >>> y, ladj = layer.call_and_ladj(x)
            >>> x_back, inv_ladj = layer.inverse_and_ladj(y)
            >>> bool(torch.allclose(x_back, x, atol=1e-6)), bool(torch.allclose(inv_ladj, -ladj))
            (True, True)
        """
        return self._map(y, True, context)

    def extra_repr(self) -> str:
        """The event size and the transformer, for the ``repr``.

        Example:
            >>> from pyroflows.torch.transforms.transformers import Affine
            >>> Coupling(3, Affine(), hidden_dims=(8,)).extra_repr()
            'dim=3, transformer=Affine(log_scale_bound=5.0)'
        """
        return f"dim={self.dim}, transformer={self.transformer}"


class MaskedAutoregressive(_Conditioned):
    """``y_i = tau(x_i; theta_i(v_<i))`` with ``theta`` from a MADE on ``v``: an autoregressive layer.

    ``reads="input"`` (``v = x``; IAF, NAF, autoregressive NSF): the forward (sampling)
    is one parallel MADE pass, the inverse solves the coordinates one after another.
    ``reads="output"`` (``v = y``; MAF): the inverse (density) is one parallel pass, the
    forward sequential. The sequential direction makes ``dim`` MADE passes on the
    solved prefix (zeros after it) and maps coordinate i with its parameters; solved
    columns are collected in a list, so autograd sees no in-place writes. The MADE's last
    layer starts at zero. log|det J| = sum_i log tau'(x_i).

    Args:
        dim: the event size.
        transformer: the element-wise map, e.g. ``Affine()`` (IAF, MAF).
        hidden_dims: the MADE's hidden widths.
        activation: the MADE's non-linearity.
        reads: ``"input"`` or ``"output"``: the side the MADE reads.
        context_dim: the size of the context of a conditional layer (0: none); every
            coordinate's parameters may read it.

    References:
        Kingma et al. 2016 (IAF), arXiv:1606.04934; Papamakarios, Pavlakou & Murray 2017
        (MAF), arXiv:1705.07057; Germain et al. 2015 (MADE), arXiv:1502.03509.

    Example:
        >>> from pyroflows.torch.transforms.transformers import Affine
        >>> layer = MaskedAutoregressive(3, Affine(), hidden_dims=(8,), reads="output")
        >>> x, _ = layer.inverse_and_ladj(torch.ones(4, 3))
        >>> tuple(x.shape)
        (4, 3)
    """

    autoregressive = True

    def __init__(
        self,
        dim: int,
        transformer: Transformer,
        hidden_dims: Sequence[int] = (64, 64),
        activation: str = "relu",
        reads: str = "input",
        context_dim: int = 0,
    ):
        if reads not in ("input", "output"):
            raise ValueError(f"reads={reads!r} is not one of ['input', 'output']")
        super().__init__(dim)
        self.transformer, self.reads, self.context_dim = transformer, reads, int(context_dim)
        self.made = MADE(dim, hidden_dims, transformer.num_params, activation, self.context_dim)

    def get_permutation(self) -> torch.Tensor:
        """The order in which coordinates are generated: the natural one (builders permute between layers).

        Example:
            >>> from pyroflows.torch.transforms.transformers import Affine
            >>> MaskedAutoregressive(3, Affine(), hidden_dims=(8,)).get_permutation().tolist()
            [0, 1, 2]
        """
        return torch.arange(self.dim)

    def _parallel(self, v, inverse, context):
        out, logd = (self.transformer.inverse if inverse else self.transformer.forward)(v, self.made(v, context))
        return out, logd.sum(-1)

    def _sequential(self, given, inverse, context):
        """Solve for the side the MADE reads, one coordinate at a time (``dim`` MADE passes)."""
        step = self.transformer.inverse if inverse else self.transformer.forward
        cols, logds = [], []
        for i in range(self.dim):
            rest = given.new_zeros(given.shape[:-1] + (self.dim - i,))
            prefix = torch.cat([*cols, rest], -1) if cols else rest
            out, logd = step(given[..., i], self.made(prefix, context)[..., i, :])
            cols.append(out.unsqueeze(-1))
            logds.append(logd)
        return torch.cat(cols, -1), torch.stack(logds, -1).sum(-1)

    def call_and_ladj(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|)``: one MADE pass with ``reads="input"``, ``dim`` passes with ``"output"``.

        Example:
            >>> from pyroflows.torch.transforms.transformers import Affine
            >>> _ = torch.manual_seed(0)
            >>> layer = MaskedAutoregressive(3, Affine(), hidden_dims=(8,), reads="output")
            >>> _ = torch.nn.init.normal_(layer.made.net[-1].weight)  # leave the identity
            >>> x = torch.tensor([[0.3, -1.2, 0.5]])
            >>> y, ladj = layer.call_and_ladj(x)  # sequential: MAF samples one coordinate at a time
            >>> x_back, inv_ladj = layer.inverse_and_ladj(y)
            >>> bool(torch.allclose(x_back, x, atol=1e-5)), bool(torch.allclose(inv_ladj, -ladj, atol=1e-5))
            (True, True)
        """
        return self._parallel(x, False, context) if self.reads == "input" else self._sequential(x, False, context)

    def inverse_and_ladj(
        self, y: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|det dx/dy|)``: one MADE pass with ``reads="output"``, ``dim`` passes with ``"input"``.

        Example:
            >>> from pyroflows.torch.transforms.transformers import Affine
            >>> layer = MaskedAutoregressive(2, Affine(), hidden_dims=(8,))
            >>> x, ladj = layer.inverse_and_ladj(torch.tensor([[1.0, 2.0]]))
            >>> x.tolist(), ladj.tolist()  # a fresh layer is the identity
            ([[1.0, 2.0]], [0.0])
        """
        return self._parallel(y, True, context) if self.reads == "output" else self._sequential(y, True, context)

    def extra_repr(self) -> str:
        """The event size, the transformer and the side the MADE reads, for the ``repr``.

        Example:
            >>> from pyroflows.torch.transforms.transformers import Affine
            >>> MaskedAutoregressive(2, Affine(), hidden_dims=(8,), reads="output").extra_repr()
            "dim=2, transformer=Affine(log_scale_bound=5.0), reads='output'"
        """
        return f"dim={self.dim}, transformer={self.transformer}, reads={self.reads!r}"


def conditioned_layer(
    name: str, dim: int, hidden_dims: Sequence[int], activation: str, context_dim: int = 0, **options: Any
) -> FlowTransform:
    """One layer of the conditioner x transformer family ``name``, as its ``FlowSpec`` says.

    ``options`` are the transformer's, plus ``conditioner`` (``"coupling"`` or
    ``"autoregressive"``) where the family lets the user choose.

    Example:
        >>> conditioned_layer("maf", 2, (8,), "relu").extra_repr()
        "dim=2, transformer=Affine(log_scale_bound=5.0), reads='output'"
    """
    spec = SPECS[name]
    kind = options.pop("conditioner", spec.conditioner)
    transformer = TRANSFORMERS[spec.transformer](**options)
    if kind == "coupling":
        return Coupling(dim, transformer, hidden_dims, activation, context_dim)
    return MaskedAutoregressive(dim, transformer, hidden_dims, activation, spec.reads, context_dim)


def build_conditioned(
    name: str, dim: int, num_layers: int, hidden_dims: Sequence[int], activation: str, permutation: str, **options: Any
) -> list[FlowTransform]:
    """The layers of a conditioner x transformer family: ``num_layers`` layers with permutations between.

    ``build_flow`` calls it for ``nice``, ``realnvp``, ``iaf``, ``maf``, ``naf`` and ``nsf``
    (and ``glow`` builds its coupling with ``conditioned_layer``); a family whose spec
    sets ``final_scale`` (NICE) ends with an ``ElementwiseAffine``.

    Args:
        name: the family, a key of ``pyroflows.registry.SPECS``.
        dim: the event size.
        num_layers: the number of conditioned layers.
        hidden_dims: widths of the conditioner networks.
        activation: their non-linearity.
        permutation: ``"reverse"`` or ``"random"``, between layers.
        **options: the transformer's options (e.g. ``count_bins``), and ``conditioner``
            where the family has the choice.

    Returns:
        The layers, in the forward order.

    Example:
        >>> layers = build_conditioned("nice", 2, 2, (8,), "relu", "reverse")
        >>> [type(layer).__name__ for layer in layers]
        ['Coupling', 'Permute', 'Coupling', 'ElementwiseAffine']
    """
    blocks = [conditioned_layer(name, dim, hidden_dims, activation, **options) for _ in range(num_layers)]
    layers = interleave(blocks, dim, permutation)
    return layers + [ElementwiseAffine(dim)] if SPECS[name].final_scale else layers


for _name in ("nice", "realnvp", "iaf", "maf", "naf", "nsf"):
    register_flow(_name)(lambda _n=_name, **kw: build_conditioned(_n, **kw))
