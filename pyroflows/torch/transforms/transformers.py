"""Element-wise transformers: monotone maps ``y = tau(x; theta)`` of one coordinate.

A transformer has no weights of its own. A conditioner (``Coupling``,
``MaskedAutoregressive``) computes ``num_params`` numbers per coordinate and the
transformer maps each coordinate with them: ``forward(x, params)`` returns
``(y, log dy/dx)`` and ``inverse(y, params)`` returns ``(x, log dx/dy)``, elementwise,
for ``x`` of shape ``(...)`` and ``params`` of shape ``(..., num_params)``. All-zero
parameters give the identity (the deep sigmoidal map: a smooth near-identity).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.nn import functional as F

from ...registry import check_transformer
from ...structure import (
    DERIVATIVE_SHIFT,
    MIN_BIN_HEIGHT,
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

Pair = tuple[torch.Tensor, torch.Tensor]


class Transformer:
    """The base of the element-wise maps; subclasses are frozen dataclasses of their options.

    A subclass sets ``num_params`` (a class attribute or a property of its options) and
    implements ``forward`` and ``inverse``; its dataclass fields are the options, which
    ``pyroflows.registry.check_transformer`` validates on construction.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Scale(Transformer):
        ...     num_params = 1
        ...     def forward(self, x, params):
        ...         return x * torch.exp(params[..., 0]), params[..., 0]
        ...     def inverse(self, y, params):
        ...         return y * torch.exp(-params[..., 0]), -params[..., 0]
        >>> Scale().forward(torch.ones(2), torch.zeros(2, 1))[0].tolist()
        [1.0, 1.0]
    """

    num_params: int = 0
    #: True where ``inverse`` solves numerically; ``inverse_tol`` is its relative tolerance.
    numerical_inverse = False
    inverse_tol = 0.0

    def __post_init__(self) -> None:
        check_transformer(self)  # the registry's checks, for a transformer built by hand

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> Pair:
        """``(tau(x; params), log dtau/dx)``, elementwise.

        Args:
            x: points, shape ``(...)``.
            params: the conditioner's outputs, shape ``(..., num_params)``.

        Returns:
            ``(y, log dy/dx)``, each shaped like ``x``.

        Example:
            >>> y, logd = Affine().forward(torch.zeros(3), torch.zeros(3, 2))
            >>> tuple(y.shape), tuple(logd.shape)
            ((3,), (3,))
        """
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> Pair:
        """``(tau^-1(y; params), log dtau^-1/dy)``, elementwise.

        Args:
            y: points, shape ``(...)``.
            params: the conditioner's outputs, shape ``(..., num_params)``.

        Returns:
            ``(x, log dx/dy)``, each shaped like ``y``.

        Example:
            >>> x, logd = Affine().inverse(torch.zeros(3), torch.zeros(3, 2))
            >>> tuple(x.shape), tuple(logd.shape)
            ((3,), (3,))
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Additive(Transformer):
    """``y = x + t``: NICE's volume-preserving shift.

    ``params[..., 0]`` is the shift ``t``; the log-derivative is 0, so a stack of
    additive couplings preserves volume (NICE ends with a scaling layer instead).

    References:
        Dinh, Krueger & Bengio 2015, "NICE: Non-linear Independent Components
        Estimation", arXiv:1410.8516.

    Example:
        >>> y, logd = Additive().forward(torch.zeros(2), torch.ones(2, 1))
        >>> y.tolist(), logd.tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """

    num_params = 1

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> Pair:
        """``(x + t, 0)``.

        Example:
            >>> Additive().forward(torch.tensor([1.0]), torch.tensor([[2.0]]))[0].tolist()
            [3.0]
        """
        return x + params[..., 0], torch.zeros_like(x)

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> Pair:
        """``(y - t, 0)``.

        Example:
            >>> Additive().inverse(torch.tensor([3.0]), torch.tensor([[2.0]]))[0].tolist()
            [1.0]
        """
        return y - params[..., 0], torch.zeros_like(y)


@dataclasses.dataclass(frozen=True)
class Affine(Transformer):
    """``y = x exp(s) + m`` with ``s = bound tanh(s_raw / bound)``: RealNVP's, IAF's and MAF's map.

    ``params[..., 0]`` is the shift ``m``, ``params[..., 1]`` the raw log-scale. The soft
    clamp keeps every scale inside ``(exp(-bound), exp(bound))``.

    Args:
        log_scale_bound: the bound on ``|s|``.

    References:
        Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP", arXiv:1605.08803.

    Example:
        >>> y, logd = Affine().forward(torch.ones(1), torch.tensor([[1.0, 0.0]]))
        >>> y.tolist(), logd.tolist()
        ([2.0], [0.0])
    """

    log_scale_bound: float = 5.0
    num_params = 2

    def _log_scale(self, raw, sign):
        # bound * tanh(raw / bound), negated inside the product so both directions round alike
        return torch.tanh(raw * (1.0 / self.log_scale_bound)) * (sign * self.log_scale_bound)

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> Pair:
        """``(x exp(s) + m, s)``.

        Example:
            >>> y, logd = Affine(log_scale_bound=1.0).forward(torch.tensor([1.0]), torch.tensor([[0.0, 100.0]]))
            >>> round(y.item(), 4), logd.tolist()  # s clamped at the bound
            (2.7183, [1.0])
        """
        s = self._log_scale(params[..., 1], 1.0)
        return x * torch.exp(s) + params[..., 0], s

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> Pair:
        """``((y - m) exp(-s), -s)``.

        Example:
            >>> Affine().inverse(torch.tensor([2.0]), torch.tensor([[1.0, 0.0]]))[0].tolist()
            [1.0]
        """
        neg_s = self._log_scale(params[..., 1], -1.0)
        return (y - params[..., 0]) * torch.exp(neg_s), neg_s


# --------------------------------------------------------------------------- rational-quadratic spline
def _knots(raw: torch.Tensor, bound: float, minimum: float) -> torch.Tensor:
    """Knot positions ``(..., K + 1)`` from ``-bound`` to ``bound``, bins at least ``minimum`` wide."""
    k = raw.shape[-1]
    frac = minimum + (1.0 - minimum * k) * torch.softmax(raw, dim=-1)
    knots = 2.0 * bound * F.pad(torch.cumsum(frac, dim=-1), (1, 0), value=0.0) - bound
    # Pin the ends exactly, so the spline meets the tails without a rounding gap.
    ends = torch.full_like(knots[..., :1], bound)
    return torch.cat([-ends, knots[..., 1:-1], ends], dim=-1)


def spline_parts(params: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knots and derivatives of the spline from raw parameters ``(..., 3K - 1)``.

    The first K parameters give the bin widths and the next K the heights (a softmax
    with a floor, ``pyroflows.structure.MIN_BIN_WIDTH``), the last K - 1 the interior
    derivatives (a shifted softplus, 1 at zero parameters).

    Args:
        params: raw parameters, shape ``(..., 3K - 1)``.
        bound: the half-width of the interval, ``[-bound, bound]``.

    Returns:
        ``(xs, ys, ds)``: knot abscissae, ordinates and derivatives, each ``(..., K + 1)``;
        the two outer derivatives are 1 (the tails' slope).

    Raises:
        ValueError: the last axis is not ``3K - 1`` long for any K.

    Example:
        >>> xs, ys, ds = spline_parts(torch.zeros(11), 3.0)  # K = 4 equal bins
        >>> xs.tolist(), [round(d, 4) for d in ds.tolist()]
        ([-3.0, -1.5, 0.0, 1.5, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    """
    k = (params.shape[-1] + 1) // 3
    if params.shape[-1] != spline_num_params(k):
        raise ValueError(f"a spline needs 3K - 1 parameters per coordinate, got {params.shape[-1]}")
    xs = _knots(params[..., :k], bound, MIN_BIN_WIDTH)
    ys = _knots(params[..., k : 2 * k], bound, MIN_BIN_HEIGHT)
    inner = MIN_DERIVATIVE + F.softplus(params[..., 2 * k :] + DERIVATIVE_SHIFT)
    return xs, ys, F.pad(inner, (1, 1), value=1.0)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, -1, idx).squeeze(-1)


def _quadratic_root(dy, h, s, d, curve):
    """Position in [0, 1] of a point ``dy`` above a bin's start, and the quadratic's ``b``.

    The bin's rational quadratic equals ``dy`` where ``a t^2 + b t + c = 0`` with
    ``a = h (s - d) + dy curve``, ``b = h d - dy curve``, ``c = -s dy``; the root is taken
    as ``2c / (-b - sqrt(b^2 - 4ac))``, free of cancellation when ``b > 0``.
    """
    a = h * (s - d) + dy * curve
    b = h * d - dy * curve
    c = -s * dy
    den = -b - torch.sqrt((b * b - 4.0 * a * c).clamp_min(0.0))
    den = torch.where(den < 0, den, -torch.ones_like(den))  # keeps the unused side finite
    return (2.0 * c / den).clamp(0.0, 1.0), b


def rational_quadratic_spline(inputs: torch.Tensor, params: torch.Tensor, bound: float, inverse: bool = False) -> Pair:
    """The monotone RQ spline on ``[-bound, bound]`` (identity outside) and its log-derivative.

    In bin k (width ``w_k``, height ``h_k``, slope ``s_k = h_k / w_k``, knot derivatives
    ``d_k``, ``d_k+1``), at the position ``theta`` in the bin and with ``t = theta (1 - theta)``,

        y = y_k + h_k (s_k theta^2 + d_k t) / (s_k + (d_k+1 + d_k - 2 s_k) t);

    the inverse solves that quadratic in ``theta`` from whichever end of the bin avoids
    cancellation. A point exactly at an interior knot belongs to the bin on its right.

    Args:
        inputs: points, shape ``(...)``.
        params: raw parameters ``(..., 3K - 1)``, broadcast against ``inputs``.
        bound: half-width of the interval the spline acts on.
        inverse: solve the bin's quadratic for the inverse instead.

    Returns:
        ``(y, log dy/dx)``, or ``(x, log dx/dy)`` with ``inverse=True``.

    References:
        Durkan, Bekasov, Murray & Papamakarios 2019, "Neural Spline Flows", arXiv:1906.04032.

    Example:
        >>> y, logd = rational_quadratic_spline(torch.tensor([-5.0, 5.0]), torch.zeros(11), 3.0)
        >>> y.tolist(), logd.tolist()  # outside the interval: the identity
        ([-5.0, 5.0], [0.0, 0.0])
    """
    batch = torch.broadcast_shapes(inputs.shape, params.shape[:-1])
    inputs = inputs.expand(batch)
    xs, ys, ds = spline_parts(params.expand(*batch, params.shape[-1]), bound)
    inside = (inputs >= -bound) & (inputs <= bound)
    # Evaluate on the clamped input everywhere (finite values and gradients in the tails).
    v = inputs.clamp(-bound, bound)
    knots = ys if inverse else xs
    # A point exactly at an interior knot starts the bin to its right.
    idx = torch.searchsorted(knots[..., 1:-1].detach().contiguous(), v.detach().unsqueeze(-1).contiguous(), right=True)
    x_k, y_k, x_k1, y_k1 = _gather(xs, idx), _gather(ys, idx), _gather(xs, idx + 1), _gather(ys, idx + 1)
    w_k, h_k = x_k1 - x_k, y_k1 - y_k
    d_k, d_k1 = _gather(ds, idx), _gather(ds, idx + 1)
    s_k = h_k / w_k
    curve = d_k1 + d_k - 2.0 * s_k
    if inverse:
        # Solve from the lower knot and from the upper one (the mirrored spline); the two
        # b's sum to 2 h s > 0, so the side with the larger b is free of cancellation.
        lower, low_b = _quadratic_root(v - y_k, h_k, s_k, d_k, curve)
        upper, up_b = _quadratic_root(y_k1 - v, h_k, s_k, d_k1, curve)
        from_top = up_b > low_b
        theta = torch.where(from_top, 1.0 - upper, lower)
        phi = torch.where(from_top, upper, 1.0 - lower)
        out = torch.where(from_top, x_k1 - upper * w_k, x_k + lower * w_k)
    else:
        theta = ((v - x_k) / w_k).clamp(0.0, 1.0)
        phi = 1.0 - theta
    t1 = theta * phi
    denom = s_k + curve * t1
    if not inverse:
        out = y_k + h_k * (s_k * theta * theta + d_k * t1) / denom
    logd = torch.log(s_k * s_k * (d_k1 * theta * theta + 2.0 * s_k * t1 + d_k * phi * phi)) - 2.0 * torch.log(denom)
    return torch.where(inside, out, inputs), torch.where(inside, -logd if inverse else logd, torch.zeros_like(logd))


@dataclasses.dataclass(frozen=True)
class RationalQuadraticSpline(Transformer):
    """A monotone rational-quadratic spline on ``[-bound, bound]``, the identity outside.

    ``count_bins`` bins; widths and heights through a softmax with a minimum bin size of
    1e-3, interior knot derivatives through a shifted softplus plus 1e-3, outer
    derivatives 1 so value and slope are continuous at ``+-bound``. Both directions are
    closed form (the inverse is the root of a quadratic per bin).

    Args:
        count_bins: the number of bins K (``3K - 1`` parameters per coordinate).
        bound: the half-width of the interval the spline moves.

    References:
        Durkan, Bekasov, Murray & Papamakarios 2019, "Neural Spline Flows", arXiv:1906.04032.

    Example:
        >>> tau = RationalQuadraticSpline(count_bins=4)
        >>> y, logd = tau.forward(torch.tensor([0.5]), torch.zeros(1, tau.num_params))
        >>> round(y.item(), 5), abs(logd.item()) < 1e-6  # zero parameters: the identity
        (0.5, True)
    """

    count_bins: int = 8
    bound: float = 3.0

    @property
    def num_params(self) -> int:
        return spline_num_params(self.count_bins)

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> Pair:
        """The spline and its log-derivative (``rational_quadratic_spline``).

        Example:
            >>> tau = RationalQuadraticSpline(count_bins=4)
            >>> params = torch.zeros(1, tau.num_params)
            >>> params[0, 0] = 1.0  # a wider first bin
            >>> y, logd = tau.forward(torch.tensor([0.5]), params)
            >>> round(y.item(), 4), round(logd.item(), 4)
            (-0.5379, 0.4867)
        """
        return rational_quadratic_spline(x, params, self.bound)

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> Pair:
        """The inverse spline, in closed form, and its log-derivative.

        Example:
            >>> tau = RationalQuadraticSpline(count_bins=4)
            >>> params = torch.zeros(1, tau.num_params)
            >>> params[0, 0] = 1.0
            >>> x, logd = tau.inverse(tau.forward(torch.tensor([0.5]), params)[0], params)
            >>> round(x.item(), 4), round(logd.item(), 4)
            (0.5, -0.4867)
        """
        return rational_quadratic_spline(y, params, self.bound, inverse=True)


# --------------------------------------------------------------------------- deep sigmoidal map
def _neg_log_sigmoid(z):
    # softplus(-z) rather than F.logsigmoid, which is far slower on small CPU tensors;
    # threshold 40 keeps the tail exact in float64 (softplus returns its input beyond it).
    return F.softplus(-z, threshold=40.0)


@functools.lru_cache(maxsize=64)
def _offset(hidden_units: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # One constant per (K, dtype, device): no host-to-device copy per call.
    return torch.as_tensor(sigmoid_offset(hidden_units), dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class DeepSigmoid(Transformer):
    """``y = logit(sum_k w_k sigmoid(a_k x + b_k))``: the deep sigmoidal flow's transformer.

    From ``3K`` raw parameters plus fixed offsets (``pyroflows.structure.sigmoid_offset``):
    ``a = 1e-3 + softplus(.) > 0``, ``b`` free, ``w = softmax(.)`` over ``K = hidden_units``
    units. Strictly increasing and onto R; value and log-derivative are computed in log
    space (logsumexp of log-sigmoids), finite for large inputs. The inverse brackets and
    bisects to ``max(inverse_tol, 4 eps) * (1 + |x|)``, then takes one implicit Newton step,
    so values and first derivatives are exact to solver precision.

    Args:
        hidden_units: the number of sigmoid units K.

    References:
        Huang, Krueger, Lacoste & Courville 2018, "Neural Autoregressive Flows", arXiv:1804.00779.

    Example:
        >>> tau = DeepSigmoid(hidden_units=4)
        >>> params = torch.zeros(1, tau.num_params, dtype=torch.float64)
        >>> y, _ = tau.forward(torch.tensor([0.3], dtype=torch.float64), params)
        >>> x, _ = tau.inverse(y, params)
        >>> round(x.item(), 10)
        0.3
    """

    hidden_units: int = 16
    numerical_inverse = True
    inverse_tol = 1e-10

    @property
    def num_params(self) -> int:
        return 3 * self.hidden_units

    def unpack(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, log w)``, each ``(..., K)``, from raw parameters ``(..., 3K)``.

        Example:
            >>> a, b, log_w = DeepSigmoid(hidden_units=2).unpack(torch.zeros(6))
            >>> [round(v, 4) for v in a.tolist()], b.tolist(), [round(v, 4) for v in log_w.exp().tolist()]
            ([1.0, 1.0], [-1.0, 1.0], [0.5, 0.5])
        """
        out = params + _offset(self.hidden_units, params.dtype, params.device)
        k = self.hidden_units
        return MIN_SLOPE + F.softplus(out[..., :k]), out[..., k : 2 * k], torch.log_softmax(out[..., 2 * k :], -1)

    @staticmethod
    def evaluate(
        x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, log_w: torch.Tensor, log_derivative: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The map and (optionally) its log-derivative at ``x`` for unpacked parameters.

        Args:
            x: points, shape ``(...)``.
            a: slopes, ``(..., K)``.
            b: offsets, ``(..., K)``.
            log_w: log-weights, ``(..., K)``.
            log_derivative: also compute ``log dy/dx`` (else ``None``).

        Returns:
            ``(y, log dy/dx)``, each shaped like ``x``.

        Example:
            >>> a, b, log_w = DeepSigmoid(hidden_units=2).unpack(torch.zeros(6))
            >>> y, logd = DeepSigmoid.evaluate(torch.zeros(1), a, b, log_w)
            >>> y.tolist(), round(logd.item(), 4)  # symmetric units: y(0) = 0
            ([0.0], -0.2402)
        """
        z = torch.addcmul(b, a, x.unsqueeze(-1))
        nls_pos, nls_neg = _neg_log_sigmoid(z), _neg_log_sigmoid(-z)  # -log sigmoid(+-z)
        log_p = torch.logsumexp(log_w - nls_pos, -1)
        log_q = torch.logsumexp(log_w - nls_neg, -1)  # log(1 - p), never log1p(-p)
        if not log_derivative:
            return log_p - log_q, None
        # dy/dx = p' / (p (1 - p)),  p' = sum_k w_k a_k sigmoid(z_k) sigmoid(-z_k)
        log_dp = torch.logsumexp(log_w + torch.log(a) - nls_pos - nls_neg, -1)
        return log_p - log_q, log_dp - log_p - log_q

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> Pair:
        """The map and its log-derivative, in closed form.

        Example:
            >>> tau = DeepSigmoid(hidden_units=2)
            >>> y, _ = tau.forward(torch.tensor([-1.0, 1.0]), torch.zeros(2, tau.num_params))
            >>> bool(y[0] < y[1])  # increasing
            True
        """
        return self.evaluate(x, *self.unpack(params))

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> Pair:
        """The inverse by bisection and one implicit Newton step, and its log-derivative.

        Example:
            >>> tau = DeepSigmoid(hidden_units=2)
            >>> params = torch.zeros(1, tau.num_params, dtype=torch.float64)
            >>> x, logd = tau.inverse(torch.tensor([0.0], dtype=torch.float64), params)
            >>> round(x.item(), 8), round(logd.item(), 4)
            (0.0, 0.2402)
        """
        a, b, log_w = self.unpack(params)
        ad, bd, wd = a.detach(), b.detach(), log_w.detach()
        tol = max(self.inverse_tol, 4 * torch.finfo(y.dtype).eps)  # never ask float32 for 1e-10
        root = bisect_increasing(lambda u: self.evaluate(u, ad, bd, wd, False)[0], y, tol=tol)
        value, log_d = self.evaluate(root, a, b, log_w)
        x = implicit_step(root, value, torch.exp(log_d), y)
        return x, -self.evaluate(x, a, b, log_w)[1]


#: The transformers by the name a ``FlowSpec`` gives them.
TRANSFORMERS = {"additive": Additive, "affine": Affine, "spline": RationalQuadraticSpline, "sigmoid": DeepSigmoid}
