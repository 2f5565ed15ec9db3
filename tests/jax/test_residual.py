"""JAX residual flows against independent references: numpy SVDs for the map, autodiff
Jacobians for the log-det and the implicit gradients, Monte Carlo standard errors for the
stochastic series, finite differences for the gradients; the key protocol (explicit
keys, NumPyro's seed handler, a clear error without either)."""

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
from jax.test_util import check_grads  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from tests.residual_cases import BAD_OPTIONS, numpy_residual, strong_weights  # noqa: E402
from pyroflows.jax.io import named_arrays  # noqa: E402
from pyroflows.jax.nn import LipschitzMLP, spectral_norm  # noqa: E402
from pyroflows.jax.transforms import ElementwiseAffine, ResidualBlock  # noqa: E402
from pyroflows.jax.transforms.base import astype  # noqa: E402


def _perturbed(block, scale=0.5, seed=0):
    rng = np.random.default_rng(seed)
    params, static = eqx.partition(astype(block, jnp.float64), eqx.is_inexact_array)
    params = jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape), params)
    return eqx.combine(params, static)


def _strong_block(dim=3, seed=0, **options):
    """A block with J_g close to 0.45 times a rotation (``tests.residual_cases.strong_weights``)."""
    block = astype(ResidualBlock(dim, (8, 8), lipschitz=0.85, key=jax.random.key(seed), **options), jnp.float64)
    weights, biases = strong_weights(dim, seed)
    layers = lambda m: [m.g.net[i] for i in (0, 2, 4)]  # noqa: E731
    block = eqx.tree_at(lambda m: [l.weight for l in layers(m)], block, [jnp.asarray(w) for w in weights])
    return eqx.tree_at(lambda m: [l.bias for l in layers(m)], block, [jnp.asarray(b) for b in biases])


def _with_options(block, **options):
    """``block``'s weights in a block built with other (static) options."""
    other = ResidualBlock(block.dim, (8, 8), lipschitz=0.85, key=jax.random.key(0), **options)
    return eqx.tree_at(lambda m: m.g, other, block.g)


@eqx.filter_jit
def _inverse(block, ys, keys):
    return jax.vmap(block.inverse_and_ladj)(ys, keys)


@eqx.filter_jit
def _forward(block, xs):
    return jax.vmap(block.call_and_ladj)(xs)


@eqx.filter_jit
def _map_jacobian(block, y, key):
    return jax.jacfwd(lambda v: block.inverse_and_ladj(v, key)[0])(y)


@eqx.filter_jit
def _forward_jacobian(block, x):
    return jax.jacfwd(lambda v: block.call_and_ladj(v)[0])(x)


def _exact(scale=0.0, seed=0, **options):
    """The strong block's structure in exact mode, perturbed by ``scale``: every test that
    uses it shares one set of compilations."""
    block = _with_options(_strong_block(3), estimator="exact", **options)
    return _perturbed(block, scale, seed) if scale else block


def _reference_series(jac_g, terms=None):
    if terms is None:
        return float(np.linalg.slogdet(np.eye(len(jac_g)) + jac_g)[1])
    return sum((-1) ** (k + 1) * np.trace(np.linalg.matrix_power(jac_g, k)) / k for k in range(1, terms + 1))


# --------------------------------------------------------------------------- the map
def test_inverse_is_y_plus_g_with_svd_normalised_weights():
    dim = 3
    block = _exact(scale=2.0, seed=1)
    ys = np.random.default_rng(2).standard_normal((7, dim))
    x, _ = _inverse(block, jnp.asarray(ys), jax.random.split(jax.random.key(0), 7))
    linear, acts = block.g.net[0::2], block.g.net[1::2]
    for layer in linear:
        assert np.linalg.norm(np.asarray(layer.weight), 2) > layer.coeff  # normalisation acts
    ref = numpy_residual(ys, [l.weight for l in linear], [l.bias for l in linear], [a.beta for a in acts], linear[0].coeff)
    np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-10, atol=1e-12)


def test_spectral_norm_matches_lapack():
    rng = np.random.default_rng(0)
    norm = jax.jit(spectral_norm, static_argnums=1)
    for shape in [(2, 16), (40, 40)]:
        for _ in range(3):
            w = rng.standard_normal(shape)
            np.testing.assert_allclose(float(norm(jnp.asarray(w), 4096)), np.linalg.norm(w, 2), rtol=1e-12)
    zero = jnp.zeros((4, 3))
    assert float(norm(zero, 4096)) == 0.0
    assert np.array_equal(np.asarray(jax.grad(spectral_norm)(zero, 4096)), np.zeros((4, 3)))


# --------------------------------------------------------------------------- exact log-det
def test_exact_log_det_is_the_autodiff_jacobian_log_det_in_both_directions():
    key = jax.random.key(0)
    ys = jnp.asarray(np.random.default_rng(3).standard_normal((3, 3)))
    for block in (_exact(), _exact(0.5, 0), _exact(0.5, 1)):  # one structure: one compilation each
        _, ildj = _inverse(block, ys, jax.random.split(key, 3))
        _, ladj = _forward(block, ys)
        for i in range(3):
            jac = np.asarray(_map_jacobian(block, ys[i], key))
            np.testing.assert_allclose(float(ildj[i]), np.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-12)
            fwd = np.asarray(_forward_jacobian(block, ys[i]))
            np.testing.assert_allclose(float(ladj[i]), np.linalg.slogdet(fwd)[1], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- stochastic series
@pytest.mark.parametrize(
    "estimator,dim,noise",
    [("roulette", 1, "rademacher"), ("roulette", 3, "gaussian"), ("truncated", 1, "rademacher")],
)
def test_series_estimates_are_unbiased(estimator, dim, noise):
    """Mean of 4000 draws within 4 standard errors (see the torch test for the cases)."""
    num_terms = None if estimator == "roulette" else 3
    block = _strong_block(dim, estimator=estimator, noise=noise, num_terms=num_terms)
    y = jnp.asarray([0.3, -0.5, 0.8][:dim])
    jac_g = np.asarray(_map_jacobian(_with_options(block, estimator="exact"), y, None)) - np.eye(dim)
    assert np.linalg.norm(jac_g, 2) > 0.4
    exact = _reference_series(jac_g)
    ref = exact if estimator == "roulette" else _reference_series(jac_g, 3)
    n = 4000
    _, est = _inverse(block, jnp.broadcast_to(y, (n, dim)), jax.random.split(jax.random.key(1), n))
    est = np.asarray(est)
    if estimator == "truncated" and dim == 1:
        np.testing.assert_allclose(est, ref, rtol=1e-12)  # a Rademacher probe is exact in 1-D
        assert abs(ref - exact) > 1e-3
        return
    se = est.std() / math.sqrt(n)
    assert est.var() > 0
    assert abs(est.mean() - ref) < 4 * se, (est.mean(), ref, se)


def _exact_log_det_gradients(block, y, h=1e-5):
    """Central differences of LAPACK's log det of the autodiff Jacobian, in ``y`` and in the
    output layer's weight: an independent reference for the estimators' gradients."""
    block = _with_options(block, estimator="exact")

    def logdet(b, v):
        return np.linalg.slogdet(np.asarray(_map_jacobian(b, v, None)))[1]

    gy = np.array([(logdet(block, y + h * e) - logdet(block, y - h * e)) / (2 * h) for e in jnp.eye(len(y))])
    w = np.asarray(block.g.net[4].weight)
    gw = np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        step = np.zeros_like(w)
        step[idx] = h
        shifted = [eqx.tree_at(lambda m: m.g.net[4].weight, block, jnp.asarray(w + sgn * step)) for sgn in (1, -1)]
        gw[idx] = (logdet(shifted[0], y) - logdet(shifted[1], y)) / (2 * h)
    return gy, gw


@pytest.mark.parametrize("neumann_gradient", [True, False])
def test_series_gradients_are_unbiased(neumann_gradient):
    """Per-draw gradients in the input and the output layer's weight: their means match
    the exact log-det's gradients within 4 standard errors."""
    block = _strong_block(3, neumann_gradient=neumann_gradient, noise="rademacher")
    y = jnp.asarray([0.3, -0.5, 0.8])
    ref_y, ref_w = _exact_log_det_gradients(block, y)

    def estimate(w, v, key):
        return eqx.tree_at(lambda m: m.g.net[4].weight, block, w).inverse_and_ladj(v, key)[1]

    n = 4000
    per_draw = jax.jit(jax.vmap(jax.grad(estimate, argnums=(0, 1)), in_axes=(None, 0, 0)))
    gw, gy = per_draw(block.g.net[4].weight, jnp.broadcast_to(y, (n, 3)), jax.random.split(jax.random.key(3), n))
    for g, ref in ((np.asarray(gy), ref_y), (np.asarray(gw), ref_w)):
        se = g.std(0) / math.sqrt(n)
        assert np.all(np.abs(g.mean(0) - ref) < 4 * se + 1e-8), (g.mean(0), ref, se)
    assert np.asarray(gy).var(0).min() > 0


def test_keys_explicit_under_seed_and_missing():
    flow = _perturbed(pf.build_flow("residual", 2, num_layers=1, hidden_dims=(8,), key=jax.random.key(0)), scale=0.3)
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


# --------------------------------------------------------------------------- the inverse
def test_forward_solves_the_residual_equation_and_has_implicit_gradients():
    block = _exact()
    x = jnp.concatenate([jnp.asarray(np.random.default_rng(5).standard_normal((6, 3))), jnp.asarray([[30.0, -30.0, 8.0]])])
    keys = jax.random.split(jax.random.key(0), len(x))
    y, ladj = _forward(block, x)
    x_back, ildj = _inverse(block, y, keys)
    assert np.all(np.abs(x_back - x) <= block.inverse_tol * (1 + np.abs(y)))
    np.testing.assert_allclose(ladj, -ildj, atol=1e-12)
    dy_dx = _forward_jacobian(block, x[0])
    np.testing.assert_allclose(dy_dx, np.linalg.inv(_map_jacobian(block, y[0], keys[0])), atol=1e-10)
    # a cap on the iterations still returns finite values, and the Newton step refines them
    y3, _ = _forward(_exact(max_inverse_iter=3), x)
    assert np.all(np.isfinite(y3)) and np.abs(_inverse(block, y3, keys)[0] - x).max() < 1e-2


def test_exact_gradients_match_finite_differences():
    """Both directions in one function, so one compilation covers them."""
    block = _perturbed(ResidualBlock(2, (4, 4), estimator="exact", key=jax.random.key(2)), scale=1.0, seed=3)
    params, static = eqx.partition(block, eqx.is_inexact_array)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 2)))

    def f(params, x):
        b = eqx.combine(params, static)
        out, ildj = jax.vmap(b.inverse_and_ladj)(x)
        back, ladj = jax.vmap(b.call_and_ladj)(x)
        return jnp.sum(jnp.sin(out)) + jnp.sum(ildj) + jnp.sum(jnp.cos(back)) + 0.5 * jnp.sum(ladj)

    check_grads(jax.jit(f), (params, x), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- the Lipschitz bound
def test_lipschitz_bound_holds_after_training_pushes_it():
    dim, coeff = 3, 0.85
    rng = np.random.default_rng(7)
    block = _exact()  # small random weights in the shared structure, far below the bound
    block = eqx.tree_at(
        lambda m: [m.g.net[i].weight for i in (0, 2, 4)], block,
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


# --------------------------------------------------------------------------- options and builder
def test_build_flow_defaults_structure_and_bad_options():
    flow = pf.build_flow("residual", 3)
    blocks = flow.parts[0::2]
    assert len(blocks) == 8 and all(isinstance(b, ResidualBlock) for b in blocks)
    assert all(isinstance(a, ElementwiseAffine) for a in flow.parts[1::2])
    b = blocks[0]
    assert (b.estimator, b.num_terms, b.noise, b.neumann_gradient, b.is_stochastic) == ("roulette", 2, "gaussian", True, True)
    assert flow.is_stochastic
    assert pf.build_flow("residual", 3, estimator="truncated").parts[0].num_terms == 10
    assert not pf.build_flow("residual", 3, estimator="exact").is_stochastic
    # every float array is a weight: no power-iteration state for eqx_module to train
    names = named_arrays(flow)
    assert sorted({k.split(".", 1)[1] for k in names if k.startswith("0.")}) == [
        "g.net.0.bias", "g.net.0.weight", "g.net.1.beta", "g.net.2.bias", "g.net.2.weight", "g.net.3.beta",
        "g.net.4.bias", "g.net.4.weight",
    ]
    for options, message in BAD_OPTIONS:
        with pytest.raises(ValueError, match=message):
            pf.build_flow("residual", 2, **options)
        with pytest.raises(ValueError, match=message):
            ResidualBlock(2, (4,), key=jax.random.key(0), **options)
