"""Residual flows: invertible residual blocks whose log-determinant is a power series.

i-ResNet: Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen 2019, arXiv:1811.00995.
Residual Flows: Chen, Behrmann, Duvenaud & Jacobsen 2019, arXiv:1906.02735.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ...registry import residual_block_options as block_options
from ..flows import register_flow
from ..nn import LipschitzMLP
from .base import ElementwiseAffine, FlowTransform

__all__ = ["ResidualBlock"]


def _detached(weights):
    linear, betas = weights
    return [(w.detach(), b.detach()) for w, b in linear], [b.detach() for b in betas]


class ResidualBlock(FlowTransform):
    r"""An invertible residual block ``x = y + g(y)`` from data ``y`` to noise ``x``.

    ``g`` is a ``LipschitzMLP``: spectrally normalised linear layers (each of norm at
    most ``lipschitz`` < 1) and 1-Lipschitz LipSwish activations, so ``Lip(g) < 1`` and
    ``y -> y + g(y)`` is a bijection of R^d (Behrmann et al. 2019).

    Direction: the explicit residual map is ``inverse_and_ladj`` (data to noise), so
    density evaluation (``log_prob``, maximum likelihood) is one pass. The forward
    (noise to data, sampling) solves ``y + g(y) = x`` by the fixed-point iteration
    ``y <- x - g(y)`` (a contraction), started at ``x``, until every step is below
    ``inverse_tol * (1 + |y|)`` (at least 8 machine epsilons) or ``max_inverse_iter``
    steps; the error is then at most ``Lip / (1 - Lip)`` times the last step. One Newton
    step with the dense Jacobian, held fixed, follows: it refines the root and gives
    exact first derivatives (implicit function theorem).

    Log-determinant ``log det(I + J_g) = sum_{k>=1} (-1)^(k+1) tr(J_g^k) / k``
    (``estimator``):

    - ``"exact"``: the dense ``log det(I + J_g)``; ``J_g`` is written out from the
      weights and the activation slopes (``dim`` columns; small dims).
    - ``"truncated"``: the first ``num_terms`` terms with ``tr(A) ~ v^T A v`` for one probe
      ``v`` per vector (Hutchinson; ``noise`` Gaussian or Rademacher). Biased by the
      dropped tail (i-ResNet).
    - ``"roulette"``: ``N = num_terms + M`` terms, ``M ~ Geometric(roulette_p)`` on
      {0, 1, ...}, term ``k`` divided by ``P(N >= k) = (1 - p)^max(0, k - num_terms)``:
      unbiased for the whole series (Chen et al. 2019). ``N`` and ``v``
      are drawn per vector from torch's global generator.

    With ``neumann_gradient=True`` the series runs without a graph and the gradient comes
    from Chen et al.'s Neumann-series estimator of ``tr((I + J_g)^-1 dJ_g)``, with the
    same ``N`` and ``v``: ``v^T d(J_g) w`` with ``w = sum_k c_k (-1)^(k+1) J_g^(k-1) v``.
    Memory no longer grows with the number of terms; the value is unchanged.

    Args:
        dim: size of the vectors.
        hidden_dims: hidden widths of ``g``.
        **options: ``estimator``, ``num_terms``, ``roulette_p``, ``noise``,
            ``neumann_gradient``, ``lipschitz``, ``power_iterations``, ``inverse_tol``,
            ``max_inverse_iter``; defaults and checks in ``pyroflows.registry.SPECS["residual"]``.

    Raises:
        ValueError: an unknown option or a bad value (``pyroflows.registry``).

    References:
        Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen 2019, "Invertible Residual
        Networks", arXiv:1811.00995.
        Chen, Behrmann, Duvenaud & Jacobsen 2019, "Residual Flows for Invertible
        Generative Modeling", arXiv:1906.02735.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> block = ResidualBlock(2, (8,), estimator="exact").double()
        >>> y = torch.randn(5, 2, dtype=torch.float64)
        >>> x, ildj = block.inverse_and_ladj(y)  # data -> noise, one pass
        >>> y_back, ladj = block.call_and_ladj(x)  # noise -> data, fixed-point iteration
        >>> tuple(ildj.shape), bool(torch.allclose(y_back, y, atol=1e-8)), bool(torch.allclose(ladj, -ildj, atol=1e-8))
        ((5,), True, True)
    """

    numerical_inverse = True

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (64, 64), **options: Any):
        super().__init__(dim)
        opts = block_options(**options)
        self.estimator, self.num_terms, self.noise = opts["estimator"], opts["num_terms"], opts["noise"]
        self.roulette_p, self.neumann_gradient = opts["roulette_p"], opts["neumann_gradient"]
        self.inverse_tol, self.max_inverse_iter = opts["inverse_tol"], opts["max_inverse_iter"]
        self.g = LipschitzMLP(dim, hidden_dims, opts["lipschitz"], opts["power_iterations"])

    @property
    def is_stochastic(self) -> bool:
        """Whether the log-determinant draws noise (every estimator but ``"exact"``)."""
        return self.estimator != "exact"

    def extra_repr(self) -> str:
        return f"dim={self.dim}, estimator={self.estimator!r}, num_terms={self.num_terms}"

    # --- log-determinant -----------------------------------------------------------------
    def _probe(self, y):
        if self.noise == "gaussian":
            return torch.randn(y.shape, dtype=y.dtype, device=y.device)
        return torch.randint(0, 2, y.shape, device=y.device).to(y.dtype) * 2 - 1

    def _series_weights(self, y):
        """Per-term weights ``k -> (..., )`` tensors (or 1.0) and the number of terms to run."""
        n = self.num_terms
        if self.estimator == "truncated":
            return (lambda k: 1.0), n
        log_q = math.log1p(-self.roulette_p)
        u = 1.0 - torch.rand(y.shape[:-1], dtype=y.dtype, device=y.device)  # in (0, 1]
        terms = n + torch.floor(torch.log(u) / log_q)  # n + Geometric(p) on {0, 1, ...}
        longest = int(terms.max()) if terms.numel() else n

        def weight(k):
            return (k <= terms).to(y.dtype) * math.exp(-max(0, k - n) * log_q)  # [k <= N] / P(N >= k)

        return weight, longest

    def _series(self, weights, slopes, y):
        jvp = LipschitzMLP.jvp
        v = self._probe(y)
        weight, num = self._series_weights(y)
        neumann = self.neumann_gradient and torch.is_grad_enabled()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not neumann):
            value, w, power = 0.0, 0.0, v
            for k in range(1, num + 1):
                c = weight(k) * (1.0 if k % 2 else -1.0)
                if neumann:
                    w = w + (c.unsqueeze(-1) if torch.is_tensor(c) else c) * power
                power = jvp(weights, slopes, power)
                value = value + c * (v * power).sum(-1) / k
        if neumann:
            surrogate = (v * jvp(weights, slopes, w)).sum(-1)
            value = value + (surrogate - surrogate.detach())
        return value

    def _residual_and_log_det(self, y, weights):
        """``g(y)`` and ``log det(I + J_g(y))`` (estimated unless ``estimator="exact"``)."""
        out, slopes = self.g.forward_and_slopes(y, weights)
        if self.estimator == "exact":
            eye = torch.eye(self.dim, dtype=y.dtype, device=y.device)
            return out, torch.linalg.slogdet(eye + LipschitzMLP.jacobian(weights, slopes))[1]
        return out, self._series(weights, slopes, y)

    # --- the two directions -----------------------------------------------------------
    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, log_det = self._residual_and_log_det(y, self.g.weights())
        return y + out, log_det

    def _fixed_point(self, x, weights):
        tol = max(self.inverse_tol, 8 * torch.finfo(x.dtype).eps)
        with torch.no_grad():
            x = x.detach()
            y = x
            for _ in range(self.max_inverse_iter):
                new = x - self.g.forward_and_slopes(y, weights, slopes=False)[0]
                converged = bool(((new - y).abs() <= tol * (1 + new.abs())).all())
                y = new
                if converged:
                    break
        return y

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.g.weights()
        fixed = _detached(weights)
        root = self._fixed_point(x, fixed)
        out, slopes = self.g.forward_and_slopes(root, weights)
        with torch.no_grad():
            eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
            newton = eye + LipschitzMLP.jacobian(fixed, [s.detach() for s in slopes])
        y = root - torch.linalg.solve(newton, (root + out - x).unsqueeze(-1)).squeeze(-1)
        return y, -self._residual_and_log_det(y, weights)[1]


@register_flow("residual")
def residual(dim: int, num_layers: int, hidden_dims: Sequence[int], **options: Any) -> list[FlowTransform]:
    """The ``residual`` family: ``num_layers`` pairs of ``ResidualBlock`` and ``ElementwiseAffine``.

    Read from data to noise, each block follows an elementwise affine map (the ActNorm
    of Chen et al.), which sets the scale the contraction ``g`` works at.

    Example:
        >>> [type(layer).__name__ for layer in residual(2, 1, (8,), estimator="exact")]
        ['ResidualBlock', 'ElementwiseAffine']
    """
    layers = []
    for _ in range(num_layers):
        layers += [ResidualBlock(dim, hidden_dims, **options), ElementwiseAffine(dim)]
    return layers
