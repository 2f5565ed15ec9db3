"""Toy targets as torch arrays: the 2-D data sets and energies of ``pyroflows.toys``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import toys

__all__ = ["log_density", "dataset"]


def log_density(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The unnormalised log-density of the 2-D energy ``name`` (``pyroflows.toys``).

    Args:
        name: ``u1`` ... ``u4`` or ``double_well``.

    Returns:
        A function mapping a tensor of shape ``(..., 2)`` to shape ``(...)``.

    Raises:
        ValueError: an unknown name.

    Example:
        >>> log_p = log_density("double_well")
        >>> log_p(torch.zeros(3, 2)).shape
        torch.Size([3])
    """
    return toys.log_density(name, "torch")


def dataset(name: str, n: int, seed: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``n`` points of the 2-D data set ``name`` (``pyroflows.toys``).

    Args:
        name: ``8gaussians`` or ``checkerboard``.
        n: the number of points.
        seed: seeds the draws.
        dtype: the tensor's dtype; the default dtype when ``None``.

    Returns:
        A tensor of shape ``(n, 2)``.

    Raises:
        ValueError: an unknown name.

    Example:
        >>> dataset("8gaussians", 5, dtype=torch.float64).shape
        torch.Size([5, 2])
    """
    data = toys.sample_dataset(name, n, seed)
    return torch.as_tensor(data, dtype=dtype or torch.get_default_dtype())
