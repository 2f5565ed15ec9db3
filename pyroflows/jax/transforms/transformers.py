"""JAX mirror of ``pyroflows.torch.transforms.transformers``: the element-wise maps ``y = tau(x; theta)``.

The same classes, options and numbers. Transformers are frozen dataclasses, hashable,
so a layer keeps one as a static field; the spline runs one scalar at a time under
``vmap``, and the deep sigmoidal inverse bisects in ``while_loop``s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ...registry import check_transformer
from ...structure import (
    DERIVATIVE_SHIFT,
    MIN_BIN_WIDTH,
    MIN_DERIVATIVE,
    MIN_SLOPE,
    sigmoid_offset,
    spline_num_params,
)
from .base import bisect_increasing, implicit_step

__all__ = [
    "Transformer",
    "Additive",
    "Affine",
    "RationalQuadraticSpline",
    "DeepSigmoid",
    "rational_quadratic_spline",
    "spline_parts",
    "TRANSFORMERS",
]

Pair = tuple[jax.Array, jax.Array]


class Transformer:
    """The base of the element-wise maps: JAX mirror of ``pyroflows.torch.transforms.Transformer``.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Shift(Transformer):
        ...     num_params = 1
        ...     def forward(self, x, params):
        ...         return x + params[..., 0], jnp.zeros_like(x)
        ...     def inverse(self, y, params):
        ...         return y - params[..., 0], jnp.zeros_like(y)
        >>> hash(Shift()) == hash(Shift())  # hashable: a static field of a layer
        True
    """

    num_params: int = 0
    #: True where ``inverse`` solves numerically; ``inverse_tol`` is its relative tolerance.
    numerical_inverse = False
    inverse_tol = 0.0

    def __post_init__(self) -> None:
        check_transformer(self)  # the registry's checks, for a transformer built by hand

    def forward(self, x: jax.Array, params: jax.Array) -> Pair:
        """``(tau(x; params), log dtau/dx)``, elementwise, for ``params`` of shape ``(..., num_params)``.

        Example:
            >>> y, logd = Affine().forward(jnp.zeros(3), jnp.zeros((3, 2)))
            >>> y.shape, logd.shape
            ((3,), (3,))
        """
        raise NotImplementedError

    def inverse(self, y: jax.Array, params: jax.Array) -> Pair:
        """``(tau^-1(y; params), log dtau^-1/dy)``, elementwise.

        Example:
            >>> x, logd = Affine().inverse(jnp.zeros(3), jnp.zeros((3, 2)))
            >>> x.shape, logd.shape
            ((3,), (3,))
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Additive(Transformer):
    """``y = x + t``: JAX mirror of ``pyroflows.torch.transforms.Additive``.

    Dinh, Krueger & Bengio 2015 (NICE), arXiv:1410.8516.

    Example:
        >>> y, logd = Additive().forward(jnp.zeros(2), jnp.ones((2, 1)))
        >>> y.tolist(), logd.tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """

    num_params = 1

    def forward(self, x: jax.Array, params: jax.Array) -> Pair:
        """``(x + t, 0)``.

        Example:
            >>> Additive().forward(jnp.array([1.0]), jnp.array([[2.0]]))[0].tolist()
            [3.0]
        """
        return x + params[..., 0], jnp.zeros_like(x)

    def inverse(self, y: jax.Array, params: jax.Array) -> Pair:
        """``(y - t, 0)``.

        Example:
            >>> Additive().inverse(jnp.array([3.0]), jnp.array([[2.0]]))[0].tolist()
            [1.0]
        """
        return y - params[..., 0], jnp.zeros_like(y)


@dataclasses.dataclass(frozen=True)
class Affine(Transformer):
    """``y = x exp(s) + m``, ``s`` soft-clamped: JAX mirror of ``pyroflows.torch.transforms.Affine``.

    Dinh, Sohl-Dickstein & Bengio 2017 (Real NVP), arXiv:1605.08803.

    Example:
        >>> y, logd = Affine().forward(jnp.ones(1), jnp.array([[1.0, 0.0]]))
        >>> y.tolist(), logd.tolist()
        ([2.0], [0.0])
    """

    log_scale_bound: float = 5.0
    num_params = 2

    def _log_scale(self, raw, sign):
        # bound * tanh(raw / bound), negated inside the product so both directions round alike
        return jnp.tanh(raw * (1.0 / self.log_scale_bound)) * (sign * self.log_scale_bound)

    def forward(self, x: jax.Array, params: jax.Array) -> Pair:
        """``(x exp(s) + m, s)``.

        Example:
            >>> y, logd = Affine(log_scale_bound=1.0).forward(jnp.array([1.0]), jnp.array([[0.0, 100.0]]))
            >>> round(float(y[0]), 4), logd.tolist()  # s clamped at the bound
            (2.7183, [1.0])
        """
        s = self._log_scale(params[..., 1], 1.0)
        return x * jnp.exp(s) + params[..., 0], s

    def inverse(self, y: jax.Array, params: jax.Array) -> Pair:
        """``((y - m) exp(-s), -s)``.

        Example:
            >>> Affine().inverse(jnp.array([2.0]), jnp.array([[1.0, 0.0]]))[0].tolist()
            [1.0]
        """
        neg_s = self._log_scale(params[..., 1], -1.0)
        return (y - params[..., 0]) * jnp.exp(neg_s), neg_s


# --------------------------------------------------------------------------- rational-quadratic spline
def _softplus(z):
    # torch's F.softplus (threshold 20: linear above it), so both backends give the same knots.
    return jnp.where(z > 20.0, z, jax.nn.softplus(z))


def spline_parts(params: jax.Array, bound: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Knots and derivatives ``(xs, ys, ds)``: JAX mirror of ``pyroflows.torch.transforms.transformers.spline_parts``.

    Widths and heights share one softmax and cumsum here.

    Example:
        >>> xs, ys, ds = spline_parts(jnp.zeros(11), 3.0)
        >>> xs.tolist(), [round(d, 4) for d in ds.tolist()]
        ([-3.0, -1.5, 0.0, 1.5, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    """
    k = (params.shape[-1] + 1) // 3
    if params.shape[-1] != spline_num_params(k):
        raise ValueError(f"a spline needs 3K - 1 parameters per coordinate, got {params.shape[-1]}")
    # Widths and heights share one softmax and cumsum (their minimum bin sizes are equal).
    raw = params[..., : 2 * k].reshape(*params.shape[:-1], 2, k)
    frac = MIN_BIN_WIDTH + (1.0 - MIN_BIN_WIDTH * k) * jax.nn.softmax(raw, axis=-1)
    inner = 2.0 * bound * jnp.cumsum(frac, axis=-1)[..., :-1] - bound
    ends = jnp.full_like(raw[..., :1], bound)  # pinned exactly: no rounding gap at the tails
    knots = jnp.concatenate([-ends, inner, ends], axis=-1)
    ones = jnp.ones_like(params[..., :1])
    ds = jnp.concatenate([ones, MIN_DERIVATIVE + _softplus(params[..., 2 * k :] + DERIVATIVE_SHIFT), ones], axis=-1)
    return knots[..., 0, :], knots[..., 1, :], ds


def _safe_sqrt(a):
    # sqrt(max(a, 0)) with a finite gradient everywhere: an unused branch of ``where`` must
    # not send inf * 0 = nan into the gradients.
    pos = a > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, a, 1.0)), 0.0)


def _quadratic_root(dy, h, s, d, curve):
    """Position in [0, 1] of a point ``dy`` above a bin's start: the root
    ``2c / (-b - sqrt(b^2 - 4ac))`` of ``a t^2 + b t + c`` with ``a = h (s - d) + dy curve``,
    ``b = h d - dy curve``, ``c = -s dy``."""
    a = h * (s - d) + dy * curve
    b = h * d - dy * curve
    c = -s * dy
    den = -b - _safe_sqrt(b * b - 4.0 * a * c)
    den = jnp.where(den < 0, den, -1.0)  # keeps degenerate input finite
    return jnp.clip(2.0 * c / den, 0.0, 1.0)


def _spline_scalar(v_in, params, bound: float, inverse: bool):
    """The spline for one scalar and its ``(3K - 1,)`` parameters: ``(out, log-derivative)``."""
    xs, ys, ds = spline_parts(params, bound)
    inside = (v_in >= -bound) & (v_in <= bound)
    v = jnp.clip(v_in, -bound, bound)  # finite values and gradients in the tails
    knots = jax.lax.stop_gradient(ys if inverse else xs)
    # A point exactly at an interior knot starts the bin to its right (torch's right=True).
    idx = jnp.searchsorted(knots[1:-1], jax.lax.stop_gradient(v), side="right", method="compare_all")
    # One slice of the stacked table (idx + 2 never clamps) instead of six gathers.
    table = jnp.stack([xs, ys, ds])
    (x_k, y_k, d_k), (x_k1, y_k1, d_k1) = jax.lax.dynamic_slice_in_dim(table, idx, 2, axis=1).T
    w_k, h_k = x_k1 - x_k, y_k1 - y_k
    s_k = h_k / w_k
    curve = d_k1 + d_k - 2.0 * s_k
    if inverse:
        # Solve from the side whose quadratic has the larger b (the two b's sum to 2 h s > 0),
        # free of cancellation; torch computes both roots and selects, with the same numbers.
        dy_low, dy_up = v - y_k, y_k1 - v
        from_top = (h_k * d_k1 - dy_up * curve) > (h_k * d_k - dy_low * curve)
        root = _quadratic_root(jnp.where(from_top, dy_up, dy_low), h_k, s_k, jnp.where(from_top, d_k1, d_k), curve)
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
    logd = jnp.log(s_k * s_k * (d_k1 * theta * theta + 2.0 * s_k * t1 + d_k * phi * phi)) - 2.0 * jnp.log(denom)
    return jnp.where(inside, out, v_in), jnp.where(inside, -logd if inverse else logd, jnp.zeros_like(logd))


def rational_quadratic_spline(inputs: jax.Array, params: jax.Array, bound: float, inverse: bool = False) -> Pair:
    """The RQ spline: JAX mirror of ``pyroflows.torch.transforms.transformers.rational_quadratic_spline``.

    Each scalar is mapped on its own (``vmap`` over the broadcast batch), with one
    ``dynamic_slice`` of the knot table. Durkan et al. 2019, arXiv:1906.04032.

    Example:
        >>> y, logd = rational_quadratic_spline(jnp.array([-5.0, 5.0]), jnp.zeros(11), 3.0)
        >>> y.tolist(), logd.tolist()  # outside the interval: the identity
        ([-5.0, 5.0], [0.0, 0.0])
    """
    inputs, params = jnp.asarray(inputs), jnp.asarray(params)
    if inputs.ndim == 0 and params.ndim == 1:
        return _spline_scalar(inputs, params, bound, inverse)
    batch = jnp.broadcast_shapes(inputs.shape, params.shape[:-1])
    flat_in = jnp.broadcast_to(inputs, batch).reshape(-1)
    flat_p = jnp.broadcast_to(params, (*batch, params.shape[-1])).reshape(-1, params.shape[-1])
    out, logd = jax.vmap(lambda v, p: _spline_scalar(v, p, bound, inverse))(flat_in, flat_p)
    return out.reshape(batch), logd.reshape(batch)


@dataclasses.dataclass(frozen=True)
class RationalQuadraticSpline(Transformer):
    """A monotone RQ spline: JAX mirror of ``pyroflows.torch.transforms.RationalQuadraticSpline``.

    Durkan, Bekasov, Murray & Papamakarios 2019 (Neural Spline Flows), arXiv:1906.04032.

    Example:
        >>> tau = RationalQuadraticSpline(count_bins=4)
        >>> y, logd = tau.forward(jnp.array([0.5]), jnp.zeros((1, tau.num_params)))
        >>> round(float(y[0]), 5), abs(float(logd[0])) < 1e-6  # zero parameters: the identity
        (0.5, True)
    """

    count_bins: int = 8
    bound: float = 3.0

    @property
    def num_params(self) -> int:
        return spline_num_params(self.count_bins)

    def forward(self, x: jax.Array, params: jax.Array) -> Pair:
        """The spline and its log-derivative.

        Example:
            >>> tau = RationalQuadraticSpline(count_bins=4)
            >>> params = jnp.zeros((1, tau.num_params)).at[0, 0].set(1.0)  # a wider first bin
            >>> y, logd = tau.forward(jnp.array([0.5]), params)
            >>> round(float(y[0]), 4), round(float(logd[0]), 4)
            (-0.5379, 0.4867)
        """
        return rational_quadratic_spline(x, params, self.bound)

    def inverse(self, y: jax.Array, params: jax.Array) -> Pair:
        """The inverse spline, in closed form, and its log-derivative.

        Example:
            >>> tau = RationalQuadraticSpline(count_bins=4)
            >>> params = jnp.zeros((1, tau.num_params)).at[0, 0].set(1.0)
            >>> x, _ = tau.inverse(tau.forward(jnp.array([0.5]), params)[0], params)
            >>> round(float(x[0]), 4)
            0.5
        """
        return rational_quadratic_spline(y, params, self.bound, inverse=True)


# --------------------------------------------------------------------------- deep sigmoidal map
def _neg_log_sigmoids(z):
    """``(-log sigmoid(z), -log sigmoid(-z))`` sharing one ``log1p(exp(-|z|))`` (exact in both tails)."""
    common = jnp.log1p(jnp.exp(-jnp.abs(z)))
    return jnp.maximum(-z, 0.0) + common, jnp.maximum(z, 0.0) + common


def _logsumexp(v):
    """logsumexp over the last axis: a lean form whose shift carries no gradient."""
    m = jax.lax.stop_gradient(jnp.max(v, -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m[..., 0] + jnp.log(jnp.sum(jnp.exp(v - m), -1))


@dataclasses.dataclass(frozen=True)
class DeepSigmoid(Transformer):
    """``y = logit(sum_k w_k sigmoid(a_k x + b_k))``: JAX mirror of ``pyroflows.torch.transforms.DeepSigmoid``.

    The inverse bisects in ``while_loop``s (``bisect_increasing``). Huang, Krueger,
    Lacoste & Courville 2018 (NAF), arXiv:1804.00779.

    Example:
        >>> tau = DeepSigmoid(hidden_units=4)
        >>> params = jnp.zeros((1, tau.num_params))
        >>> x, _ = tau.inverse(tau.forward(jnp.array([0.3]), params)[0], params)
        >>> round(float(x[0]), 5)
        0.3
    """

    hidden_units: int = 16
    numerical_inverse = True
    inverse_tol = 1e-10

    @property
    def num_params(self) -> int:
        return 3 * self.hidden_units

    def unpack(self, params: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(a, b, log w)``, each ``(..., K)``, from raw parameters ``(..., 3K)``.

        Example:
            >>> a, b, log_w = DeepSigmoid(hidden_units=2).unpack(jnp.zeros(6))
            >>> b.tolist(), [round(v, 4) for v in jnp.exp(log_w).tolist()]
            ([-1.0, 1.0], [0.5, 0.5])
        """
        out = params + jnp.asarray(sigmoid_offset(self.hidden_units), dtype=params.dtype)
        k = self.hidden_units
        raw_a, b, raw_w = out[..., :k], out[..., k : 2 * k], out[..., 2 * k :]
        softplus_a = jnp.maximum(raw_a, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(raw_a)))
        return MIN_SLOPE + softplus_a, b, raw_w - _logsumexp(raw_w)[..., None]

    @staticmethod
    def evaluate(
        x: jax.Array, a: jax.Array, b: jax.Array, log_w: jax.Array, log_derivative: bool = True
    ) -> tuple[jax.Array, jax.Array | None]:
        """The map and (optionally) its log-derivative at ``x`` for unpacked parameters.

        Example:
            >>> a, b, log_w = DeepSigmoid(hidden_units=2).unpack(jnp.zeros(6))
            >>> y, logd = DeepSigmoid.evaluate(jnp.zeros(1), a, b, log_w)
            >>> abs(float(y[0])) < 1e-6, round(float(logd[0]), 4)
            (True, -0.2402)
        """
        z = b + a * x[..., None]
        nls_pos, nls_neg = _neg_log_sigmoids(z)
        if not log_derivative:
            log_pq = _logsumexp(jnp.stack([log_w - nls_pos, log_w - nls_neg], -2))
            return log_pq[..., 0] - log_pq[..., 1], None
        # One stacked logsumexp for log p, log(1 - p) and log p' (fewer kernels to compile);
        # y = logit(p), dy/dx = p' / (p (1 - p)).
        lse = _logsumexp(jnp.stack([log_w - nls_pos, log_w - nls_neg, log_w + jnp.log(a) - nls_pos - nls_neg], -2))
        log_p, log_q, log_dp = lse[..., 0], lse[..., 1], lse[..., 2]
        return log_p - log_q, log_dp - log_p - log_q

    def forward(self, x: jax.Array, params: jax.Array) -> Pair:
        """The map and its log-derivative, in closed form.

        Example:
            >>> tau = DeepSigmoid(hidden_units=2)
            >>> y, _ = tau.forward(jnp.array([-1.0, 1.0]), jnp.zeros((2, tau.num_params)))
            >>> bool(y[0] < y[1])
            True
        """
        return self.evaluate(x, *self.unpack(params))

    def inverse(self, y: jax.Array, params: jax.Array) -> Pair:
        """The inverse by bisection and one implicit Newton step, and its log-derivative.

        Example:
            >>> tau = DeepSigmoid(hidden_units=2)
            >>> x, logd = tau.inverse(jnp.zeros(1), jnp.zeros((1, tau.num_params)))
            >>> abs(float(x[0])) < 1e-5, round(float(logd[0]), 4)
            (True, 0.2402)
        """
        a, b, log_w = self.unpack(params)
        tol = max(self.inverse_tol, 4 * float(jnp.finfo(y.dtype).eps))  # never ask float32 for 1e-10
        root = bisect_increasing(lambda p, u: self.evaluate(u, *p, log_derivative=False)[0], (a, b, log_w), y, tol=tol)
        value, log_d = self.evaluate(root, a, b, log_w)
        x = implicit_step(root, value, jnp.exp(log_d), y)
        return x, -self.evaluate(x, a, b, log_w)[1]


#: The transformers by the name a ``FlowSpec`` gives them.
TRANSFORMERS = {"additive": Additive, "affine": Affine, "spline": RationalQuadraticSpline, "sigmoid": DeepSigmoid}
