"""JAX Gaussianization: what only JAX has, its own log_ndtr (torch uses
torch.special.log_ndtr). ndtri_exp, the layer and the flow run on both backends in
tests/families/test_gaussianization.py."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from scipy import special  # noqa: E402

from pyroflows.jax.transforms.gaussianization import log_ndtr  # noqa: E402


def test_log_ndtr_is_exact_in_both_tails():
    z = np.concatenate([-np.logspace(-3, 150, 2000), np.logspace(-3, 1.5, 500)])
    np.testing.assert_allclose(np.asarray(jax.jit(log_ndtr)(jnp.asarray(z))), special.log_ndtr(z), rtol=1e-14, atol=0)
