"""The JAX side of the flow registry: ``available_flows``, ``build_flow``, ``register_flow``."""

from __future__ import annotations

import jax

from ..registry import FlowRegistry

__all__ = ["available_flows", "build_flow", "register_flow", "REGISTRY"]

REGISTRY = FlowRegistry("jax")


def available_flows() -> list[str]:
    """Every registered flow name, sorted."""
    return REGISTRY.names()


def register_flow(name: str, *, replace: bool = False):
    """Decorator adding ``builder(dim, num_layers=None, hidden_dims=None, *, key, **options)`` as ``name``.

    The builder returns a list of layers (``pyroflows.jax.transforms.FlowTransform``)
    or one layer; ``build_flow`` wraps them in a ``Flow``.
    """
    return REGISTRY.register(name, replace=replace)


def build_flow(name: str, dim: int, *, key=None, num_layers=None, hidden_dims=None, **options):
    """Build the flow ``name`` for vectors of size ``dim`` as an equinox ``Flow``.

    The same names, options and parametrisation as ``pyroflows.torch.build_flow``;
    ``key`` seeds the initial weights (default ``jax.random.key(0)``).
    ``flow.to_transform()`` gives a NumPyro ``Transform``.

    >>> flow = build_flow("realnvp", 2, key=jax.random.key(1))
    >>> y = flow.to_transform()(jnp.zeros(2))  # doctest: +SKIP
    """
    from .transforms.base import Flow, FlowTransform

    if key is None:
        key = jax.random.key(0)
    builder, config = REGISTRY.resolve(name, dim, num_layers, hidden_dims, options)
    layers = builder(**config, key=key)
    config = dict(config, name=name)
    if isinstance(layers, Flow):
        return Flow(layers.parts, config["dim"], config)
    if isinstance(layers, FlowTransform):
        layers = [layers]
    return Flow(layers, config["dim"], config)
