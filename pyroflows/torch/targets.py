"""Toy targets as torch arrays: the 2-D data sets and energies of ``pyroflows.toys``."""

from __future__ import annotations

import torch

from .. import toys

__all__ = ["log_density", "dataset"]


def log_density(name: str):
    """The unnormalised log-density of energy ``name`` (``u1`` ... ``u4``, ``double_well``) on ``(..., 2)``."""
    return toys.log_density(name, "torch")


def dataset(name: str, n: int, seed: int = 0, dtype=None):
    """``n`` points of ``8gaussians`` or ``checkerboard``, shape ``(n, 2)``."""
    data = toys.sample_dataset(name, n, seed)
    return torch.as_tensor(data, dtype=dtype or torch.get_default_dtype())
