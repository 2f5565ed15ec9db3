"""JAX residual flows: what only JAX has. The key protocol (explicit keys, NumPyro's seed
handler, a clear error without either), a Lipschitz bound that holds after optax pushes
the raw weights past it, and no power-iteration state among the arrays that NumPyro
trains. The references run on both backends in tests/families/test_residual.py."""

import math

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.io import named_arrays  # noqa: E402
from pyroflows.jax.nn import LipschitzMLP  # noqa: E402
from pyroflows.jax.transforms import ResidualBlock  # noqa: E402
from pyroflows.jax.transforms.base import astype  # noqa: E402
from tests.jax.helpers import perturbed  # noqa: E402
from tests.residual_cases import strong_weights  # noqa: E402


def _exact(dim=3, seed=0):
    """A block with J_g close to 0.45 times a rotation (``tests.residual_cases.strong_weights``), exact mode."""
    block = astype(ResidualBlock(dim, (8, 8), lipschitz=0.85, estimator="exact", key=jax.random.key(seed)), jnp.float64)
    weights, biases = strong_weights(dim, seed)
    layers = lambda m: [m.g.net[i] for i in (0, 2, 4)]  # noqa: E731
    block = eqx.tree_at(lambda m: [l.weight for l in layers(m)], block, [jnp.asarray(w) for w in weights])
    return eqx.tree_at(lambda m: [l.bias for l in layers(m)], block, [jnp.asarray(b) for b in biases])


@eqx.filter_jit
def _map_jacobian(block, y, key):
    return jax.jacfwd(lambda v: block.inverse_and_ladj(v, key)[0])(y)


def test_keys_explicit_under_seed_and_missing():
    flow = perturbed(pf.build_flow("residual", 2, num_layers=1, hidden_dims=(8,), key=jax.random.key(0)), scale=0.3)
    data = jnp.asarray(np.random.default_rng(4).standard_normal((5, 2)))
    base = dist.Normal(jnp.zeros(2), 1.0).to_event(1)
    lp = lambda t: dist.TransformedDistribution(base, t).log_prob(data)  # noqa: E731
    a = lp(flow.to_transform(key=jax.random.key(5)))
    assert np.array_equal(a, lp(flow.to_transform(key=jax.random.key(5))))
    assert not np.array_equal(a, lp(flow.to_transform(key=jax.random.key(6))))
    with numpyro.handlers.seed(rng_seed=0):
        seeded = lp(flow.to_transform())
    assert np.all(np.isfinite(seeded))
    with pytest.raises(ValueError, match="seed.*key|key.*seed"):
        lp(flow.to_transform())
    block = flow.parts[0]
    with pytest.raises(ValueError, match="key"):
        block.inverse_and_ladj(data[0])
    # Only the log-det estimate draws noise: the maps alone need no key (issue 17).
    t, keyed = flow.to_transform(), flow.to_transform(key=jax.random.key(5))
    x, _ = keyed.inverse_and_ladj(data)
    np.testing.assert_array_equal(t.inv(data), x)
    np.testing.assert_allclose(t(x), data, atol=1e-9)
    np.testing.assert_array_equal(t(x), keyed(x))
    np.testing.assert_array_equal(block.inverse_map(data[0]), block.inverse_and_ladj(data[0], jax.random.key(1))[0])
    exact = pf.build_flow("residual", 2, num_layers=1, hidden_dims=(8,), estimator="exact")
    assert np.all(np.isfinite(lp(exact.to_transform())))  # exact mode needs no key


def test_lipschitz_bound_holds_after_training_pushes_it():
    dim, coeff = 3, 0.85
    rng = np.random.default_rng(7)
    block = _exact()  # small random weights in the shared structure, far below the bound
    block = eqx.tree_at(
        lambda m: [m.g.net[i].weight for i in (0, 2, 4)],
        block,
        [jnp.asarray(0.1 * rng.standard_normal(m.weight.shape)) for m in block.g.net[0::2]],
    )
    pts = jnp.asarray(rng.standard_normal((64, dim)))
    v = jnp.asarray(rng.standard_normal((64, dim)))
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    def stretch(params):  # minus the mean squared Jacobian-vector product: minimising it raises Lip(g)
        g = eqx.combine(params, static).g
        weights = g.weights()
        jv = jax.vmap(lambda p, u: LipschitzMLP.jvp(weights, g.forward_and_slopes(p, weights)[1], u))(pts, v)
        return -jnp.mean(jnp.sum(jv**2, -1))

    params, static = eqx.partition(block, eqx.is_inexact_array)
    opt = optax.adam(0.2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(stretch)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(40):
        params, state = step(params, state)
    block = eqx.combine(params, static)
    n = block.g.net[0].power_iterations
    for layer in block.g.net[0::2]:
        m = min(layer.weight.shape)
        assert np.linalg.norm(np.asarray(layer.weight), 2) > coeff  # pushed past the bound ...
        # ... and the normalised layer stays within it
        assert np.linalg.norm(np.asarray(layer.normalized_weight()), 2) <= coeff * (1 + (m - 1) / (2 * math.e * n))
    jacs = [np.asarray(_map_jacobian(block, p, None)) - np.eye(dim) for p in 2 * rng.standard_normal((30, dim))]
    lips = np.array([np.linalg.norm(j, 2) for j in jacs])
    assert lips.max() < coeff and lips.max() > 0.3


def test_no_power_iteration_state_among_the_trained_arrays():
    # every float array is a weight: no power-iteration state for eqx_module to train
    names = named_arrays(pf.build_flow("residual", 3))
    assert sorted({k.split(".", 1)[1] for k in names if k.startswith("0.")}) == [
        "g.net.0.bias",
        "g.net.0.weight",
        "g.net.1.beta",
        "g.net.2.bias",
        "g.net.2.weight",
        "g.net.3.beta",
        "g.net.4.bias",
        "g.net.4.weight",
    ]
    assert pf.build_flow("residual", 3).is_stochastic
    assert not pf.build_flow("residual", 3, estimator="exact").is_stochastic
