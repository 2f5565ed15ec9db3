"""Neural spline flows: monotone rational-quadratic splines with linear tails (JAX mirror of torch).

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
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

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


def _knots(raw, bound: float, minimum: float):
    """Knot positions ``(..., K + 1)`` from ``-bound`` to ``bound`` and bin sizes ``(..., K)``."""
    k = raw.shape[-1]
    frac = minimum + (1.0 - minimum * k) * jax.nn.softmax(raw, axis=-1)
    cum = jnp.cumsum(frac, axis=-1)
    inner = 2.0 * bound * cum[..., :-1] - bound
    # Pin the ends exactly, so the spline meets the tails without a rounding gap.
    ends = jnp.full_like(raw[..., :1], bound)
    knots = jnp.concatenate([-ends, inner, ends], axis=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _softplus(z):
    # torch's F.softplus (threshold 20: linear above it), so both backends give the same knots.
    return jnp.where(z > 20.0, z, jax.nn.softplus(z))


def spline_parts(params, bound: float):
    """Knots and derivatives of the spline from raw parameters ``(..., 3K - 1)``.

    Returns ``(xs, ys, ds)``: the knot abscissae and ordinates ``(..., K + 1)`` and the
    knot derivatives ``(..., K + 1)``, whose two outer values are 1 (the tails' slope).
    """
    k = (params.shape[-1] + 1) // 3
    if params.shape[-1] != 3 * k - 1:
        raise ValueError(f"a spline needs 3K - 1 parameters per coordinate, got {params.shape[-1]}")
    # Widths and heights share one softmax/cumsum (MIN_BIN_WIDTH == MIN_BIN_HEIGHT): fewer
    # ops to compile, the same numbers.
    raw_wh = params[..., : 2 * k].reshape(*params.shape[:-1], 2, k)
    knots, _ = _knots(raw_wh, bound, MIN_BIN_WIDTH)
    xs, ys = knots[..., 0, :], knots[..., 1, :]
    inner = MIN_DERIVATIVE + _softplus(params[..., 2 * k :] + _DERIVATIVE_SHIFT)
    ones = jnp.ones_like(params[..., :1])
    ds = jnp.concatenate([ones, inner, ones], axis=-1)
    return xs, ys, ds


def _bin(knots, v):
    """Index of the bin ``[knots[k], knots[k+1])`` holding the scalar ``v`` (clamped to the ends).

    Only the ``K - 1`` interior knots are searched (``side="right"``, torch's
    ``right=True``), so a point at ``-bound`` or below lands in bin 0 and one at
    ``bound`` or above in bin K - 1; a point exactly at an interior knot starts the bin
    to its right (where its position is 0).
    """
    inner = jax.lax.stop_gradient(knots[1:-1])
    return jnp.searchsorted(inner, jax.lax.stop_gradient(v), side="right", method="compare_all")


def _safe_sqrt(a):
    # sqrt(max(a, 0)) with a finite gradient everywhere (0 where a <= 0): an unused
    # branch of ``where`` must not send inf * 0 = nan into the gradients.
    pos = a > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, a, 1.0)), 0.0)


def _quadratic_root(dy, h, s, d, curve):
    """Position in [0, 1] of a point ``dy`` above a bin's start.

    The bin's rational quadratic equals ``dy`` where ``a t^2 + b t + c = 0`` with
    ``a = h (s - d) + dy curve``, ``b = h d - dy curve``, ``c = -s dy`` (``d`` is the
    derivative at the bin's start). Returns the root ``2c / (-b - sqrt(b^2 - 4ac))``.
    """
    a = h * (s - d) + dy * curve
    b = h * d - dy * curve
    c = -s * dy
    den = -b - _safe_sqrt(b * b - 4.0 * a * c)
    # den <= -b < 0 on the side that is used (b > 0); the guard keeps degenerate input finite.
    den = jnp.where(den < 0, den, -1.0)
    return jnp.clip(2.0 * c / den, 0.0, 1.0)


def _spline_scalar(v_in, params, bound: float, inverse: bool):
    """The spline for one scalar and its ``(3K - 1,)`` parameters: ``(out, log-derivative)``."""
    xs, ys, ds = spline_parts(params, bound)
    inside = (v_in >= -bound) & (v_in <= bound)
    # Evaluate on the clamped input everywhere (finite values and gradients in the tails),
    # then select the identity outside.
    v = jnp.clip(v_in, -bound, bound)
    idx = _bin(ys if inverse else xs, v)
    # One slice of the stacked table (idx <= K - 1, so idx + 2 never clamps) instead of six
    # gathers: fewer kernels for XLA to compile.
    table = jnp.stack([xs, ys, ds])
    (x_k, y_k, d_k), (x_k1, y_k1, d_k1) = jax.lax.dynamic_slice_in_dim(table, idx, 2, axis=1).T
    w_k, h_k = x_k1 - x_k, y_k1 - y_k
    s_k = h_k / w_k
    curve = d_k1 + d_k - 2.0 * s_k

    if inverse:
        # Solve the bin's quadratic for theta from the lower knot, or for 1 - theta from
        # the upper knot (the mirrored spline: y_k <-> y_k+1, d_k <-> d_k+1), with the root
        # 2c / (-b - sqrt(b^2 - 4ac)), free of cancellation when b > 0. The two sides' b's
        # sum to 2 h s > 0, so the larger one is positive: that side is used (torch's rule,
        # from_top = b_upper > b_lower). Only the chosen side's root is computed: the same
        # numbers as computing both and selecting, with half the divisions and square roots.
        dy_low, dy_up = v - y_k, y_k1 - v
        from_top = (h_k * d_k1 - dy_up * curve) > (h_k * d_k - dy_low * curve)
        root = _quadratic_root(
            jnp.where(from_top, dy_up, dy_low), h_k, s_k, jnp.where(from_top, d_k1, d_k), curve
        )
        theta = jnp.where(from_top, 1.0 - root, root)
        phi = jnp.where(from_top, root, 1.0 - root)
        out = jnp.where(from_top, x_k1 - root * w_k, x_k + root * w_k)
    else:
        theta = jnp.clip((v - x_k) / w_k, 0.0, 1.0)
        phi = 1.0 - theta
    t1 = theta * phi
    denom = s_k + curve * t1
    if not inverse:
        out = y_k + h_k * (s_k * theta * theta + d_k * t1) / denom
    deriv_num = s_k * s_k * (d_k1 * theta * theta + 2.0 * s_k * t1 + d_k * phi * phi)
    logd = jnp.log(deriv_num) - 2.0 * jnp.log(denom)
    if inverse:
        logd = -logd
    return jnp.where(inside, out, v_in), jnp.where(inside, logd, jnp.zeros_like(logd))


def rational_quadratic_spline(inputs, params, bound: float, inverse: bool = False):
    """The monotone RQ spline (identity outside ``[-bound, bound]``) and its log-derivative.

    ``inputs`` has shape ``(...)``, ``params`` ``(..., 3K - 1)`` (broadcast against each
    other). Forward returns ``(y, log dy/dx)``; ``inverse=True`` returns ``(x, log dx/dy)``,
    solving the bin's quadratic in closed form. Differentiable in inputs and params.
    """
    inputs, params = jnp.asarray(inputs), jnp.asarray(params)
    batch = jnp.broadcast_shapes(inputs.shape, params.shape[:-1])
    flat_in = jnp.broadcast_to(inputs, batch).reshape(-1)
    flat_p = jnp.broadcast_to(params, (*batch, params.shape[-1])).reshape(-1, params.shape[-1])
    out, logd = jax.vmap(lambda v, p: _spline_scalar(v, p, bound, inverse))(flat_in, flat_p)
    return out.reshape(batch), logd.reshape(batch)


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

    conditioner: MLP
    count_bins: int = eqx.field(static=True)
    bound: float = eqx.field(static=True)
    split: int = eqx.field(static=True)
    num_params: int = eqx.field(static=True)

    def __init__(self, dim: int, hidden_dims=(64, 64), count_bins: int = 8, bound: float = 3.0,
                 activation: str = "relu", *, key):
        self.dim = int(dim)
        self.count_bins, self.bound = int(count_bins), float(bound)
        self.split = self.dim // 2
        self.num_params = spline_params_per_coordinate(self.count_bins)
        self.conditioner = MLP(self.split, hidden_dims, self.num_params * (self.dim - self.split),
                               activation, key=key)

    def _params(self, xa):
        return self.conditioner(xa).reshape(self.dim - self.split, self.num_params)

    def _apply_spline(self, v, inverse):
        va, vb = v[: self.split], v[self.split :]
        out, logd = rational_quadratic_spline(vb, self._params(va), self.bound, inverse)
        return jnp.concatenate([va, out]), logd.sum()

    def call_and_ladj(self, x):
        return self._apply_spline(x, inverse=False)

    def inverse_and_ladj(self, y):
        return self._apply_spline(y, inverse=True)


class SplineAutoregressive(FlowTransform):
    """Autoregressive rational-quadratic spline (Durkan, Bekasov, Murray & Papamakarios 2019, arXiv:1906.04032).

    ``y_i = g(x_i; theta_i(x_1..x_{i-1}))``: the same monotone rational-quadratic spline
    as ``SplineCoupling`` (``count_bins`` bins on ``[-bound, bound]``, identity outside
    with slope 1 at the outer knots, so the tails join continuously), its ``3K - 1``
    parameters per coordinate produced by a MADE on the input. The forward is one
    parallel pass (fast sampling, the IAF layout); log|det J| = sum_i log g'(x_i).

    The inverse is exact: ``dim`` sequential MADE passes in a ``fori_loop``, pass ``i``
    inverting coordinate ``i`` in closed form (the root of the bin's quadratic) from the
    already final coordinates ``< i``; gradients flow through every pass.
    """

    made: MADE
    count_bins: int = eqx.field(static=True)
    bound: float = eqx.field(static=True)
    num_params: int = eqx.field(static=True)
    autoregressive: ClassVar[bool] = True

    def __init__(self, dim: int, hidden_dims=(64, 64), count_bins: int = 8, bound: float = 3.0,
                 activation: str = "relu", *, key):
        self.dim = int(dim)
        self.count_bins, self.bound = int(count_bins), float(bound)
        self.num_params = spline_params_per_coordinate(self.count_bins)
        self.made = MADE(self.dim, hidden_dims, self.num_params, activation, key=key)

    def get_permutation(self):
        return jnp.arange(self.dim)

    def call_and_ladj(self, x):
        y, logd = rational_quadratic_spline(x, self.made(x), self.bound)
        return y, logd.sum()

    def inverse_and_ladj(self, y):
        def step(i, carry):
            x, logd = carry
            # MADE's output i sees only x_{<i}, which are final after passes 0..i-1.
            params = self.made(x)[i]
            xi, li = _spline_scalar(y[i], params, self.bound, True)
            return x.at[i].set(xi), logd.at[i].set(li)

        init = (jnp.zeros_like(y), jnp.zeros_like(y))
        x, logd = jax.lax.fori_loop(0, self.dim, step, init)
        return x, logd.sum()


@register_flow("nsf")
def nsf(dim, num_layers, hidden_dims, activation, permutation, count_bins, bound, conditioner, *, key):
    layer = SplineCoupling if conditioner == "coupling" else SplineAutoregressive
    keys = jax.random.split(key, num_layers + 1)
    blocks = [layer(dim, hidden_dims, count_bins, bound, activation, key=k) for k in keys[:-1]]
    return interleave(blocks, dim, permutation, keys[-1])
