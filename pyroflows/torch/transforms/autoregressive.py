"""Autoregressive layers: affine (IAF, MAF), deep sigmoidal (NAF) and block neural (BNAF).

Every layer here uses the natural coordinate order: coordinate i of the output depends on
coordinates ``<= i`` of the input, so its Jacobian is lower triangular. Builders put
``Permute`` layers between blocks. One direction is a single parallel pass; the other
solves the coordinates one after another (``dim`` sequential passes).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..flows import register_flow
from ..nn import MADE
from .base import FlowTransform, bisect_increasing, implicit_step, interleave, soft_clamp

__all__ = ["AffineAutoregressive", "NeuralAutoregressive", "BlockNeuralAutoregressive"]


def _solver_tol(tol: float, dtype: torch.dtype) -> float:
    # Bisection cannot shrink an interval below a few ulps; never ask float32 for 1e-10.
    return max(tol, 4 * torch.finfo(dtype).eps)


def _with_prefix(cols, like: torch.Tensor, dim: int) -> torch.Tensor:
    """The solved columns followed by zeros: what the conditioner sees at step ``len(cols)``."""
    rest = like.new_zeros(like.shape[:-1] + (dim - len(cols),))
    return torch.cat([*cols, rest], -1) if cols else rest


class _Autoregressive(FlowTransform):
    autoregressive = True

    def get_permutation(self) -> torch.Tensor:
        """The order in which coordinates are generated: the natural one (builders permute between layers)."""
        return torch.arange(self.dim)


class AffineAutoregressive(_Autoregressive):
    """Affine autoregressive layer with a MADE conditioner: IAF or MAF.

    ``conditioner="input"`` (IAF, Kingma et al. 2016, arXiv:1606.04934):
    ``y_i = x_i * exp(s_i(x_<i)) + m_i(x_<i)``; the forward (sampling) is one parallel MADE
    pass, the inverse ``dim`` sequential passes.

    ``conditioner="output"`` (MAF, Papamakarios et al. 2017, arXiv:1705.07057):
    ``y_i = x_i * exp(s_i(y_<i)) + m_i(y_<i)``; the inverse (density evaluation) is one
    parallel pass ``x = (y - m(y)) * exp(-s(y))``, the forward ``dim`` sequential passes.

    ``(m, s_raw)`` come from a MADE (Germain et al. 2015, arXiv:1502.03509) whose last
    layer starts at zero, so a fresh layer is the identity; the log-scale is soft-clamped,
    ``s = bound * tanh(s_raw / bound)``. log|det dy/dx| = sum_i s_i. Both directions are
    exact (no numerical solve).
    """

    def __init__(
        self,
        dim: int,
        hidden_dims=(64, 64),
        activation: str = "relu",
        log_scale_bound: float = 5.0,
        conditioner: str = "input",
    ):
        if conditioner not in ("input", "output"):
            raise ValueError(f"conditioner={conditioner!r} is not one of ['input', 'output']")
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound={log_scale_bound!r} must be a positive number")
        super().__init__(dim)
        self.conditioner = conditioner
        self.log_scale_bound = float(log_scale_bound)
        self.made = MADE(dim, hidden_dims, 2, activation)

    def shift_and_log_scale(self, v):
        """``(m(v), s(v))``, each of shape ``(..., dim)``; entry i depends on ``v_<i`` only."""
        shift, raw = self.made(v).unbind(-1)
        # soft_clamp(raw, bound), written exactly as the density path negates it
        return shift, torch.tanh(raw * (1.0 / self.log_scale_bound)) * self.log_scale_bound

    def _parallel_forward(self, x):
        shift, s = self.shift_and_log_scale(x)
        return x * torch.exp(s) + shift, s.sum(-1)

    def _parallel_inverse(self, y):
        # MAF's density path: -s = -bound * tanh(raw / bound) formed directly, no extra negations.
        shift, raw = self.made(y).unbind(-1)
        neg_s = torch.tanh(raw * (1.0 / self.log_scale_bound)) * (-self.log_scale_bound)
        return (y - shift) * torch.exp(neg_s), neg_s.sum(-1)

    def _sequential(self, given, forward: bool):
        """Solve for the side the conditioner reads, one coordinate at a time (``dim`` MADE passes).

        IAF inverse and MAF forward. Solved columns are collected in a list, so autograd
        sees no in-place writes and gradients are exact.
        """
        cols, log_scales = [], []
        for i in range(self.dim):
            shift, s = self.shift_and_log_scale(_with_prefix(cols, given, self.dim))
            shift, s = shift[..., i : i + 1], s[..., i : i + 1]
            g = given[..., i : i + 1]
            cols.append(g * torch.exp(s) + shift if forward else (g - shift) * torch.exp(-s))
            log_scales.append(s)
        total = torch.cat(log_scales, -1).sum(-1)
        return torch.cat(cols, -1), total if forward else -total

    def call_and_ladj(self, x):
        if self.conditioner == "input":
            return self._parallel_forward(x)
        return self._sequential(x, forward=True)

    def inverse_and_ladj(self, y):
        if self.conditioner == "output":
            return self._parallel_inverse(y)
        return self._sequential(y, forward=False)

    def extra_repr(self):
        return f"dim={self.dim}, conditioner={self.conditioner!r}, log_scale_bound={self.log_scale_bound}"


def _neg_log_sigmoid(z):
    # softplus(-z) rather than F.logsigmoid, which is far slower on small CPU tensors;
    # threshold 40 keeps the tail exact in float64 (softplus returns its input beyond it).
    return F.softplus(-z, threshold=40.0)


# Smallest slope of a sigmoid unit: keeps a > 0 even where softplus underflows.
_MIN_SLOPE = 1e-3


class NeuralAutoregressive(_Autoregressive):
    """Deep sigmoidal flow layer (Huang, Krueger, Lacoste & Courville 2018, arXiv:1804.00779).

    Per coordinate, with ``(a, b, w)`` in ``R^K`` given by a MADE on ``x_<i``:
    ``y_i = logit( sum_k w_k * sigmoid(a_k * x_i + b_k) )``, where ``a = 1e-3 + softplus(.)``
    (> 0), ``b`` is free and ``w = softmax(.)`` over the ``K = hidden_units`` units. It is
    strictly increasing in ``x_i`` and onto R (every ``a_k > 0``). ``y`` and ``log dy_i/dx_i``
    are computed in log space (logsigmoid, logsumexp), so they stay finite for large inputs.

    Fixed offsets make a zero MADE output a well-scaled map: ``a_k = 1`` and ``b_k`` evenly
    spread over ``[-1, 1]``, so a fresh layer is a smooth, near-identity monotone map whose
    units differ (identical units would get identical gradients forever).

    Forward: one parallel MADE pass (the conditioner reads the input). Inverse: coordinate
    after coordinate, a MADE pass on the solved prefix, bisection to
    ``max(inverse_tol, 4 eps) * (1 + |x|)``, then one implicit Newton step, so values and
    first derivatives (w.r.t. ``y`` and the parameters) are exact to solver precision.
    """

    numerical_inverse = True
    inverse_tol = 1e-10

    def __init__(self, dim: int, hidden_dims=(64, 64), hidden_units: int = 16, activation: str = "relu"):
        super().__init__(dim)
        self.hidden_units = k = int(hidden_units)
        self.made = MADE(dim, hidden_dims, 3 * k, activation)
        a0 = math.log(math.expm1(1.0 - _MIN_SLOPE))  # softplus(a0) + _MIN_SLOPE = 1
        b0 = torch.linspace(-1.0, 1.0, k) if k > 1 else torch.zeros(1)
        # Derived from hidden_units, so not saved (persistent=False): the JAX layer derives it too.
        self.register_buffer("offset", torch.cat([torch.full((k,), a0), b0, torch.zeros(k)]), persistent=False)

    def transformer_params(self, v):
        """``(a, b, log w)`` for every coordinate, each of shape ``(..., dim, K)``, from ``v_<i``."""
        out = self.made(v) + self.offset
        return self._split(out)

    def _split(self, out):
        k = self.hidden_units
        raw_a, b, raw_w = out[..., :k], out[..., k : 2 * k], out[..., 2 * k :]
        return _MIN_SLOPE + F.softplus(raw_a), b, torch.log_softmax(raw_w, -1)

    @staticmethod
    def transformer(x, a, b, log_w, log_derivative=True):
        """``logit(sum_k w_k sigmoid(a_k x + b_k))`` and its log-derivative in x, elementwise.

        ``x`` has shape ``(...)``, the parameters ``(..., K)``.
        """
        z = torch.addcmul(b, a, x.unsqueeze(-1))
        # -log sigmoid(z) and -log sigmoid(-z)
        nls_pos, nls_neg = _neg_log_sigmoid(z), _neg_log_sigmoid(-z)
        log_p = torch.logsumexp(log_w - nls_pos, -1)
        log_q = torch.logsumexp(log_w - nls_neg, -1)  # log(1 - p), never log1p(-p)
        y = log_p - log_q
        if not log_derivative:
            return y, None
        # dy/dx = p' / (p (1 - p)),  p' = sum_k w_k a_k sigmoid(z_k) sigmoid(-z_k)
        log_dp = torch.logsumexp(log_w + torch.log(a) - nls_pos - nls_neg, -1)
        return y, log_dp - log_p - log_q

    def call_and_ladj(self, x):
        a, b, log_w = self.transformer_params(x)
        y, log_d = self.transformer(x, a, b, log_w)
        return y, log_d.sum(-1)

    def inverse_and_ladj(self, y):
        tol = _solver_tol(self.inverse_tol, y.dtype)
        cols, log_ds = [], []
        for i in range(self.dim):
            out = self.made(_with_prefix(cols, y, self.dim))[..., i, :] + self.offset
            a, b, log_w = self._split(out)
            target = y[..., i]
            ad, bd, wd = a.detach(), b.detach(), log_w.detach()
            root = bisect_increasing(lambda u: self.transformer(u, ad, bd, wd, False)[0], target, tol=tol)
            value, log_d = self.transformer(root, a, b, log_w)
            x_i = implicit_step(root, value, torch.exp(log_d), target)
            log_ds.append(self.transformer(x_i, a, b, log_w)[1])
            cols.append(x_i.unsqueeze(-1))
        return torch.cat(cols, -1), -torch.stack(log_ds, -1).sum(-1)

    def extra_repr(self):
        return f"dim={self.dim}, hidden_units={self.hidden_units}"


def _log_dtanh(h):
    """log(1 - tanh(h)^2) = log 4 - 2|h| - 2 softplus(-2|h|), finite for any h."""
    h = h.abs()
    return 2.0 * (math.log(2.0) - h - F.softplus(-2.0 * h))


def _small_linear(h, w):
    """``h @ w.T`` for one tiny diagonal block, by broadcasting: BLAS calls on such sizes
    cost more in dispatch (and thread wake-ups) than the arithmetic, and the bisection
    makes thousands of them."""
    return (h.unsqueeze(-2) * w).sum(-1)


# Row gains of the weight-normalised block layers are exp(soft-clamped log-gain).
_LOG_GAIN_BOUND = 6.0
# Initial gain of BNAF's first layer (undone by the last): the tanh units start in their
# near-linear range, so a fresh f is close to the identity on a few standard deviations.
_INPUT_GAIN = 1.0 / 3.0


class _BlockLinear(nn.Module):
    """A ``(dim*a) -> (dim*b)`` linear map with block lower-triangular weights.

    Blocks are ``b x a``. Diagonal blocks are ``exp(raw)`` (positive), blocks below the
    diagonal are ``raw`` (free), blocks above are zero. Each row is weight-normalised,
    ``W = exp(gain) * W~ / ||W~_row||`` (De Cao et al. 2019), so
    ``log W_diag = gain + raw - log||W~_row||`` is available in closed form.
    """

    def __init__(self, dim: int, a: int, b: int, log_gain: float = 0.0):
        super().__init__()
        self.dim, self.a, self.b = dim, a, b
        blocks = torch.arange(dim)
        row_block = blocks.repeat_interleave(b)[:, None]
        col_block = blocks.repeat_interleave(a)[None, :]
        self.register_buffer("diag_mask", row_block == col_block)
        self.register_buffer("off_mask", (row_block > col_block).to(torch.get_default_dtype()))
        bound = 1.0 / math.sqrt(dim * a)
        self.raw = nn.Parameter(torch.empty(dim * b, dim * a).uniform_(-bound, bound))
        self.raw_log_gain = nn.Parameter(
            torch.full((dim * b,), _LOG_GAIN_BOUND * math.atanh(log_gain / _LOG_GAIN_BOUND))
        )
        bias_bound = _INPUT_GAIN / math.sqrt(a)
        self.bias = nn.Parameter(torch.empty(dim * b).uniform_(-bias_bound, bias_bound))

    def weights(self):
        """``(W, log W_diag)``: the full ``(dim*b, dim*a)`` matrix and its diagonal blocks ``(dim, b, a)``."""
        raw = self.raw
        with torch.no_grad():
            # Factor out each row's largest entry so exp and the squares cannot overflow.
            neg_inf = torch.tensor(-math.inf, dtype=raw.dtype, device=raw.device)
            big = torch.where(self.diag_mask, raw, neg_inf).amax(-1, keepdim=True)
            off_big = (raw.abs() * self.off_mask).amax(-1, keepdim=True)
            m = torch.maximum(big, torch.log(off_big.clamp_min(torch.finfo(raw.dtype).tiny)))
        diag = torch.exp(torch.where(self.diag_mask, raw - m, neg_inf))
        off = raw * self.off_mask * torch.exp(-m)
        sq = (diag.square() + off.square()).sum(-1, keepdim=True)  # >= 1 by the choice of m
        log_norm = m + 0.5 * torch.log(sq)
        gain = soft_clamp(self.raw_log_gain, _LOG_GAIN_BOUND).unsqueeze(-1)
        weight = torch.exp(gain - 0.5 * torch.log(sq)) * (diag + off)
        log_w = (gain + raw - log_norm).reshape(self.dim, self.b, self.dim, self.a)
        log_diag = torch.diagonal(log_w, dim1=0, dim2=2).permute(2, 0, 1)
        return weight, log_diag


class BlockNeuralAutoregressive(_Autoregressive):
    """Block neural autoregressive flow layer with a gated residual (De Cao, Titov & Aziz 2019, arXiv:1904.04676).

    ``f`` is a network of block lower-triangular linear layers
    ``dim -> dim*h_1 -> ... -> dim*h_L -> dim`` (``hidden_factors = (h_1, ..., h_L)``) with
    tanh between them; diagonal blocks are positive (exp, then row weight normalisation),
    blocks below the diagonal free, blocks above zero, so ``f_i`` depends on ``x_<=i`` and
    increases in ``x_i``. ``f`` is bounded, so the layer adds a gated residual to be onto
    R^dim: ``y = g * f(x) + (1 - g) * x`` with ``g = sigmoid(gate)`` per coordinate.
    ``log dy_i/dx_i = logaddexp(log g + log f'_ii, log(1 - g))``, where ``log f'_ii`` is
    accumulated exactly through the diagonal blocks by log-space matrix products.

    Forward: one parallel pass. Inverse: coordinate after coordinate, bisection of the
    one-dimensional map (the solved prefix fixed) to ``max(inverse_tol, 4 eps) * (1 + |x|)``,
    then one implicit Newton step, so values and first derivatives are exact.
    """

    numerical_inverse = True
    inverse_tol = 1e-10

    def __init__(self, dim: int, hidden_factors=(8, 8)):
        super().__init__(dim)
        if isinstance(hidden_factors, int):
            hidden_factors = (hidden_factors,)
        self.hidden_factors = tuple(int(h) for h in hidden_factors)
        sizes = [1, *self.hidden_factors, 1]
        layers = []
        for n, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            # Gain 1/sqrt(a): a row of a near-equal positive entries then has unit slope.
            log_gain = -0.5 * math.log(a)
            log_gain += math.log(_INPUT_GAIN) if n == 0 else 0.0
            log_gain -= math.log(_INPUT_GAIN) if n == len(sizes) - 2 else 0.0
            layers.append(_BlockLinear(dim, a, b, log_gain))
        self.layers = nn.ModuleList(layers)
        self.gate = nn.Parameter(torch.zeros(dim))

    def _network(self, x, weights):
        """``f(x)`` and ``log f'_ii`` for every coordinate."""
        h = x
        log_j = x.new_zeros(x.shape + (1,))  # (..., dim, a): log d h_block_i / d x_i
        last = len(weights) - 1
        for n, (layer, (w, log_diag)) in enumerate(zip(self.layers, weights)):
            pre = F.linear(h, w, layer.bias)
            log_j = torch.logsumexp(log_diag + log_j.unsqueeze(-2), -1)
            if n < last:
                h = torch.tanh(pre)
                log_j = log_j + _log_dtanh(pre).reshape(log_j.shape)
            else:
                h = pre
        return h, log_j.squeeze(-1)

    def _gated(self, x, f, log_df, gate):
        g = torch.sigmoid(gate)
        y = g * f + (1 - g) * x
        return y, torch.logaddexp(log_df - _neg_log_sigmoid(gate), -_neg_log_sigmoid(-gate))

    def call_and_ladj(self, x):
        weights = [layer.weights() for layer in self.layers]
        f, log_df = self._network(x, weights)
        y, log_d = self._gated(x, f, log_df, self.gate)
        return y, log_d.sum(-1)

    @staticmethod
    def _coordinate(u, i, offs, weights):
        """``f_i`` and ``log f'_ii`` as functions of ``x_i`` alone, the prefix's contributions ``offs`` fixed."""
        h = u.unsqueeze(-1)
        log_j = torch.zeros_like(h)
        last = len(weights) - 1
        for n, (off, (_, log_diag)) in enumerate(zip(offs, weights)):
            block = log_diag[i]  # (b, a)
            pre = off + _small_linear(h, torch.exp(block))
            log_j = torch.logsumexp(block + log_j.unsqueeze(-2), -1)
            if n < last:
                h = torch.tanh(pre)
                log_j = log_j + _log_dtanh(pre)
            else:
                h = pre
        return h.squeeze(-1), log_j.squeeze(-1)

    @staticmethod
    def _solver_map(i, offs, weights, gate):
        """``x_i -> y_i`` without gradients, for bisection: weights exponentiated and the gate folded in once."""
        with torch.no_grad():
            ws = [log_diag[i].exp() for _, log_diag in weights]
            offs = [o.detach() for o in offs]
            g = torch.sigmoid(gate.detach())
            ws[-1], offs[-1], keep = ws[-1] * g, offs[-1] * g, 1 - g

        def fn(u):
            h = u.unsqueeze(-1)
            for n, (w, off) in enumerate(zip(ws, offs)):
                h = off + _small_linear(h, w)
                if n < len(ws) - 1:
                    h = torch.tanh(h)
            return torch.addcmul(h.squeeze(-1), keep, u)

        return fn

    def inverse_and_ladj(self, y):
        tol = _solver_tol(self.inverse_tol, y.dtype)
        weights = [layer.weights() for layer in self.layers]
        cols, log_ds = [], []
        for i in range(self.dim):
            # Contributions of the solved prefix x_<i to block i of every layer.
            h = y.new_zeros(y.shape[:-1] + (0,)) if i == 0 else torch.cat(cols, -1)
            offs = []
            for n, (layer, (w, _)) in enumerate(zip(self.layers, weights)):
                a, b = layer.a, layer.b
                rows = slice(i * b, (i + 1) * b)
                offs.append(F.linear(h, w[rows, : i * a], layer.bias[rows]))
                if n < len(weights) - 1:
                    h = torch.tanh(F.linear(h, w[: i * b, : i * a], layer.bias[: i * b]))
            gate, target = self.gate[i], y[..., i]
            root = bisect_increasing(self._solver_map(i, offs, weights, gate), target, tol=tol)
            f, log_df = self._coordinate(root, i, offs, weights)
            value, log_d = self._gated(root, f, log_df, gate)
            x_i = implicit_step(root, value, torch.exp(log_d), target)
            f, log_df = self._coordinate(x_i, i, offs, weights)
            log_ds.append(self._gated(x_i, f, log_df, gate)[1])
            cols.append(x_i.unsqueeze(-1))
        return torch.cat(cols, -1), -torch.stack(log_ds, -1).sum(-1)

    def extra_repr(self):
        return f"dim={self.dim}, hidden_factors={self.hidden_factors}"


@register_flow("iaf")
def iaf(dim, num_layers, hidden_dims, activation, permutation, log_scale_bound):
    blocks = [AffineAutoregressive(dim, hidden_dims, activation, log_scale_bound, "input") for _ in range(num_layers)]
    return interleave(blocks, dim, permutation)


@register_flow("maf")
def maf(dim, num_layers, hidden_dims, activation, permutation, log_scale_bound):
    blocks = [AffineAutoregressive(dim, hidden_dims, activation, log_scale_bound, "output") for _ in range(num_layers)]
    return interleave(blocks, dim, permutation)


@register_flow("naf")
def naf(dim, num_layers, hidden_dims, activation, permutation, hidden_units):
    blocks = [NeuralAutoregressive(dim, hidden_dims, hidden_units, activation) for _ in range(num_layers)]
    return interleave(blocks, dim, permutation)


@register_flow("bnaf")
def bnaf(dim, num_layers, hidden_factors, permutation):
    blocks = [BlockNeuralAutoregressive(dim, hidden_factors) for _ in range(num_layers)]
    return interleave(blocks, dim, permutation)
