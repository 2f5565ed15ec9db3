"""FFJORD (CNF) on JAX only: where the Hutchinson noise comes from (an explicit key,
NumPyro's seed handler, or a clear error), and that the maps alone need none. Everything
else runs on both backends in tests/families/test_ffjord.py, and tests/parity compares
the diffrax paths with torchdiffeq."""

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import pytest  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.transforms import CNF  # noqa: E402
from tests.jax.helpers import perturbed  # noqa: E402

OPTIONS = (
    "activation",
    "estimator",
    "noise",
    "solver",
    "num_steps",
    "atol",
    "rtol",
    "adjoint",
    "time_length",
    "kinetic_energy",
    "jacobian_norm",
)


def _with(layer, **options):
    """A layer with the same weights under other options (the same kind of network)."""
    net = layer.net
    hidden = [l.weight.shape[-2] for l in (net.layers if hasattr(net, "w_in") else net.layers[:-1])]
    options = {**{n: getattr(layer, n) for n in OPTIONS}, **options}
    return eqx.tree_at(lambda m: m.net, CNF(layer.dim, hidden, **options, key=jax.random.key(0)), net)


def _points(n, dim, seed=1, scale=1.5):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal((n, dim)))


def test_noise_keys_come_from_the_caller_or_numpyro_and_exact_modes_need_none():
    flow = perturbed(pf.build_flow("ffjord", 2, hidden_dims=(8,), key=jax.random.key(0)), 0.5)
    x = _points(64, 2, seed=10)
    with pytest.raises(ValueError, match="key"):
        flow.parts[0].call_and_ladj(x[0])
    with pytest.raises(ValueError, match="numpyro.handlers.seed"):
        flow.to_transform().call_with_intermediates(x)
    y1, a = flow.to_transform(key=jax.random.key(1)).call_with_intermediates(x)
    _, b = flow.to_transform(key=jax.random.key(1)).call_with_intermediates(x)
    np.testing.assert_array_equal(a, b)
    with numpyro.handlers.seed(rng_seed=0):
        y2, c = flow.to_transform().call_with_intermediates(x)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(y2, y1, atol=1e-12)  # the noise moves the log-det, never the map
    # So the maps alone need no key (issue 17): the ODE for x without the divergence.
    t = flow.to_transform()
    np.testing.assert_allclose(t(x), y1, atol=1e-12)
    back = flow.to_transform(key=jax.random.key(1)).inverse_and_ladj(y1)[0]
    np.testing.assert_allclose(t.inv(y1), back, atol=1e-12)
    np.testing.assert_allclose(back, x, atol=1e-5)  # rk4's error on these dynamics
    np.testing.assert_allclose(flow.forward_map(x[0]), y1[0], atol=1e-12)
    exact = eqx.tree_at(lambda f: f.parts, flow, tuple(_with(p, estimator="exact") for p in flow.parts))
    assert not exact.is_stochastic
    exact.to_transform()(x)
