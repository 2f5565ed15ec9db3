"""Backend-neutral constants of residual flows: estimator names, probe noises, series lengths.

Plain data, imported by ``pyroflows.registry`` (whose ``residual`` options list these
names) and by both backends' residual blocks; this module imports nothing from the
package. The option checks of a residual block live with the other option checks, in
``pyroflows.registry.residual_block_options``.

Example:
    >>> from pyroflows.lipschitz import DEFAULT_NUM_TERMS, ESTIMATORS
    >>> ESTIMATORS
    ('roulette', 'truncated', 'exact')
    >>> DEFAULT_NUM_TERMS["truncated"]
    10
"""

from __future__ import annotations

__all__ = ["ESTIMATORS", "NOISES", "DEFAULT_NUM_TERMS"]

ESTIMATORS: tuple[str, ...] = ("roulette", "truncated", "exact")
"""Log-determinant estimators: ``"roulette"``, a Russian-roulette power series (unbiased);
``"truncated"``, an n-term series (biased); ``"exact"``, the dense log-determinant (small
dims)."""

NOISES: tuple[str, ...] = ("gaussian", "rademacher")
"""Distributions of the Hutchinson trace probe."""

DEFAULT_NUM_TERMS: dict[str, int] = {"roulette": 2, "truncated": 10, "exact": 0}
"""What ``num_terms=None`` means for each estimator: 2 terms always computed before the
roulette starts (Chen et al. 2019), a 10-term truncated series, none for ``"exact"``."""
