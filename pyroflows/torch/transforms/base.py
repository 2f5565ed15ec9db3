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

import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch.distributions import constraints

from ...registry import check_event_dim

__all__ = [
    "FlowTransform", "Flow", "Permute", "ElementwiseAffine", "CholeskyAffine", "LogTails", "bisect_increasing", "soft_clamp",
    "check_input",
]


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(x / bound)``: smooth, the identity near 0, and inside (-bound, bound)."""
    return bound * torch.tanh(x / bound)


def _float_dtype(module: torch.nn.Module):
    """The dtype of ``module``'s first floating-point parameter (else buffer), or ``None``."""
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            if t.is_floating_point():
                return t.dtype
    return None


def check_input(x: torch.Tensor, dim: int, dtype: torch.dtype | None, what: str = "input",
                owner: str = "this flow") -> torch.Tensor:
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
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor as {what}, got {type(x).__name__}; "
                        "convert it with torch.as_tensor(x)")
    shape = x.shape
    if not shape or shape[-1] != dim:
        check_event_dim(shape, dim, what)
    if x.dtype == dtype or dtype is None and x.is_floating_point():
        return x
    if not (x.is_floating_point() or x.is_complex()):
        return x.to(torch.get_default_dtype() if dtype is None else dtype)
    if dtype is None or x.is_complex():
        raise TypeError(f"{owner} maps real vectors, but the {what} has dtype {x.dtype}; pass a real "
                        "floating-point tensor")
    raise TypeError(
        f"{owner} has {dtype} parameters but the {what} has dtype {x.dtype}; cast the flow with "
        f"flow.to({x.dtype}) or the {what} with .to({dtype})"
    )


class _Entry:
    __slots__ = ("x", "y", "ladj", "stamp", "__weakref__")

    def __init__(self, x, y, ladj, stamp):
        self.x, self.y, self.ladj, self.stamp = x, y, ladj, stamp


class FlowTransform(TransformModule):
    """A bijection of vectors of size ``dim`` (event dim 1) with its log|det J|.

    Subclasses implement ``call_and_ladj(x) -> (y, log|det dy/dx|)`` and
    ``inverse_and_ladj(y) -> (x, log|det dx/dy|)`` for inputs of shape ``(..., dim)``;
    the log-determinants have shape ``(...)``. Direction: ``forward`` maps base noise to
    the sample space.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    #: True where ``inverse_and_ladj`` solves numerically; ``inverse_tol`` is its tolerance.
    numerical_inverse = False
    inverse_tol = 0.0

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
        """The floating-point dtype of this layer's parameters (``None`` if it has none)."""
        cache = self.__dict__.get("_dtype_cache")
        if cache is None:
            cache = self.__dict__["_dtype_cache"] = (_float_dtype(self),)
        return cache[0]

    def _checked(self, x, what="input"):
        # The one check of the hot path: shape and dtype, no copy for the right dtype.
        return check_input(x, self.dim, self.flow_dtype, what, type(self).__name__)

    # --- the two methods a layer implements -------------------------------------------
    def call_and_ladj(self, x):
        raise NotImplementedError

    def inverse_and_ladj(self, y):
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
        e = self._lookup(x=x)
        if e is not None:
            return e.y
        x = self._checked(x)
        y, ladj = self.call_and_ladj(x)
        self._store(x, y, ladj, y)
        return y

    def _inv_call(self, y):
        e = self._lookup(y=y)
        if e is not None:
            return e.x
        y = self._checked(y)
        x, ildj = self.inverse_and_ladj(y)
        ladj = -ildj
        self._store(x, y, ladj, x)
        return x

    def _call(self, x):
        return self.call_and_ladj(self._checked(x))[0]

    def _inverse(self, y):
        return self.inverse_and_ladj(self._checked(y))[0]

    def log_abs_det_jacobian(self, x, y):
        e = self._lookup(x=x) or self._lookup(y=y)
        if e is not None:
            return e.ladj
        return self.call_and_ladj(self._checked(x))[1]

    def with_cache(self, cache_size=1):
        return self

    def clear_cache(self):
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

    def extra_repr(self):
        return f"dim={self.dim}"


class Flow(ComposeTransformModule):
    """A stack of ``FlowTransform`` layers: what ``build_flow`` returns.

    ``config`` records the builder's name and arguments. ``call_and_ladj`` and
    ``inverse_and_ladj`` run the whole stack in one pass.
    """

    def __init__(self, parts, dim: int, config: dict | None = None):
        super().__init__(list(parts))
        self.dim = int(dim)
        self.config = dict(config or {})

    def _checked(self, x, what):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            # Float dtypes are checked by each part against its own parameters.
            check_event_dim(x.shape, self.dim, what)
            return x
        return check_input(x, self.dim, _float_dtype(self), what, "Flow")

    def call_and_ladj(self, x):
        """``(y, log|det dy/dx|)`` of the whole stack for ``x`` of shape ``(..., dim)``.

        Integer or boolean ``x`` is cast to the flow's dtype; a floating ``x`` of another
        dtype than the parameters raises a ``TypeError`` that names both.
        """
        x = self._checked(x, "input")
        total = x.new_zeros(x.shape[:-1])
        for part in self.parts:
            y = part(x)
            total = total + part.log_abs_det_jacobian(x, y)
            x = y
        return x, total

    def inverse_and_ladj(self, y):
        """``(x, log|det dx/dy|)`` of the whole stack (the inverse of ``call_and_ladj``)."""
        y = self._checked(y, "input")
        total = y.new_zeros(y.shape[:-1])
        for part in reversed(self.parts):
            x = part.inv(y)
            total = total - part.log_abs_det_jacobian(x, y)
            y = x
        return y, total

    def with_cache(self, cache_size=1):
        return self

    def extra_repr(self):
        return f"dim={self.dim}, name={self.config.get('name')!r}"


class Permute(FlowTransform):
    """A fixed permutation of the coordinates (log-det 0)."""

    def __init__(self, permutation):
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        super().__init__(len(permutation))
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    @classmethod
    def reverse(cls, dim):
        return cls(torch.arange(dim - 1, -1, -1))

    @classmethod
    def random(cls, dim):
        return cls(torch.randperm(dim))

    def call_and_ladj(self, x):
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def inverse_and_ladj(self, y):
        return y[..., self.inverse_permutation], y.new_zeros(y.shape[:-1])


class ElementwiseAffine(FlowTransform):
    """y = loc + exp(log_scale) * x per coordinate, with a soft-clamped log-scale."""

    def __init__(self, dim: int, log_scale_bound: float = 5.0):
        super().__init__(dim)
        self.log_scale_bound = float(log_scale_bound)
        self.loc = torch.nn.Parameter(torch.zeros(dim))
        self.unconstrained_log_scale = torch.nn.Parameter(torch.zeros(dim))

    def log_scale(self):
        return soft_clamp(self.unconstrained_log_scale, self.log_scale_bound)

    def call_and_ladj(self, x):
        s = self.log_scale()
        return self.loc + torch.exp(s) * x, s.sum().expand(x.shape[:-1])

    def inverse_and_ladj(self, y):
        s = self.log_scale()
        return (y - self.loc) * torch.exp(-s), (-s.sum()).expand(y.shape[:-1])


class CholeskyAffine(FlowTransform):
    """y = loc + L x with a fixed lower-triangular ``L`` (positive diagonal): a whitening map.

    ``loc`` and ``scale_tril`` are buffers, not parameters: ``AutoFlow(init_scale="laplace")``
    puts the Laplace approximation ``N(loc, L L^T)`` here, so that the layers before it
    learn in coordinates where the posterior is close to ``N(0, I)``.
    """

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor):
        super().__init__(loc.shape[-1])
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale_tril", scale_tril.detach().clone())

    def call_and_ladj(self, x):
        ladj = torch.log(torch.diagonal(self.scale_tril)).sum()
        return self.loc + x @ self.scale_tril.T, ladj.expand(x.shape[:-1])

    def inverse_and_ladj(self, y):
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
    """

    def __init__(self, dim: int, threshold: float = 5.0):
        super().__init__(dim)
        self.threshold = float(threshold)

    def call_and_ladj(self, x):
        excess = (x.abs() - self.threshold).clamp(min=0)
        log_slope = torch.log1p(excess)
        y = torch.sign(x) * (x.abs().clamp(max=self.threshold) + log_slope)
        return y, -log_slope.sum(-1)

    def inverse_and_ladj(self, y):
        excess = (y.abs() - self.threshold).clamp(min=0)
        x = torch.sign(y) * (y.abs().clamp(max=self.threshold) + torch.expm1(excess))
        # log(1 + |x| - t) = excess exactly: no expm1/log1p round trip
        return x, excess.sum(-1)


def permutation_layer(kind: str, dim: int) -> Permute:
    return Permute.reverse(dim) if kind == "reverse" else Permute.random(dim)


def interleave(blocks, dim: int, permutation: str):
    """``blocks`` with a permutation between consecutive ones (none after the last)."""
    out = []
    for i, block in enumerate(blocks):
        if i:
            out.append(permutation_layer(permutation, dim))
        out.extend(block if isinstance(block, (list, tuple)) else [block])
    return out


def bisect_increasing(fn, target, *, tol, max_iter=200, lo=None, hi=None):
    """Solve ``fn(x) = target`` elementwise for an increasing ``fn``, without gradients.

    The bracket starts at ``[lo, hi]`` (default ``target -+ 1``) and doubles outwards
    until it holds the root; bisection then stops when every interval is shorter than
    ``tol * (1 + |x|)``. Callers attach gradients with ``implicit_step``.
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


def implicit_step(root, value, derivative, target):
    """One Newton step from a detached root: same value, exact first derivatives.

    At a root of ``g(x) = target``, ``x = root - (g(root) - target) / g'(root)`` equals
    ``root`` to the solver's tolerance, and its gradients are those of the implicit
    function theorem: dx/dtarget = 1/g', dx/dtheta = -(dg/dtheta)/g'.
    """
    return root - (value - target) / derivative.detach()
