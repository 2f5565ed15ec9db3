"""JAX mirror of ``pyroflows.torch.transforms.base``: the layer base class, ``Flow``, and
``EqxTransform``, the NumPyro ``Transform`` that runs a layer on batches.

What differs from torch: layers are equinox modules for ONE unbatched vector of shape
``(dim,)``, and ``EqxTransform`` vectorises them with ``vmap``. Field names are the torch
attribute names, so a ``state_dict`` key names the same array (``pyroflows.jax.io``).
Constant arrays (masks, permutations, signs) are integer or boolean, so NumPyro's
``eqx_module``, which trains every inexact array, never trains them. ``Flow`` stacks
identical consecutive blocks and runs them with ``jax.lax.scan``, so compile time does
not grow with depth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform

from ...exports import BASE_LAYERS
from ...registry import check_event_dim
from ...structure import reverse_permutation

__all__ = [
    *BASE_LAYERS,
    "EqxTransform",
    "soft_clamp",
    "bisect_increasing",
    "implicit_step",
    "interleave",
    "astype",
    "is_stochastic",
    "float_dtype",
]


def soft_clamp(x: jax.Array, bound: float) -> jax.Array:
    """``bound * tanh(x / bound)``: JAX mirror of ``pyroflows.torch.transforms.base.soft_clamp``.

    Example:
        >>> soft_clamp(jnp.array([0.0, 100.0]), 5.0).tolist()
        [0.0, 5.0]
    """
    return bound * jnp.tanh(x / bound)


class FlowTransform(eqx.Module):
    """The base of every layer: JAX mirror of ``pyroflows.torch.transforms.FlowTransform``.

    An equinox module whose ``call_and_ladj(x)`` and ``inverse_and_ladj(y)`` take ONE
    vector of shape ``(dim,)`` and return a scalar log-determinant; ``dim`` is a static
    field. ``to_transform()`` gives the batched NumPyro ``Transform``.

    Example:
        >>> class Shift(FlowTransform):
        ...     def __init__(self, dim):
        ...         self.dim = dim
        ...     def call_and_ladj(self, x):
        ...         return x + 1.0, jnp.zeros(())
        ...     def inverse_and_ladj(self, y):
        ...         return y - 1.0, jnp.zeros(())
        >>> Shift(2).to_transform()(jnp.zeros((3, 2))).tolist()
        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """

    dim: int = eqx.field(static=True)
    numerical_inverse: ClassVar[bool] = False
    inverse_tol: ClassVar[float] = 0.0
    # Layers that draw noise (stochastic log-det estimators) set this, or define a
    # property ``is_stochastic`` when it depends on a static option, and take
    # ``call_and_ladj(x, key=None)`` / ``inverse_and_ladj(y, key=None)``. Only their
    # log-det may depend on the key: the map itself must not.
    stochastic: ClassVar[bool] = False

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for one vector ``x`` of shape ``(dim,)``."""
        raise NotImplementedError

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for one vector ``y`` of shape ``(dim,)``."""
        raise NotImplementedError

    def forward_map(self, x: jax.Array) -> jax.Array:
        """The forward map alone, for one vector: no log-det, so no noise and no key.

        Layers whose log-det is a stochastic estimate override this with a pass that
        skips the estimate; the default runs ``call_and_ladj`` (with a fixed key for a
        stochastic layer, which by contract only changes the dropped log-det).

        Args:
            x: one vector, shape ``(dim,)``.

        Returns:
            ``y``, shape ``(dim,)``.

        Example:
            >>> [round(v, 4) for v in LogTails(2, threshold=1.0).forward_map(jnp.array([0.5, 2.0])).tolist()]
            [0.5, 1.6931]
        """
        return _call_layer(self, x, False, _fixed_key() if is_stochastic(self) else None)[0]

    def inverse_map(self, y: jax.Array) -> jax.Array:
        """The inverse map alone, for one vector (see ``forward_map``).

        Example:
            >>> Permute.reverse(2).inverse_map(jnp.array([1.0, 2.0])).tolist()
            [2.0, 1.0]
        """
        return _call_layer(self, y, True, _fixed_key() if is_stochastic(self) else None)[0]

    def to_transform(self, key: jax.Array | None = None) -> EqxTransform:
        """This layer as a NumPyro ``Transform`` on ``(..., dim)`` arrays.

        ``key`` feeds layers whose log-det is a random estimate; without it they draw
        from ``numpyro.prng_key()``, so they work inside a model or guide under ``seed``.
        The maps alone (``transform(x)``, ``transform.inv(y)``) need no key at all.

        Args:
            key: a PRNG key for stochastic log-det estimates, or ``None``.

        Returns:
            An ``EqxTransform`` wrapping this layer.

        Example:
            >>> transform = ElementwiseAffine(2).to_transform()
            >>> transform(jnp.ones((4, 3, 2))).shape
            (4, 3, 2)
        """
        return EqxTransform(self, key)


def is_stochastic(layer: FlowTransform) -> bool:
    """Whether ``layer`` draws noise, so its calls need a ``key``.

    A layer says so with the class attribute ``stochastic``, or with a property
    ``is_stochastic`` where it depends on an option; a ``Flow`` is stochastic when one of
    its parts is.

    Args:
        layer: a layer or a flow.

    Returns:
        ``True`` for a layer whose log-det is a random estimate.

    Example:
        >>> is_stochastic(LogTails(2)), is_stochastic(Flow([ElementwiseAffine(2)], 2))
        (False, False)
    """
    return bool(getattr(layer, "is_stochastic", type(layer).stochastic))


def _fixed_key():
    return jax.random.key(0)


def _call_layer(layer, x, inverse, key, log_det=True, context=None):
    conditional = context is not None and getattr(layer, "context_dim", 0)
    if not (log_det or conditional):
        return (layer.inverse_map(x) if inverse else layer.forward_map(x)), None
    fn = layer.inverse_and_ladj if inverse else layer.call_and_ladj
    kwargs = {"key": key} if is_stochastic(layer) else {}
    if conditional:
        kwargs["context"] = context
    out = fn(x, **kwargs)
    return out if log_det else (out[0], None)


def float_dtype(module: object) -> jnp.dtype:
    """The floating-point dtype a module computes in.

    Args:
        module: a layer or flow (any pytree).

    Returns:
        The dtype of its first inexact array, or JAX's default float dtype when it has none
        (a permutation, say).

    Example:
        >>> float_dtype(astype(ElementwiseAffine(2), jnp.float16))
        dtype('float16')
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


def _run(chunk, x, inverse, keys=None, log_det=True, context=None):
    total = jnp.zeros((), x.dtype)
    order = range(len(chunk) - 1, -1, -1) if inverse else range(len(chunk))
    for i in order:
        x, ladj = _call_layer(chunk[i], x, inverse, None if keys is None else keys[i], log_det, context)
        if log_det:
            total = total + ladj
    return x, total


class Flow(FlowTransform):
    """A stack of layers, what ``build_flow`` returns: JAX mirror of ``pyroflows.torch.transforms.Flow``.

    Maps one vector; identical consecutive blocks run under ``jax.lax.scan``; ``config``
    is a static (hashable) field; stochastic parts take a ``key``.

    Example:
        >>> flow = Flow([ElementwiseAffine(2), Permute.reverse(2)], 2, {"name": "mine"})
        >>> y, ladj = flow.call_and_ladj(jnp.array([1.0, 2.0]))
        >>> y.tolist(), float(ladj)
        ([2.0, 1.0], 0.0)
    """

    parts: tuple
    config: dict = eqx.field(static=True)
    segments: tuple = eqx.field(static=True)

    def __init__(self, parts: Sequence[FlowTransform], dim: int, config: dict | None = None):
        self.dim = int(dim)
        self.parts = tuple(parts)
        self.config = _Frozen(config or {})
        self.segments = _segments(self.parts)

    def with_parts(self, parts: Sequence[FlowTransform], config: dict) -> Flow:
        """A flow of this kind with other ``parts`` and ``config`` (JAX mirror of torch's ``Flow.with_parts``).

        Example:
            >>> flow = Flow([LogTails(2)], 2, {"name": "tails"})
            >>> len(flow.with_parts((*flow.parts, Permute.reverse(2)), {}).parts)
            2
        """
        return Flow(parts, self.dim, config)

    @property
    def is_stochastic(self) -> bool:
        """Whether a part draws noise, so ``call_and_ladj`` and ``inverse_and_ladj`` need a ``key``.

        Example:
            >>> Flow([LogTails(2)], 2).is_stochastic
            False
        """
        return any(is_stochastic(p) for p in self.parts)

    def _apply(self, x, inverse, key, log_det=True, context=None):
        x = _as_input(self, x, batched=False)
        total = jnp.zeros((), x.dtype)
        # one key per part, so a part's noise does not depend on the direction of travel
        keys = None if key is None else jax.random.split(key, len(self.parts))
        segments = reversed(self.segments) if inverse else self.segments
        for start, period, repeats in segments:
            chunks = [self.parts[start + k * period : start + (k + 1) * period] for k in range(repeats)]
            seg_keys = (
                None
                if keys is None
                else keys[start : start + period * repeats].reshape((repeats, period) + keys.shape[1:])
            )
            if repeats == 1:
                x, ladj = _run(chunks[0], x, inverse, None if seg_keys is None else seg_keys[0], log_det, context)
            else:
                dynamic, static = eqx.partition(chunks, eqx.is_array)
                stacked = jax.tree.map(lambda *a: jnp.stack(a), *dynamic)

                def body(carry, xs, static=static[0]):
                    weights, chunk_keys = xs
                    y, lad = _run(eqx.combine(weights, static), carry[0], inverse, chunk_keys, log_det, context)
                    return (y, carry[1] + lad), None

                (x, ladj), _ = jax.lax.scan(body, (x, jnp.zeros((), x.dtype)), (stacked, seg_keys), reverse=inverse)
            total = total + ladj
        return x, total

    def call_and_ladj(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for one vector ``x`` of shape ``(dim,)`` (integers are cast).

        Args:
            x: one vector; for a batch use ``jax.vmap`` or ``to_transform()``.
            key: feeds the layers with a stochastic log-det estimate (``is_stochastic``).

        Example:
            >>> y, ladj = Flow([LogTails(2, threshold=1.0)], 2).call_and_ladj(jnp.array([0, 3]))
            >>> [round(v, 4) for v in y.tolist()], round(float(ladj), 4)
            ([0.0, 2.0986], -1.0986)
        """
        return self._apply(x, inverse=False, key=key)

    def inverse_and_ladj(self, y: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for one vector ``y`` of shape ``(dim,)``.

        Args:
            key: feeds the layers with a stochastic log-det estimate.

        Example:
            >>> flow = Flow([LogTails(2, threshold=1.0), Permute.reverse(2)], 2)
            >>> x, _ = flow.inverse_and_ladj(flow.call_and_ladj(jnp.array([0.5, 3.0]))[0])
            >>> [round(v, 4) for v in x.tolist()]
            [0.5, 3.0]
        """
        return self._apply(y, inverse=True, key=key)

    def forward_map(self, x: jax.Array) -> jax.Array:
        """The forward map alone for one vector: no log-det, so no key even for stochastic layers.

        Example:
            >>> Flow([Permute.reverse(2)], 2).forward_map(jnp.array([1.0, 2.0])).tolist()
            [2.0, 1.0]
        """
        return self._apply(x, inverse=False, key=None, log_det=False)[0]

    def inverse_map(self, y: jax.Array) -> jax.Array:
        """The inverse map alone for one vector (see ``forward_map``).

        Example:
            >>> Flow([Permute([1, 2, 0])], 3).inverse_map(jnp.array([1.0, 2.0, 0.0])).tolist()
            [0.0, 1.0, 2.0]
        """
        return self._apply(y, inverse=True, key=None, log_det=False)[0]

    # --- TrainableFlow (pyroflows.protocols): what fit_mle and fit_reverse_kl use ---------
    # The density of N(0, I) pushed forward through the flow; the array work is in
    # pyroflows.jax.density (imported here, as it imports nothing of this module).
    standardizable: ClassVar[bool] = True

    def log_prob(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """``log q(x)`` for ``q`` = ``N(0, I)`` pushed forward through the flow (one inverse pass).

        Args:
            x: points of shape ``(..., dim)``.
            key: feeds layers with a random log-det estimate; without it they take
                ``numpyro.prng_key()`` (inside ``numpyro.handlers.seed``) or raise.

        Returns:
            ``log q(x)``, shape ``(...)``.

        Example:
            >>> flow = Flow([ElementwiseAffine(2)], 2)
            >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]
            [-1.8379, -1.8379, -1.8379]
        """
        from ..density import pushforward_log_prob

        return pushforward_log_prob(self, x, key)

    def sample_and_log_prob(self, num_samples: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``num_samples`` draws ``x = flow(u)``, ``u ~ N(0, I)``, and their ``log q(x)``.

        ``log q`` comes from the forward pass alone and is differentiable in the weights.

        Args:
            num_samples: how many draws.
            key: a JAX PRNG key.

        Returns:
            ``(x, log_q)`` with shapes ``(num_samples, dim)`` and ``(num_samples,)``.

        Example:
            >>> x, log_q = Flow([ElementwiseAffine(2)], 2).sample_and_log_prob(4, jax.random.key(0))
            >>> x.shape, log_q.shape
            ((4, 2), (4,))
        """
        from ..density import pushforward_sample_and_log_prob

        return pushforward_sample_and_log_prob(self, num_samples, key)

    def fit_target(self, log_density: Callable | None, stick_the_landing: bool) -> Callable | None:
        """The log-density ``fit_reverse_kl`` trains against: the user's ``log_density`` itself.

        Args:
            log_density: the unnormalised target, ``(n, dim) -> (n,)``.
            stick_the_landing: whether the fit scores its draws with fixed weights (a
                ``Flow`` has an inverse, so it can).

        Returns:
            ``log_density`` unchanged.

        Example:
            >>> target = lambda x: -(x**2).sum(-1)
            >>> Flow([ElementwiseAffine(2)], 2).fit_target(target, False) is target
            True
        """
        return log_density

    # --- end of TrainableFlow ---------------------------------------------------------------


class ConditionalFlow(Flow):
    """A flow whose layers read a context: JAX mirror of ``pyroflows.torch.transforms.ConditionalFlow``.

    Maps one vector at one context vector; ``to_transform(context=c)`` is the NumPyro
    transform at ``c`` (a pytree child, so it works under ``jit`` and ``vmap``), where an
    unbatched ``c`` broadcasts against batched inputs.

    Example:
        >>> from pyroflows.jax import build_flow
        >>> flow = build_flow("realnvp", 2, context_dim=3, hidden_dims=(8,))
        >>> y, ladj = flow.call_and_ladj(jnp.zeros(2), jnp.ones(3))
        >>> flow.to_transform(context=jnp.ones(3))(jnp.zeros((5, 2))).shape
        (5, 2)
        >>> flow.log_prob(jnp.zeros((4, 2)), jnp.ones((4, 3))).shape
        (4,)
    """

    context_dim: int = eqx.field(static=True)
    # Fixed z-scoring of the context (fit_mle sets it); read through stop_gradient, so an
    # optimiser that sees them as weights (NumPyro's eqx_module) leaves them unchanged.
    context_loc: jax.Array
    context_scale: jax.Array

    def __init__(self, parts: Sequence[FlowTransform], dim: int, context_dim: int, config: dict | None = None):
        super().__init__(parts, dim, config)
        self.context_dim = int(context_dim)
        dtype = float_dtype(tuple(parts))
        self.context_loc = jnp.zeros(self.context_dim, dtype)
        self.context_scale = jnp.ones(self.context_dim, dtype)

    def with_parts(self, parts: Sequence[FlowTransform], config: dict) -> ConditionalFlow:
        """A conditional flow with other ``parts`` and ``config``, with this one's context z-scoring."""
        out = ConditionalFlow(parts, self.dim, self.context_dim, config)
        return eqx.tree_at(lambda f: (f.context_loc, f.context_scale), out, (self.context_loc, self.context_scale))

    def _apply(self, x, inverse, key, log_det=True, context=None):
        loc, scale = jax.lax.stop_gradient(self.context_loc), jax.lax.stop_gradient(self.context_scale)
        return super()._apply(x, inverse, key, log_det, (context - loc) / scale)

    def _context(self, context, batched=False):
        if context is None:
            raise ValueError(
                f"this flow is conditional (context_dim={self.context_dim}) and needs a context: pass one to "
                "call_and_ladj / inverse_and_ladj / log_prob, or use flow.to_transform(context=c)"
            )
        c = jnp.asarray(context)
        if batched:
            check_event_dim(jnp.shape(c), self.context_dim, "context")
        elif jnp.shape(c) != (self.context_dim,):
            raise ValueError(
                f"ConditionalFlow.call_and_ladj / inverse_and_ladj read one context of shape ({self.context_dim},), "
                f"got shape {tuple(jnp.shape(c))}; for a batch use flow.to_transform(context=c)"
            )
        return c if jnp.issubdtype(c.dtype, jnp.inexact) else c.astype(float_dtype(self))

    def call_and_ladj(
        self, x: jax.Array, context: jax.Array | None = None, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for one vector ``x`` at one ``context`` of shape ``(context_dim,)``."""
        return self._apply(x, False, key, context=self._context(context))

    def inverse_and_ladj(
        self, y: jax.Array, context: jax.Array | None = None, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for one vector ``y`` at one ``context``."""
        return self._apply(y, True, key, context=self._context(context))

    def forward_map(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """The forward map alone at ``context``."""
        return self._apply(x, False, None, log_det=False, context=self._context(context))[0]

    def inverse_map(self, y: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """The inverse map alone at ``context``."""
        return self._apply(y, True, None, log_det=False, context=self._context(context))[0]

    def to_transform(self, key: jax.Array | None = None, context: jax.Array | None = None) -> EqxTransform:
        """The flow at ``context`` (shape ``(..., context_dim)``) as a NumPyro ``Transform``."""
        return EqxTransform(self, key, self._context(context, batched=True))

    def condition(self, context: jax.Array) -> ConditionedFlow:
        """The flow at one context vector, as a layer (a ``ConditionedFlow``)."""
        return ConditionedFlow(self, context)

    def log_prob(self, x: jax.Array, context: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
        """``log q(x | context)`` for points ``(..., dim)`` and contexts broadcast against them."""
        from ..density import pushforward_log_prob

        return pushforward_log_prob(self, x, key, context)

    def sample_and_log_prob(
        self, num_samples: int, key: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``num_samples`` draws at ``context`` (one, or one per draw) and their ``log q(x | context)``."""
        from ..density import pushforward_sample_and_log_prob

        return pushforward_sample_and_log_prob(self, num_samples, key, context)


class ConditionedFlow(FlowTransform):
    """A ``ConditionalFlow`` at one context vector: JAX mirror of ``pyroflows.torch.transforms.ConditionedFlow``.

    A layer like any other (``to_transform()``, ``jit``, ``vmap``); the context is an array
    leaf, so gradients reach whatever produced it. For a batch of contexts use
    ``ConditionalFlow.to_transform(context=c)``.

    Example:
        >>> from pyroflows.jax import build_flow
        >>> flow = build_flow("maf", 2, context_dim=1, hidden_dims=(8,)).condition(jnp.array([0.5]))
        >>> flow.to_transform().inv(flow.to_transform()(jnp.ones((3, 2)))).round(6).tolist()
        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """

    flow: ConditionalFlow
    context: jax.Array

    def __init__(self, flow: ConditionalFlow, context: jax.Array):
        self.dim = flow.dim
        self.flow, self.context = flow, flow._context(context)

    @property
    def is_stochastic(self) -> bool:
        """Whether the flow's log-det is a random estimate (it then takes a ``key``)."""
        return self.flow.is_stochastic

    def call_and_ladj(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for one vector at the bound context."""
        return self.flow.call_and_ladj(x, self.context, key)

    def inverse_and_ladj(self, y: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for one vector at the bound context."""
        return self.flow.inverse_and_ladj(y, self.context, key)

    def forward_map(self, x: jax.Array) -> jax.Array:
        """The forward map alone at the bound context."""
        return self.flow.forward_map(x, self.context)

    def inverse_map(self, y: jax.Array) -> jax.Array:
        """The inverse map alone at the bound context."""
        return self.flow.inverse_map(y, self.context)


class _Frozen(dict):
    """A hashable dict, so a flow's config can be a static (compile-time) field."""

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))


@eqx.filter_jit
def _vmapped(module, flat, inverse: bool, keys, context=None):
    # Compiled once per flow structure and batch size, so eager use does not re-trace
    # every scan and solver loop on each call; inside an outer jit it simply inlines.
    # Keys are arguments, never constants, so a compiled program draws fresh noise.
    return jax.vmap(lambda v, k, c: _call_layer(module, v, inverse, k, context=c))(flat, keys, context)


@eqx.filter_jit
def _vmapped_map(module, flat, inverse: bool, context=None):
    return jax.vmap(lambda v, c: _call_layer(module, v, inverse, None, log_det=False, context=c)[0])(flat, context)


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


def _flat_inputs(module, x, context):
    """``x`` (and the context, broadcast against it) flattened to one batch axis."""
    x = _as_input(module, x, batched=True)
    if context is None:
        return jnp.shape(x), jnp.reshape(x, (-1, module.dim)), None
    batch = jnp.broadcast_shapes(jnp.shape(x)[:-1], jnp.shape(context)[:-1])
    x = jnp.broadcast_to(x, batch + (module.dim,))
    context = jnp.broadcast_to(context, batch + jnp.shape(context)[-1:])
    return jnp.shape(x), jnp.reshape(x, (-1, module.dim)), jnp.reshape(context, (x.size // module.dim, -1))


def _batched(module, x, inverse, key=None, context=None):
    shape, flat, context = _flat_inputs(module, x, context)
    keys = jax.random.split(_noise_key(module, key), flat.shape[0]) if is_stochastic(module) else None
    out, ladj = _vmapped(module, flat, inverse, keys, context)
    return jnp.reshape(out, shape), jnp.reshape(ladj, shape[:-1])


def _batched_map(module, x, inverse, context=None):
    """The map alone on ``(..., dim)``: for a stochastic module without a key at hand."""
    shape, flat, context = _flat_inputs(module, x, context)
    return jnp.reshape(_vmapped_map(module, flat, inverse, context), shape)


class EqxTransform(Transform):
    """A NumPyro ``Transform`` backed by an equinox flow, on ``(..., dim)`` arrays.

    A pytree (its module and key are the children), so it passes through ``jit`` and
    ``vmap``; ``call_with_intermediates`` returns the log-determinant as the
    intermediate, so a ``TransformedDistribution`` scores its own samples without an
    inverse, and scoring a point it just inverted reuses that inverse pass. The module
    runs under ``vmap`` over every leading axis, compiled once per structure and size.

    Inputs: the last axis must be the flow's ``dim``; integer and boolean arrays are cast
    to the flow's float dtype. For a module with a stochastic log-det estimate, the
    log-det needs a key (``key`` here, or ``numpyro.prng_key()`` under ``seed``) and
    raises without one; ``__call__`` and ``inv`` then compute the map alone.

    Args:
        module: the layer or flow.
        key: a PRNG key for stochastic log-det estimates, or ``None``.

    Example:
        >>> import numpyro.distributions as dist
        >>> base = dist.Normal(jnp.zeros(2), 1.0).to_event(1)
        >>> q = dist.TransformedDistribution(base, EqxTransform(Flow([LogTails(2)], 2)))
        >>> q.log_prob(jnp.zeros((4, 2))).shape
        (4,)
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, module: FlowTransform, key: jax.Array | None = None, context: jax.Array | None = None):
        self.module = module
        self.key = key
        self.context = context
        self._last_inverse = None

    @property
    def dim(self) -> int:
        """The module's event size.

        Example:
            >>> EqxTransform(LogTails(3)).dim
            3
        """
        return self.module.dim

    def call_with_intermediates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for a batch ``x`` of shape ``(..., dim)``; the log-det is the intermediate.

        Example:
            >>> y, ladj = EqxTransform(ElementwiseAffine(2)).call_with_intermediates(jnp.ones((3, 2)))
            >>> y.shape, ladj.tolist()
            ((3, 2), [0.0, 0.0, 0.0])
        """
        return _batched(self.module, x, False, self.key, self.context)

    def __call__(self, x: jax.Array) -> jax.Array:
        if is_stochastic(self.module):
            # Only the log-det needs noise: without a key at hand run the map alone.
            key = _available_key(self.key)
            if key is None:
                return _batched_map(self.module, x, False, self.context)
            return _batched(self.module, x, False, key, self.context)[0]
        return _batched(self.module, x, False, None, self.context)[0]

    def _inverse(self, y: jax.Array) -> jax.Array:
        if is_stochastic(self.module):
            key = _available_key(self.key)
            return (
                _batched_map(self.module, y, True, self.context) if key is None else self._inverse_and_ladj(y, key)[0]
            )
        return self._inverse_and_ladj(y, None)[0]

    def log_abs_det_jacobian(self, x: jax.Array, y: jax.Array, intermediates: jax.Array | None = None) -> jax.Array:
        """``log|det dy/dx|`` for a batch: the intermediate if given, else from the last inverse or a forward pass.

        Example:
            >>> transform = EqxTransform(LogTails(1, threshold=1.0))
            >>> x = jnp.array([[3.0], [2.0]])
            >>> [round(v, 4) for v in transform.log_abs_det_jacobian(x, transform(x)).tolist()]
            [-1.0986, -0.6931]
        """
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

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for a batch ``y`` of shape ``(..., dim)``.

        Example:
            >>> x, ladj = EqxTransform(Permute.reverse(2)).inverse_and_ladj(jnp.array([[1.0, 2.0]]))
            >>> x.tolist(), ladj.tolist()
            ([[2.0, 1.0]], [0.0])
        """
        return self._inverse_and_ladj(y, self.key)

    def _inverse_and_ladj(self, y, key):
        x, ladj = _batched(self.module, y, True, key, self.context)
        # Held by identity (one entry, like Pyro's cache_size=1), so only the very
        # objects of this call can match; a new trace or a new array never does.
        self._last_inverse = (y, x, ladj)
        return x, ladj

    def tree_flatten(self) -> tuple[tuple, None]:
        """The pytree children ``(module, key, context)`` and no auxiliary data.

        Example:
            >>> layer = LogTails(2)
            >>> children, _ = EqxTransform(layer).tree_flatten()
            >>> children[0] is layer, children[1] is None
            (True, True)
        """
        return (self.module, self.key, self.context), None

    @classmethod
    def tree_unflatten(cls, aux_data: None, children: tuple) -> EqxTransform:
        """The transform rebuilt from ``tree_flatten``'s children.

        Example:
            >>> transform = EqxTransform(LogTails(2))
            >>> EqxTransform.tree_unflatten(None, transform.tree_flatten()[0]) == transform
            True
        """
        return cls(*children)

    def __eq__(self, other):
        return isinstance(other, EqxTransform) and other.module is self.module and other.context is self.context

    def __hash__(self):
        return id(self.module)


class Permute(FlowTransform):
    """A fixed permutation ``y = x[permutation]``: JAX mirror of ``pyroflows.torch.transforms.Permute``.

    The permutation is an int32 constant (not trained).

    Example:
        >>> Permute([2, 0, 1]).call_and_ladj(jnp.array([10.0, 11.0, 12.0]))[0].tolist()
        [12.0, 10.0, 11.0]
        >>> Permute.reverse(3).permutation.tolist()
        [2, 1, 0]
    """

    permutation: jax.Array
    inverse_permutation: jax.Array

    def __init__(self, permutation: Sequence[int] | np.ndarray):
        permutation = np.asarray(permutation, dtype=np.int32)
        self.dim = int(permutation.shape[0])
        self.permutation = jnp.asarray(permutation)
        self.inverse_permutation = jnp.asarray(np.argsort(permutation).astype(np.int32))

    @classmethod
    def reverse(cls, dim: int) -> Permute:
        """The permutation that reverses the coordinates."""
        return cls(reverse_permutation(dim))

    @classmethod
    def random(cls, dim: int, key: jax.Array) -> Permute:
        """A random permutation, drawn from ``key``.

        Args:
            key: a PRNG key.

        Example:
            >>> sorted(Permute.random(3, jax.random.key(0)).permutation.tolist())
            [0, 1, 2]
        """
        from ..nn import host_rng

        return cls(host_rng(key).permutation(dim))

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(x[permutation], 0)``.

        Example:
            >>> y, ladj = Permute.reverse(2).call_and_ladj(jnp.array([1.0, 2.0]))
            >>> y.tolist(), float(ladj)
            ([2.0, 1.0], 0.0)
        """
        return x[self.permutation], jnp.zeros((), x.dtype)

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(y[inverse_permutation], 0)``.

        Example:
            >>> Permute([1, 2, 0]).inverse_and_ladj(jnp.array([1.0, 2.0, 0.0]))[0].tolist()
            [0.0, 1.0, 2.0]
        """
        return y[self.inverse_permutation], jnp.zeros((), y.dtype)


class ElementwiseAffine(FlowTransform):
    """``y = loc + exp(log_scale) * x``: JAX mirror of ``pyroflows.torch.transforms.ElementwiseAffine``.

    Example:
        >>> layer = eqx.tree_at(lambda m: m.loc, ElementwiseAffine(2), jnp.ones(2))
        >>> layer.call_and_ladj(jnp.zeros(2))[0].tolist()
        [1.0, 1.0]
    """

    loc: jax.Array
    unconstrained_log_scale: jax.Array
    log_scale_bound: float = eqx.field(static=True)

    def __init__(self, dim: int, log_scale_bound: float = 5.0):
        self.dim = int(dim)
        self.log_scale_bound = float(log_scale_bound)
        self.loc = jnp.asarray(np.zeros(dim), dtype=float)
        self.unconstrained_log_scale = jnp.asarray(np.zeros(dim), dtype=float)

    def log_scale(self) -> jax.Array:
        """The clamped log-scale, shape ``(dim,)``.

        Example:
            >>> layer = ElementwiseAffine(2, log_scale_bound=1.0)
            >>> eqx.tree_at(lambda m: m.unconstrained_log_scale, layer, jnp.full(2, 50.0)).log_scale().tolist()
            [1.0, 1.0]
        """
        return soft_clamp(self.unconstrained_log_scale, self.log_scale_bound)

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(loc + exp(log_scale) * x, sum(log_scale))``.

        Example:
            >>> y, ladj = ElementwiseAffine(2).call_and_ladj(jnp.ones(2))
            >>> y.tolist(), float(ladj)
            ([1.0, 1.0], 0.0)
        """
        s = self.log_scale()
        return self.loc + jnp.exp(s) * x, s.sum()

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``((y - loc) * exp(-log_scale), -sum(log_scale))``.

        Example:
            >>> ElementwiseAffine(2).inverse_and_ladj(jnp.array([0.5, -2.0]))[0].tolist()
            [0.5, -2.0]
        """
        s = self.log_scale()
        return (y - self.loc) * jnp.exp(-s), -s.sum()


class CholeskyAffine(FlowTransform):
    """``y = loc + L x``, a whitening map: JAX mirror of ``pyroflows.torch.transforms.CholeskyAffine``.

    The arrays are ordinary fields; ``AutoFlow`` holds them fixed with ``stop_gradient``.

    Example:
        >>> layer = CholeskyAffine(jnp.zeros(2), jnp.array([[2.0, 0.0], [1.0, 1.0]]))
        >>> y, ladj = layer.call_and_ladj(jnp.ones(2))
        >>> y.tolist(), round(float(ladj), 4)
        ([2.0, 2.0], 0.6931)
    """

    loc: jax.Array
    scale_tril: jax.Array

    def __init__(self, loc: jax.Array, scale_tril: jax.Array):
        self.dim = int(jnp.shape(loc)[-1])
        self.loc = jnp.asarray(loc)
        self.scale_tril = jnp.asarray(scale_tril)

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(loc + L x, sum(log diag(L)))``.

        Example:
            >>> CholeskyAffine(jnp.ones(2), jnp.eye(2)).call_and_ladj(jnp.zeros(2))[0].tolist()
            [1.0, 1.0]
        """
        return self.loc + self.scale_tril @ x, jnp.log(jnp.diagonal(self.scale_tril)).sum()

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(L^-1 (y - loc), -sum(log diag(L)))``.

        Example:
            >>> layer = CholeskyAffine(jnp.zeros(2), jnp.array([[2.0, 0.0], [1.0, 1.0]]))
            >>> layer.inverse_and_ladj(jnp.array([2.0, 2.0]))[0].tolist()
            [1.0, 1.0]
        """
        x = jax.scipy.linalg.solve_triangular(self.scale_tril, y - self.loc, lower=True)
        return x, -jnp.log(jnp.diagonal(self.scale_tril)).sum()


def permutation_layer(kind: str, dim: int, key: jax.Array) -> Permute:
    """The ``Permute`` that ``kind`` (``"reverse"`` or ``"random"``, drawn from ``key``) names.

    Example:
        >>> permutation_layer("reverse", 3, jax.random.key(0)).permutation.tolist()
        [2, 1, 0]
    """
    return Permute.reverse(dim) if kind == "reverse" else Permute.random(dim, key)


def interleave(
    blocks: Sequence[FlowTransform | Sequence[FlowTransform]], dim: int, permutation: str, key: jax.Array
) -> list[FlowTransform]:
    """``blocks`` with permutations between: JAX mirror of ``pyroflows.torch.transforms.base.interleave``.

    Args:
        key: draws the random permutations.

    Example:
        >>> layers = interleave([LogTails(2), [LogTails(2), LogTails(2)]], 2, "random", jax.random.key(0))
        >>> [type(layer).__name__ for layer in layers]
        ['LogTails', 'Permute', 'LogTails', 'LogTails']
    """
    out = []
    keys = jax.random.split(key, max(len(blocks), 1))
    for i, block in enumerate(blocks):
        if i:
            out.append(permutation_layer(permutation, dim, keys[i]))
        out.extend(block if isinstance(block, (list, tuple)) else [block])
    return out


def bisect_increasing(
    fn: Callable,
    args: object,
    target: jax.Array,
    *,
    tol: float,
    max_iter: int = 200,
    lo: jax.Array | None = None,
    hi: jax.Array | None = None,
) -> jax.Array:
    """Solve ``fn(args, x) = target`` elementwise: JAX mirror of ``pyroflows.torch.transforms.base.bisect_increasing``.

    In ``while_loop``s, under ``jit`` and ``vmap``; ``fn`` takes ``args`` (for example the
    layer itself) first, and ``args`` passes through ``stop_gradient``.

    Args:
        args: the data ``fn`` reads besides ``x``, any pytree.

    Example:
        >>> root = bisect_increasing(lambda c, x: c * x**3, 1.0, jnp.array([8.0, -1.0]), tol=1e-6)
        >>> [round(v, 4) for v in root.tolist()]
        [2.0, -1.0]
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


def implicit_step(root: jax.Array, value: jax.Array, derivative: jax.Array, target: jax.Array) -> jax.Array:
    """A Newton step with implicit gradients: JAX mirror of ``pyroflows.torch.transforms.base.implicit_step``.

    Example:
        >>> def cube_root(t):
        ...     root = bisect_increasing(lambda _, x: x**3, None, t, tol=1e-6)
        ...     return implicit_step(root, root**3, 3 * root**2, t)
        >>> round(float(jax.grad(cube_root)(8.0)), 4)  # 1 / (3 x^2) at x = 2
        0.0833
    """
    return jax.lax.stop_gradient(root) - (value - target) / jax.lax.stop_gradient(derivative)


def astype(module: object, dtype: jnp.dtype) -> object:
    """``module`` with every floating-point array cast to ``dtype`` (integer/boolean constants kept).

    Args:
        module: a layer or flow (any pytree).
        dtype: the new floating-point dtype.

    Returns:
        A copy of ``module``.

    Example:
        >>> flow = astype(Flow([ElementwiseAffine(2), Permute.reverse(2)], 2), jnp.float16)
        >>> flow.parts[0].loc.dtype, flow.parts[1].permutation.dtype
        (dtype('float16'), dtype('int32'))
    """
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, module)


class LogTails(FlowTransform):
    """Identity inside ``[-t, t]``, logarithmic beyond: JAX mirror of ``pyroflows.torch.transforms.LogTails``.

    Example:
        >>> y = LogTails(2, threshold=1.0).call_and_ladj(jnp.array([0.5, 2.0]))[0]
        >>> [round(v, 4) for v in y.tolist()]  # 2 -> 1 + log 2
        [0.5, 1.6931]
    """

    threshold: float = eqx.field(static=True)

    def __init__(self, dim: int, threshold: float = 5.0):
        self.dim = int(dim)
        self.threshold = float(threshold)

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The tails map and ``-sum log(1 + max(|x| - t, 0))``.

        Example:
            >>> round(float(LogTails(2, threshold=1.0).call_and_ladj(jnp.array([0.0, 2.0]))[1]), 4)
            -0.6931
        """
        excess = jnp.maximum(jnp.abs(x) - self.threshold, 0.0)
        log_slope = jnp.log1p(excess)
        return jnp.sign(x) * (jnp.minimum(jnp.abs(x), self.threshold) + log_slope), -log_slope.sum()

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The inverse, ``sign(y) (t + expm1(|y| - t))`` beyond ``t``, and its log-det.

        Example:
            >>> round(float(LogTails(1, threshold=1.0).inverse_and_ladj(jnp.array([1.6931]))[0][0]), 3)
            2.0
        """
        excess = jnp.maximum(jnp.abs(y) - self.threshold, 0.0)
        # log(1 + |x| - t) = excess exactly: no expm1/log1p round trip
        return jnp.sign(y) * (jnp.minimum(jnp.abs(y), self.threshold) + jnp.expm1(excess)), excess.sum()
