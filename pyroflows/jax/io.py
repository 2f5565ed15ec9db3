"""Save and load JAX flows in the backend-neutral format of ``pyroflows.checkpoint``.

A leaf's name is its path in the module tree written as a torch ``state_dict`` key:
``Flow.parts[2].conditioner.net[0].weight`` is ``2.conditioner.net.0.weight``.
"""

from __future__ import annotations

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint
from .flows import build_flow
from .standardize import Standardize, with_standardize

__all__ = ["save_flow", "load_flow", "named_arrays"]


def _key_name(path) -> str:
    parts = []
    for i, entry in enumerate(path):
        if isinstance(entry, jax.tree_util.GetAttrKey):
            if i == 0 and entry.name == "parts":
                continue  # torch's ComposeTransformModule is the list itself
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        else:
            parts.append(str(getattr(entry, "key", entry)))
    return ".".join(parts)


def named_arrays(flow) -> dict[str, jax.Array]:
    """Every array of ``flow`` by its torch-style name (what ``save_flow`` writes).

    Args:
        flow: a flow made by ``build_flow`` (any equinox module works).

    Returns:
        The arrays by name, in the order of the module tree's leaves.

    Example:
        >>> flow = build_flow("maf", 2, key=jax.random.key(0), num_layers=1, hidden_dims=(4,))
        >>> names = list(named_arrays(flow))
        >>> all(name.startswith("0.") for name in names)  # the first layer, as torch numbers it
        True
    """
    leaves = jax.tree_util.tree_flatten_with_path(flow, is_leaf=lambda x: x is None)[0]
    return {_key_name(path): leaf for path, leaf in leaves if eqx.is_array(leaf)}


def _replace_arrays(flow, arrays: dict):
    """``flow`` with each array whose torch-style name is a key of ``arrays`` replaced by its value."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(flow, is_leaf=lambda x: x is None)
    new = [arrays.get(_key_name(path), leaf) if eqx.is_array(leaf) else leaf for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, new)


def save_flow(flow, path: str | os.PathLike) -> None:
    """Write ``flow`` (from ``build_flow``) to ``path``: JAX mirror of ``pyroflows.torch.save_flow``.

    The same backend-neutral ``.npz`` file, with the arrays under their torch-style names
    (``named_arrays``), so either backend's ``load_flow`` reads it; the same arguments and errors.

    Example:
        >>> import os, tempfile
        >>> flow = build_flow("maf", 2, key=jax.random.key(0), num_layers=1, hidden_dims=(4,))
        >>> path = os.path.join(tempfile.mkdtemp(), "flow.npz")
        >>> save_flow(flow, path)
        >>> load_flow(path).config == flow.config
        True
    """
    if not getattr(flow, "config", None):
        raise ValueError("save_flow needs a flow made by build_flow (it records how to rebuild it)")
    arrays = {k: np.asarray(v) for k, v in named_arrays(flow).items()}
    checkpoint.write(path, dict(flow.config), arrays, backend="jax")


def load_flow(path: str | os.PathLike, dtype=None):
    """Rebuild the flow saved at ``path`` (by either backend): JAX mirror of ``pyroflows.torch.load_flow``.

    It returns the equinox flow and raises the errors the torch function does.

    Args:
        path: a file written by ``save_flow`` of either backend.
        dtype: the dtype of the floating weights; defaults to the saved one (float64
            needs ``jax_enable_x64``).

    Example:
        >>> import os, tempfile
        >>> flow = build_flow("maf", 2, key=jax.random.key(0), num_layers=1, hidden_dims=(4,))
        >>> path = os.path.join(tempfile.mkdtemp(), "flow.npz")
        >>> save_flow(flow, path)
        >>> loaded = load_flow(path)
        >>> all(bool((a == b).all()) for a, b in zip(named_arrays(flow).values(), named_arrays(loaded).values()))
        True
    """
    config, arrays, _ = checkpoint.read(path)
    name, dim, kwargs = checkpoint.rebuild_arguments(config)
    try:
        flow = build_flow(name, dim, key=jax.random.key(0), **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise checkpoint.build_error(path, config, "jax", e) from None
    if checkpoint.is_standardized(config):
        flow = with_standardize(flow, Standardize(np.zeros(dim), np.ones(dim)))
    current = named_arrays(flow)
    expected = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in current.items()}
    arrays = checkpoint.match_arrays(expected, arrays, path)
    cast = dtype is not None
    return _replace_arrays(
        flow,
        {
            k: jnp.asarray(a.astype(dtype) if cast and np.issubdtype(a.dtype, np.floating) else a)
            for k, a in arrays.items()
        },
    )
