"""The torch side of the flow registry: ``available_flows``, ``build_flow``, ``register_flow``."""

from __future__ import annotations

from pyro.distributions.torch_transform import TransformModule

from ..registry import FlowRegistry

__all__ = ["available_flows", "build_flow", "register_flow", "REGISTRY"]

REGISTRY = FlowRegistry("torch")


def available_flows() -> list[str]:
    """Every registered flow name, sorted."""
    return REGISTRY.names()


def register_flow(name: str, *, replace: bool = False):
    """Decorator adding ``builder(dim, num_layers=None, hidden_dims=None, **options)`` as ``name``.

    The builder returns a list of ``TransformModule`` layers or one ``TransformModule``;
    ``build_flow(name, dim, ...)`` and ``AutoFlow(model, flow=name)`` then use it.
    """
    return REGISTRY.register(name, replace=replace)


def build_flow(name: str, dim: int, *, num_layers=None, hidden_dims=None, **options):
    """Build the flow ``name`` for vectors of size ``dim`` as a ``Flow`` (a ``ComposeTransformModule``).

    ``num_layers`` and ``hidden_dims`` default to the family's values
    (``pyroflows.registry.SPECS``); ``options`` are the family's keyword options.
    Unknown names and options raise ``ValueError`` naming the valid ones.

    >>> flow = build_flow("realnvp", 2)
    >>> dist = pyro.distributions.TransformedDistribution(base, [flow])  # doctest: +SKIP
    """
    from .transforms.base import Flow

    layers, config = REGISTRY.build(name, dim, num_layers=num_layers, hidden_dims=hidden_dims, **options)
    if isinstance(layers, Flow):
        layers.config = config
        return layers
    if isinstance(layers, TransformModule):
        layers = [layers]
    return Flow(layers, config["dim"], config)
