"""The torch side of the flow registry: ``available_flows``, ``build_flow``, ``register_flow``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pyro.distributions.torch_transform import TransformModule

from ..registry import FlowRegistry

if TYPE_CHECKING:  # the transforms import this module to register their builders
    from .transforms.base import Flow

__all__ = ["available_flows", "build_flow", "register_flow", "REGISTRY"]

REGISTRY = FlowRegistry("torch")


def available_flows() -> list[str]:
    """Every registered flow name, sorted.

    Returns:
        The names ``build_flow`` and ``AutoFlow(flow=...)`` accept.

    Example:
        >>> {"maf", "realnvp", "planar"} <= set(available_flows())
        True
    """
    return REGISTRY.names()


def register_flow(name: str, *, replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator adding ``builder(dim, num_layers=None, hidden_dims=None, **options)`` as ``name``.

    The builder returns a list of ``TransformModule`` layers or one ``TransformModule``;
    ``build_flow(name, dim, ...)`` and ``AutoFlow(model, flow=name)`` then use it.

    Args:
        name: the flow's name.
        replace: allow replacing a registered name.

    Returns:
        The decorator, which returns the builder unchanged.

    Raises:
        ValueError: ``name`` is registered already and ``replace`` is false.

    Example:
        >>> from pyroflows.torch.transforms import ElementwiseAffine
        >>> @register_flow("doc_affine", replace=True)
        ... def doc_affine(dim, num_layers=None, hidden_dims=None):
        ...     return ElementwiseAffine(dim)
        >>> type(build_flow("doc_affine", 2).parts[0]).__name__
        'ElementwiseAffine'
        >>> REGISTRY.unregister("doc_affine")  # leave the registry as it was
    """
    return REGISTRY.register(name, replace=replace)


def build_flow(
    name: str,
    dim: int,
    *,
    num_layers: int | None = None,
    hidden_dims: Sequence[int] | None = None,
    context_dim: int | None = None,
    **options: Any,
) -> Flow:
    """Build the flow ``name`` for vectors of size ``dim`` as a ``Flow`` (a ``ComposeTransformModule``).

    The ``Flow`` maps base noise to samples and implements
    ``pyroflows.protocols.TrainableFlow`` (``log_prob`` of ``N(0, I)`` pushed through it).

    Args:
        name: a registered flow name (``available_flows()``).
        dim: the event size.
        num_layers: the number of layers; the family's default when ``None``
            (``pyroflows.registry.SPECS``).
        hidden_dims: hidden widths of the family's networks; its default when ``None``.
        context_dim: the size of a context the flow is conditioned on; a
            ``ConditionalFlow`` (a Pyro ``ConditionalTransformModule``) when given.
        **options: the family's keyword options.

    Returns:
        A ``pyroflows.torch.transforms.Flow`` whose ``config`` records the name and arguments
        (a ``ConditionalFlow`` with ``context_dim``).

    Raises:
        ValueError: an unknown name or option, naming the valid ones.

    Example:
        >>> import pyro.distributions as dist
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(8,))
        >>> flow.config["name"], flow.dim
        ('realnvp', 2)
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> dist.TransformedDistribution(base, [flow]).sample((4,)).shape
        torch.Size([4, 2])
    """
    from .transforms.base import ConditionalFlow, Flow

    layers, config = REGISTRY.build(
        name, dim, num_layers=num_layers, hidden_dims=hidden_dims, context_dim=context_dim, **options
    )
    if isinstance(layers, Flow):
        layers.config = config
        return layers
    if isinstance(layers, TransformModule):
        layers = [layers]
    if config.get("context_dim"):
        return ConditionalFlow(layers, config["dim"], config["context_dim"], config)
    return Flow(layers, config["dim"], config)
