"""JAX GDN: what only JAX has. The dense variant's Newton iteration under jit, where a bad
input gives NaN after a bounded number of steps instead of torch's exception, and its
float32 tolerance. The references run on both backends in tests/families/test_gdn.py."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pyroflows.jax.transforms import GDN  # noqa: E402
from pyroflows.jax.transforms.base import astype  # noqa: E402


def make_layer(dim, variant, seed=0, scale=0.5, max_exponent=0.4):
    layer = astype(GDN(dim, variant, max_exponent), jnp.float64)
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape)), params)
    return eqx.combine(params, static)


def test_dense_newton_converges_fast_and_stays_bounded_on_bad_input():
    layer = make_layer(4, "dense", seed=2, scale=1.5, max_exponent=0.49)
    y = np.random.default_rng(2).standard_normal((20, 4)) * np.array([1e-6, 1.0, 30.0, 1e6])
    steps = jax.jit(jax.vmap(layer.newton_steps))
    assert int(np.max(steps(jnp.asarray(y)))) <= 12
    # Under jit there is no exception: NaN in gives NaN out after at most max_newton_steps.
    bad = jnp.array([[jnp.nan, 1.0, 2.0, 3.0], [jnp.inf, 1.0, 2.0, 3.0]])
    assert np.all(np.asarray(steps(bad)) <= GDN.max_newton_steps)
    z = np.asarray(jax.jit(jax.vmap(layer.call_and_ladj))(bad)[0])
    assert np.all(np.isnan(z[0]))
    with pytest.raises(ValueError, match="dense"):
        make_layer(2, "diagonal").newton_steps(jnp.zeros(2))
    # Single precision: the Newton tolerance becomes 8 float32 epsilons.
    layer32 = astype(layer, jnp.float32)

    @jax.jit
    def round_trip(layer, y):
        z, ladj = jax.vmap(layer.call_and_ladj)(y)
        return z, ladj, *jax.vmap(layer.inverse_and_ladj)(z)

    z, ladj, y2, ildj = round_trip(layer32, jnp.asarray(y, jnp.float32))
    assert z.dtype == ladj.dtype == y2.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y2), y.astype(np.float32), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ladj), -np.asarray(ildj), atol=2e-3)
