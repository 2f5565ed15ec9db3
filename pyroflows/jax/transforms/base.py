"""The base class of every pyroflows layer in JAX, the composed ``Flow``, its NumPyro
``Transform``, and numerical inverses.

Layers are equinox modules written for ONE unbatched vector of shape ``(dim,)``
(``call_and_ladj``, ``inverse_and_ladj``); ``EqxTransform`` vectorises them once with
``vmap`` over any batch shape. Field names mirror the torch modules' attribute names,
so a torch ``state_dict`` key names the same array here (see ``pyroflows.jax.io``).
Constant arrays (masks, permutations, signs) are integer or boolean, so NumPyro's
``eqx_module``, which registers every inexact array as a parameter, never trains them.

``Flow`` scans repeated blocks: identical consecutive blocks (same structure and
shapes) are stacked and run with ``jax.lax.scan``, so compile time does not grow with
depth.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform

from ...registry import check_event_dim

__all__ = [
    "FlowTransform", "Flow", "EqxTransform", "Permute", "ElementwiseAffine", "CholeskyAffine",
    "soft_clamp", "bisect_increasing", "implicit_step", "interleave", "astype", "is_stochastic",
]


def soft_clamp(x, bound: float):
    """``bound * tanh(x / bound)``: smooth, the identity near 0, and inside (-bound, bound)."""
    return bound * jnp.tanh(x / bound)


class FlowTransform(eqx.Module):
    """A bijection of vectors of size ``dim`` with its log|det J|, for one unbatched vector.

    Subclasses implement ``call_and_ladj(x) -> (y, log|det dy/dx|)`` and
    ``inverse_and_ladj(y) -> (x, log|det dx/dy|)`` for ``x`` of shape ``(dim,)``.
    Direction: the forward map sends base noise to the sample space.
    """

    dim: int = eqx.field(static=True)
    numerical_inverse: ClassVar[bool] = False
    inverse_tol: ClassVar[float] = 0.0
    # Layers that draw noise (stochastic log-det estimators) set this, or define a
    # property ``is_stochastic`` when it depends on a static option, and take
    # ``call_and_ladj(x, key=None)`` / ``inverse_and_ladj(y, key=None)``.
    stochastic: ClassVar[bool] = False

    def call_and_ladj(self, x):
        raise NotImplementedError

    def inverse_and_ladj(self, y):
        raise NotImplementedError

    def to_transform(self, key=None) -> "EqxTransform":
        """This layer as a NumPyro ``Transform`` on ``(..., dim)`` arrays.

        ``key`` feeds layers that draw noise; without it they draw from
        ``numpyro.prng_key()``, so they work inside a model or guide under ``seed``.
        """
        return EqxTransform(self, key)


def is_stochastic(layer) -> bool:
    """Whether ``layer`` draws noise, so its calls need a ``key``."""
    return bool(getattr(layer, "is_stochastic", type(layer).stochastic))


def _call_layer(layer, x, inverse, key):
    fn = layer.inverse_and_ladj if inverse else layer.call_and_ladj
    return fn(x, key=key) if is_stochastic(layer) else fn(x)


def _chunk_signature(chunk):
    leaves, treedef = jax.tree_util.tree_flatten(chunk)
    return treedef, tuple((jnp.shape(a), jnp.result_type(a)) if eqx.is_array(a) else a for a in leaves)


def _segments(parts, max_period=3):
    """Split ``parts`` into runs ``(start, period, repeats)`` of identical blocks."""
    out, i, n = [], 0, len(parts)
    while i < n:
        best = (1, 1)
        for p in range(1, max_period + 1):
            if i + 2 * p > n:
                break
            sig = _chunk_signature(parts[i : i + p])
            r = 1
            while i + (r + 1) * p <= n and _chunk_signature(parts[i + r * p : i + (r + 1) * p]) == sig:
                r += 1
            if r > 1 and r * p > best[0] * best[1]:
                best = (p, r)
        out.append((i, *best))
        i += best[0] * best[1]
    return tuple(out)


def _run(chunk, x, inverse, keys=None):
    total = jnp.zeros((), x.dtype)
    order = range(len(chunk) - 1, -1, -1) if inverse else range(len(chunk))
    for i in order:
        x, ladj = _call_layer(chunk[i], x, inverse, None if keys is None else keys[i])
        total = total + ladj
    return x, total


class Flow(FlowTransform):
    """A stack of layers: what ``build_flow`` returns. ``config`` records the builder's arguments."""

    parts: tuple
    config: dict = eqx.field(static=True)
    segments: tuple = eqx.field(static=True)

    def __init__(self, parts, dim: int, config: dict | None = None):
        self.dim = int(dim)
        self.parts = tuple(parts)
        self.config = _Frozen(config or {})
        self.segments = _segments(self.parts)

    @property
    def is_stochastic(self) -> bool:
        return any(is_stochastic(p) for p in self.parts)

    def _apply(self, x, inverse, key):
        total = jnp.zeros((), x.dtype)
        # one key per part, so a part's noise does not depend on the direction of travel
        keys = None if key is None else jax.random.split(key, len(self.parts))
        segments = reversed(self.segments) if inverse else self.segments
        for start, period, repeats in segments:
            chunks = [self.parts[start + k * period : start + (k + 1) * period] for k in range(repeats)]
            seg_keys = None if keys is None else keys[start : start + period * repeats].reshape((repeats, period) + keys.shape[1:])
            if repeats == 1:
                x, ladj = _run(chunks[0], x, inverse, None if seg_keys is None else seg_keys[0])
            else:
                dynamic, static = eqx.partition(chunks, eqx.is_array)
                stacked = jax.tree.map(lambda *a: jnp.stack(a), *dynamic)

                def body(carry, xs, static=static[0]):
                    weights, chunk_keys = xs
                    y, lad = _run(eqx.combine(weights, static), carry[0], inverse, chunk_keys)
                    return (y, carry[1] + lad), None

                (x, ladj), _ = jax.lax.scan(
                    body, (x, jnp.zeros((), x.dtype)), (stacked, seg_keys), reverse=inverse
                )
            total = total + ladj
        return x, total

    def call_and_ladj(self, x, key=None):
        return self._apply(x, inverse=False, key=key)

    def inverse_and_ladj(self, y, key=None):
        return self._apply(y, inverse=True, key=key)


class _Frozen(dict):
    """A hashable dict, so a flow's config can be a static (compile-time) field."""

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))


@eqx.filter_jit
def _vmapped(module, flat, inverse: bool, keys):
    # Compiled once per flow structure and batch size, so eager use does not re-trace
    # every scan and solver loop on each call; inside an outer jit it simply inlines.
    # Keys are arguments, never constants, so a compiled program draws fresh noise.
    if keys is None:
        return jax.vmap(lambda v: _call_layer(module, v, inverse, None))(flat)
    return jax.vmap(lambda v, k: _call_layer(module, v, inverse, k))(flat, keys)


def _noise_key(module, key):
    if key is not None:
        return key
    import warnings

    import numpyro

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpyro warns outside a seed handler; we raise below
        key = numpyro.prng_key()
    if key is None:
        raise ValueError(
            f"{type(module).__name__} draws noise for its log-det estimator and got no random key: "
            "call it inside numpyro.handlers.seed (a model or guide under SVI does this), "
            "or pass one with flow.to_transform(key=jax.random.key(0))"
        )
    return key


def _batched(module, x, inverse, key=None):
    check_event_dim(jnp.shape(x), module.dim, "input")
    shape = jnp.shape(x)
    flat = jnp.reshape(x, (-1, module.dim))
    keys = jax.random.split(_noise_key(module, key), flat.shape[0]) if is_stochastic(module) else None
    out, ladj = _vmapped(module, flat, inverse, keys)
    return jnp.reshape(out, shape), jnp.reshape(ladj, shape[:-1])


class EqxTransform(Transform):
    """A NumPyro ``Transform`` backed by an equinox flow, on ``(..., dim)`` arrays.

    A pytree (its module is the only child), so it passes through ``jit`` and ``vmap``;
    ``call_with_intermediates`` returns the log-determinant as the intermediate, so a
    ``TransformedDistribution`` scores its own samples without an inverse.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, module: FlowTransform, key=None):
        self.module = module
        self.key = key
        self._last_inverse = None


    @property
    def dim(self):
        return self.module.dim

    def call_with_intermediates(self, x):
        return _batched(self.module, x, False, self.key)

    def __call__(self, x):
        return self.call_with_intermediates(x)[0]

    def _inverse(self, y):
        return self.inverse_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        if intermediates is not None:
            return intermediates
        last = self._last_inverse
        if last is not None and last[0] is y and last[1] is x:
            self._last_inverse = None
            # ``TransformedDistribution.log_prob`` asks for the log-det of the pair it
            # just inverted: reuse that pass instead of running the forward map, which
            # for MAF-type layers is the sequential direction.
            return -last[2]
        return self.call_with_intermediates(x)[1]

    def inverse_and_ladj(self, y):
        """``(x, log|det dx/dy|)`` for a batch ``y`` of shape ``(..., dim)``."""
        x, ladj = _batched(self.module, y, True, self.key)
        # Held by identity (one entry, like Pyro's cache_size=1), so only the very
        # objects of this call can match; a new trace or a new array never does.
        self._last_inverse = (y, x, ladj)
        return x, ladj

    def tree_flatten(self):
        return (self.module, self.key), None

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        return cls(*children)

    def __eq__(self, other):
        return isinstance(other, EqxTransform) and other.module is self.module

    def __hash__(self):
        return id(self.module)


class Permute(FlowTransform):
    """A fixed permutation of the coordinates (log-det 0)."""

    permutation: jax.Array
    inverse_permutation: jax.Array

    def __init__(self, permutation):
        permutation = np.asarray(permutation, dtype=np.int32)
        self.dim = int(permutation.shape[0])
        self.permutation = jnp.asarray(permutation)
        self.inverse_permutation = jnp.asarray(np.argsort(permutation).astype(np.int32))

    @classmethod
    def reverse(cls, dim):
        return cls(jnp.arange(dim - 1, -1, -1))

    @classmethod
    def random(cls, dim, key):
        from ..nn import host_rng

        return cls(host_rng(key).permutation(dim))

    def call_and_ladj(self, x):
        return x[self.permutation], jnp.zeros((), x.dtype)

    def inverse_and_ladj(self, y):
        return y[self.inverse_permutation], jnp.zeros((), y.dtype)


class ElementwiseAffine(FlowTransform):
    """y = loc + exp(log_scale) * x per coordinate, with a soft-clamped log-scale."""

    loc: jax.Array
    unconstrained_log_scale: jax.Array
    log_scale_bound: float = eqx.field(static=True)

    def __init__(self, dim: int, log_scale_bound: float = 5.0):
        self.dim = int(dim)
        self.log_scale_bound = float(log_scale_bound)
        self.loc = jnp.asarray(np.zeros(dim), dtype=float)
        self.unconstrained_log_scale = jnp.asarray(np.zeros(dim), dtype=float)

    def log_scale(self):
        return soft_clamp(self.unconstrained_log_scale, self.log_scale_bound)

    def call_and_ladj(self, x):
        s = self.log_scale()
        return self.loc + jnp.exp(s) * x, s.sum()

    def inverse_and_ladj(self, y):
        s = self.log_scale()
        return (y - self.loc) * jnp.exp(-s), -s.sum()


class CholeskyAffine(FlowTransform):
    """y = loc + L x with a lower-triangular ``L`` (positive diagonal): a whitening map.

    ``AutoFlow(init_scale="laplace")`` puts the Laplace approximation ``N(loc, L L^T)``
    here and holds it fixed (its arrays pass through ``stop_gradient``), so that the
    layers before it learn in coordinates where the posterior is close to ``N(0, I)``.
    """

    loc: jax.Array
    scale_tril: jax.Array

    def __init__(self, loc, scale_tril):
        self.dim = int(jnp.shape(loc)[-1])
        self.loc = jnp.asarray(loc)
        self.scale_tril = jnp.asarray(scale_tril)

    def call_and_ladj(self, x):
        return self.loc + self.scale_tril @ x, jnp.log(jnp.diagonal(self.scale_tril)).sum()

    def inverse_and_ladj(self, y):
        x = jax.scipy.linalg.solve_triangular(self.scale_tril, y - self.loc, lower=True)
        return x, -jnp.log(jnp.diagonal(self.scale_tril)).sum()


def permutation_layer(kind: str, dim: int, key) -> Permute:
    return Permute.reverse(dim) if kind == "reverse" else Permute.random(dim, key)


def interleave(blocks, dim: int, permutation: str, key):
    """``blocks`` with a permutation between consecutive ones (none after the last)."""
    out = []
    keys = jax.random.split(key, max(len(blocks), 1))
    for i, block in enumerate(blocks):
        if i:
            out.append(permutation_layer(permutation, dim, keys[i]))
        out.extend(block if isinstance(block, (list, tuple)) else [block])
    return out


def bisect_increasing(fn, args, target, *, tol, max_iter=200, lo=None, hi=None):
    """Solve ``fn(args, x) = target`` elementwise for ``fn`` increasing in ``x``, without gradients.

    ``args`` (for example the layer itself) is passed through ``stop_gradient``, so the
    loops are never differentiated; callers attach gradients with ``implicit_step``.
    The bracket starts at ``[lo, hi]`` (default ``target -+ 1``) and doubles outwards
    until it holds the root; bisection stops when every interval is shorter than
    ``tol * (1 + |x|)``. Works under ``jit`` and ``vmap``.
    """
    args = jax.lax.stop_gradient(args)
    t = jax.lax.stop_gradient(target)
    lo = t - 1.0 if lo is None else jax.lax.stop_gradient(lo)
    hi = t + 1.0 if hi is None else jax.lax.stop_gradient(hi)

    def expand_cond(state):
        lo, hi, _, i = state
        return (jnp.any(fn(args, lo) > t) | jnp.any(fn(args, hi) < t)) & (i < 2100)

    def expand(state):
        lo, hi, width, i = state
        width = width * 2
        lo = jnp.where(fn(args, lo) > t, lo - width, lo)
        hi = jnp.where(fn(args, hi) < t, hi + width, hi)
        return lo, hi, width, i + 1

    lo, hi, _, _ = jax.lax.while_loop(expand_cond, expand, (lo, hi, jnp.ones_like(t), 0))

    def bisect_cond(state):
        lo, hi, i = state
        mid = 0.5 * (lo + hi)
        return jnp.any(hi - lo > tol * (1 + jnp.abs(mid))) & (i < max_iter)

    def bisect(state):
        lo, hi, i = state
        mid = 0.5 * (lo + hi)
        above = fn(args, mid) > t
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi), i + 1

    lo, hi, _ = jax.lax.while_loop(bisect_cond, bisect, (lo, hi, 0))
    return 0.5 * (lo + hi)


def implicit_step(root, value, derivative, target):
    """One Newton step from a detached root: same value, exact first derivatives.

    At a root of ``g(x) = target``, ``x = root - (g(root) - target) / g'(root)`` equals
    ``root`` to the solver's tolerance, and its gradients are those of the implicit
    function theorem: dx/dtarget = 1/g', dx/dtheta = -(dg/dtheta)/g'.
    """
    return jax.lax.stop_gradient(root) - (value - target) / jax.lax.stop_gradient(derivative)


def astype(module, dtype):
    """``module`` with every floating-point array cast to ``dtype`` (integer/boolean constants kept)."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, module)
