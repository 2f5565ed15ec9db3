"""Autoregressive layers: affine (IAF, MAF), deep sigmoidal (NAF) and block neural (BNAF).

JAX mirror of ``pyroflows.torch.transforms.autoregressive``: the same fields, formulas
and numbers. Every layer uses the natural coordinate order: coordinate i of the output
depends on coordinates ``<= i`` of the input, so its Jacobian is lower triangular.
Builders put ``Permute`` layers between blocks. One direction is a single parallel
pass; the other solves the coordinates one after another inside ``jax.lax.fori_loop``
(a scan of length ``dim``, so compile time does not grow with ``dim`` and reverse-mode
gradients flow through it).
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..flows import register_flow
from ..nn import MADE, host_rng
from .base import FlowTransform, bisect_increasing, implicit_step, interleave, soft_clamp

__all__ = ["AffineAutoregressive", "NeuralAutoregressive", "BlockNeuralAutoregressive"]


def _solver_tol(tol: float, dtype) -> float:
    # Bisection cannot shrink an interval below a few ulps; never ask float32 for 1e-10.
    return max(tol, 4 * float(jnp.finfo(dtype).eps))


class _Autoregressive(FlowTransform):
    autoregressive: ClassVar[bool] = True

    def get_permutation(self):
        """The order in which coordinates are generated: the natural one (builders permute between layers)."""
        return jnp.arange(self.dim)


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
    exact (no numerical solve); the sequential one is a ``fori_loop`` over coordinates.
    """

    made: MADE
    conditioner: str = eqx.field(static=True)
    log_scale_bound: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden_dims=(64, 64),
        activation: str = "relu",
        log_scale_bound: float = 5.0,
        conditioner: str = "input",
        *,
        key,
    ):
        if conditioner not in ("input", "output"):
            raise ValueError(f"conditioner={conditioner!r} is not one of ['input', 'output']")
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound={log_scale_bound!r} must be a positive number")
        self.dim = int(dim)
        self.conditioner = conditioner
        self.log_scale_bound = float(log_scale_bound)
        self.made = MADE(self.dim, hidden_dims, 2, activation, key=key)

    def shift_and_log_scale(self, v):
        """``(m(v), s(v))``, each of shape ``(dim,)``; entry i depends on ``v_<i`` only."""
        out = self.made(v)
        # soft_clamp(raw, bound), written exactly as torch (and the density path) forms it
        return out[:, 0], jnp.tanh(out[:, 1] * (1.0 / self.log_scale_bound)) * self.log_scale_bound

    def _parallel_forward(self, x):
        shift, s = self.shift_and_log_scale(x)
        return x * jnp.exp(s) + shift, s.sum()

    def _parallel_inverse(self, y):
        # MAF's density path: -s = -bound * tanh(raw / bound) formed directly, no extra negations.
        out = self.made(y)
        neg_s = jnp.tanh(out[:, 1] * (1.0 / self.log_scale_bound)) * (-self.log_scale_bound)
        return (y - out[:, 0]) * jnp.exp(neg_s), neg_s.sum()

    def _sequential(self, given, forward: bool):
        """Solve for the side the conditioner reads, one coordinate at a time (``dim`` MADE passes).

        IAF inverse and MAF forward. The carry holds the solved prefix and zeros after it
        (what torch's conditioner sees at each step); coordinate i is written after the
        MADE pass that reads only ``< i``, so gradients through the scan are exact.
        """

        def body(i, carry):
            v, total = carry
            shift, s = self.shift_and_log_scale(v)
            g, m, si = given[i], shift[i], s[i]
            new = g * jnp.exp(si) + m if forward else (g - m) * jnp.exp(-si)
            return v.at[i].set(new.astype(v.dtype)), total + si.astype(total.dtype)

        init = (jnp.zeros_like(given), jnp.zeros((), given.dtype))
        v, total = jax.lax.fori_loop(0, self.dim, body, init)
        return v, total if forward else -total

    def call_and_ladj(self, x):
        if self.conditioner == "input":
            return self._parallel_forward(x)
        return self._sequential(x, forward=True)

    def inverse_and_ladj(self, y):
        if self.conditioner == "output":
            return self._parallel_inverse(y)
        return self._sequential(y, forward=False)


def _softplus(z):
    # log(1 + e^z), exact in both tails; leaner than jax.nn.softplus (logaddexp adds
    # selects), and the solver loops inline several copies of every op.
    return jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _neg_log_sigmoid(z):
    return _softplus(-z)


def _neg_log_sigmoids(z):
    """``(-log sigmoid(z), -log sigmoid(-z))`` sharing one ``log1p(exp(-|z|))`` (exact in both tails)."""
    common = jnp.log1p(jnp.exp(-jnp.abs(z)))
    return jnp.maximum(-z, 0.0) + common, jnp.maximum(z, 0.0) + common


def _logsumexp(v):
    """logsumexp over the last axis; a lean form (fewer XLA kernels than jax.scipy's) whose
    shift carries no gradient, so its derivative is the softmax."""
    m = jax.lax.stop_gradient(jnp.max(v, -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m[..., 0] + jnp.log(jnp.sum(jnp.exp(v - m), -1))


# Smallest slope of a sigmoid unit: keeps a > 0 even where softplus underflows.
_MIN_SLOPE = 1e-3


def naf_offset(hidden_units: int) -> np.ndarray:
    """The fixed offsets added to NAF's MADE output, ``(a0 * ones(K), linspace(-1, 1, K), zeros(K))``.

    A constant of the static config (float64 numpy), not a leaf: NumPyro trains every
    inexact array, and torch keeps it as a buffer, i.e. untrained.
    """
    k = int(hidden_units)
    a0 = math.log(math.expm1(1.0 - _MIN_SLOPE))  # softplus(a0) + _MIN_SLOPE = 1
    b0 = np.linspace(-1.0, 1.0, k) if k > 1 else np.zeros(1)
    return np.concatenate([np.full(k, a0), b0, np.zeros(k)])


class NeuralAutoregressive(_Autoregressive):
    """Deep sigmoidal flow layer (Huang, Krueger, Lacoste & Courville 2018, arXiv:1804.00779).

    Per coordinate, with ``(a, b, w)`` in ``R^K`` given by a MADE on ``x_<i``:
    ``y_i = logit( sum_k w_k * sigmoid(a_k * x_i + b_k) )``, where ``a = 1e-3 + softplus(.)``
    (> 0), ``b`` is free and ``w = softmax(.)`` over the ``K = hidden_units`` units. It is
    strictly increasing in ``x_i`` and onto R (every ``a_k > 0``). ``y`` and ``log dy_i/dx_i``
    are computed in log space (logsigmoid, logsumexp), so they stay finite for large inputs.

    Fixed offsets make a zero MADE output a well-scaled map: ``a_k = 1`` and ``b_k`` evenly
    spread over ``[-1, 1]``, so a fresh layer is a smooth, near-identity monotone map whose
    units differ. They are derived from ``hidden_units`` (``naf_offset``), not stored.

    Forward: one parallel MADE pass (the conditioner reads the input). Inverse: a
    ``fori_loop`` over coordinates, each a MADE pass on the solved prefix, bisection to
    ``max(inverse_tol, 4 eps) * (1 + |x|)``, then one implicit Newton step, so values and
    first derivatives (w.r.t. ``y`` and the parameters) are exact to solver precision.
    """

    numerical_inverse: ClassVar[bool] = True
    inverse_tol: ClassVar[float] = 1e-10

    made: MADE
    hidden_units: int = eqx.field(static=True)

    def __init__(self, dim: int, hidden_dims=(64, 64), hidden_units: int = 16, activation: str = "relu", *, key):
        self.dim = int(dim)
        self.hidden_units = int(hidden_units)
        self.made = MADE(self.dim, hidden_dims, 3 * self.hidden_units, activation, key=key)

    def _offset(self, like):
        return jnp.asarray(naf_offset(self.hidden_units), dtype=like.dtype)

    def transformer_params(self, v):
        """``(a, b, log w)`` for every coordinate, each of shape ``(dim, K)``, from ``v_<i``."""
        out = self.made(v)
        return self._split(out + self._offset(out))

    def _split(self, out):
        k = self.hidden_units
        raw_a, b, raw_w = out[..., :k], out[..., k : 2 * k], out[..., 2 * k :]
        return _MIN_SLOPE + _softplus(raw_a), b, raw_w - _logsumexp(raw_w)[..., None]

    @staticmethod
    def transformer(x, a, b, log_w, log_derivative=True):
        """``logit(sum_k w_k sigmoid(a_k x + b_k))`` and its log-derivative in x, elementwise.

        ``x`` has shape ``(...)``, the parameters ``(..., K)``.
        """
        z = b + a * x[..., None]
        nls_pos, nls_neg = _neg_log_sigmoids(z)  # -log sigmoid(z), -log sigmoid(-z)
        if not log_derivative:
            log_pq = _logsumexp(jnp.stack([log_w - nls_pos, log_w - nls_neg], -2))
            return log_pq[..., 0] - log_pq[..., 1], None
        # One stacked logsumexp for log p, log(1 - p) (never log1p(-p)) and log p', where
        # p' = sum_k w_k a_k sigmoid(z_k) sigmoid(-z_k): fewer kernels to compile.
        terms = [log_w - nls_pos, log_w - nls_neg, log_w + jnp.log(a) - nls_pos - nls_neg]
        lse = _logsumexp(jnp.stack(terms, -2))
        log_p, log_q, log_dp = lse[..., 0], lse[..., 1], lse[..., 2]
        # y = logit(p);  dy/dx = p' / (p (1 - p))
        return log_p - log_q, log_dp - log_p - log_q

    def call_and_ladj(self, x):
        a, b, log_w = self.transformer_params(x)
        y, log_d = self.transformer(x, a, b, log_w)
        return y, log_d.sum()

    def inverse_and_ladj(self, y):
        tol = _solver_tol(self.inverse_tol, y.dtype)
        offset = self._offset(y)

        def solve_map(params, u):
            return self.transformer(u, *params, log_derivative=False)[0]

        def body(i, carry):
            x, total = carry
            out = self.made(x)[i]
            a, b, log_w = self._split(out + offset.astype(out.dtype))
            target = y[i]
            root = bisect_increasing(solve_map, (a, b, log_w), target, tol=tol)
            value, log_d = self.transformer(root, a, b, log_w)
            x_i = implicit_step(root, value, jnp.exp(log_d), target)
            log_d = self.transformer(x_i, a, b, log_w)[1]
            return x.at[i].set(x_i.astype(x.dtype)), total + log_d.astype(total.dtype)

        init = (jnp.zeros_like(y), jnp.zeros((), y.dtype))
        x, total = jax.lax.fori_loop(0, self.dim, body, init)
        return x, -total


def _log_dtanh(h):
    """log(1 - tanh(h)^2) = log 4 - 2|h| - 2 softplus(-2|h|), finite for any h."""
    h = jnp.abs(h)
    return 2.0 * (math.log(2.0) - h - _softplus(-2.0 * h))


# Row gains of the weight-normalised block layers are exp(soft-clamped log-gain).
_LOG_GAIN_BOUND = 6.0
# Initial gain of BNAF's first layer (undone by the last): the tanh units start in their
# near-linear range, so a fresh f is close to the identity on a few standard deviations.
_INPUT_GAIN = 1.0 / 3.0


class _BlockLinear(eqx.Module):
    """A ``(dim*a) -> (dim*b)`` linear map with block lower-triangular weights.

    Blocks are ``b x a``. Diagonal blocks are ``exp(raw)`` (positive), blocks below the
    diagonal are ``raw`` (free), blocks above are zero. Each row is weight-normalised,
    ``W = exp(gain) * W~ / ||W~_row||`` (De Cao et al. 2019), so
    ``log W_diag = gain + raw - log||W~_row||`` is available in closed form. The masks
    are boolean constants.
    """

    diag_mask: jax.Array
    off_mask: jax.Array
    raw: jax.Array
    raw_log_gain: jax.Array
    bias: jax.Array
    dim: int = eqx.field(static=True)
    a: int = eqx.field(static=True)
    b: int = eqx.field(static=True)

    def __init__(self, dim: int, a: int, b: int, log_gain: float = 0.0, *, key):
        self.dim, self.a, self.b = dim, a, b
        blocks = np.arange(dim)
        row_block = np.repeat(blocks, b)[:, None]
        col_block = np.repeat(blocks, a)[None, :]
        self.diag_mask = jnp.asarray(row_block == col_block)
        self.off_mask = jnp.asarray(row_block > col_block)
        rng = host_rng(key)
        bound = 1.0 / math.sqrt(dim * a)
        self.raw = jnp.asarray(rng.uniform(-bound, bound, (dim * b, dim * a)), dtype=float)
        raw_gain = _LOG_GAIN_BOUND * math.atanh(log_gain / _LOG_GAIN_BOUND)
        self.raw_log_gain = jnp.asarray(np.full(dim * b, raw_gain), dtype=float)
        bias_bound = _INPUT_GAIN / math.sqrt(a)
        self.bias = jnp.asarray(rng.uniform(-bias_bound, bias_bound, dim * b), dtype=float)

    def weights(self):
        """``(W, log W_diag)``: the full ``(dim*b, dim*a)`` matrix and its diagonal blocks ``(dim, b, a)``."""
        raw, diag_mask, off_mask = self.raw, self.diag_mask, self.off_mask
        # Factor out each row's largest entry (diagonal raw, or log|off-diagonal|) so exp and
        # the squares cannot overflow; one reduction, and m cancels exactly (no gradient).
        scale = jnp.where(diag_mask, raw, jnp.where(off_mask, jnp.log(jnp.abs(raw)), -jnp.inf))
        m = jax.lax.stop_gradient(jnp.max(scale, -1, keepdims=True))
        diag = jnp.exp(jnp.where(diag_mask, raw - m, -jnp.inf))
        off = jnp.where(off_mask, raw, 0.0) * jnp.exp(-m)
        sq = jnp.sum(diag**2 + off**2, -1, keepdims=True)  # >= 1 by the choice of m
        log_norm = m + 0.5 * jnp.log(sq)
        gain = soft_clamp(self.raw_log_gain, _LOG_GAIN_BOUND)[:, None]
        weight = jnp.exp(gain - 0.5 * jnp.log(sq)) * (diag + off)
        log_w = (gain + raw - log_norm).reshape(self.dim, self.b, self.dim, self.a)
        log_diag = jnp.transpose(jnp.diagonal(log_w, axis1=0, axis2=2), (2, 0, 1))
        return weight, log_diag


def _bnaf_solver_map(args, u):
    """``x_i -> y_i`` for bisection: weights exponentiated and the gate folded in by the caller."""
    ws, offs, keep = args
    h = u[None]
    for n, (w, off) in enumerate(zip(ws, offs)):
        h = off + w @ h
        if n < len(ws) - 1:
            h = jnp.tanh(h)
    return h[0] + keep * u


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

    Forward: one parallel pass. Inverse: a ``fori_loop`` over coordinates, bisection of
    the one-dimensional map (the solved prefix fixed) to
    ``max(inverse_tol, 4 eps) * (1 + |x|)``, then one implicit Newton step, so values and
    first derivatives are exact.
    """

    numerical_inverse: ClassVar[bool] = True
    inverse_tol: ClassVar[float] = 1e-10

    layers: tuple
    gate: jax.Array
    hidden_factors: tuple = eqx.field(static=True)

    def __init__(self, dim: int, hidden_factors=(8, 8), *, key):
        self.dim = int(dim)
        if isinstance(hidden_factors, int):
            hidden_factors = (hidden_factors,)
        self.hidden_factors = tuple(int(h) for h in hidden_factors)
        sizes = [1, *self.hidden_factors, 1]
        keys = jax.random.split(key, len(sizes) - 1)
        layers = []
        for n, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
            # Gain 1/sqrt(a): a row of a near-equal positive entries then has unit slope.
            log_gain = -0.5 * math.log(a)
            log_gain += math.log(_INPUT_GAIN) if n == 0 else 0.0
            log_gain -= math.log(_INPUT_GAIN) if n == len(sizes) - 2 else 0.0
            layers.append(_BlockLinear(self.dim, a, b, log_gain, key=k))
        self.layers = tuple(layers)
        self.gate = jnp.asarray(np.zeros(self.dim), dtype=float)

    def _network(self, x, weights):
        """``f(x)`` and ``log f'_ii`` for every coordinate."""
        h = x
        log_j = jnp.zeros(x.shape + (1,), x.dtype)  # (dim, a): log d h_block_i / d x_i
        last = len(weights) - 1
        for n, (layer, (w, log_diag)) in enumerate(zip(self.layers, weights)):
            pre = w @ h + layer.bias
            log_j = _logsumexp(log_diag + log_j[:, None, :])
            if n < last:
                h = jnp.tanh(pre)
                log_j = log_j + _log_dtanh(pre).reshape(log_j.shape)
            else:
                h = pre
        return h, log_j[:, 0]

    @staticmethod
    def _gated(x, f, log_df, gate):
        g = jax.nn.sigmoid(gate)
        y = g * f + (1 - g) * x
        return y, jnp.logaddexp(log_df - _neg_log_sigmoid(gate), -_neg_log_sigmoid(-gate))

    def call_and_ladj(self, x):
        weights = [layer.weights() for layer in self.layers]
        f, log_df = self._network(x, weights)
        y, log_d = self._gated(x, f, log_df, self.gate)
        return y, log_d.sum()

    def _prefix_offsets(self, x, i, weights):
        """Contributions of the solved prefix ``x_<i`` (``x`` is zero from i on) to block i of every layer."""
        offs, h = [], x
        last = len(weights) - 1
        for n, (layer, (w, _)) in enumerate(zip(self.layers, weights)):
            pre = w @ h + layer.bias
            offs.append(jax.lax.dynamic_slice_in_dim(pre, i * layer.b, layer.b))
            if n < last:
                # Blocks >= i would feed the diagonal block (that is u's part) or nothing.
                h = jnp.where(jnp.arange(self.dim * layer.b) // layer.b < i, jnp.tanh(pre), 0.0)
        return offs

    @staticmethod
    def _coordinate(u, offs, blocks):
        """``f_i`` and ``log f'_ii`` as functions of ``x_i`` alone, the prefix's contributions ``offs`` fixed."""
        h = u[None]
        log_j = jnp.zeros_like(h)
        last = len(blocks) - 1
        for n, (off, block) in enumerate(zip(offs, blocks)):
            pre = off + jnp.exp(block) @ h
            log_j = _logsumexp(block + log_j[None, :])
            if n < last:
                h = jnp.tanh(pre)
                log_j = log_j + _log_dtanh(pre)
            else:
                h = pre
        return h[0], log_j[0]

    def inverse_and_ladj(self, y):
        tol = _solver_tol(self.inverse_tol, y.dtype)
        weights = [layer.weights() for layer in self.layers]

        def body(i, carry):
            x, total = carry
            offs = self._prefix_offsets(x, i, weights)
            blocks = [log_diag[i] for _, log_diag in weights]
            gate, target = self.gate[i], y[i]
            g = jax.nn.sigmoid(gate)
            ws = [jnp.exp(block) for block in blocks]
            solver_args = (ws[:-1] + [ws[-1] * g], offs[:-1] + [offs[-1] * g], 1 - g)
            root = bisect_increasing(_bnaf_solver_map, solver_args, target, tol=tol)
            f, log_df = self._coordinate(root, offs, blocks)
            value, log_d = self._gated(root, f, log_df, gate)
            x_i = implicit_step(root, value, jnp.exp(log_d), target)
            f, log_df = self._coordinate(x_i, offs, blocks)
            log_d = self._gated(x_i, f, log_df, gate)[1]
            return x.at[i].set(x_i.astype(x.dtype)), total + log_d.astype(total.dtype)

        init = (jnp.zeros_like(y), jnp.zeros((), y.dtype))
        x, total = jax.lax.fori_loop(0, self.dim, body, init)
        return x, -total


@register_flow("iaf")
def iaf(dim, num_layers, hidden_dims, activation, permutation, log_scale_bound, *, key):
    keys = jax.random.split(key, num_layers + 1)
    blocks = [AffineAutoregressive(dim, hidden_dims, activation, log_scale_bound, "input", key=k) for k in keys[:-1]]
    return interleave(blocks, dim, permutation, keys[-1])


@register_flow("maf")
def maf(dim, num_layers, hidden_dims, activation, permutation, log_scale_bound, *, key):
    keys = jax.random.split(key, num_layers + 1)
    blocks = [AffineAutoregressive(dim, hidden_dims, activation, log_scale_bound, "output", key=k) for k in keys[:-1]]
    return interleave(blocks, dim, permutation, keys[-1])


@register_flow("naf")
def naf(dim, num_layers, hidden_dims, activation, permutation, hidden_units, *, key):
    keys = jax.random.split(key, num_layers + 1)
    blocks = [NeuralAutoregressive(dim, hidden_dims, hidden_units, activation, key=k) for k in keys[:-1]]
    return interleave(blocks, dim, permutation, keys[-1])


@register_flow("bnaf")
def bnaf(dim, num_layers, hidden_factors, permutation, *, key):
    keys = jax.random.split(key, num_layers + 1)
    blocks = [BlockNeuralAutoregressive(dim, hidden_factors, key=k) for k in keys[:-1]]
    return interleave(blocks, dim, permutation, keys[-1])
