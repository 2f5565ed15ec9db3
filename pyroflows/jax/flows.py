"""The JAX side of the flow registry: ``available_flows``, ``build_flow``, ``register_flow``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from ..registry import FlowRegistry

__all__ = ["available_flows", "build_flow", "register_flow", "REGISTRY"]

REGISTRY = FlowRegistry("jax")


def available_flows() -> list[str]:
    """Every registered flow name, sorted.

    Returns:
        The names ``build_flow`` accepts.

    Example:
        >>> "realnvp" in available_flows()
        True
    """
    return REGISTRY.names()


def register_flow(name: str, *, replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator adding ``builder(dim, num_layers=None, hidden_dims=None, *, key, **options)`` as ``name``.

    JAX mirror of ``pyroflows.torch.register_flow`` (the same arguments and errors): the
    builder returns a list of layers (``pyroflows.jax.transforms.FlowTransform``) or one
    layer, and ``build_flow`` wraps them in a ``Flow``.

    Example:
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> @register_flow("example_affine", replace=True)
        ... def example_affine(dim, num_layers, hidden_dims, *, key):
        ...     return ElementwiseAffine(dim)
        >>> build_flow("example_affine", 2).parts[0].dim
        2
        >>> REGISTRY.unregister("example_affine")  # leave the registry as it was
    """
    return REGISTRY.register(name, replace=replace)


def build_flow(
    name: str,
    dim: int,
    *,
    key: jax.Array | None = None,
    num_layers: int | None = None,
    hidden_dims: Any = None,
    context_dim: int | None = None,
    **options: Any,
) -> Any:
    """Build the flow ``name`` for vectors of size ``dim`` as an equinox ``Flow``.

    The same names, options and parametrisation as ``pyroflows.torch.build_flow``;
    ``flow.to_transform()`` gives a NumPyro ``Transform``.

    Args:
        name: a registered flow name (``available_flows()``).
        dim: the event size.
        key: seeds the initial weights (default ``jax.random.key(0)``).
        num_layers: layers of the flow (default: the family's).
        hidden_dims: hidden sizes of its networks (default: the family's).
        context_dim: the size of a context; a ``ConditionalFlow`` when given.
        **options: the family's options (``pyroflows.registry.describe(name)``).

    Returns:
        A ``pyroflows.jax.transforms.Flow`` whose ``config`` records the arguments.

    Raises:
        ValueError: an unknown name or a bad option.

    Example:
        >>> import jax.numpy as jnp
        >>> flow = build_flow("householder", 2, key=jax.random.key(1))
        >>> flow.to_transform()(jnp.zeros(2)).shape
        (2,)
    """
    from .transforms.base import ConditionalFlow, Flow, FlowTransform

    if key is None:
        key = jax.random.key(0)
    builder, config = REGISTRY.resolve(name, dim, num_layers, hidden_dims, dict(options, context_dim=context_dim))
    layers = builder(**config, key=key)
    config = dict(config, name=name)
    if isinstance(layers, Flow):
        return Flow(layers.parts, config["dim"], config)
    if isinstance(layers, FlowTransform):
        layers = [layers]
    if config.get("context_dim"):
        return ConditionalFlow(layers, config["dim"], config["context_dim"], config)
    return Flow(layers, config["dim"], config)
