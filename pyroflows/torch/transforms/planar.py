"""Planar and radial flows: one-unit residual maps whose Jacobian determinant is a scalar.

Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows", arXiv:1505.05770.
Both layers move every point along one direction (planar) or one radius (radial), so the
matrix determinant lemma gives log|det J| in O(dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..flows import register_flow
from .base import FlowTransform, bisect_increasing, implicit_step

__all__ = ["Planar", "Radial"]

#: Positive quantities (softplus outputs) are kept at or above this, so that a layer
#: never becomes exactly singular when a raw parameter runs off to -infinity.
_FLOOR = 1e-6
#: |w|^2 is floored at this before dividing by it, so that w = 0 gives the identity, not 0/0.
_W_EPS = 1e-12


def _solver_tol(layer, dtype):
    # Bisection cannot resolve below the dtype's spacing; the implicit Newton step after
    # it recovers most of the remaining digits.
    return max(layer.inverse_tol, 8 * torch.finfo(dtype).eps)


def _safe_log(x):
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def _log_tanh_slope(z, one_plus_c):
    """``log(1 + c tanh'(z))`` as ``log(tanh^2 z + (1 + c) sech^2 z)``, accurate near ``c = -1`` (Sylvester too)."""
    th2 = torch.tanh(z).square()
    return _safe_log(th2 + one_plus_c * (1.0 - th2))


class Planar(FlowTransform):
    r"""Planar flow ``y = x + u_hat * tanh(w.x + b)`` (Rezende & Mohamed 2015).

    The raw ``u`` is mapped to

        u_hat = u + (m(w.u) - w.u) w / |w|^2,   m(a) = -1 + softplus(a),

    so ``w.u_hat = m(w.u) > -1`` and the map is invertible for every value of the
    parameters (softplus is floored at 1e-6, and ``|w|^2`` at 1e-12 so that ``w = 0`` is
    the identity). The log-determinant is

        log|det J| = log(1 + (w.u_hat) tanh'(w.x + b))
                   = log(tanh^2(z) + (1 + w.u_hat) sech^2(z)),   z = w.x + b,

    written as a sum of non-negative terms so it stays accurate when ``w.u_hat`` is
    near -1.

    Inverse: numerical. Along ``w`` the map is the scalar increasing equation
    ``w.y = a + (w.u_hat) tanh(a + b)`` in ``a = w.x``; it is bracketed in
    ``[w.y - |w.u_hat|, w.y + |w.u_hat|]``, bisected to ``inverse_tol * (1 + |a|)``
    (1e-10; at least 8 machine epsilons in lower precision), refined by one implicit
    Newton step (exact first derivatives), and then ``x = y - u_hat tanh(a + b)``.

    Args:
        dim: size of the vectors.

    References:
        Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
        arXiv:1505.05770, appendix A.1.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = Planar(2)
        >>> x = torch.randn(5, 2)
        >>> y, ladj = layer.call_and_ladj(x)
        >>> x_back, ildj = layer.inverse_and_ladj(y)
        >>> tuple(y.shape), tuple(ladj.shape), bool(torch.allclose(x_back, x, atol=1e-5))
        ((5, 2), (5,), True)
    """

    numerical_inverse = True
    inverse_tol = 1e-10

    def __init__(self, dim: int):
        super().__init__(dim)
        w = torch.randn(dim)
        w = w / w.norm().clamp_min(1e-3)
        v = 0.1 * torch.randn(dim) / math.sqrt(dim)
        # Start at u_hat = (the part of v orthogonal to w): m(w.u) = 0 needs w.u = log(e - 1),
        # so a fresh layer is a small volume-preserving shear, close to the identity.
        a0 = math.log(math.e - 1.0)
        u = v - (w @ v) * w + a0 * w
        self.u = nn.Parameter(u)
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(()))

    def constrained(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_hat, 1 + w.u_hat)``, the second computed without cancellation."""
        w, u = self.w, self.u
        a = w @ u
        w_sq = w @ w
        denom = w_sq.clamp_min(_W_EPS)
        sp = F.softplus(a).clamp_min(_FLOOR)
        u_hat = u + ((sp - 1.0) - a) / denom * w
        # 1 + w.u_hat = (1 + a) (1 - s) + softplus(a) s with s = |w|^2 / max(|w|^2, eps),
        # which is softplus(a) itself (no cancellation) unless |w|^2 < eps.
        one_plus_c = (1.0 + a) * ((denom - w_sq) / denom) + sp * (w_sq / denom)
        return u_hat, one_plus_c

    def u_hat(self) -> torch.Tensor:
        """The constrained ``u_hat`` (``w.u_hat > -1``), shape ``(dim,)``."""
        return self.constrained()[0]

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u_hat, one_plus_c = self.constrained()
        z = x @ self.w + self.b
        y = x + torch.tanh(z).unsqueeze(-1) * u_hat
        return y, _log_tanh_slope(z, one_plus_c)

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u_hat, one_plus_c = self.constrained()
        c = one_plus_c - 1.0
        target = y @ self.w
        b = self.b

        def g(a):
            return a + c * torch.tanh(a + b)

        with torch.no_grad():
            c_, b_ = c.detach(), b.detach()
            spread = c_.abs()
            a0 = bisect_increasing(
                lambda a: a + c_ * torch.tanh(a + b_),
                target,
                tol=_solver_tol(self, y.dtype),
                lo=target - spread,
                hi=target + spread,
            )
        slope = torch.exp(_log_tanh_slope(a0 + b, one_plus_c))
        a = implicit_step(a0, g(a0), slope, target)
        x = y - torch.tanh(a + b).unsqueeze(-1) * u_hat
        return x, -_log_tanh_slope(a + b, one_plus_c)


class Radial(FlowTransform):
    r"""Radial flow ``y = x + beta_hat h(r) (x - x0)``, ``r = |x - x0|``, ``h(r) = 1 / (alpha + r)``.

    Rezende & Mohamed 2015 (appendix A.2). ``alpha = softplus(raw_alpha)``
    and ``beta_hat = -alpha + softplus(raw_beta)`` (both softplus outputs floored at 1e-6),
    so ``beta_hat > -alpha`` and the radius map ``r -> r (1 + beta_hat h(r))`` is increasing:
    the layer is invertible for every parameter value. With ``s = alpha + beta_hat`` the
    log-determinant is

        (dim - 1) log(1 + beta_hat h) + log(1 + beta_hat h + beta_hat h'(r) r)
        = (dim - 1) log((r + s) / (alpha + r)) + log((r (r + 2 alpha) + alpha s) / (alpha + r)^2),

    a form with no cancellation.

    Inverse: exact, in closed form. ``r_y = |y - x0|`` satisfies ``r^2 + (s - r_y) r - alpha r_y = 0``;
    its non-negative root is taken with the cancellation-free branch of the quadratic
    formula, and ``x = x0 + (y - x0) (alpha + r) / (r + s)``, which needs no division by
    ``r_y`` and so is exact at ``y = x0``.

    Args:
        dim: size of the vectors.

    References:
        Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
        arXiv:1505.05770, appendix A.2.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = Radial(2)
        >>> x = torch.randn(5, 2)
        >>> y, ladj = layer.call_and_ladj(x)
        >>> x_back, ildj = layer.inverse_and_ladj(y)
        >>> tuple(ladj.shape), bool(torch.allclose(x_back, x, atol=1e-5)), bool(torch.allclose(ildj, -ladj, atol=1e-5))
        ((5,), True, True)
    """

    def __init__(self, dim: int):
        super().__init__(dim)
        self.x0 = nn.Parameter(torch.randn(dim))
        self.raw_alpha = nn.Parameter(torch.zeros(()))
        # raw_beta near raw_alpha gives beta_hat near 0: a mild radial contraction or expansion.
        self.raw_beta = nn.Parameter(0.1 * torch.randn(()))

    def constrained(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, beta_hat, s = alpha + beta_hat)``."""
        alpha = F.softplus(self.raw_alpha).clamp_min(_FLOOR)
        s = F.softplus(self.raw_beta).clamp_min(_FLOOR)
        return alpha, s - alpha, s

    def _ladj(self, r, alpha, s):
        log_ar = torch.log(alpha + r)
        radial = torch.log(r * (r + 2.0 * alpha) + alpha * s) - 2.0 * log_ar
        return (self.dim - 1) * (torch.log(r + s) - log_ar) + radial

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, beta, s = self.constrained()
        diff = x - self.x0
        r = torch.linalg.vector_norm(diff, dim=-1)
        y = x + (beta / (alpha + r)).unsqueeze(-1) * diff
        return y, self._ladj(r, alpha, s)

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, _, s = self.constrained()
        diff = y - self.x0
        r_y = torch.linalg.vector_norm(diff, dim=-1)
        # Root of r^2 + B r - alpha r_y = 0 with B = s - r_y. Each branch sees only the
        # sign of B it is accurate for, so neither can divide by zero (nor leak NaN grads).
        B = s - r_y
        B_pos, B_neg = B.clamp_min(0.0), B.clamp_max(0.0)
        four_ac = 4.0 * alpha * r_y
        r_pos = 2.0 * alpha * r_y / (B_pos + torch.sqrt(B_pos.square() + four_ac))
        use_pos = B >= 0
        # The unused branch gets +1 under its square root: at y = x0 it would be sqrt(0).
        r_neg = 0.5 * (torch.sqrt(B_neg.square() + four_ac + use_pos.to(B.dtype)) - B_neg)
        r = torch.where(use_pos, r_pos, r_neg)
        x = self.x0 + ((alpha + r) / (r + s)).unsqueeze(-1) * diff
        return x, -self._ladj(r, alpha, s)


@register_flow("planar")
def planar(dim: int, num_layers: int) -> list[Planar]:
    """The ``planar`` family: ``num_layers`` ``Planar`` layers (``build_flow("planar", dim)``).

    Example:
        >>> [type(layer).__name__ for layer in planar(2, 2)]
        ['Planar', 'Planar']
    """
    return [Planar(dim) for _ in range(num_layers)]


@register_flow("radial")
def radial(dim: int, num_layers: int) -> list[Radial]:
    """The ``radial`` family: ``num_layers`` ``Radial`` layers (``build_flow("radial", dim)``).

    Example:
        >>> [type(layer).__name__ for layer in radial(2, 2)]
        ['Radial', 'Radial']
    """
    return [Radial(dim) for _ in range(num_layers)]
