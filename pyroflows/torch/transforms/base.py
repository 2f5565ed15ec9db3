"""The base class of every pyroflows layer, the composed ``Flow``, and numerical inverses.

A layer implements two methods that return the map and its log-determinant together
(``call_and_ladj`` and ``inverse_and_ladj``); ``FlowTransform`` turns them into a
Pyro ``TransformModule`` with a cache that is safe for training.

Why not Pyro's cache: Pyro keeps the last ``(x, y)`` pair and, for its flows, the
intermediate log-scales, and hands them back whenever the same tensor is seen again.
Scoring one data batch over several optimiser steps then returns a stale result from a
freed graph ("Trying to backward through the graph a second time"), and a sample drawn
under ``no_grad`` scores without gradients. Our entry is used only while it is still
valid: the same tensor objects, the same parameter versions, the same grad mode, and
no backward pass has run through it yet.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch.distributions import constraints

from ...exports import BASE_LAYERS
from ...registry import check_event_dim
from ...structure import reverse_permutation

__all__ = [*BASE_LAYERS, "bisect_increasing", "soft_clamp", "check_input"]


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(x / bound)``: smooth, the identity near 0, and inside (-bound, bound).

    The layers keep their log-scales in range with it, so a scale can neither vanish nor
    overflow however far an optimiser pushes the raw parameter.

    Args:
        x: any tensor.
        bound: the half-width of the range.

    Returns:
        The clamped tensor, shaped like ``x``.

    Example:
        >>> soft_clamp(torch.tensor([0.0, 100.0]), 5.0).tolist()
        [0.0, 5.0]
    """
    return bound * torch.tanh(x / bound)


def _float_dtype(module: torch.nn.Module):
    """The dtype of ``module``'s first floating-point parameter (else buffer), or ``None``."""
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            if t.is_floating_point():
                return t.dtype
    return None


def check_input(
    x: torch.Tensor, dim: int, dtype: torch.dtype | None, what: str = "input", owner: str = "this flow"
) -> torch.Tensor:
    """``x`` ready for a flow on vectors of size ``dim`` with floating-point ``dtype``.

    Integer and boolean inputs are cast to ``dtype`` (their values are exact there); a
    floating-point input of another dtype raises, as Pyro's own transforms do, rather
    than be promoted or rounded silently. An input of the right dtype is returned as is.

    Args:
        x: the input tensor, shape ``(..., dim)``.
        dim: the flow's event size.
        dtype: the flow's parameter dtype; ``None`` (a flow without floating-point
            tensors, such as a permutation) accepts every floating dtype.
        what: the argument's name in messages.
        owner: the flow's name in messages.

    Returns:
        ``x``, or ``x`` cast to ``dtype`` when it held integers or booleans.

    Raises:
        ValueError: the last dimension of ``x`` is not ``dim``.
        TypeError: ``x`` is not a tensor, or is a floating (or complex) tensor of another dtype.

    Example:
        >>> check_input(torch.tensor([[1, 2]]), 2, torch.float64).dtype  # integers are cast
        torch.float64
        >>> check_input(torch.zeros(3, dtype=torch.float64), 3, torch.float32)
        Traceback (most recent call last):
            ...
        TypeError: this flow has torch.float32 parameters but the input has dtype torch.float64; ...
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{owner} expects a torch.Tensor as {what}, got {type(x).__name__}; convert it with torch.as_tensor(x)"
        )
    shape = x.shape
    if not shape or shape[-1] != dim:
        check_event_dim(shape, dim, what)
    if x.dtype == dtype or dtype is None and x.is_floating_point():
        return x
    if not (x.is_floating_point() or x.is_complex()):
        return x.to(torch.get_default_dtype() if dtype is None else dtype)
    if dtype is None or x.is_complex():
        raise TypeError(
            f"{owner} maps real vectors, but the {what} has dtype {x.dtype}; pass a real floating-point tensor"
        )
    raise TypeError(
        f"{owner} has {dtype} parameters but the {what} has dtype {x.dtype}; cast the flow with "
        f"flow.to({x.dtype}) or the {what} with .to({dtype})"
    )


class _Entry:
    __slots__ = ("x", "y", "ladj", "stamp", "__weakref__")

    def __init__(self, x, y, ladj, stamp):
        self.x, self.y, self.ladj, self.stamp = x, y, ladj, stamp


class FlowTransform(TransformModule):
    """The base of every layer: a bijection of vectors of size ``dim`` (event dim 1) with its log|det J|.

    Subclasses implement ``call_and_ladj(x) -> (y, log|det dy/dx|)`` and
    ``inverse_and_ladj(y) -> (x, log|det dx/dy|)`` for inputs of shape ``(..., dim)``;
    the log-determinants have shape ``(...)``. Direction: ``forward`` maps base noise to
    the sample space. The Pyro interface (``layer(x)``, ``layer.inv(y)``,
    ``log_abs_det_jacobian``) is built on the two methods, with a one-entry cache that is
    used only while it is valid (see the module docstring), so a layer is a
    ``pyro.distributions.TransformModule`` that trains safely.

    Args:
        dim: the event size.

    Example:
        >>> class Shift(FlowTransform):
        ...     def call_and_ladj(self, x):
        ...         return x + 1.0, x.new_zeros(x.shape[:-1])
        ...     def inverse_and_ladj(self, y):
        ...         return y - 1.0, y.new_zeros(y.shape[:-1])
        >>> layer = Shift(2)
        >>> y = layer(torch.zeros(1, 2))
        >>> y.tolist(), layer.inv(y).tolist(), layer.log_abs_det_jacobian(torch.zeros(1, 2), y).tolist()
        ([[1.0, 1.0]], [[0.0, 0.0]], [0.0])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    #: True where ``inverse_and_ladj`` solves numerically; ``inverse_tol`` is its tolerance.
    numerical_inverse = False
    inverse_tol = 0.0
    #: The size of the context a conditional layer reads (0: none); such a layer's
    #: ``call_and_ladj`` and ``inverse_and_ladj`` take it as a second argument.
    context_dim = 0

    def __init__(self, dim: int):
        super().__init__(cache_size=0)
        self.dim = int(dim)
        self._entry = None

    def __setattr__(self, name, value):
        if isinstance(value, (torch.Tensor, torch.nn.Module)):
            self.__dict__["_dtype_cache"] = None  # a new tensor may change the dtype
        super().__setattr__(name, value)

    @property
    def flow_dtype(self) -> torch.dtype | None:
        """The floating-point dtype of this layer's parameters (``None`` if it has none).

        Example:
            >>> ElementwiseAffine(2).double().flow_dtype, Permute.reverse(2).flow_dtype
            (torch.float64, None)
        """
        cache = self.__dict__.get("_dtype_cache")
        if cache is None:
            cache = self.__dict__["_dtype_cache"] = (_float_dtype(self),)
        return cache[0]

    def _checked(self, x, what="input"):
        # The one check of the hot path: shape and dtype, no copy for the right dtype.
        return check_input(x, self.dim, self.flow_dtype, what, type(self).__name__)

    # --- the two methods a layer implements -------------------------------------------
    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward map (noise to samples) and its log-determinant, in one pass; shapes as in the class docstring."""
        raise NotImplementedError

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse map (samples to noise) and its log-determinant, in one pass; shapes as in the class docstring."""
        raise NotImplementedError

    # --- torch.distributions.Transform interface ------------------------------------
    def _stamp(self):
        return torch.is_grad_enabled(), tuple(p._version for p in self.parameters())

    def _lookup(self, x=None, y=None):
        e = self._entry
        if e is None or (x is not None and e.x is not x) or (y is not None and e.y is not y):
            return None
        if e.stamp != self._stamp():
            self._entry = None
            return None
        return e

    def _store(self, x, y, ladj, produced):
        entry = _Entry(x, y, ladj, self._stamp())
        self._entry = entry
        ref, owner = weakref.ref(entry), weakref.ref(self)

        def consumed(_grad):
            # A backward pass through the entry frees its graph: never hand it out again.
            module = owner()
            if module is not None and module._entry is not None and module._entry is ref():
                module._entry = None

        for t in (produced, ladj):
            if t.requires_grad:
                t.register_hook(consumed)

    def __call__(self, x):
        return self._through(x, inverse=False)

    def _inv_call(self, y):
        return self._through(y, inverse=True)

    def _through(self, v, inverse):
        """The map at ``v`` (its inverse with ``inverse``), from the cache entry while it is valid."""
        e = self._lookup(y=v) if inverse else self._lookup(x=v)
        if e is not None:
            return e.x if inverse else e.y
        v = self._checked(v)
        out, ladj = self.inverse_and_ladj(v) if inverse else self.call_and_ladj(v)
        x, y, ladj = (out, v, -ladj) if inverse else (v, out, ladj)
        self._store(x, y, ladj, out)
        return out

    def _call(self, x):
        return self.call_and_ladj(self._checked(x))[0]

    def _inverse(self, y):
        return self.inverse_and_ladj(self._checked(y))[0]

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log|det dy/dx|`` (Pyro's interface): from the cache when ``(x, y)`` is its pair.

        Example:
            >>> layer = ElementwiseAffine(2)
            >>> x = torch.zeros(3, 2)
            >>> layer.log_abs_det_jacobian(x, layer(x)).tolist()
            [0.0, 0.0, 0.0]
        """
        e = self._lookup(x=x) or self._lookup(y=y)
        if e is not None:
            return e.ladj
        return self.call_and_ladj(self._checked(x))[1]

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        """The layer itself: it keeps its own cache, so Pyro's ``cache_size`` is ignored.

        Example:
            >>> layer = LogTails(2)
            >>> layer.with_cache(0) is layer
            True
        """
        return self

    def clear_cache(self) -> None:
        """Forget the cached ``(x, y, log-det)`` entry.

        Example:
            >>> layer = LogTails(2)
            >>> x = torch.zeros(1, 2)
            >>> y = layer(x)
            >>> layer.clear_cache()
            >>> layer.inv(y) is x  # recomputed, not the cached input
            False
        """
        self._entry = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_entry"] = None  # cached tensors belong to a graph, not to the model
        state["_dtype_cache"] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        self._entry = None
        self.__dict__["_dtype_cache"] = None  # .to(), .double(), .float() change it
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        """The layer's options, for its ``repr``.

        Example:
            >>> LogTails(3).extra_repr()
            'dim=3'
        """
        return f"dim={self.dim}"


class Flow(ComposeTransformModule):
    """A stack of ``FlowTransform`` layers: what ``build_flow`` returns.

    A Pyro ``ComposeTransformModule`` (so ``flow(x)``, ``flow.inv(y)`` and its use in a
    ``TransformedDistribution`` work as for any Pyro transform) whose ``call_and_ladj``
    and ``inverse_and_ladj`` run the whole stack in one pass. It also implements
    ``pyroflows.protocols.TrainableFlow``, so ``fit_mle`` and ``fit_reverse_kl`` train it.

    Args:
        parts: the layers, in the forward order (noise to samples).
        dim: the event size.
        config: the builder's name and arguments (``save_flow`` stores them).

    Example:
        >>> flow = Flow([ElementwiseAffine(2), Permute.reverse(2)], 2, {"name": "mine"})
        >>> y, ladj = flow.call_and_ladj(torch.ones(3, 2))
        >>> tuple(y.shape), ladj.tolist()
        ((3, 2), [0.0, 0.0, 0.0])
    """

    def __init__(self, parts: Sequence[FlowTransform], dim: int, config: dict | None = None):
        super().__init__(list(parts))
        self.dim = int(dim)
        self.config = dict(config or {})

    def _checked(self, x, what):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            # Float dtypes are checked by each part against its own parameters.
            check_event_dim(x.shape, self.dim, what)
            return x
        return check_input(x, self.dim, _float_dtype(self), what, "Flow")

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|)`` of the whole stack for ``x`` of shape ``(..., dim)``.

        Integer or boolean ``x`` is cast to the flow's dtype; a floating ``x`` of another
        dtype than the parameters raises a ``TypeError`` that names both.

        Example:
            >>> flow = Flow([LogTails(2, threshold=1.0)], 2)
            >>> y, ladj = flow.call_and_ladj(torch.tensor([[0, 3]]))  # integers are cast
            >>> [round(v, 4) for v in y[0].tolist()], round(ladj.item(), 4)
            ([0.0, 2.0986], -1.0986)
        """
        return _run_stack(self.parts, self._checked(x, "input"), False)

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|det dx/dy|)`` of the whole stack (the inverse of ``call_and_ladj``).

        Example:
            >>> flow = Flow([LogTails(2, threshold=1.0), Permute.reverse(2)], 2)
            >>> y, ladj = flow.call_and_ladj(torch.tensor([[0.5, 3.0]]))
            >>> x, inv_ladj = flow.inverse_and_ladj(y)
            >>> [round(v, 4) for v in x[0].tolist()], bool(torch.allclose(inv_ladj, -ladj))
            ([0.5, 3.0], True)
        """
        return _run_stack(self.parts, self._checked(y, "input"), True)

    def with_parts(self, parts: Sequence[FlowTransform], config: dict) -> Flow:
        """A flow of this kind with other ``parts`` (shared, not copied) and ``config``.

        Example:
            >>> flow = Flow([LogTails(2)], 2, {"name": "tails"})
            >>> flow.with_parts([*flow.parts, Permute.reverse(2)], {}).parts[0] is flow.parts[0]
            True
        """
        return Flow(parts, self.dim, config)

    def with_cache(self, cache_size: int = 1) -> Flow:
        """The flow itself: its layers keep their own caches.

        Example:
            >>> flow = Flow([LogTails(2)], 2)
            >>> flow.with_cache() is flow
            True
        """
        return self

    def extra_repr(self) -> str:
        """The event size and the builder's name, for the ``repr``.

        Example:
            >>> Flow([LogTails(2)], 2, {"name": "tails"}).extra_repr()
            "dim=2, name='tails'"
        """
        return f"dim={self.dim}, name={self.config.get('name')!r}"

    # --- pyroflows.protocols.TrainableFlow (what fit_mle and fit_reverse_kl call) --------
    #: ``fit_mle(standardize=True)`` may append a fixed ``Standardize`` layer.
    standardizable = True

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` of ``q`` = ``N(0, I)`` pushed through the stack (one inverse pass), shape ``(...)``.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> from pyroflows.torch import build_flow
            >>> build_flow("realnvp", 2).log_prob(torch.zeros(3, 2)).shape
            torch.Size([3])
        """
        from ..density import pushforward_log_prob

        return pushforward_log_prob(self, x)

    def sample_and_log_prob(self, num_samples: int, rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_samples`` draws ``x = f(u)``, ``u ~ N(0, I)`` from ``rng``, and ``log q(x)``.

        One forward pass; both outputs are differentiable in the weights.

        Example:
            >>> from pyroflows.torch import build_flow
            >>> x, log_q = build_flow("realnvp", 2).sample_and_log_prob(4, torch.Generator().manual_seed(0))
            >>> tuple(x.shape), tuple(log_q.shape)
            ((4, 2), (4,))
        """
        from ..density import pushforward_sample_and_log_prob

        return pushforward_sample_and_log_prob(self, num_samples, rng)

    def fit_target(
        self, log_density: Callable[[torch.Tensor], torch.Tensor], stick_the_landing: bool
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The user's ``log_density`` unchanged: a flow fits any target, with or without
        sticking the landing."""
        return log_density

    # --- end of the TrainableFlow block ----------------------------------------------------


def _run_stack(parts, v, inverse, context=None):
    """The stack's map of ``v`` (its inverse with ``inverse``) and log-det; ``context`` goes
    to the conditional parts, the others run through their caches."""
    total = v.new_zeros(v.shape[:-1])
    for part in reversed(parts) if inverse else parts:
        if context is not None and getattr(part, "context_dim", 0):
            v, ladj = (part.inverse_and_ladj if inverse else part.call_and_ladj)(part._checked(v), context)
        elif inverse:
            x = part.inv(v)
            v, ladj = x, -part.log_abs_det_jacobian(x, v)
        else:
            y = part(v)
            v, ladj = y, part.log_abs_det_jacobian(v, y)
        total = total + ladj
    return v, total


class ConditionalFlow(Flow, ConditionalTransformModule):
    """A flow whose layers read a context ``c``: ``y = f(x; c)``, what ``build_flow(..., context_dim=k)`` returns.

    A Pyro ``ConditionalTransformModule``: ``flow.condition(c)`` is the flow at context
    ``c`` as a ``Transform`` (a ``ConditionedFlow``), so
    ``dist.ConditionalTransformedDistribution(base, [flow]).condition(c)`` samples and
    scores. Context and input batch shapes broadcast against each other. The context
    enters the conditioner networks of the conditional layers; the other parts
    (permutations, NICE's final scale) do not read it. The layers read the context
    z-scored by the fixed buffers ``context_loc`` and ``context_scale`` (zero and one
    until ``fit_mle`` sets them from the training contexts).

    Args:
        parts: the layers, in the forward order.
        dim: the event size.
        context_dim: the size of the context.
        config: the builder's name and arguments (``context_dim`` included).

    References:
        Papamakarios, Pavlakou & Murray 2017, "Masked Autoregressive Flow for Density
        Estimation", arXiv:1705.07057 (conditional MADE and MAF).

    Example:
        >>> import pyro.distributions as dist
        >>> from pyroflows.torch import build_flow
        >>> _ = torch.manual_seed(0)
        >>> flow = build_flow("realnvp", 2, context_dim=3, hidden_dims=(8,))
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> d = dist.ConditionalTransformedDistribution(base, [flow]).condition(torch.ones(5, 3))
        >>> x = d.sample()
        >>> tuple(x.shape), tuple(d.log_prob(x).shape)
        ((5, 2), (5,))
        >>> y, ladj = flow.call_and_ladj(torch.zeros(4, 2), torch.ones(3))  # the context broadcasts
        >>> tuple(y.shape), tuple(ladj.shape)
        ((4, 2), (4,))
    """

    def __init__(self, parts: Sequence[FlowTransform], dim: int, context_dim: int, config: dict | None = None):
        super().__init__(parts, dim, config)
        self.context_dim = int(context_dim)
        dtype = _float_dtype(self) or torch.get_default_dtype()
        self.register_buffer("context_loc", torch.zeros(self.context_dim, dtype=dtype))
        self.register_buffer("context_scale", torch.ones(self.context_dim, dtype=dtype))

    def with_parts(self, parts: Sequence[FlowTransform], config: dict) -> ConditionalFlow:
        """A conditional flow with other ``parts`` and ``config``, sharing the context standardization.

        Example:
            >>> from pyroflows.torch import build_flow
            >>> flow = build_flow("maf", 2, context_dim=1, hidden_dims=(8,))
            >>> type(flow.with_parts(list(flow.parts), flow.config)).__name__
            'ConditionalFlow'
        """
        out = ConditionalFlow(parts, self.dim, self.context_dim, config)
        out.context_loc, out.context_scale = self.context_loc, self.context_scale
        return out

    def _inputs(self, v, context):
        v = self._checked(v, "input")
        if context is None:
            raise ValueError(
                f"this flow is conditional (context_dim={self.context_dim}) and needs a context: pass one to "
                "call_and_ladj / inverse_and_ladj / log_prob, or use flow.condition(context) as a transform"
            )
        context = check_input(context, self.context_dim, v.dtype, "context", "ConditionalFlow")
        context = (context - self.context_loc) / self.context_scale
        batch = torch.broadcast_shapes(v.shape[:-1], context.shape[:-1])
        return v.expand(batch + v.shape[-1:]), context.expand(batch + context.shape[-1:])

    def call_and_ladj(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|)`` at ``context`` (shape ``(..., context_dim)``, broadcast against ``x``)."""
        v, context = self._inputs(x, context)
        return _run_stack(self.parts, v, False, context)

    def inverse_and_ladj(
        self, y: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|det dx/dy|)`` at ``context`` (the inverse of ``call_and_ladj``)."""
        v, context = self._inputs(y, context)
        return _run_stack(self.parts, v, True, context)

    def condition(self, context: torch.Tensor) -> ConditionedFlow:
        """The flow at ``context``, as a Pyro ``Transform`` (Pyro's ``ConditionalTransform`` interface)."""
        return ConditionedFlow(self, context)

    def __call__(self, x):
        return self._inputs(x, None)  # raises: the unconditioned map is not defined

    _inv_call = __call__

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Not defined without a context: raises (use ``condition(context)``)."""
        return self._inputs(x, None)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``log q(x | context)`` of ``N(0, I)`` pushed through the flow at ``context``, shape ``(...)``.

        Example:
            >>> from pyroflows.torch import build_flow
            >>> flow = build_flow("maf", 2, context_dim=1, hidden_dims=(8,))
            >>> flow.log_prob(torch.zeros(3, 2), torch.zeros(3, 1)).shape
            torch.Size([3])
        """
        from ..density import pushforward_log_prob

        return pushforward_log_prob(self.condition(context), x)

    def sample_and_log_prob(
        self, num_samples: int, rng: torch.Generator | None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_samples`` draws at ``context`` and their ``log q(x | context)``.

        A context of shape ``(context_dim,)`` gives ``(num_samples, dim)`` draws; one of
        shape ``(num_samples, context_dim)`` gives one draw per context.
        """
        from ..density import pushforward_sample_and_log_prob

        return pushforward_sample_and_log_prob(self.condition(context), num_samples, rng, self.dim)


class ConditionedFlow(FlowTransform):
    """A ``ConditionalFlow`` at a fixed context: a Pyro ``Transform`` (``ConditionalFlow.condition`` makes it).

    Args:
        flow: the conditional flow.
        context: its context, shape ``(..., context_dim)``; broadcast against the inputs.

    Example:
        >>> from pyroflows.torch import build_flow
        >>> flow = build_flow("nsf", 2, context_dim=2, hidden_dims=(8,))
        >>> t = flow.condition(torch.tensor([0.5, -1.0]))
        >>> x = torch.zeros(3, 2)
        >>> bool(torch.allclose(t.inv(t(x)), x, atol=1e-6))
        True
    """

    def __init__(self, flow: ConditionalFlow, context: torch.Tensor):
        super().__init__(flow.dim)
        self.flow = flow
        # a buffer, so .to(dtype) moves it with the weights; not saved (save the flow)
        context = check_input(context, flow.context_dim, _float_dtype(flow), "context", "ConditionalFlow")
        self.register_buffer("context", context, persistent=False)

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|)`` at the bound context."""
        return self.flow.call_and_ladj(x, self.context)

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|det dx/dy|)`` at the bound context."""
        return self.flow.inverse_and_ladj(y, self.context)


class Permute(FlowTransform):
    """A fixed permutation of the coordinates (log-det 0): ``y = x[..., permutation]``.

    Builders put one between the layers of a stack, so that every coordinate is
    transformed and conditioned on in turn. The permutation is a buffer, not trained.

    Args:
        permutation: a permutation of ``0..dim-1``.

    Example:
        >>> Permute([2, 0, 1])(torch.tensor([[10.0, 11.0, 12.0]])).tolist()
        [[12.0, 10.0, 11.0]]
        >>> Permute.reverse(3).permutation.tolist()
        [2, 1, 0]
    """

    def __init__(self, permutation: Sequence[int] | torch.Tensor):
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        super().__init__(len(permutation))
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    @classmethod
    def reverse(cls, dim: int) -> Permute:
        """The permutation that reverses the coordinates."""
        return cls(reverse_permutation(dim))

    @classmethod
    def random(cls, dim: int) -> Permute:
        """A permutation drawn from torch's global generator (``torch.manual_seed`` fixes it).

        Example:
            >>> _ = torch.manual_seed(0)
            >>> sorted(Permute.random(3).permutation.tolist())
            [0, 1, 2]
        """
        return cls(torch.randperm(dim))

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x[..., permutation], 0)``.

        Example:
            >>> y, ladj = Permute.reverse(2).call_and_ladj(torch.tensor([[1.0, 2.0]]))
            >>> y.tolist(), ladj.tolist()
            ([[2.0, 1.0]], [0.0])
        """
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y[..., inverse_permutation], 0)``.

        Example:
            >>> Permute([1, 2, 0]).inverse_and_ladj(torch.tensor([[1.0, 2.0, 0.0]]))[0].tolist()
            [[0.0, 1.0, 2.0]]
        """
        return y[..., self.inverse_permutation], y.new_zeros(y.shape[:-1])


class ElementwiseAffine(FlowTransform):
    """``y = loc + exp(log_scale) * x`` per coordinate, with a soft-clamped log-scale.

    ``log_scale = soft_clamp(unconstrained_log_scale, log_scale_bound)``; both parameters
    start at zero (the identity). Families whose spec sets ``final_scale`` end with one,
    and ``AutoFlow`` uses it as the learned location and scale of the guide.

    Args:
        dim: the event size.
        log_scale_bound: the bound on ``|log_scale|``.

    Example:
        >>> layer = ElementwiseAffine(2)
        >>> with torch.no_grad():
        ...     _ = layer.loc.fill_(1.0)
        >>> layer(torch.zeros(1, 2)).tolist()
        [[1.0, 1.0]]
    """

    def __init__(self, dim: int, log_scale_bound: float = 5.0):
        super().__init__(dim)
        self.log_scale_bound = float(log_scale_bound)
        self.loc = torch.nn.Parameter(torch.zeros(dim))
        self.unconstrained_log_scale = torch.nn.Parameter(torch.zeros(dim))

    def log_scale(self) -> torch.Tensor:
        """The clamped log-scale, shape ``(dim,)``.

        Example:
            >>> layer = ElementwiseAffine(2, log_scale_bound=1.0)
            >>> with torch.no_grad():
            ...     _ = layer.unconstrained_log_scale.fill_(50.0)
            >>> layer.log_scale().tolist()
            [1.0, 1.0]
        """
        return soft_clamp(self.unconstrained_log_scale, self.log_scale_bound)

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc + exp(log_scale) * x, sum(log_scale))``.

        Example:
            >>> y, ladj = ElementwiseAffine(2).call_and_ladj(torch.ones(3, 2))
            >>> y.tolist(), ladj.tolist()
            ([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], [0.0, 0.0, 0.0])
        """
        s = self.log_scale()
        return self.loc + torch.exp(s) * x, s.sum().expand(x.shape[:-1])

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``((y - loc) * exp(-log_scale), -sum(log_scale))``.

        Example:
            >>> layer = ElementwiseAffine(2)
            >>> y, _ = layer.call_and_ladj(torch.tensor([[0.5, -2.0]]))
            >>> layer.inverse_and_ladj(y)[0].tolist()
            [[0.5, -2.0]]
        """
        s = self.log_scale()
        return (y - self.loc) * torch.exp(-s), (-s.sum()).expand(y.shape[:-1])


class CholeskyAffine(FlowTransform):
    """y = loc + L x with a fixed lower-triangular ``L`` (positive diagonal): a whitening map.

    ``loc`` and ``scale_tril`` are buffers, not parameters: ``AutoFlow(init_scale="laplace")``
    puts the Laplace approximation ``N(loc, L L^T)`` here, so that the layers before it
    learn in coordinates where the posterior is close to ``N(0, I)``.

    Args:
        loc: the shift, shape ``(dim,)``.
        scale_tril: ``L``, shape ``(dim, dim)``, lower triangular with a positive diagonal.

    Example:
        >>> layer = CholeskyAffine(torch.zeros(2), torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        >>> y, ladj = layer.call_and_ladj(torch.ones(1, 2))
        >>> y.tolist(), round(ladj.item(), 4)  # log|det L| = log 2
        ([[2.0, 2.0]], 0.6931)
    """

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor):
        super().__init__(loc.shape[-1])
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale_tril", scale_tril.detach().clone())

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc + L x, sum(log diag(L)))``.

        Example:
            >>> layer = CholeskyAffine(torch.ones(2), torch.eye(2))
            >>> layer.call_and_ladj(torch.zeros(1, 2))[0].tolist()
            [[1.0, 1.0]]
        """
        ladj = torch.log(torch.diagonal(self.scale_tril)).sum()
        return self.loc + x @ self.scale_tril.T, ladj.expand(x.shape[:-1])

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L^-1 (y - loc), -sum(log diag(L)))``, by a triangular solve.

        Example:
            >>> layer = CholeskyAffine(torch.zeros(2), torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
            >>> layer.inverse_and_ladj(torch.tensor([[2.0, 2.0]]))[0].tolist()
            [[1.0, 1.0]]
        """
        x = torch.linalg.solve_triangular(self.scale_tril, (y - self.loc).unsqueeze(-1), upper=False).squeeze(-1)
        ladj = -torch.log(torch.diagonal(self.scale_tril)).sum()
        return x, ladj.expand(y.shape[:-1])


class LogTails(FlowTransform):
    """Identity on ``[-threshold, threshold]``, logarithmic beyond: a fixed bijection of R^D.

    ``y = x`` for ``|x| <= t`` and ``y = sign(x) (t + log(1 + |x| - t))`` beyond, per
    coordinate (continuously differentiable). ``AutoFlow`` puts it between the flow and
    its affine layer: a flow whose weights take one large optimiser step can put samples
    at ``|x| ~ 1e30``, and a model that exponentiates them (a scale site) then returns
    ``inf`` and the ELBO gradient NaN. After ``LogTails`` such a sample is ``t + 69``, so
    the guide stays finite at learning rates where the flow alone diverges; the bulk of
    the distribution (``|x| <= t``, in whitened coordinates) is untouched.

    Args:
        dim: the event size.
        threshold: ``t``, where the logarithmic tails begin.

    Example:
        >>> y = LogTails(1, threshold=1.0)(torch.tensor([[0.5], [2.0]]))
        >>> [round(v, 4) for v in y.flatten().tolist()]  # 2 -> 1 + log 2
        [0.5, 1.6931]
    """

    def __init__(self, dim: int, threshold: float = 5.0):
        super().__init__(dim)
        self.threshold = float(threshold)

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tails map and ``-sum log(1 + excess)``, ``excess = max(|x| - t, 0)``.

        Example:
            >>> _, ladj = LogTails(2, threshold=1.0).call_and_ladj(torch.tensor([[0.0, 2.0]]))
            >>> [round(v, 4) for v in ladj.tolist()]
            [-0.6931]
        """
        excess = (x.abs() - self.threshold).clamp(min=0)
        log_slope = torch.log1p(excess)
        y = torch.sign(x) * (x.abs().clamp(max=self.threshold) + log_slope)
        return y, -log_slope.sum(-1)

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse, ``sign(y) (t + expm1(|y| - t))`` beyond ``t``, and its log-det.

        Example:
            >>> x, _ = LogTails(1, threshold=1.0).inverse_and_ladj(torch.tensor([[1.6931]]))
            >>> round(x.item(), 3)
            2.0
        """
        excess = (y.abs() - self.threshold).clamp(min=0)
        x = torch.sign(y) * (y.abs().clamp(max=self.threshold) + torch.expm1(excess))
        # log(1 + |x| - t) = excess exactly: no expm1/log1p round trip
        return x, excess.sum(-1)


def permutation_layer(kind: str, dim: int) -> Permute:
    """The ``Permute`` a builder's ``permutation`` option names: ``"reverse"`` or ``"random"``.

    Example:
        >>> permutation_layer("reverse", 3).permutation.tolist()
        [2, 1, 0]
    """
    return Permute.reverse(dim) if kind == "reverse" else Permute.random(dim)


def interleave(
    blocks: Sequence[FlowTransform | Sequence[FlowTransform]], dim: int, permutation: str
) -> list[FlowTransform]:
    """``blocks`` with a permutation between consecutive ones (none after the last).

    Args:
        blocks: layers, or lists of layers that stay together.
        dim: the event size.
        permutation: ``"reverse"`` or ``"random"`` (see ``permutation_layer``).

    Returns:
        The flat list of layers.

    Example:
        >>> layers = interleave([LogTails(2), [LogTails(2), LogTails(2)]], 2, "reverse")
        >>> [type(layer).__name__ for layer in layers]
        ['LogTails', 'Permute', 'LogTails', 'LogTails']
    """
    out = []
    for i, block in enumerate(blocks):
        if i:
            out.append(permutation_layer(permutation, dim))
        out.extend(block if isinstance(block, (list, tuple)) else [block])
    return out


def bisect_increasing(
    fn: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    *,
    tol: float,
    max_iter: int = 200,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve ``fn(x) = target`` elementwise for an increasing ``fn``, without gradients.

    The bracket starts at ``[lo, hi]`` (default ``target -+ 1``) and doubles outwards
    until it holds the root; bisection then stops when every interval is shorter than
    ``tol * (1 + |x|)``. Callers attach gradients with ``implicit_step``. The layers with
    a numerical inverse (``numerical_inverse = True``) solve with it.

    Args:
        fn: an elementwise, increasing function.
        target: the values to reach.
        tol: the relative tolerance of the root.
        max_iter: the most bisection steps.
        lo: a start for the lower ends of the bracket.
        hi: a start for the upper ends.

    Returns:
        The roots, shaped like ``target``, detached from the graph.

    Example:
        >>> target = torch.tensor([8.0, -1.0], dtype=torch.float64)
        >>> [round(v, 9) for v in bisect_increasing(lambda x: x**3, target, tol=1e-12).tolist()]
        [2.0, -1.0]
    """
    with torch.no_grad():
        t = target.detach()
        lo = (t - 1.0) if lo is None else lo.detach().clone()
        hi = (t + 1.0) if hi is None else hi.detach().clone()
        width = torch.ones_like(t)
        for _ in range(2100):  # doubling reaches the float64 range in about 1030 steps
            low = fn(lo) > t
            high = fn(hi) < t
            if not (low.any() or high.any()):
                break
            width = width * 2
            lo = torch.where(low, lo - width, lo)
            hi = torch.where(high, hi + width, hi)
        for _ in range(max_iter):
            mid = 0.5 * (lo + hi)
            above = fn(mid) > t
            lo = torch.where(above, lo, mid)
            hi = torch.where(above, mid, hi)
            if bool(((hi - lo) <= tol * (1 + mid.abs())).all()):
                break
        return 0.5 * (lo + hi)


def implicit_step(
    root: torch.Tensor, value: torch.Tensor, derivative: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """One Newton step from a detached root: same value, exact first derivatives.

    At a root of ``g(x) = target``, ``x = root - (g(root) - target) / g'(root)`` equals
    ``root`` to the solver's tolerance, and its gradients are those of the implicit
    function theorem: dx/dtarget = 1/g', dx/dtheta = -(dg/dtheta)/g'.

    Args:
        root: the solver's root (no gradient needed).
        value: ``g(root)``, computed with gradients.
        derivative: ``g'(root)`` (used detached).
        target: the right-hand side, possibly with gradients.

    Returns:
        ``root`` with the implicit function theorem's gradients attached.

    Example:
        >>> target = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        >>> root = bisect_increasing(lambda x: x**3, target, tol=1e-12)
        >>> x = implicit_step(root, root**3, 3 * root**2, target)
        >>> x.backward()
        >>> round(x.item(), 6), round(target.grad.item(), 6)  # dx/dtarget = 1 / (3 x^2)
        (2.0, 0.083333)
    """
    return root - (value - target) / derivative.detach()
