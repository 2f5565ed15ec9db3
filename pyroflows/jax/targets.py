"""Toy targets as jax arrays: the 2-D data sets and energies of ``pyroflows.toys``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .. import toys

__all__ = ["log_density", "dataset"]


def log_density(name: str) -> Callable[[jax.Array], jax.Array]:
    """The unnormalised log-density of a toy energy, as a jax function.

    Args:
        name: ``u1`` ... ``u4`` or ``double_well`` (``pyroflows.toys``).

    Returns:
        A function mapping ``(..., 2)`` arrays to ``(...)``.

    Raises:
        ValueError: an unknown name.

    Example:
        >>> import jax.numpy as jnp
        >>> log_density("u1")(jnp.zeros((3, 2))).shape
        (3,)
    """
    return toys.log_density(name, "jax")


def dataset(name: str, n: int, seed: int = 0, dtype: Any = None) -> jax.Array:
    """Points of a 2-D toy data set, as a jax array.

    Args:
        name: ``8gaussians`` or ``checkerboard`` (``pyroflows.toys``).
        n: how many points.
        seed: seeds numpy's generator.
        dtype: the array's dtype (default: JAX's default float).

    Returns:
        An array of shape ``(n, 2)``.

    Raises:
        ValueError: an unknown name.

    Example:
        >>> dataset("8gaussians", 5).shape
        (5, 2)
    """
    data = toys.sample_dataset(name, n, seed)
    return jnp.asarray(data, dtype=dtype)
