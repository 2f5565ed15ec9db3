"""Gaussianization flows against independent references, on every backend: scipy's
ndtri_exp, log_ndtr, erfcx and logistic distribution, a direct float64 evaluation of
Phi^-1(F(H y)), autodiff Jacobians and central differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from tests.families.checks import check_gradients

LOG_P = -np.logspace(-12, 4, 1601)
NDTRI_EXP = "transforms.gaussianization.ndtri_exp"
# One layer structure (dim, components, reflections) serves every layer test: on JAX each
# structure is a compilation of each direction (seconds for the numerical forward). The
# scipy comparison runs several structures on torch.
DIM, K, R = 3, 5, 6


def make_layer(backend, dim, num_components=4, num_reflections=None, seed=0, perturb=0.3, dtype="float64"):
    return backend.make(
        "Gaussianization", dim, num_components, num_reflections, seed=seed, perturb=perturb, dtype=dtype
    )


def _rotation(p):
    """H_K ... H_1 from the raw reflection vectors."""
    dim = p["reflections"].shape[-1]
    rotation = np.eye(dim)
    for v in p["reflections"]:
        v = v / np.linalg.norm(v)
        rotation = (np.eye(dim) - 2 * np.outer(v, v)) @ rotation
    return rotation


def _mixture(layer, p):
    bound = layer.log_scale_bound
    scales = np.exp(bound * np.tanh(p["unconstrained_log_scales"] / bound))
    return p["logits"], p["means"], scales


def reference_inverse(layer, p, y):
    """Phi^-1(F(H y)) and its log-det, written directly from the paper with scipy in float64."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    dim = y.shape[-1]
    rotation = _rotation(p)
    logits, means, scales = _mixture(layer, p)
    log_w = logits - special.logsumexp(logits, axis=-1, keepdims=True)
    z = np.empty_like(y)
    ladj = np.zeros(len(y))
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


def plain_reference(layer, p, y):
    """The same map in probability space: norm.ppf of a sum of logistic CDFs (moderate inputs only)."""
    logits, means, scales = _mixture(layer, p)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    u = y @ _rotation(p).T
    cdf = (weights * stats.logistic.cdf(u[..., None], loc=means, scale=scales)).sum(-1)
    pdf = (weights * stats.logistic.pdf(u[..., None], loc=means, scale=scales)).sum(-1)
    z = stats.norm.ppf(cdf)
    return z, (np.log(pdf) - stats.norm.logpdf(z)).sum(-1)


# --- ndtri_exp ---------------------------------------------------------------------------
def test_ndtri_exp_matches_scipy_in_float64_including_the_deep_tail(backend):
    z = backend.fn(NDTRI_EXP, LOG_P)
    np.testing.assert_allclose(z, special.ndtri_exp(LOG_P), rtol=1e-13, atol=1e-14)
    # Where p = exp(log_p) is a normal float well away from 1, the plain ndtri(p) agrees.
    moderate = (LOG_P > -700) & (LOG_P < -0.1)
    np.testing.assert_allclose(z[moderate], special.ndtri(np.exp(LOG_P[moderate])), rtol=1e-12, atol=1e-14)
    # Round trip through scipy's log_ndtr, as tight as rounding z to float64 allows; above
    # p = 1/2 through the upper tail 1 - p, which is what z determines there.
    lower = LOG_P < math.log(0.5)
    np.testing.assert_allclose(special.log_ndtr(z[lower]), LOG_P[lower], rtol=2e-15, atol=0)
    np.testing.assert_allclose(special.log_ndtr(-z[~lower]), np.log(-np.expm1(LOG_P[~lower])), rtol=2e-15)
    # Far beyond: log_p down to -1e307 (z ~ -4e153). scipy's own ndtri_exp drifts by ~1e-12
    # there, so the reference is the round trip through scipy's log_ndtr.
    deep = -np.logspace(4, 307, 300)
    zd = backend.fn(NDTRI_EXP, deep)
    np.testing.assert_allclose(special.log_ndtr(zd), deep, rtol=1e-15)
    np.testing.assert_allclose(zd, special.ndtri_exp(deep), rtol=2e-12)


def test_ndtri_exp_special_values_and_float32(backend):
    log_p = np.array([-1e-300, -1e-100, -1e-20, -1e-5, -0.1, math.log(0.5), 0.0, -math.inf])
    z = backend.fn(NDTRI_EXP, log_p)
    np.testing.assert_allclose(z[:6], special.ndtri_exp(log_p[:6]), rtol=1e-13, atol=1e-15)
    assert z[0] > 37 and z[5] == 0.0
    assert z[6] == math.inf and z[7] == -math.inf
    z32 = backend.fn(NDTRI_EXP, LOG_P, dtype="float32")
    assert z32.dtype == np.float32 and np.all(np.isfinite(z32))
    reference = special.ndtri_exp(LOG_P.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(z32.astype(np.float64), reference, rtol=2e-6, atol=1e-6)


def test_ndtri_exp_first_and_second_derivatives(backend):
    """dz/dlog_p = Phi(z)/phi(z) = m and d2z/dlog_p2 = (1 + z m) m, with m from scipy's erfcx."""
    log_p = np.concatenate([LOG_P[::40], -np.logspace(4, 300, 30)])
    few, h = np.array([-3000.0, -50.0, -2.0, -0.5, -1e-3]), 1e-6
    # One array per call (on JAX each shape is a compilation): the points, -inf, and the few
    # points where central differences check the first derivative.
    first, second = backend.derivatives(NDTRI_EXP, np.concatenate([log_p, [-math.inf], few]), order=2)
    assert first[len(log_p)] == 0.0
    first_few = first[len(log_p) + 1 :]
    first, second = first[: len(log_p)], second[: len(log_p)]
    z, up, down = np.split(backend.fn(NDTRI_EXP, np.concatenate([log_p, few + h, few - h])), [len(log_p), -len(few)])
    # Phi(z) / phi(z) = sqrt(pi / 2) erfcx(-z / sqrt 2): no cancellation in the tail, where
    # exp(log Phi - log phi) is only good to about eps z^2.
    mills = np.sqrt(np.pi / 2) * special.erfcx(-z / np.sqrt(2))
    np.testing.assert_allclose(first, mills, rtol=1e-12)
    # 1 + z m cancels in both tails (z m -> -1, and m blows up above), so compare moderately.
    moderate = np.abs(z) < 5
    np.testing.assert_allclose(second[moderate], ((1 + z * mills) * mills)[moderate], rtol=1e-9)
    assert np.all(np.isfinite(second))
    np.testing.assert_allclose(first_few, (up - down) / (2 * h), rtol=1e-4)


# --- the layer against scipy ---------------------------------------------------------------
@pytest.mark.jax_keep(
    lambda dim, num_components, num_reflections: (dim, num_components, num_reflections) == (DIM, K, R)
)
@pytest.mark.parametrize(
    "dim,num_components,num_reflections", [(1, 1, None), (2, 3, 1), (3, 8, None), (DIM, K, R), (4, 5, 6)]
)
def test_inverse_matches_direct_scipy_evaluation_and_the_forward_inverts_it(
    backend, dim, num_components, num_reflections
):
    layer = make_layer(backend, dim, num_components, num_reflections, seed=dim)
    p = backend.params(layer)
    y = np.random.default_rng(dim).standard_normal((6, dim)) * 2
    z, ladj = backend.apply(layer, "inverse_and_ladj", y)
    z_ref, ladj_ref = reference_inverse(layer, p, y)
    np.testing.assert_allclose(z, z_ref, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ladj, ladj_ref, rtol=1e-11, atol=1e-11)
    # Moderate points: the textbook formula with probabilities, not logs, agrees too.
    z_plain, ladj_plain = plain_reference(layer, p, y)
    np.testing.assert_allclose(z, z_plain, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ladj, ladj_plain, rtol=1e-8, atol=1e-8)
    # The numerical forward maps the result back.
    y2, fladj = backend.apply(layer, "call_and_ladj", z)
    np.testing.assert_allclose(y2, y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fladj, -ladj, rtol=1e-9, atol=1e-9)


def test_far_tails_with_the_smallest_scales_in_float64_and_float32(backend):
    # Every array set here, so both backends run the same layer: one where the last point
    # lies where the map is nearly flat.
    layer = make_layer(backend, 2, 3, seed=1)
    layer = backend.with_arrays(
        layer,
        {
            "unconstrained_log_scales": np.full((2, 3), -100.0),  # scale e^-5
            "reflections": np.random.default_rng(1).standard_normal((2, 2)),
        },
    )
    y = np.array([[30.0, -30.0], [-30.0, 30.0], [30.0, 30.0], [0.0, 1e-8]])
    z, ildj = backend.apply(layer, "inverse_and_ladj", y)
    z_ref, ildj_ref = reference_inverse(layer, backend.params(layer), y)
    assert np.all(np.isfinite(z)) and np.abs(z_ref).max() > 50  # log F ~ -1e3 or below
    np.testing.assert_allclose(z, z_ref, rtol=1e-12)
    np.testing.assert_allclose(ildj, ildj_ref, rtol=1e-11, atol=1e-9)  # log f - log phi cancel at ~1e4
    # And the numerical forward gets back there.
    y2, ladj = backend.apply(layer, "call_and_ladj", z)
    np.testing.assert_allclose(y2[:3], y[:3], rtol=1e-9)
    np.testing.assert_allclose(ladj[:3], -ildj[:3], rtol=1e-9)
    # Between narrow components the map is nearly flat (dz/du ~ 1e-7 at the last point),
    # so rounding in z alone moves y by ~1e-9 there; y2 is still mapped back to z.
    np.testing.assert_allclose(y2, y, rtol=1e-9, atol=1e-7)
    z2, _ = backend.apply(layer, "inverse_and_ladj", y2)
    np.testing.assert_allclose(z2, z, rtol=1e-12, atol=1e-12)
    layer32 = backend.astype(layer, "float32")
    for method in ("call_and_ladj", "inverse_and_ladj"):
        out, ld = backend.apply(layer32, method, y.astype(np.float32))
        assert out.dtype == ld.dtype == np.float32
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(ld))


def test_each_coordinate_is_increasing_after_the_rotation(backend):
    dim = DIM
    layer = make_layer(backend, dim, K, R, seed=4, perturb=1.0)
    rotation = _rotation(backend.params(layer))
    grid = np.linspace(-40, 40, 2001)
    for i in range(dim):
        u = np.zeros((len(grid), dim))
        u[:, i] = grid
        z, _ = backend.apply(layer, "inverse_and_ladj", u @ rotation)  # y = H^T u: rotated coordinates u
        assert np.all(np.diff(z[:, i]) > 0)
        others = [j for j in range(dim) if j != i]
        # Other coordinates see u_j = 0 throughout.
        np.testing.assert_allclose(z[:, others], np.broadcast_to(z[:1, others], (len(grid), dim - 1)), atol=1e-12)


def test_log_det_matches_autodiff_in_both_directions(backend):
    layer = make_layer(backend, DIM, K, R, seed=5, perturb=0.5)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(DIM) * 3
        for method in ("call_and_ladj", "inverse_and_ladj"):
            logdet = np.linalg.slogdet(backend.layer_jacobian_of(layer, method, x))[1]
            np.testing.assert_allclose(backend.apply(layer, method, x)[1], logdet, rtol=1e-9, atol=1e-9)


# --- the numerical forward -----------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 2e-4)])
def test_round_trip_tolerance(backend, dtype, tol):
    layer = make_layer(backend, DIM, K, R, seed=6, perturb=0.5, dtype=dtype)
    x = (np.random.default_rng(6).standard_normal((200, DIM)) * np.array([0.1, 3.0, 8.0])).astype(dtype)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    assert float((np.abs(x2 - x) / (1 + np.abs(x))).max()) < tol
    assert float(np.abs(ladj + ildj).max()) < tol * 10
    # The data side is solved to inverse_tol: mapping y again reproduces it.
    if dtype == "float64":
        y2, _ = backend.apply(layer, "call_and_ladj", x2)
        assert float((np.abs(y2 - y) / (1 + np.abs(y))).max()) < 1e-9


@pytest.mark.parametrize("method", ["call_and_ladj", "inverse_and_ladj"])
def test_gradients_match_finite_differences(backend, method):
    """In every parameter and input, through the bisection of the numerical forward."""
    layer = make_layer(backend, DIM, K, R, seed=7, perturb=0.5)
    x = np.array([[0.3, -1.2, 1.0], [2.5, 0.7, -0.2], [-4.0, 6.0, 0.5]])
    check_gradients(backend, layer, method, x)
    # A zero reflection vector is the identity, with finite (zero) gradients.
    reflections = backend.params(layer)["reflections"].copy()
    reflections[0] = 0.0
    degenerate = backend.with_arrays(layer, {"reflections": reflections})
    _, grads, grad_x = backend.value_and_grads(degenerate, method, x, np.ones((3, DIM + 1)))
    assert all(np.all(np.isfinite(g)) for g in (*grads.values(), grad_x))
    assert np.all(grads["reflections"][0] == 0.0)


# --- construction, options, builder -------------------------------------------------------
def test_initial_marginal_map_is_close_to_the_identity(backend):
    layer = make_layer(backend, DIM, K, R, perturb=0.0)
    rotation = _rotation(backend.params(layer))
    u = np.linspace(-3, 3, 61)[:, None] * np.ones(DIM)
    z, _ = backend.apply(layer, "inverse_and_ladj", u @ rotation)
    assert float(np.abs(z - u).max()) < 0.1


def test_parameters_are_valid_for_any_values(backend):
    layer = make_layer(backend, DIM, K, R, seed=8, perturb=5.0)
    reflections = backend.params(layer)["reflections"].copy()
    reflections[0] = 0.0  # a degenerate reflection stays finite
    layer = backend.with_arrays(layer, {"reflections": reflections})
    x = np.random.default_rng(8).standard_normal((20, DIM)) * 5
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    x2, _ = backend.apply(layer, "inverse_and_ladj", y)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(ladj))
    assert float((np.abs(x2 - x) / (1 + np.abs(x))).max()) < 1e-8


BUILDER_OPTIONS = [{}, {"num_components": 1}, {"num_components": 3, "num_reflections": 1}, {"num_reflections": 5}]


@pytest.mark.parametrize("options", BUILDER_OPTIONS, ids=str)
def test_builder_options(backend, options):
    flow = backend.pf.build_flow("gaussianization", 3, num_layers=2, **options)
    assert len(flow.parts) == 2 and all(isinstance(p, backend.transforms().Gaussianization) for p in flow.parts)
    k, r = options.get("num_components", 8), options.get("num_reflections") or 3
    for part in flow.parts:
        assert part.num_components == k and part.num_reflections == r
    arrays = backend.params(flow)
    assert arrays["0.reflections"].shape == (r, 3) and arrays["0.means"].shape == (3, k)


# On JAX each option set is a compilation of the numerical forward of the whole flow; the
# layer tests above cover one to eight components and fewer or more reflections than dims.
@pytest.mark.jax_keep(lambda options: options == {"num_components": 3, "num_reflections": 1})
@pytest.mark.parametrize("options", BUILDER_OPTIONS, ids=str)
def test_builder_round_trip(backend, options):
    flow = backend.build_flow("gaussianization", 3, num_layers=2, **options)
    x = np.random.default_rng(9).standard_normal((5, 3))
    y, ladj = backend.forward(flow, x)
    x2, ildj = backend.inverse(flow, y)
    np.testing.assert_allclose(x2, x, atol=1e-8, rtol=1e-8)
    np.testing.assert_allclose(ildj, -ladj, atol=1e-8, rtol=1e-8)


def test_builder_rejects_bad_options(backend):
    with pytest.raises(ValueError, match="num_components"):
        backend.pf.build_flow("gaussianization", 2, num_components=0)
    with pytest.raises(ValueError, match="hidden_dims"):
        backend.pf.build_flow("gaussianization", 2, hidden_dims=[8])


# --- large base values (issue 17) -------------------------------------------------------------
# Base values out to |z| = 1e3; a layer maps z to about s z^2 / 2, so the default four layers
# reach ~1e37. The log-det used to be log f(u) - log phi(z), two numbers near -z^2/2 that
# cancelled to garbage, then NaN, from |z| ~ 20 (float32) and 100 (float64).
BASE = np.array([-1e3, -300.0, -100.0, -25.0, -20.0, -8.0, 0.0, 8.0, 15.0, 19.0, 20.0, 25.0, 100.0, 300.0, 1e3])
Z = np.stack([BASE, BASE[::-1]], -1)


def _flow(backend, perturb, seed=0, dtype="float64"):
    """The default depth (four layers) of build_flow, moved by ``perturb``."""
    return backend.build_flow("gaussianization", 2, seed=seed, perturb=perturb, dtype=dtype)


# float32: the reflections mix coordinates of sizes 1e37 and 1e30, so the smaller one keeps
# only a few digits; mapped back through the square-root-like inverse that is ~1e-4.
@pytest.mark.parametrize("dtype,perturb,tol", [("float64", 0.2, 1e-9), ("float32", 0.0, 1e-3)])
def test_large_base_values_stay_finite_and_invert(backend, dtype, perturb, tol):
    # In float32 the fresh flow of build_flow, as in the report.
    flow = _flow(backend, perturb, dtype=dtype)
    y, ladj = backend.forward(flow, Z.astype(dtype), dtype)
    z2, ildj = backend.inverse(flow, y.copy(), dtype)  # a new array: no cache hit
    for a in (y, ladj, z2, ildj):
        assert np.all(np.isfinite(a))
    assert np.abs(y).max() > 1e30  # the map really does reach far out
    assert float((np.abs(z2 - Z) / (1 + np.abs(Z))).max()) < tol
    assert float((np.abs(ladj + ildj) / (1 + np.abs(ladj))).max()) < tol


def test_large_base_value_log_dets_agree_across_dtypes(backend):
    """float32 against the same (fresh, default-depth) flow in float64: the hazard form keeps
    single precision."""
    flow64 = _flow(backend, 0.0)
    flow32 = backend.astype(flow64, "float32")
    y64, ladj64 = backend.forward(flow64, Z)
    assert np.abs(y64).max() < 1e38  # inside float32's range
    y32, ladj32 = backend.forward(flow32, Z.astype(np.float32), "float32")
    z32, ildj32 = backend.inverse(flow32, y64.astype(np.float32), "float32")  # float32 data near the float64 path
    np.testing.assert_allclose(y32, y64, rtol=1e-4)
    np.testing.assert_allclose(ladj32, ladj64, rtol=1e-4, atol=1e-3)
    # The reflections mix coordinates of sizes 1e37 and 1e30: the smaller keeps a few digits.
    np.testing.assert_allclose(z32, Z, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ildj32, -ladj64, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("value", [8.0, 15.0, 25.0])
def test_log_det_matches_autodiff_at_large_base_values(backend, value):
    flow = _flow(backend, 0.2, seed=1)
    z = np.array([value, -0.6 * value])
    y = backend.forward(flow, z[None])[0][0]
    for point, direction in ((z, "forward"), (y, "inverse")):
        jac, ladj = backend.jacobian(flow, point, direction)
        sign, logdet = np.linalg.slogdet(jac)
        assert sign != 0
        np.testing.assert_allclose(ladj, logdet, rtol=1e-8, atol=1e-8)
