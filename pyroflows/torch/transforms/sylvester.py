"""Sylvester flows and Householder reflections.

Sylvester: van den Berg, Hasenclever, Tomczak & Welling 2018, arXiv:1803.05649.
Householder: Tomczak & Welling 2016, arXiv:1611.09630.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...structure import SYLVESTER_VARIANTS, sylvester_num_vectors
from ..flows import register_flow
from .base import ElementwiseAffine, FlowTransform, bisect_increasing, implicit_step
from .planar import _log_tanh_slope, _solver_tol

__all__ = ["Sylvester", "Householder"]

VARIANTS = SYLVESTER_VARIANTS


def _log_cosh(x):
    a = x.abs()
    return a + F.softplus(-2.0 * a) - math.log(2.0)


def reflect(x: torch.Tensor, vectors: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Apply ``H_1``, then ``H_2``, ... (``reverse``: ``H_K`` first) to ``x``.

    ``H_k = I - 2 v_k v_k^T / |v_k|^2`` for the rows ``v_k`` of ``vectors``. ``|v|^2`` is
    floored at the dtype's smallest normal number, so ``v = 0`` acts as the identity.

    Args:
        x: vectors of shape ``(..., dim)``.
        vectors: the reflection vectors, shape ``(K, dim)``.
        reverse: apply the reflections in reverse order (the inverse map).

    Returns:
        The reflected vectors, shape ``(..., dim)``.

    Example:
        >>> reflect(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([[-1.,  2.]])
    """
    sq = (vectors * vectors).sum(-1, keepdim=True)
    units = vectors / torch.sqrt(sq.clamp_min(torch.finfo(vectors.dtype).tiny))
    order = range(len(units) - 1, -1, -1) if reverse else range(len(units))
    for k in order:
        unit = units[k]
        x = x - 2.0 * (x @ unit).unsqueeze(-1) * unit
    return x


class Householder(FlowTransform):
    r"""A product of Householder reflections ``y = H_K ... H_1 x``, ``H_k = I - 2 v_k v_k^T / |v_k|^2``.

    Orthogonal, so log|det J| = 0. Inverse: exact, the same reflections in reverse
    order. ``|v|^2`` is floored at the smallest normal number of the dtype, so a vector
    at 0 gives the identity instead of 0/0.

    Args:
        dim: size of the vectors.
        num_reflections: ``K``, at least 1 (default ``dim``).

    Raises:
        ValueError: ``num_reflections`` below 1.

    References:
        Tomczak & Welling 2016, "Improving Variational Auto-Encoders using Householder
        Flow", arXiv:1611.09630.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = Householder(2, num_reflections=3)
        >>> q = layer.matrix()
        >>> bool(torch.allclose(q @ q.T, torch.eye(2), atol=1e-6)), layer.call_and_ladj(torch.ones(4, 2))[1].tolist()
        (True, [0.0, 0.0, 0.0, 0.0])
    """

    def __init__(self, dim: int, num_reflections: int | None = None):
        super().__init__(dim)
        self.num_reflections = dim if num_reflections is None else int(num_reflections)
        if self.num_reflections < 1:
            raise ValueError(f"num_reflections={num_reflections!r} must be a positive integer")
        # Gaussian vectors give a random orthogonal map.
        self.vectors = nn.Parameter(torch.randn(self.num_reflections, dim))

    def matrix(self) -> torch.Tensor:
        """The orthogonal matrix ``H_K ... H_1`` (for inspection and tests), shape ``(dim, dim)``."""
        eye = torch.eye(self.dim, dtype=self.vectors.dtype, device=self.vectors.device)
        return reflect(eye, self.vectors).transpose(0, 1)

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reflect(x, self.vectors), x.new_zeros(x.shape[:-1])

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reflect(y, self.vectors, reverse=True), y.new_zeros(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_reflections={self.num_reflections}"


class Sylvester(FlowTransform):
    r"""Sylvester flow ``y = x + Q R tanh(R~ Q^T x + b)`` (van den Berg et al. 2018).

    ``Q`` is ``dim x M`` with orthonormal
    columns; ``R`` and ``R~`` are ``M x M`` upper triangular with diagonals
    ``r_ii = tanh(p_i)`` and ``r~_ii = tanh(q_i)`` (as in the paper), so
    ``r_ii r~_ii > -1`` and the layer is invertible for every parameter value. By
    Sylvester's determinant identity

        log|det J| = sum_i log(1 + r_ii r~_ii tanh'(z_i)),   z = R~ Q^T x + b,

    evaluated as ``log(tanh^2 z_i + (1 + r_ii r~_ii) sech^2 z_i)`` with
    ``log(1 + tanh p tanh q) = log cosh(p + q) - log cosh p - log cosh q`` (no cancellation).

    ``variant`` chooses ``Q``:

    - ``"orthogonal"``: the first ``M = num_vectors`` (default ``dim``) columns of
      ``matrix_exp(S - S^T)``;
    - ``"householder"``: the product of ``dim`` Householder reflections (``M = dim``);
    - ``"triangular"``: the identity, or with ``reverse=True`` the reversal permutation
      (``M = dim``); stacks alternate the two so both triangles get mixed.

    Inverse: numerical. With ``v = Q^T x``, ``Q^T y = v + R tanh(R~ v + b)`` is an
    upper-triangular system; it is solved from the last coordinate to the first, each a
    scalar increasing equation ``v_i + r_ii tanh(r~_ii v_i + c_i) = s_i`` bracketed in
    ``[s_i - |r_ii|, s_i + |r_ii|]``, bisected to ``inverse_tol * (1 + |v_i|)`` (1e-10; at
    least 8 machine epsilons in lower precision) and refined by an implicit Newton step,
    one coordinate after another so the first derivatives are exact. Then
    ``x = y - Q R tanh(R~ v + b)``, which also restores the part of ``x`` outside the
    span of ``Q`` when ``M < dim``. Vectorised over the batch.

    Args:
        dim: size of the vectors.
        variant: ``"orthogonal"``, ``"householder"`` or ``"triangular"``.
        num_vectors: ``M`` for the orthogonal variant, in ``[1, dim]`` (default ``dim``).
        reverse: use the reversal permutation as ``Q`` (triangular variant).

    Raises:
        ValueError: an unknown variant, or a ``num_vectors`` out of range or given to
            another variant.

    References:
        van den Berg, Hasenclever, Tomczak & Welling 2018, "Sylvester Normalizing Flows
        for Variational Inference", arXiv:1803.05649.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = Sylvester(2, variant="orthogonal", num_vectors=1)
        >>> x = torch.randn(5, 2)
        >>> y, ladj = layer.call_and_ladj(x)
        >>> x_back, ildj = layer.inverse_and_ladj(y)
        >>> tuple(ladj.shape), bool(torch.allclose(x_back, x, atol=1e-5)), bool(torch.allclose(ildj, -ladj, atol=1e-5))
        ((5,), True, True)
    """

    numerical_inverse = True
    inverse_tol = 1e-10

    def __init__(self, dim: int, variant: str = "orthogonal", num_vectors: int | None = None, reverse: bool = False):
        super().__init__(dim)
        m = sylvester_num_vectors(dim, variant, num_vectors)
        self.variant, self.num_vectors, self.reverse = variant, m, bool(reverse)

        # Masks instead of torch.triu in the call path: triu costs milliseconds per call with
        # several CPU threads, a mask multiply microseconds.
        upper = torch.ones(m, m).triu(1)
        self.register_buffer("upper_mask", upper)
        if variant == "orthogonal":
            # A random skew matrix: Q starts as a random M-frame, not the coordinate axes.
            self.register_buffer("skew_mask", torch.ones(dim, dim).triu(1))
            self.skew = nn.Parameter(0.5 * torch.randn(dim, dim) * self.skew_mask)
        elif variant == "householder":
            self.vectors = nn.Parameter(torch.randn(dim, dim))
        else:
            eye = torch.eye(dim)
            self.register_buffer("q_fixed", eye.flip(1) if self.reverse else eye)

        # R~ sets the scale of the tanh arguments (order 1); R is small, so a fresh layer is
        # a mild perturbation of the identity.
        self.r_offdiag = nn.Parameter(0.1 * torch.randn(m, m) / math.sqrt(m) * upper)
        self.r_tilde_offdiag = nn.Parameter(torch.randn(m, m) / math.sqrt(m) * upper)
        self.raw_r_diag = nn.Parameter(0.1 * torch.randn(m))
        self.raw_r_tilde_diag = nn.Parameter(torch.ones(m))
        self.bias = nn.Parameter(torch.zeros(m))

    # --- parametrisation -----------------------------------------------------------
    def q(self) -> torch.Tensor:
        """``Q``, ``dim x M`` with orthonormal columns."""
        if self.variant == "orthogonal":
            upper = self.skew * self.skew_mask
            return torch.linalg.matrix_exp(upper - upper.transpose(0, 1))[:, : self.num_vectors]
        if self.variant == "householder":
            eye = torch.eye(self.dim, dtype=self.vectors.dtype, device=self.vectors.device)
            return reflect(eye, self.vectors)
        return self.q_fixed

    def triangles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(R, R~, log(1 + r_ii r~_ii))``."""
        p, q = self.raw_r_diag, self.raw_r_tilde_diag
        r = self.r_offdiag * self.upper_mask + torch.diag(torch.tanh(p))
        r_tilde = self.r_tilde_offdiag * self.upper_mask + torch.diag(torch.tanh(q))
        log_one_plus_d = _log_cosh(p + q) - _log_cosh(p) - _log_cosh(q)
        return r, r_tilde, log_one_plus_d

    # --- the map ---------------------------------------------------------------------
    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q()
        r, r_tilde, log_one_plus_d = self.triangles()
        z = (x @ q) @ r_tilde.transpose(0, 1) + self.bias
        y = x + (torch.tanh(z) @ r.transpose(0, 1)) @ q.transpose(0, 1)
        return y, _log_tanh_slope(z, torch.exp(log_one_plus_d)).sum(-1)

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q()
        r, r_tilde, log_one_plus_d = self.triangles()
        one_plus_d = torch.exp(log_one_plus_d)
        m = self.num_vectors
        t = y @ q
        tol = _solver_tol(self, y.dtype)
        vs, hs = [None] * m, [None] * m
        for i in range(m - 1, -1, -1):
            c = self.bias[i]
            s = t[..., i]
            if i < m - 1:
                later = torch.stack(vs[i + 1 :], -1)
                c = c + later @ r_tilde[i, i + 1 :]
                s = s - torch.stack(hs[i + 1 :], -1) @ r[i, i + 1 :]
            r_ii, rt_ii = r[i, i], r_tilde[i, i]
            with torch.no_grad():
                r_, rt_, c_ = r_ii.detach(), rt_ii.detach(), c.detach()
                spread = r_.abs()
                v0 = bisect_increasing(
                    lambda v: v + r_ * torch.tanh(rt_ * v + c_), s, tol=tol, lo=s - spread, hi=s + spread
                )
            z0 = rt_ii * v0 + c
            slope = torch.exp(_log_tanh_slope(z0, one_plus_d[i]))
            v = implicit_step(v0, v0 + r_ii * torch.tanh(z0), slope, s)
            vs[i] = v
            hs[i] = torch.tanh(rt_ii * v + c)
        v = torch.stack(vs, -1)
        z = v @ r_tilde.transpose(0, 1) + self.bias
        x = y - (torch.tanh(z) @ r.transpose(0, 1)) @ q.transpose(0, 1)
        return x, -_log_tanh_slope(z, one_plus_d).sum(-1)

    def extra_repr(self) -> str:
        extra = f", reverse={self.reverse}" if self.variant == "triangular" else ""
        return f"dim={self.dim}, variant={self.variant!r}, num_vectors={self.num_vectors}{extra}"


@register_flow("sylvester")
def sylvester(dim: int, num_layers: int, variant: str, num_vectors: int | None) -> list[Sylvester]:
    """The ``sylvester`` family: ``num_layers`` ``Sylvester`` layers of one variant.

    The triangular variant alternates ``Q = I`` and ``Q = reversal``, so both triangles
    get mixed.

    Example:
        >>> [layer.reverse for layer in sylvester(2, 2, "triangular", None)]
        [False, True]
    """
    return [
        Sylvester(dim, variant, num_vectors, reverse=(variant == "triangular" and i % 2 == 1))
        for i in range(num_layers)
    ]


@register_flow("householder")
def householder(dim: int, num_layers: int, num_reflections: int | None) -> list[FlowTransform]:
    """The ``householder`` family: an ``ElementwiseAffine`` map, then ``num_layers`` ``Householder`` layers.

    The affine map comes first (forward = noise to sample), so ``Q (loc + scale * x)``
    has a full covariance.

    Example:
        >>> [type(layer).__name__ for layer in householder(2, 1, None)]
        ['ElementwiseAffine', 'Householder']
    """
    return [ElementwiseAffine(dim)] + [Householder(dim, num_reflections) for _ in range(num_layers)]
