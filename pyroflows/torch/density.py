"""The density of ``N(0, I)`` pushed through a flow: the low-level helpers of the Pyro backend.

For a bijection ``f`` from base noise ``u ~ N(0, I)`` to samples ``x = f(u)``,

    log q(x) = log N(f^{-1}(x); 0, I) + log|det d f^{-1}(x) / dx|.

``pyroflows.torch.train`` (the fitting loops), ``pyroflows.torch.snf`` (stochastic
normalizing flows) and ``Flow`` import from here, and this module imports none of them,
so train and snf never import each other (mirrors ``pyroflows.jax.density``). It holds:

- ``std_normal_log_prob``: ``log N(u; 0, I)``;
- ``forward_and_ladj`` and ``inverse_and_ladj``: a map and its log-determinant for any
  Pyro ``Transform`` (one pass for a pyroflows layer, which returns both);
- ``pushforward_log_prob`` and ``pushforward_sample_and_log_prob``: ``log q`` of a point,
  and draws with their ``log q``;
- ``TransformFlow`` and ``as_trainable``: the ``pyroflows.protocols.TrainableFlow``
  protocol for a transform that lacks it (a user's own ``TransformModule``), so the
  training loops never test a flow's type;
- ``log_prob_stop_gradient``: ``log q(x)`` with the flow's parameters held fixed (the
  sticking-the-landing estimator of Roeder, Wu & Duvenaud 2017).

References:
    Papamakarios, Nalisnick, Rezende, Mohamed & Lakshminarayanan 2021, "Normalizing
    flows for probabilistic modeling and inference", arXiv:1912.02762, section 2.1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..protocols import TrainableFlow

__all__ = [
    "std_normal_log_prob",
    "forward_and_ladj",
    "inverse_and_ladj",
    "dtype_and_device",
    "pushforward_log_prob",
    "pushforward_sample_and_log_prob",
    "TransformFlow",
    "as_trainable",
    "detached_parameters",
    "log_prob_stop_gradient",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def std_normal_log_prob(u: torch.Tensor) -> torch.Tensor:
    """The log-density of the standard normal ``N(0, I)`` on the last axis of ``u``.

    Args:
        u: points of shape ``(..., dim)``.

    Returns:
        ``-|u|^2 / 2 - dim log(2 pi) / 2``, shape ``(...)``.

    Example:
        >>> std_normal_log_prob(torch.zeros(3, 2))
        tensor([-1.8379, -1.8379, -1.8379])
    """
    return -0.5 * (u * u).sum(-1) - u.shape[-1] * _HALF_LOG_2PI


def forward_and_ladj(transform: Any, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward map of ``transform`` at ``u`` and its log-determinant.

    A pyroflows layer or ``Flow`` returns both from one pass (``call_and_ladj``); any other
    Pyro ``Transform`` is called and then asked for ``log_abs_det_jacobian``.

    Args:
        transform: a Pyro ``Transform`` on vectors (event dim 1).
        u: inputs of shape ``(..., dim)``.

    Returns:
        ``(x, log|det dx/du|)`` with shapes ``(..., dim)`` and ``(...)``.

    Example:
        >>> from pyro.distributions.transforms import AffineTransform
        >>> scale = AffineTransform(torch.zeros(2), 2.0 * torch.ones(2), event_dim=1)
        >>> x, ladj = forward_and_ladj(scale, torch.ones(3, 2))
        >>> x[0].tolist(), round(ladj[0].item(), 4)
        ([2.0, 2.0], 1.3863)
    """
    if hasattr(transform, "call_and_ladj"):
        return transform.call_and_ladj(u)
    x = transform(u)
    return x, transform.log_abs_det_jacobian(u, x)


def inverse_and_ladj(transform: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse map of ``transform`` at ``x`` and its log-determinant.

    A pyroflows layer or ``Flow`` returns both from one pass (``inverse_and_ladj``); any
    other Pyro ``Transform`` is inverted (``transform.inv``) and its forward
    log-determinant negated.

    Args:
        transform: a Pyro ``Transform`` on vectors (event dim 1).
        x: points of shape ``(..., dim)`` in the transform's codomain.

    Returns:
        ``(u, log|det du/dx|)`` with shapes ``(..., dim)`` and ``(...)``.

    Example:
        >>> from pyroflows.torch.transforms import LogTails
        >>> u, ildj = inverse_and_ladj(LogTails(2), torch.full((3, 2), 2.0))  # the identity on [-5, 5]
        >>> u[0].tolist(), ildj.tolist()
        ([2.0, 2.0], [0.0, 0.0, 0.0])
    """
    if hasattr(transform, "inverse_and_ladj"):
        return transform.inverse_and_ladj(x)
    u = transform.inv(x)
    return u, -transform.log_abs_det_jacobian(u, x)


def dtype_and_device(module: Any) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of ``module``'s first parameter, else of its first buffer.

    A module with neither (or an object that is not a ``torch.nn.Module``) gives the
    default dtype on the CPU.

    Args:
        module: a ``torch.nn.Module`` or any other object.

    Returns:
        ``(dtype, device)``: what new tensors for ``module`` (base noise, data) should use.

    Example:
        >>> dtype_and_device(torch.nn.Linear(2, 2).double())
        (torch.float64, device(type='cpu'))
    """
    if isinstance(module, torch.nn.Module):
        for tensors in (module.parameters(), module.buffers()):
            for t in tensors:
                if t.is_floating_point():
                    return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def pushforward_log_prob(transform: Any, x: torch.Tensor) -> torch.Tensor:
    """``log q(x)`` for ``q`` = ``N(0, I)`` pushed forward through ``transform`` (one inverse pass).

    Args:
        transform: a Pyro ``Transform`` on vectors (a pyroflows layer or ``Flow``, or any other).
        x: points of shape ``(..., dim)``.

    Returns:
        ``log q(x)``, shape ``(...)``.

    Example:
        >>> from pyroflows.torch.transforms import ElementwiseAffine
        >>> round(pushforward_log_prob(ElementwiseAffine(2), torch.zeros(2)).item(), 4)
        -1.8379
    """
    u, ildj = inverse_and_ladj(transform, x)
    return std_normal_log_prob(u) + ildj


def pushforward_sample_and_log_prob(
    transform: Any, num_samples: int, rng: torch.Generator | None, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws ``x = f(u)``, ``u ~ N(0, I)``, and their ``log q(x)`` from the forward pass alone.

    ``log q(x) = log N(u; 0, I) - log|det dx/du|``, differentiable in the transform's
    parameters (the reparametrisation gradient). ``u`` takes the dtype and device of the
    transform's first parameter (``dtype_and_device``).

    Args:
        transform: a Pyro ``Transform`` on vectors.
        num_samples: how many draws.
        rng: a ``torch.Generator`` for ``u``; the global RNG when ``None``.
        dim: the event size; ``transform.dim`` when ``None``.

    Returns:
        ``(x, log_q)`` with shapes ``(num_samples, dim)`` and ``(num_samples,)``.

    Example:
        >>> from pyroflows.torch.transforms import ElementwiseAffine
        >>> x, log_q = pushforward_sample_and_log_prob(ElementwiseAffine(2), 4, torch.Generator().manual_seed(0))
        >>> tuple(x.shape), tuple(log_q.shape)
        ((4, 2), (4,))
    """
    dtype, device = dtype_and_device(transform)
    u = torch.randn(num_samples, transform.dim if dim is None else dim, generator=rng, dtype=dtype, device=device)
    x, ladj = forward_and_ladj(transform, u)
    return x, std_normal_log_prob(u) - ladj


class TransformFlow(torch.nn.Module):
    """``N(0, I)`` pushed forward through any Pyro ``Transform``, as a ``TrainableFlow``.

    The adapter that lets ``fit_mle`` and ``fit_reverse_kl`` train a transform that does
    not implement ``pyroflows.protocols.TrainableFlow`` itself, such as a user's own
    ``TransformModule``. The transform is held as a submodule, so the adapter's
    ``parameters()`` are the transform's (trained in place).

    Args:
        transform: a Pyro ``Transform`` on vectors (event dim 1); its ``dim`` attribute,
            if any, is the event size (``None`` otherwise).

    Attributes:
        transform: the wrapped transform.
        dim: the event size, or ``None`` when the transform has no ``dim``.
        standardizable: always ``True``: a fixed affine layer may follow the transform.

    Example:
        >>> from pyroflows.torch.transforms import ElementwiseAffine
        >>> _ = torch.manual_seed(0)
        >>> flow = TransformFlow(ElementwiseAffine(2))
        >>> flow.log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])
        >>> x, log_q = flow.sample_and_log_prob(4, torch.Generator().manual_seed(0))
        >>> tuple(x.shape), tuple(log_q.shape)
        ((4, 2), (4,))
    """

    standardizable = True

    def __init__(self, transform: Any):
        super().__init__()
        self.transform = transform
        self.dim = getattr(transform, "dim", None)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x) = log N(u; 0, I) + log|det du/dx|`` with ``u`` the inverse of ``x``, shape ``(...)``."""
        return pushforward_log_prob(self.transform, x)

    def sample_and_log_prob(self, num_samples: int, rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_samples`` draws ``x = f(u)``, ``u ~ N(0, I)`` from ``rng``, and their ``log q(x)``.

        Both are differentiable in the transform's parameters (reparametrised draws).
        """
        return pushforward_sample_and_log_prob(self.transform, num_samples, rng, self.dim)

    def fit_target(self, log_density: Callable, stick_the_landing: bool) -> Callable:
        """The user's ``log_density`` unchanged: a pushforward density fits any target."""
        return log_density

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def as_trainable(flow: Any) -> TrainableFlow:
    """``flow`` itself when it implements ``TrainableFlow``, else ``TransformFlow(flow)``.

    Args:
        flow: a ``Flow``, a ``StochasticFlow``, any other object with the protocol's
            members, or a Pyro ``Transform``.

    Returns:
        An object with ``dim``, ``standardizable``, ``log_prob``, ``sample_and_log_prob``
        and ``fit_target``.

    Example:
        >>> import pyroflows.torch as pf
        >>> from pyroflows.torch.transforms import ElementwiseAffine
        >>> flow = pf.build_flow("realnvp", 2)
        >>> as_trainable(flow) is flow
        True
        >>> type(as_trainable(ElementwiseAffine(2))).__name__
        'TransformFlow'
    """
    return flow if isinstance(flow, TrainableFlow) else TransformFlow(flow)


@contextlib.contextmanager
def detached_parameters(module: Any) -> Iterator[None]:
    """Inside the block every parameter of ``module`` reads as its detached value.

    Plain attribute swapping, not ``torch.func.functional_call``, which refuses to run
    under ``torch.jit.trace`` (``JitTrace_ELBO``).

    Args:
        module: the module whose parameters are held fixed (an object that is not a
            ``torch.nn.Module`` has none, and the block changes nothing).

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> with detached_parameters(layer):
        ...     print(layer(torch.ones(1, 2)).requires_grad)
        False
        >>> layer(torch.ones(1, 2)).requires_grad
        True
    """
    modules = module.modules() if isinstance(module, torch.nn.Module) else ()
    saved = [(m, name, p) for m in modules for name, p in m._parameters.items() if p is not None]
    try:
        for m, name, p in saved:
            m._parameters[name] = p.detach()
        yield
    finally:
        for m, name, p in saved:
            m._parameters[name] = p


def log_prob_stop_gradient(flow: Any, x: torch.Tensor) -> torch.Tensor:
    """``log q(x)`` with the flow's parameters held fixed: gradients reach ``x`` only.

    The path-derivative ("sticking the landing") estimator scores a reparametrised sample
    this way. ``x`` enters as a fresh view, so no layer cache hands back the forward pass
    (whose graph holds the live parameters).

    Args:
        flow: a ``TrainableFlow`` or a Pyro ``TransformModule`` (wrapped by ``as_trainable``).
        x: points of shape ``(..., dim)``.

    Returns:
        ``log q(x)``, shape ``(...)``, differentiable in ``x`` but not in the parameters.

    References:
        Roeder, Wu & Duvenaud 2017, "Sticking the landing: simple, lower-variance gradient
        estimators for variational inference", arXiv:1703.09194.

    Example:
        >>> from pyroflows.torch.transforms import ElementwiseAffine
        >>> layer = ElementwiseAffine(2)
        >>> x = torch.zeros(3, 2, requires_grad=True)
        >>> log_prob_stop_gradient(layer, x).sum().backward()
        >>> x.grad.shape, all(p.grad is None for p in layer.parameters())
        (torch.Size([3, 2]), True)
    """
    model = as_trainable(flow)
    with detached_parameters(model):
        return model.log_prob(x.view_as(x))
