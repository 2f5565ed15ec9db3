"""JAX planar and radial flows: what only JAX has. Per-example scores of a flow that runs
the numerical inverse, under jit(vmap(grad)); keys per layer. The paper's formulas and
every other reference run on both backends in tests/families/test_planar.py."""

import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from tests.jax.helpers import perturbed  # noqa: E402


def test_planar_flow_per_example_score_under_jit_vmap_grad():
    # The score d/dy log q(y) of a planar flow density, per example: jit(vmap(grad)) of a
    # log-density that runs the numerical inverse, against central differences.
    flow = perturbed(pf.build_flow("planar", 2, num_layers=3, key=jax.random.key(10)), seed=11)

    def log_q(y):
        x, ildj = flow.inverse_and_ladj(y)
        return -0.5 * jnp.sum(x**2) - math.log(2 * math.pi) + ildj

    ys = jnp.asarray(np.random.default_rng(12).standard_normal((5, 2)))
    scores = jax.jit(jax.vmap(jax.grad(log_q)))(ys)
    h = 1e-5
    # One batch holds y + h e_k and y - h e_k for k = 0, 1: lq[sign, k, example].
    shifted = jnp.concatenate([ys + sign * h * e for sign in (1.0, -1.0) for e in np.eye(2)])
    lq = jax.jit(jax.vmap(log_q))(shifted).reshape(2, 2, 5)
    np.testing.assert_allclose(scores.T, (lq[0] - lq[1]) / (2 * h), atol=1e-7)


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_each_layer_gets_its_own_key_and_the_same_key_gives_the_same_flow(name):
    flow = pf.build_flow(name, 4, num_layers=3, key=jax.random.key(22))
    first = flow.parts[0].x0 if name == "radial" else flow.parts[0].w
    second = flow.parts[1].x0 if name == "radial" else flow.parts[1].w
    assert not np.allclose(first, second)
    again = pf.build_flow(name, 4, num_layers=3, key=jax.random.key(22))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(flow), jax.tree.leaves(again)))
