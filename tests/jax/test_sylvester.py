"""JAX Sylvester flows: what only JAX has. Its own matrix exponential, a traced program
whose size does not depend on dim, and boolean constants that NumPyro never trains. The
paper's formulas and every other reference run on both backends in
tests/families/test_sylvester.py."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.transforms import Sylvester  # noqa: E402


def test_matrix_exponential_matches_scipy():
    from pyroflows.jax.transforms.sylvester import expm

    rng = np.random.default_rng(6)
    for scale in (0.0, 0.3, 3.0, 30.0):
        a = np.triu(scale * rng.standard_normal((5, 5)), 1)
        a = a - a.T
        e = np.asarray(jax.jit(expm)(jnp.asarray(a)))
        np.testing.assert_allclose(e, scipy.linalg.expm(a), atol=1e-12)
        np.testing.assert_allclose(e.T @ e, np.eye(5), atol=1e-12)
    # Its derivative is the Frechet derivative of exp.
    direction = rng.standard_normal((5, 5))
    tangent = jax.jit(lambda a, e: jax.jvp(expm, (a,), (e,))[1])(jnp.asarray(a), jnp.asarray(direction))
    np.testing.assert_allclose(tangent, scipy.linalg.expm_frechet(a, direction)[1], atol=1e-10)


@pytest.mark.parametrize("variant", ["orthogonal", "householder", "triangular"])
def test_traced_program_does_not_grow_with_dim(variant):
    # The coordinate solve and the reflections are lax loops: the traced inverse (and
    # forward) has the same number of top-level operations for dim 3 and dim 40.
    def size(dim, direction):
        layer = Sylvester(dim, variant, key=jax.random.key(0))
        fn = layer.inverse_and_ladj if direction == "inverse" else layer.call_and_ladj
        return len(jax.make_jaxpr(fn)(jnp.zeros(dim)).jaxpr.eqns)

    for direction in ("forward", "inverse"):
        assert size(3, direction) == size(40, direction)


def test_constants_are_boolean_so_numpyro_never_trains_them():
    flow = pf.build_flow("sylvester", 4, num_layers=3, variant="triangular", key=jax.random.key(17))
    np.testing.assert_array_equal(flow.parts[1].q_fixed, np.eye(4, dtype=bool)[:, ::-1])
    for p in flow.parts:
        # Constants are boolean, so NumPyro's eqx_module never registers them as parameters.
        assert p.upper_mask.dtype == jnp.bool_ and p.q_fixed.dtype == jnp.bool_
        assert p.skew is None and p.vectors is None and p.num_vectors == 4
    layer = pf.build_flow("sylvester", 4, key=jax.random.key(18)).parts[0]
    assert layer.skew_mask.dtype == jnp.bool_ and layer.vectors is None and layer.q_fixed is None
