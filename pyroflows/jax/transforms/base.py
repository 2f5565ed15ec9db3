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
    "FlowTransform", "Flow", "EqxTransform", "Permute", "ElementwiseAffine", "CholeskyAffine", "LogTails",
    "soft_clamp", "bisect_increasing", "implicit_step", "interleave", "astype", "is_stochastic", "float_dtype",
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
    # ``call_and_ladj(x, key=None)`` / ``inverse_and_ladj(y, key=None)``. Only their
    # log-det may depend on the key: the map itself must not.
    stochastic: ClassVar[bool] = False

    def call_and_ladj(self, x):
        raise NotImplementedError

    def inverse_and_ladj(self, y):
        raise NotImplementedError

    def forward_map(self, x):
        """The forward map alone, for one vector: no log-det, so no noise and no key.

        Layers whose log-det is a stochastic estimate override this with a pass that
        skips the estimate; the default runs ``call_and_ladj`` (with a fixed key for a
        stochastic layer, which by contract only changes the dropped log-det).
        """
        return _call_layer(self, x, False, _fixed_key() if is_stochastic(self) else None)[0]

    def inverse_map(self, y):
        """The inverse map alone, for one vector (see ``forward_map``)."""
        return _call_layer(self, y, True, _fixed_key() if is_stochastic(self) else None)[0]

    def to_transform(self, key=None) -> "EqxTransform":
        """This layer as a NumPyro ``Transform`` on ``(..., dim)`` arrays.

        ``key`` feeds layers whose log-det is a random estimate; without it they draw
        from ``numpyro.prng_key()``, so they work inside a model or guide under ``seed``.
        The maps alone (``transform(x)``, ``transform.inv(y)``) need no key at all.
        """
        return EqxTransform(self, key)


def is_stochastic(layer) -> bool:
    """Whether ``layer`` draws noise, so its calls need a ``key``."""
    return bool(getattr(layer, "is_stochastic", type(layer).stochastic))


def _fixed_key():
    return jax.random.key(0)


def _call_layer(layer, x, inverse, key, log_det=True):
    if not log_det:
        return (layer.inverse_map(x) if inverse else layer.forward_map(x)), None
    fn = layer.inverse_and_ladj if inverse else layer.call_and_ladj
    return fn(x, key=key) if is_stochastic(layer) else fn(x)


def float_dtype(module) -> jnp.dtype:
    """The floating-point dtype a module computes in.

    Args:
        module: a layer or flow (any pytree).

    Returns:
        The dtype of its first inexact array, or JAX's default float dtype when it has none
        (a permutation, say).
    """
    for leaf in jax.tree.leaves(module):
        if eqx.is_inexact_array(leaf):
            return leaf.dtype
    return jnp.result_type(float)


def _as_input(module, x, batched):
    """``x`` as an array with the module's event size; integers and booleans become floats.

    A floating input of another dtype follows JAX's promotion rules (as any jnp function).
    """
    x = jnp.asarray(x)
    shape = jnp.shape(x)
    if batched:
        check_event_dim(shape, module.dim, "input")
    elif shape != (module.dim,):
        raise ValueError(
            f"{type(module).__name__}.call_and_ladj / inverse_and_ladj map one vector of shape ({module.dim},), "
            f"got shape {tuple(shape)}; for a batch use flow.to_transform() (any leading shape) or "
            "jax.vmap(flow.call_and_ladj)"
        )
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(float_dtype(module))  # an integer array promoted would fail in the scan carry
    return x


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


def _run(chunk, x, inverse, keys=None, log_det=True):
    total = jnp.zeros((), x.dtype)
    order = range(len(chunk) - 1, -1, -1) if inverse else range(len(chunk))
    for i in order:
        x, ladj = _call_layer(chunk[i], x, inverse, None if keys is None else keys[i], log_det)
        if log_det:
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

    def _apply(self, x, inverse, key, log_det=True):
        x = _as_input(self, x, batched=False)
        total = jnp.zeros((), x.dtype)
        # one key per part, so a part's noise does not depend on the direction of travel
        keys = None if key is None else jax.random.split(key, len(self.parts))
        segments = reversed(self.segments) if inverse else self.segments
        for start, period, repeats in segments:
            chunks = [self.parts[start + k * period : start + (k + 1) * period] for k in range(repeats)]
            seg_keys = None if keys is None else keys[start : start + period * repeats].reshape((repeats, period) + keys.shape[1:])
            if repeats == 1:
                x, ladj = _run(chunks[0], x, inverse, None if seg_keys is None else seg_keys[0], log_det)
            else:
                dynamic, static = eqx.partition(chunks, eqx.is_array)
                stacked = jax.tree.map(lambda *a: jnp.stack(a), *dynamic)

                def body(carry, xs, static=static[0]):
                    weights, chunk_keys = xs
                    y, lad = _run(eqx.combine(weights, static), carry[0], inverse, chunk_keys, log_det)
                    return (y, carry[1] + lad), None

                (x, ladj), _ = jax.lax.scan(
                    body, (x, jnp.zeros((), x.dtype)), (stacked, seg_keys), reverse=inverse
                )
            total = total + ladj
        return x, total

    def call_and_ladj(self, x, key=None):
        """``(y, log|det dy/dx|)`` for one vector ``x`` of shape ``(dim,)`` (integers are cast).

        ``key`` feeds the layers with a stochastic log-det estimate (``is_stochastic``).
        """
        return self._apply(x, inverse=False, key=key)

    def inverse_and_ladj(self, y, key=None):
        """``(x, log|det dx/dy|)`` for one vector ``y`` of shape ``(dim,)``."""
        return self._apply(y, inverse=True, key=key)

    def forward_map(self, x):
        """The forward map alone for one vector: no log-det, so no key even for stochastic layers."""
        return self._apply(x, inverse=False, key=None, log_det=False)[0]

    def inverse_map(self, y):
        """The inverse map alone for one vector (see ``forward_map``)."""
        return self._apply(y, inverse=True, key=None, log_det=False)[0]


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


@eqx.filter_jit
def _vmapped_map(module, flat, inverse: bool):
    return jax.vmap(lambda v: _call_layer(module, v, inverse, None, log_det=False)[0])(flat)


def _available_key(key):
    """``key``, else ``numpyro.prng_key()`` inside a seed handler, else ``None``."""
    if key is not None:
        return key
    import warnings

    import numpyro

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpyro warns outside a seed handler; callers decide
        return numpyro.prng_key()


def _noise_key(module, key):
    key = _available_key(key)
    if key is None:
        raise ValueError(
            f"{type(module).__name__} estimates its log-det with random noise and got no random key: "
            "pass one with flow.to_transform(key=jax.random.key(0)) (or key= to call_and_ladj / "
            "inverse_and_ladj), or call it inside numpyro.handlers.seed (a model or guide under SVI "
            "does this); the maps alone (transform(x), transform.inv(y)) need no key"
        )
    return key


def _batched(module, x, inverse, key=None):
    x = _as_input(module, x, batched=True)
    shape = jnp.shape(x)
    flat = jnp.reshape(x, (-1, module.dim))
    keys = jax.random.split(_noise_key(module, key), flat.shape[0]) if is_stochastic(module) else None
    out, ladj = _vmapped(module, flat, inverse, keys)
    return jnp.reshape(out, shape), jnp.reshape(ladj, shape[:-1])


def _batched_map(module, x, inverse):
    """The map alone on ``(..., dim)``: for a stochastic module without a key at hand."""
    x = _as_input(module, x, batched=True)
    shape = jnp.shape(x)
    out = _vmapped_map(module, jnp.reshape(x, (-1, module.dim)), inverse)
    return jnp.reshape(out, shape)


class EqxTransform(Transform):
    """A NumPyro ``Transform`` backed by an equinox flow, on ``(..., dim)`` arrays.

    A pytree (its module is the only child), so it passes through ``jit`` and ``vmap``;
    ``call_with_intermediates`` returns the log-determinant as the intermediate, so a
    ``TransformedDistribution`` scores its own samples without an inverse.

    Inputs: the last axis must be the flow's ``dim``; integer and boolean arrays are cast
    to the flow's float dtype. For a module with a stochastic log-det estimate, the
    log-det needs a key (``key`` here, or ``numpyro.prng_key()`` under ``seed``) and
    raises without one; ``__call__`` and ``inv`` then compute the map alone.
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
        if is_stochastic(self.module):
            # Only the log-det needs noise: without a key at hand run the map alone.
            key = _available_key(self.key)
            return _batched_map(self.module, x, False) if key is None else _batched(self.module, x, False, key)[0]
        return _batched(self.module, x, False)[0]

    def _inverse(self, y):
        if is_stochastic(self.module):
            key = _available_key(self.key)
            return _batched_map(self.module, y, True) if key is None else self._inverse_and_ladj(y, key)[0]
        return self._inverse_and_ladj(y, None)[0]

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
        return self._inverse_and_ladj(y, self.key)

    def _inverse_and_ladj(self, y, key):
        x, ladj = _batched(self.module, y, True, key)
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


class LogTails(FlowTransform):
    """Identity on ``[-threshold, threshold]``, logarithmic beyond: a fixed bijection of R^D.

    ``y = x`` for ``|x| <= t`` and ``y = sign(x) (t + log(1 + |x| - t))`` beyond, per
    coordinate (continuously differentiable). ``AutoFlow`` puts it between the flow and
    its affine layer: a flow whose weights take one large optimiser step can put samples
    at ``|x| ~ 1e30``, and a model that exponentiates them (a scale site) then returns
    ``inf`` and the ELBO gradient NaN. After ``LogTails`` such a sample is ``t + 69``, so
    the guide stays finite at learning rates where the flow alone diverges; the bulk of
    the distribution (``|x| <= t``, in whitened coordinates) is untouched.
    """

    threshold: float = eqx.field(static=True)

    def __init__(self, dim: int, threshold: float = 5.0):
        self.dim = int(dim)
        self.threshold = float(threshold)

    def call_and_ladj(self, x):
        excess = jnp.maximum(jnp.abs(x) - self.threshold, 0.0)
        log_slope = jnp.log1p(excess)
        return jnp.sign(x) * (jnp.minimum(jnp.abs(x), self.threshold) + log_slope), -log_slope.sum()

    def inverse_and_ladj(self, y):
        excess = jnp.maximum(jnp.abs(y) - self.threshold, 0.0)
        # log(1 + |x| - t) = excess exactly: no expm1/log1p round trip
        return jnp.sign(y) * (jnp.minimum(jnp.abs(y), self.threshold) + jnp.expm1(excess)), excess.sum()
