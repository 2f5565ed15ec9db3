"""JAX mirror of ``pyroflows.torch.transforms.autoregressive``: the BNAF layer.

The inverse solves the coordinates one after another inside ``jax.lax.fori_loop``, so
compile time does not grow with ``dim``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ...structure import block_masks
from ..flows import register_flow
from ..nn import host_rng
from .base import FlowTransform, bisect_increasing, implicit_step, interleave, soft_clamp

__all__ = ["BlockNeuralAutoregressive"]


def _solver_tol(tol: float, dtype) -> float:
    # Bisection cannot shrink an interval below a few ulps; never ask float32 for 1e-10.
    return max(tol, 4 * float(jnp.finfo(dtype).eps))


def _softplus(z):
    # log(1 + e^z), exact in both tails; leaner than jax.nn.softplus (logaddexp adds
    # selects), and the solver loops inline several copies of every op.
    return jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _neg_log_sigmoid(z):
    return _softplus(-z)


def _logsumexp(v):
    """logsumexp over the last axis; a lean form (fewer XLA kernels than jax.scipy's) whose
    shift carries no gradient, so its derivative is the softmax."""
    m = jax.lax.stop_gradient(jnp.max(v, -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m[..., 0] + jnp.log(jnp.sum(jnp.exp(v - m), -1))


def _log_dtanh(h):
    """``log tanh'(h)``, finite for any h (as torch's ``_log_dtanh``)."""
    h = jnp.abs(h)
    return 2.0 * (math.log(2.0) - h - _softplus(-2.0 * h))


# Row gains of the weight-normalised block layers are exp(soft-clamped log-gain).
_LOG_GAIN_BOUND = 6.0
# Initial gain of BNAF's first layer (undone by the last): the tanh units start in their
# near-linear range, so a fresh f is close to the identity on a few standard deviations.
_INPUT_GAIN = 1.0 / 3.0


class _BlockLinear(eqx.Module):
    """The weight-normalised block lower-triangular layer of torch's ``_BlockLinear``; boolean masks."""

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
        diag, below = block_masks(dim, a, b)
        self.diag_mask, self.off_mask = jnp.asarray(diag), jnp.asarray(below)
        rng = host_rng(key)
        bound = 1.0 / math.sqrt(dim * a)
        self.raw = jnp.asarray(rng.uniform(-bound, bound, (dim * b, dim * a)), dtype=float)
        raw_gain = _LOG_GAIN_BOUND * math.atanh(log_gain / _LOG_GAIN_BOUND)
        self.raw_log_gain = jnp.asarray(np.full(dim * b, raw_gain), dtype=float)
        bias_bound = _INPUT_GAIN / math.sqrt(a)
        self.bias = jnp.asarray(rng.uniform(-bias_bound, bias_bound, dim * b), dtype=float)

    def weights(self):
        """The full matrix and the log of its diagonal blocks, one row maximum factored out."""
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


class BlockNeuralAutoregressive(FlowTransform):
    """A BNAF layer with a gated residual: JAX mirror of ``pyroflows.torch.transforms.BlockNeuralAutoregressive``.

    The inverse is a ``fori_loop`` over coordinates with a ``while_loop`` bisection in
    each. De Cao, Titov & Aziz 2019, arXiv:1904.04676.

    Args:
        key: a PRNG key for the initial weights.

    Example:
        >>> layer = BlockNeuralAutoregressive(2, hidden_factors=(4,), key=jax.random.key(0))
        >>> @jax.jit
        ... def jacobian_and_ladj(x):
        ...     return jax.jacfwd(lambda v: layer.call_and_ladj(v)[0])(x), layer.call_and_ladj(x)[1]
        >>> jac, ladj = jacobian_and_ladj(jnp.array([0.3, -1.2]))
        >>> bool(jac[0, 1] == 0), bool(jnp.isclose(ladj, jnp.linalg.slogdet(jac)[1], atol=1e-5))
        (True, True)
    """

    numerical_inverse: ClassVar[bool] = True
    inverse_tol: ClassVar[float] = 1e-10
    autoregressive: ClassVar[bool] = True

    layers: tuple
    gate: jax.Array
    hidden_factors: tuple = eqx.field(static=True)

    def __init__(self, dim: int, hidden_factors: int | Sequence[int] = (8, 8), *, key: jax.Array):
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

    def get_permutation(self) -> jax.Array:
        """The order in which coordinates are generated: the natural one.

        Example:
            >>> BlockNeuralAutoregressive(3, 2, key=jax.random.key(0)).get_permutation().tolist()
            [0, 1, 2]
        """
        return jnp.arange(self.dim)

    def _network(self, x, weights):
        """The network on one vector, with the log-derivatives of its diagonal."""
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

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for one vector, in one parallel pass.

        Example:
            >>> layer = BlockNeuralAutoregressive(2, (4,), key=jax.random.key(0))
            >>> y, ladj = jax.jit(lambda x: layer.call_and_ladj(x))(jnp.zeros(2))  # one compile, not one per op
            >>> y.shape, ladj.shape
            ((2,), ())
        """
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
        """Coordinate i of the network and its log-derivative, as functions of the scalar ``u``."""
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

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for one vector, solved coordinate by coordinate in a ``fori_loop``.

        Example:
            >>> layer = BlockNeuralAutoregressive(2, (4,), key=jax.random.key(0))
            >>> round_trip = jax.jit(lambda x: layer.inverse_and_ladj(layer.call_and_ladj(x)[0])[0])
            >>> x = jnp.array([0.3, -1.2])
            >>> bool(jnp.allclose(round_trip(x), x, atol=1e-5))
            True
        """
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


@register_flow("bnaf")
def bnaf(
    dim: int, num_layers: int, hidden_factors: int | Sequence[int], permutation: str, *, key: jax.Array
) -> list[FlowTransform]:
    """The layers of ``build_flow("bnaf", ...)``: JAX mirror of ``pyroflows.torch.transforms.autoregressive.bnaf``.

    Example:
        >>> [type(layer).__name__ for layer in bnaf(2, 2, (4,), "reverse", key=jax.random.key(0))]
        ['BlockNeuralAutoregressive', 'Permute', 'BlockNeuralAutoregressive']
    """
    keys = jax.random.split(key, num_layers + 1)
    blocks = [BlockNeuralAutoregressive(dim, hidden_factors, key=k) for k in keys[:-1]]
    return interleave(blocks, dim, permutation, keys[-1])
