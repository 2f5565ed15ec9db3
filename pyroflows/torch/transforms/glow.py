"""Glow's step of flow: ActNorm, an LU-parametrised invertible linear map, affine coupling.

Kingma & Dhariwal 2018, arXiv:1807.03039, for vectors: the 1x1 convolution becomes a
``dim x dim`` matrix ``W = P L (U + diag(sign * exp(log_s)))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..flows import register_flow
from .base import ElementwiseAffine, FlowTransform, soft_clamp
from .conditioners import conditioned_layer

__all__ = ["ActNorm", "InvertibleLinear"]


class ActNorm(ElementwiseAffine):
    """Per-coordinate affine map ``y = loc + exp(log_scale) * x`` with data-dependent initialisation.

    The first inverse call in training mode on a batch of two or more points (the data
    side, as in maximum likelihood) sets ``loc`` and ``log_scale`` so that the inverse
    maps that batch to zero mean and unit variance per coordinate. A forward call first,
    or a loaded state dict, marks it initialised without touching the weights (the
    buffer ``initialized`` records it).

    Args:
        dim: the event size.
        log_scale_bound: the bound on ``|log_scale|``.

    References:
        Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1
        Convolutions", arXiv:1807.03039.

    Example:
        >>> layer = ActNorm(2)
        >>> data = torch.tensor([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]])
        >>> z, _ = layer.inverse_and_ladj(data)  # the first inverse call initialises
        >>> [round(v, 4) for v in z.mean(0).tolist()], [round(v, 4) for v in z.std(0).tolist()]
        ([0.0, 0.0], [1.0, 1.0])
    """

    def __init__(self, dim: int, log_scale_bound: float = 5.0):
        super().__init__(dim, log_scale_bound)
        self.register_buffer("initialized", torch.tensor(False))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Loaded weights are someone's choice (a JAX flow trained without initialize_actnorm
        # saves initialized=False): never overwrite them from data.
        self.initialized.fill_(True)

    def initialize(self, y: torch.Tensor) -> None:
        """Set the weights from data ``y`` of shape ``(n, dim)`` (or any batch shape), in place.

        ``loc`` becomes the mean and ``log_scale`` the log standard deviation (clamped
        inside the bound) of each coordinate.

        Example:
            >>> layer = ActNorm(2)
            >>> layer.initialize(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
            >>> layer.loc.tolist(), bool(layer.initialized)
            ([2.0, 2.0], True)
        """
        with torch.no_grad():
            flat = y.detach().reshape(-1, self.dim)
            log_std = torch.log(flat.std(0).clamp_min(1e-6))
            bound = 0.99 * self.log_scale_bound
            log_std = log_std.clamp(-bound, bound)
            self.loc.copy_(flat.mean(0))
            self.unconstrained_log_scale.copy_(self.log_scale_bound * torch.atanh(log_std / self.log_scale_bound))
            self.initialized.fill_(True)

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map and its log-det; marks the layer initialised, weights unchanged.

        Example:
            >>> layer = ActNorm(2)
            >>> y, _ = layer.call_and_ladj(torch.ones(3, 2))
            >>> y.tolist()[0], bool(layer.initialized)
            ([1.0, 1.0], True)
        """
        if not self.initialized:
            self.initialized.fill_(True)
        return super().call_and_ladj(x)

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse and its log-det; the first call in training mode on two or more points initialises.

        Example:
            >>> layer = ActNorm(1).eval()  # no initialisation outside training mode
            >>> layer.inverse_and_ladj(torch.tensor([[5.0], [7.0]]))[0].tolist()
            [[5.0], [7.0]]
        """
        if not self.initialized:
            if self.training and y.reshape(-1, self.dim).shape[0] > 1:
                self.initialize(y)
            else:
                self.initialized.fill_(True)
        return super().inverse_and_ladj(y)


class InvertibleLinear(FlowTransform):
    """``y = W x`` with ``W = P L (U + diag(sign * exp(log_s)))`` (Glow's LU parametrisation).

    ``P`` and the signs of the diagonal are fixed, ``L`` is unit lower triangular, ``U`` strictly upper
    triangular; log|det W| = sum(log_s), with ``log_s`` soft-clamped to ``(-bound, bound)``.
    Initialised at a random rotation (from torch's global generator), so both directions
    cost ``O(dim^2)`` per point: a product, or two triangular solves.

    Args:
        dim: the event size.
        log_scale_bound: the bound on ``|log_s|``.

    References:
        Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1
        Convolutions", arXiv:1807.03039.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = InvertibleLinear(3)
        >>> _, ladj = layer.call_and_ladj(torch.zeros(1, 3))
        >>> bool(torch.isclose(ladj[0], torch.linalg.slogdet(layer.weight())[1], atol=1e-5))
        True
    """

    def __init__(self, dim: int, log_scale_bound: float = 5.0):
        super().__init__(dim)
        self.log_scale_bound = float(log_scale_bound)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        log_s = torch.log(diag.abs()).clamp(-0.99 * log_scale_bound, 0.99 * log_scale_bound)
        self.register_buffer("permutation", p.float())
        self.register_buffer("diag_sign", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        # Masks rather than torch.tril/triu per call: those are slow under thread contention.
        self.register_buffer("upper_mask", torch.triu(torch.ones(dim, dim), 1))
        self.lower = nn.Parameter(lower.float() * self.lower_mask)
        self.upper = nn.Parameter((upper * self.upper_mask).float())
        self.unconstrained_log_s = nn.Parameter((log_scale_bound * torch.atanh(log_s / log_scale_bound)).float())

    def _factors(self):
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        log_s = soft_clamp(self.unconstrained_log_s, self.log_scale_bound)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.upper_mask + torch.diag(self.diag_sign * torch.exp(log_s))
        return lower, upper, log_s

    def weight(self) -> torch.Tensor:
        """The matrix ``W = P L U``, shape ``(dim, dim)``.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> w = InvertibleLinear(2).weight()  # a rotation at initialisation
            >>> bool(torch.allclose(w @ w.T, torch.eye(2), atol=1e-5))
            True
        """
        lower, upper, _ = self._factors()
        return self.permutation @ lower @ upper

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W x, sum(log_s))``.

        Example:
            >>> y, ladj = InvertibleLinear(2).call_and_ladj(torch.zeros(4, 2))
            >>> tuple(y.shape), tuple(ladj.shape)
            ((4, 2), (4,))
        """
        lower, upper, log_s = self._factors()
        y = x @ (self.permutation @ lower @ upper).transpose(-1, -2)
        return y, log_s.sum().expand(x.shape[:-1])

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W^-1 y, -sum(log_s))`` by two triangular solves.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> layer = InvertibleLinear(3)
            >>> x = torch.tensor([[0.3, -1.2, 0.5]])
            >>> bool(torch.allclose(layer.inverse_and_ladj(layer(x))[0], x, atol=1e-5))
            True
        """
        lower, upper, log_s = self._factors()
        # x = U^-1 L^-1 P^T y, solved on row vectors: x^T = y^T P L^-T U^-T.
        rows = y.reshape(-1, self.dim) @ self.permutation
        rows = torch.linalg.solve_triangular(lower.transpose(0, 1), rows, upper=True, left=False, unitriangular=True)
        rows = torch.linalg.solve_triangular(upper.transpose(0, 1), rows, upper=False, left=False)
        return rows.reshape(y.shape), (-log_s.sum()).expand(y.shape[:-1])


@register_flow("glow")
def glow(dim: int, num_layers: int, hidden_dims: Sequence[int], activation: str, **options: Any) -> list[FlowTransform]:
    """The layers of ``build_flow("glow", ...)``: ``num_layers`` steps of coupling, linear map, ActNorm.

    ``options``: ``log_scale_bound`` (of all three layers) and ``context_dim`` (of the coupling).

    Example:
        >>> [type(layer).__name__ for layer in glow(2, 1, (8,), "relu", log_scale_bound=5.0)]
        ['Coupling', 'InvertibleLinear', 'ActNorm']
    """
    layers = []
    for _ in range(num_layers):
        # Forward order, noise to data: the inverse (data side) meets ActNorm first, as in Glow.
        layers += [
            conditioned_layer("glow", dim, hidden_dims, activation, **options),
            InvertibleLinear(dim, options["log_scale_bound"]),
            ActNorm(dim, options["log_scale_bound"]),
        ]
    return layers
