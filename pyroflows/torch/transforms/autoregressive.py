"""Block neural autoregressive flow (BNAF): a family with its own structure.

The conditioner x transformer autoregressive families (IAF, MAF, NAF, autoregressive
NSF) are ``MaskedAutoregressive`` layers in ``conditioners.py``. BNAF's layer is one
monotone network per coordinate whose weights are block lower triangular, so its
Jacobian is lower triangular; its inverse solves the coordinates one after another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...structure import block_masks
from ..flows import register_flow
from .base import FlowTransform, bisect_increasing, implicit_step, interleave, soft_clamp

__all__ = ["BlockNeuralAutoregressive"]


def _solver_tol(tol: float, dtype: torch.dtype) -> float:
    # Bisection cannot shrink an interval below a few ulps; never ask float32 for 1e-10.
    return max(tol, 4 * torch.finfo(dtype).eps)


def _neg_log_sigmoid(z):
    # softplus(-z) rather than F.logsigmoid, which is far slower on small CPU tensors
    return F.softplus(-z, threshold=40.0)


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
        diag, below = block_masks(dim, a, b)
        self.register_buffer("diag_mask", torch.as_tensor(diag))
        self.register_buffer("off_mask", torch.as_tensor(below, dtype=torch.get_default_dtype()))
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


class BlockNeuralAutoregressive(FlowTransform):
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

    Each block layer's rows are weight-normalised with a learned, soft-clamped gain; the
    gains start so that a fresh ``f`` is close to the identity over a few standard
    deviations, and ``g`` starts at 1/2.

    Args:
        dim: the event size.
        hidden_factors: ``(h_1, ..., h_L)``, hidden units per coordinate in each hidden
            layer (an int is one hidden layer).

    References:
        De Cao, Titov & Aziz 2019, "Block Neural Autoregressive Flow", arXiv:1904.04676.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = BlockNeuralAutoregressive(2, hidden_factors=(4,))
        >>> x = torch.tensor([0.3, -1.2])
        >>> jac = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x)
        >>> ladj = layer.call_and_ladj(x)[1]
        >>> bool(jac[0, 1] == 0), bool(torch.isclose(ladj, torch.logdet(jac), atol=1e-5))  # lower triangular
        (True, True)
    """

    numerical_inverse = True
    inverse_tol = 1e-10
    autoregressive = True

    def __init__(self, dim: int, hidden_factors: int | Sequence[int] = (8, 8)):
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

    def get_permutation(self) -> torch.Tensor:
        """The order in which coordinates are generated: the natural one (builders permute between layers).

        Example:
            >>> BlockNeuralAutoregressive(3, hidden_factors=2).get_permutation().tolist()
            [0, 1, 2]
        """
        return torch.arange(self.dim)

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

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|)`` in one parallel pass; the log-det sums the exact ``log dy_i/dx_i``.

        Example:
            >>> y, ladj = BlockNeuralAutoregressive(2, hidden_factors=(4,)).call_and_ladj(torch.zeros(5, 2))
            >>> tuple(y.shape), tuple(ladj.shape)
            ((5, 2), (5,))
        """
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

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|det dx/dy|)``, solved one coordinate after another (bisection, then a Newton step).

        Example:
            >>> _ = torch.manual_seed(0)
            >>> layer = BlockNeuralAutoregressive(2, hidden_factors=(4,)).double()
            >>> x = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
            >>> y, ladj = layer.call_and_ladj(x)
            >>> x_back, inv_ladj = layer.inverse_and_ladj(y)
            >>> bool(torch.allclose(x_back, x)), bool(torch.allclose(inv_ladj, -ladj))
            (True, True)
        """
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

    def extra_repr(self) -> str:
        """The event size and the hidden factors, for the ``repr``.

        Example:
            >>> BlockNeuralAutoregressive(2, hidden_factors=(4,)).extra_repr()
            'dim=2, hidden_factors=(4,)'
        """
        return f"dim={self.dim}, hidden_factors={self.hidden_factors}"


@register_flow("bnaf")
def bnaf(dim: int, num_layers: int, hidden_factors: int | Sequence[int], permutation: str) -> list[FlowTransform]:
    """The layers of ``build_flow("bnaf", ...)``: BNAF layers with permutations between.

    Example:
        >>> [type(layer).__name__ for layer in bnaf(2, 2, (4,), "reverse")]
        ['BlockNeuralAutoregressive', 'Permute', 'BlockNeuralAutoregressive']
    """
    blocks = [BlockNeuralAutoregressive(dim, hidden_factors) for _ in range(num_layers)]
    return interleave(blocks, dim, permutation)
