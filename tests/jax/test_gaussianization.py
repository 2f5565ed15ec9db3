"""JAX Gaussianization against independent references: scipy's ndtri_exp, log_ndtr,
erfcx and logistic distribution, a direct float64 evaluation of Phi^-1(F(H y)), finite
differences of the numerical forward, and the option handling of the builder."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from scipy import special, stats  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.transforms import Gaussianization  # noqa: E402
from pyroflows.jax.io import named_arrays  # noqa: E402
from pyroflows.jax.transforms.base import astype  # noqa: E402
from pyroflows.jax.transforms.gaussianization import log_ndtr, ndtri_exp  # noqa: E402

LOG_P = -np.logspace(-12, 4, 1601)
# Jitted: eagerly, every jnp operation inside would be compiled on its own.
ndtri_exp_jit = jax.jit(ndtri_exp)


def perturb(module, seed, scale):
    params, static = eqx.partition(module, eqx.is_inexact_array)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape)), params)
    return eqx.combine(params, static)


def make_layer(dim, num_components=4, num_reflections=None, seed=0, scale=0.3):
    layer = Gaussianization(dim, num_components, num_reflections, key=jax.random.key(seed))
    return perturb(astype(layer, jnp.float64), seed, scale)


def reference_inverse(layer, y):
    """Phi^-1(F(H y)) and its log-det, written from the paper with scipy, one point at a time."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    dim = y.shape[-1]
    rotation = np.eye(dim)
    for v in np.asarray(layer.reflections):
        v = v / np.linalg.norm(v)
        rotation = (np.eye(dim) - 2 * np.outer(v, v)) @ rotation
    logits = np.asarray(layer.logits)
    log_w = logits - special.logsumexp(logits, axis=-1, keepdims=True)
    means = np.asarray(layer.means)
    bound = layer.log_scale_bound
    scales = np.exp(bound * np.tanh(np.asarray(layer.unconstrained_log_scales) / bound))
    z, ladj = np.empty_like(y), np.zeros(len(y))
    for n, point in enumerate(y):
        u = rotation @ point
        for i in range(dim):
            dist = stats.logistic(loc=means[i], scale=scales[i])
            log_cdf = special.logsumexp(log_w[i] + dist.logcdf(u[i]))
            log_sf = special.logsumexp(log_w[i] + dist.logsf(u[i]))
            log_pdf = special.logsumexp(log_w[i] + dist.logpdf(u[i]))
            z[n, i] = special.ndtri_exp(log_cdf) if log_cdf < log_sf else -special.ndtri_exp(log_sf)
            ladj[n] += log_pdf - stats.norm.logpdf(z[n, i])
    return z, ladj


def both_directions(layer, x):
    """Forward, then inverse of the result, batched, in one compiled call."""

    @jax.jit
    def run(layer, x):
        y, ladj = jax.vmap(layer.call_and_ladj)(x)
        x2, ildj = jax.vmap(layer.inverse_and_ladj)(y)
        return y, ladj, x2, ildj

    return [np.asarray(a) for a in run(layer, jnp.asarray(x))]


# --- ndtri_exp and log_ndtr ------------------------------------------------------------------
def test_ndtri_exp_matches_scipy_in_float64_including_the_deep_tail():
    z = np.asarray(ndtri_exp_jit(jnp.asarray(LOG_P)))
    np.testing.assert_allclose(z, special.ndtri_exp(LOG_P), rtol=1e-13, atol=1e-14)
    lower = LOG_P < math.log(0.5)
    np.testing.assert_allclose(special.log_ndtr(z[lower]), LOG_P[lower], rtol=2e-15, atol=0)
    np.testing.assert_allclose(special.log_ndtr(-z[~lower]), np.log(-np.expm1(LOG_P[~lower])), rtol=2e-15)
    # Far beyond: log_p down to -1e307 (z ~ -4e153). scipy's own ndtri_exp drifts by ~1e-12
    # there, so the reference is the round trip through scipy's log_ndtr.
    deep = -np.logspace(4, 307, 300)
    zd = np.asarray(ndtri_exp_jit(jnp.asarray(deep)))
    np.testing.assert_allclose(special.log_ndtr(zd), deep, rtol=1e-15)
    np.testing.assert_allclose(zd, special.ndtri_exp(deep), rtol=2e-12)


def test_ndtri_exp_special_values_and_float32():
    log_p = jnp.array([-1e-300, -1e-20, -0.1, math.log(0.5), 0.0, -math.inf])
    z = np.asarray(ndtri_exp_jit(log_p))
    np.testing.assert_allclose(z[:4], special.ndtri_exp(np.asarray(log_p[:4])), rtol=1e-13, atol=1e-15)
    assert z[0] > 37 and z[3] == 0.0 and z[4] == math.inf and z[5] == -math.inf
    z32 = ndtri_exp_jit(jnp.asarray(LOG_P, jnp.float32))
    assert z32.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(z32)))
    reference = special.ndtri_exp(LOG_P.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(np.asarray(z32, np.float64), reference, rtol=2e-6, atol=1e-6)


def test_log_ndtr_is_exact_in_both_tails():
    z = np.concatenate([-np.logspace(-3, 150, 2000), np.logspace(-3, 1.5, 500)])
    np.testing.assert_allclose(np.asarray(jax.jit(log_ndtr)(jnp.asarray(z))), special.log_ndtr(z), rtol=1e-14, atol=0)


def test_ndtri_exp_first_and_second_derivatives():
    """dz/dlog_p = Phi(z)/phi(z) = m and d2z/dlog_p2 = (1 + z m) m, with m from scipy's erfcx."""
    grads = jax.jit(jax.vmap(lambda lp: (ndtri_exp(lp), jax.grad(ndtri_exp)(lp), jax.grad(jax.grad(ndtri_exp))(lp))))
    log_p = jnp.asarray(np.concatenate([LOG_P[::40], -np.logspace(4, 300, 30), [-math.inf]]))
    z, first, second = (np.asarray(a) for a in grads(log_p))
    z, first, second = z[:-1], first[:-1], second[:-1]
    # Phi(z) / phi(z) = sqrt(pi / 2) erfcx(-z / sqrt 2): no cancellation in the reference either.
    mills = np.sqrt(np.pi / 2) * special.erfcx(-z / np.sqrt(2))
    np.testing.assert_allclose(first, mills, rtol=1e-12)
    # 1 + z m cancels in both tails (z m -> -1, and m blows up above), so compare moderately.
    moderate = np.abs(z) < 5
    np.testing.assert_allclose(second[moderate], ((1 + z * mills) * mills)[moderate], rtol=1e-9)
    assert np.all(np.isfinite(second)) and float(grads(jnp.array([-math.inf]))[1][0]) == 0.0


# --- the layer ------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,num_components,num_reflections", [(3, 5, 6)])
def test_inverse_matches_direct_scipy_evaluation_and_the_forward_inverts_it(dim, num_components, num_reflections):
    layer = make_layer(dim, num_components, num_reflections, seed=dim)
    x = np.random.default_rng(dim).standard_normal((6, dim)) * 2
    y, ladj, x2, ildj = both_directions(layer, x)
    np.testing.assert_allclose(x2, x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ildj, -ladj, rtol=1e-9, atol=1e-9)
    z_ref, ildj_ref = reference_inverse(layer, y)
    np.testing.assert_allclose(x2, z_ref, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ildj, ildj_ref, rtol=1e-11, atol=1e-11)


def test_far_tails_with_the_smallest_scales_in_float64_and_float32():
    layer = make_layer(2, 3, seed=3)
    layer = eqx.tree_at(lambda l: l.unconstrained_log_scales, layer, jnp.full((2, 3), -100.0))  # scale e^-5
    y = np.array([[30.0, -30.0], [-30.0, 30.0], [30.0, 30.0], [0.0, 1e-8]])

    @jax.jit
    def run(layer, y):
        z, ildj = jax.vmap(layer.inverse_and_ladj)(y)
        y2, ladj = jax.vmap(layer.call_and_ladj)(z)
        return z, ildj, y2, ladj, jax.vmap(layer.inverse_and_ladj)(y2)[0]

    z, ildj, y2, ladj, z2 = (np.asarray(a) for a in run(layer, jnp.asarray(y)))
    z_ref, ildj_ref = reference_inverse(layer, y)
    assert np.abs(z_ref).max() > 50  # log F ~ -1e3 or below
    np.testing.assert_allclose(z, z_ref, rtol=1e-12)
    np.testing.assert_allclose(ildj, ildj_ref, rtol=1e-11, atol=1e-9)
    np.testing.assert_allclose(y2[:3], y[:3], rtol=1e-9)
    # Near 0 the narrow components leave F flat (log f ~ -43 for one coordinate: dz/du ~
    # 1e-18), so rounding in z moves u a lot there; y2 is still mapped back to z.
    np.testing.assert_allclose(z2, z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj[:3], -ildj[:3], rtol=1e-9)
    out = run(astype(layer, jnp.float32), jnp.asarray(y, jnp.float32))
    assert all(a.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(a))) for a in out)


def test_numerical_forward_has_exact_gradients_under_jit_vmap_and_grad():
    """d/dtheta of a batch loss through the bisection (jit + vmap + grad) against central differences."""
    layer = make_layer(2, 3, seed=7, scale=0.5)
    x = jnp.array([[0.3, -1.2], [2.5, 0.7], [-4.0, 6.0]])
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def loss(p, x):
        y, ladj = jax.vmap(eqx.combine(p, static).call_and_ladj)(x)
        return jnp.sum(jnp.sin(y)) + jnp.sum(ladj)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    # A zero reflection vector is the identity, with finite (zero) gradients.
    degenerate = eqx.tree_at(lambda p: p.reflections, params, params.reflections.at[0].set(0.0))
    _, (g_degenerate, _) = value_and_grad(degenerate, x)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(g_degenerate))
    assert np.all(np.asarray(g_degenerate.reflections[0]) == 0.0)
    _, (g_params, g_x) = value_and_grad(params, x)
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    dx = jnp.asarray(rng.standard_normal(x.shape))
    h = 1e-5
    shift = lambda s: (jax.tree.map(lambda a, d: a + s * h * d, params, direction), x + s * h * dx)  # noqa: E731
    loss_jit = jax.jit(loss)
    numeric = (float(loss_jit(*shift(1))) - float(loss_jit(*shift(-1)))) / (2 * h)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(g_params), jax.tree.leaves(direction)))
    analytic += float(jnp.vdot(g_x, dx))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("options", [{}, {"num_components": 1}, {"num_components": 3, "num_reflections": 1}])
def test_builder_options_and_torch_names(options):
    torch_pf = pytest.importorskip("pyroflows.torch")
    flow = pf.build_flow("gaussianization", 3, num_layers=2, key=jax.random.key(1), **options)
    assert len(flow.parts) == 2 and all(isinstance(p, Gaussianization) for p in flow.parts)
    k = options.get("num_components", 8)
    r = options.get("num_reflections") or 3
    assert flow.parts[0].reflections.shape == (r, 3) and flow.parts[0].means.shape == (3, k)
    names = {n: tuple(a.shape) for n, a in named_arrays(flow).items()}
    torch_flow = torch_pf.build_flow("gaussianization", 3, num_layers=2, **options)
    assert names == {n: tuple(t.shape) for n, t in torch_flow.state_dict().items()}
    if options:
        return
    # A fresh layer's rotated marginals start close to the identity map (F ~ Phi).
    layer = flow.parts[0]
    u = jnp.linspace(-3, 3, 61)[:, None] * jnp.ones(3)
    y = jax.vmap(lambda v: layer._reflect(v, layer._unit_reflections(), reverse=True))(u)
    z, _ = jax.jit(jax.vmap(layer.inverse_and_ladj))(y)
    assert float(jnp.abs(z - u).max()) < 0.1


# --- large base values (issue 17) -------------------------------------------------------------
# Base values out to |z| = 1e3; a layer maps z to about s z^2 / 2, so the default four layers
# reach ~1e37. The log-det used to be log f(u) - log phi(z), two numbers near -z^2/2 that
# cancelled to garbage, then NaN, from |z| ~ 100.
BASE = np.array([-1e3, -300.0, -100.0, -25.0, -20.0, -8.0, 0.0, 8.0, 15.0, 19.0, 20.0, 25.0, 100.0, 300.0, 1e3])


def default_depth_flow(scale, seed=0):
    flow = astype(pf.build_flow("gaussianization", 2, key=jax.random.key(seed)), jnp.float64)
    return perturb(flow, seed, scale)


@eqx.filter_jit
def _round_trip(flow, z):
    t = flow.to_transform()
    y, ladj = t.call_with_intermediates(z)
    z2, ildj = t.inverse_and_ladj(y)
    return y, ladj, z2, ildj


# One float64 program (forward and inverse) serves the three tests; float32 and the
# Jacobians run the cheaper inverse only (the forward's log-det is minus the inverse's).
def test_large_base_values_stay_finite_and_invert():
    flow = default_depth_flow(0.2)
    z = np.stack([BASE, BASE[::-1]], -1)
    y, ladj, z2, ildj = (np.asarray(a) for a in _round_trip(flow, jnp.asarray(z)))
    for a in (y, ladj, z2, ildj):
        assert np.all(np.isfinite(a))
    assert np.abs(y).max() > 1e30  # the map really does reach far out
    np.testing.assert_allclose(z2, z, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ildj, -ladj, rtol=1e-9, atol=1e-9)


def test_large_base_value_log_dets_hold_in_float32():
    """The float32 inverse of the fresh flow against the same flow in float64."""
    flow64 = default_depth_flow(0.0)
    z = np.stack([BASE, BASE[::-1]], -1)
    y64, ladj64, _, _ = (np.asarray(a) for a in _round_trip(flow64, jnp.asarray(z)))
    assert np.abs(y64).max() < 1e38  # inside float32's range
    inverse = eqx.filter_jit(lambda flow, y: flow.to_transform().inverse_and_ladj(y))
    z32, ildj32 = (np.asarray(a) for a in inverse(astype(flow64, jnp.float32), jnp.asarray(y64, jnp.float32)))
    # The reflections mix coordinates of sizes 1e37 and 1e30: the smaller keeps a few digits.
    np.testing.assert_allclose(z32, z, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ildj32, -ladj64, rtol=1e-4, atol=1e-3)


def test_log_det_matches_autodiff_at_large_base_values():
    flow = default_depth_flow(0.2)
    z = np.stack([BASE, BASE[::-1]], -1)
    rows = [7, 8, 11]  # base points (8, 8), (15, -8), (25, -20)
    y = _round_trip(flow, jnp.asarray(z))[0][jnp.asarray(rows)]

    @eqx.filter_jit
    def jacobian_and_ladj(flow, y):
        fn = flow.inverse_and_ladj
        return jax.vmap(jax.jacfwd(lambda v: fn(v)[0]))(y), jax.vmap(fn)(y)[1]

    jac, ildj = jacobian_and_ladj(flow, y)
    sign, logdet = np.linalg.slogdet(np.asarray(jac))
    assert np.all(sign != 0)
    np.testing.assert_allclose(np.asarray(ildj), logdet, rtol=1e-8, atol=1e-8)
