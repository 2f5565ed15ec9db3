"""Neural spline flows: monotone rational-quadratic splines with linear tails.

Durkan, Bekasov, Murray & Papamakarios 2019, "Neural Spline Flows", arXiv:1906.04032.
Each coordinate is moved by a monotone rational-quadratic (RQ) spline on
``[-bound, bound]`` with ``K`` bins and is left unchanged outside that interval. The
spline's parameters come from an MLP on the other half of the vector
(``SplineCoupling``) or from a MADE on the preceding coordinates
(``SplineAutoregressive``). Both directions are closed form: the inverse of an RQ
segment is the root of a quadratic.

Parameter layout per coordinate (``3K - 1`` numbers): ``K`` unnormalised bin widths,
``K`` unnormalised bin heights, ``K - 1`` unconstrained derivatives at the interior
knots. All-zero parameters give the identity.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..flows import register_flow
from ..nn import MADE, MLP
from .base import FlowTransform, interleave

__all__ = ["SplineCoupling", "SplineAutoregressive"]

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(0 + shift) + MIN_DERIVATIVE == 1, so zero parameters give unit slopes (the identity).
_DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def spline_params_per_coordinate(count_bins: int) -> int:
    """``3K - 1``: K widths, K heights, K - 1 interior knot derivatives."""
    return 3 * count_bins - 1


def _knots(raw: torch.Tensor, bound: float, minimum: float):
    """Knot positions ``(..., K + 1)`` from ``-bound`` to ``bound`` and bin sizes ``(..., K)``."""
    k = raw.shape[-1]
    frac = minimum + (1.0 - minimum * k) * torch.softmax(raw, dim=-1)
    knots = F.pad(torch.cumsum(frac, dim=-1), (1, 0), value=0.0)
    knots = 2.0 * bound * knots - bound
    # Pin the ends exactly, so the spline meets the tails without a rounding gap.
    ends = torch.full_like(knots[..., :1], bound)
    knots = torch.cat([-ends, knots[..., 1:-1], ends], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def spline_parts(params: torch.Tensor, bound: float):
    """Knots and derivatives of the spline from raw parameters ``(..., 3K - 1)``.

    Returns ``(xs, ys, ds)``: the knot abscissae and ordinates ``(..., K + 1)`` and the
    knot derivatives ``(..., K + 1)``, whose two outer values are 1 (the tails' slope).
    """
    k = (params.shape[-1] + 1) // 3
    if params.shape[-1] != 3 * k - 1:
        raise ValueError(f"a spline needs 3K - 1 parameters per coordinate, got {params.shape[-1]}")
    raw_w, raw_h, raw_d = params[..., :k], params[..., k : 2 * k], params[..., 2 * k :]
    xs, _ = _knots(raw_w, bound, MIN_BIN_WIDTH)
    ys, _ = _knots(raw_h, bound, MIN_BIN_HEIGHT)
    inner = MIN_DERIVATIVE + F.softplus(raw_d + _DERIVATIVE_SHIFT)
    ds = F.pad(inner, (1, 1), value=1.0)
    return xs, ys, ds


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, -1, idx).squeeze(-1)


def _bin(knots: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Index ``(..., 1)`` of the bin ``[knots[k], knots[k+1])`` holding ``v`` (clamped to the ends).

    Only the ``K - 1`` interior knots are searched, so a point at ``-bound`` or below
    lands in bin 0 and one at ``bound`` or above in bin K - 1; a point exactly at an
    interior knot starts the bin to its right (where its position is 0).
    """
    inner = knots[..., 1:-1].detach().contiguous()
    return torch.searchsorted(inner, v.detach().unsqueeze(-1).contiguous(), right=True)


def _quadratic_root(dy, h, s, d, curve):
    """Position in [0, 1] of a point ``dy`` above a bin's start, and the quadratic's ``b``.

    The bin's rational quadratic equals ``dy`` where ``a t^2 + b t + c = 0`` with
    ``a = h (s - d) + dy curve``, ``b = h d - dy curve``, ``c = -s dy`` (``d`` is the
    derivative at the bin's start). Returns the root ``2c / (-b - sqrt(b^2 - 4ac))``.
    """
    a = h * (s - d) + dy * curve
    b = h * d - dy * curve
    c = -s * dy
    disc = (b * b - 4.0 * a * c).clamp_min(0.0)
    den = -b - torch.sqrt(disc)
    # den <= -b < 0 on the side that is used; the guard keeps the unused side finite.
    den = torch.where(den < 0, den, -torch.ones_like(den))
    return (2.0 * c / den).clamp(0.0, 1.0), b


def rational_quadratic_spline(inputs: torch.Tensor, params: torch.Tensor, bound: float, inverse: bool = False):
    """The monotone RQ spline (identity outside ``[-bound, bound]``) and its log-derivative.

    ``inputs`` has shape ``(...)``, ``params`` ``(..., 3K - 1)`` (broadcast against each
    other). Forward returns ``(y, log dy/dx)``; ``inverse=True`` returns ``(x, log dx/dy)``,
    solving the bin's quadratic in closed form. Gradients flow to inputs and params.
    """
    batch = torch.broadcast_shapes(inputs.shape, params.shape[:-1])
    inputs = inputs.expand(batch)
    params = params.expand(*batch, params.shape[-1])
    xs, ys, ds = spline_parts(params, bound)

    inside = (inputs >= -bound) & (inputs <= bound)
    # Evaluate on the clamped input everywhere (finite values and gradients in the tails),
    # then select the identity outside.
    v = inputs.clamp(-bound, bound)
    idx = _bin(ys if inverse else xs, v)
    x_k, y_k = _gather(xs, idx), _gather(ys, idx)
    w_k = _gather(xs, idx + 1) - x_k
    h_k = _gather(ys, idx + 1) - y_k
    d_k, d_k1 = _gather(ds, idx), _gather(ds, idx + 1)
    s_k = h_k / w_k
    curve = d_k1 + d_k - 2.0 * s_k

    if inverse:
        # Solve the bin's quadratic for theta from the lower knot, and for 1 - theta from
        # the upper knot (the mirrored spline: y_k <-> y_k+1, d_k <-> d_k+1). Each uses the
        # root 2c / (-b - sqrt(b^2 - 4ac)), free of cancellation when b > 0; the two b's sum
        # to 2 h s > 0, so the larger one is positive, and that side's root is used.
        lower, low_b = _quadratic_root(v - y_k, h_k, s_k, d_k, curve)
        upper, up_b = _quadratic_root(_gather(ys, idx + 1) - v, h_k, s_k, d_k1, curve)
        from_top = up_b > low_b
        theta = torch.where(from_top, 1.0 - upper, lower)
        phi = torch.where(from_top, upper, 1.0 - lower)
        out = torch.where(from_top, _gather(xs, idx + 1) - upper * w_k, x_k + lower * w_k)
    else:
        theta = ((v - x_k) / w_k).clamp(0.0, 1.0)
        phi = 1.0 - theta
    t1 = theta * phi
    denom = s_k + curve * t1
    if not inverse:
        out = y_k + h_k * (s_k * theta * theta + d_k * t1) / denom
    deriv_num = s_k * s_k * (d_k1 * theta * theta + 2.0 * s_k * t1 + d_k * phi * phi)
    logd = torch.log(deriv_num) - 2.0 * torch.log(denom)
    if inverse:
        logd = -logd
    out = torch.where(inside, out, inputs)
    logd = torch.where(inside, logd, torch.zeros_like(logd))
    return out, logd


class SplineCoupling(FlowTransform):
    """Rational-quadratic spline coupling (Durkan, Bekasov, Murray & Papamakarios 2019, arXiv:1906.04032).

    ``y_a = x_a`` for the first ``dim // 2`` coordinates; each remaining coordinate is
    ``y_i = g(x_i; theta_i(x_a))``, a monotone rational-quadratic spline with
    ``count_bins`` bins on ``[-bound, bound]`` whose ``3K - 1`` parameters (bin widths
    and heights through a softmax with a minimum bin size of 1e-3, interior knot
    derivatives through a shifted softplus plus 1e-3) come from an MLP on ``x_a``
    (``dim = 1``: a learned constant). Outside ``[-bound, bound]`` the map is the
    identity; the outer knots have derivative 1, so value and slope are continuous at
    ``+-bound``. log|det J| = sum_i log g'(x_i).

    The inverse is exact: per bin, the rational quadratic inverts in closed form as the
    root of a quadratic (no iterative solver, no tolerance beyond rounding). All-zero
    network outputs (the initialisation) give the identity.
    """

    def __init__(
        self, dim: int, hidden_dims=(64, 64), count_bins: int = 8, bound: float = 3.0, activation: str = "relu"
    ):
        super().__init__(dim)
        self.count_bins, self.bound = int(count_bins), float(bound)
        self.split = dim // 2
        self.num_params = spline_params_per_coordinate(self.count_bins)
        self.conditioner = MLP(self.split, hidden_dims, self.num_params * (dim - self.split), activation)

    def _params(self, xa):
        out = self.conditioner(xa)
        return out.reshape(*out.shape[:-1], self.dim - self.split, self.num_params)

    def _apply_spline(self, v, inverse):
        va, vb = v[..., : self.split], v[..., self.split :]
        out, logd = rational_quadratic_spline(vb, self._params(va), self.bound, inverse)
        return torch.cat([va, out], -1), logd.sum(-1)

    def call_and_ladj(self, x):
        return self._apply_spline(x, inverse=False)

    def inverse_and_ladj(self, y):
        return self._apply_spline(y, inverse=True)

    def extra_repr(self):
        return f"dim={self.dim}, count_bins={self.count_bins}, bound={self.bound}"


class SplineAutoregressive(FlowTransform):
    """Autoregressive rational-quadratic spline (Durkan, Bekasov, Murray & Papamakarios 2019, arXiv:1906.04032).

    ``y_i = g(x_i; theta_i(x_1..x_{i-1}))``: the same monotone rational-quadratic spline
    as ``SplineCoupling`` (``count_bins`` bins on ``[-bound, bound]``, identity outside
    with slope 1 at the outer knots, so the tails join continuously), its ``3K - 1``
    parameters per coordinate produced by a MADE on the input. The forward is one
    parallel pass (fast sampling, the IAF layout); log|det J| = sum_i log g'(x_i).

    The inverse is exact: ``dim`` sequential MADE passes, each inverting every
    coordinate in closed form (the root of the bin's quadratic); after pass ``i`` the
    first ``i`` coordinates are final, and gradients flow through every pass.
    """

    autoregressive = True

    def __init__(
        self, dim: int, hidden_dims=(64, 64), count_bins: int = 8, bound: float = 3.0, activation: str = "relu"
    ):
        super().__init__(dim)
        self.count_bins, self.bound = int(count_bins), float(bound)
        self.num_params = spline_params_per_coordinate(self.count_bins)
        self.made = MADE(dim, hidden_dims, self.num_params, activation)

    def get_permutation(self):
        return torch.arange(self.dim)

    def call_and_ladj(self, x):
        y, logd = rational_quadratic_spline(x, self.made(x), self.bound)
        return y, logd.sum(-1)

    def inverse_and_ladj(self, y):
        x = torch.zeros_like(y)
        for _ in range(self.dim):
            # A new tensor each pass (no in-place writes): the graph stays intact.
            x, logd = rational_quadratic_spline(y, self.made(x), self.bound, inverse=True)
        return x, logd.sum(-1)

    def extra_repr(self):
        return f"dim={self.dim}, count_bins={self.count_bins}, bound={self.bound}"


@register_flow("nsf")
def nsf(dim, num_layers, hidden_dims, activation, permutation, count_bins, bound, conditioner):
    layer = SplineCoupling if conditioner == "coupling" else SplineAutoregressive
    blocks = [layer(dim, hidden_dims, count_bins, bound, activation) for _ in range(num_layers)]
    return interleave(blocks, dim, permutation)
