"""Residual flows against independent references, on every backend: numpy and LAPACK for
the map and the spectral norms, autodiff Jacobians for the log-det and the implicit
gradients, Monte Carlo standard errors for the stochastic series, central differences
for the gradients.

On JAX each block structure (dim, estimator, noise, terms) is a compilation of each
function, so most tests share one: the strong block below at dim 3 in exact mode."""

import math

import numpy as np
import pytest

from tests.families.checks import check_gradients
from tests.residual_cases import BAD_OPTIONS, numpy_residual, strong_weights

HIDDEN, LIPSCHITZ = (8, 8), 0.85


def _block(backend, dim, seed=0, scale=0.5, **options):
    """A block of the shared structure with its weights moved by ``scale`` * N(0, 1)."""
    block = backend.make("ResidualBlock", dim, HIDDEN, lipschitz=LIPSCHITZ, **options)
    return backend.perturbed(block, scale, seed)


def _strong_block(backend, dim=3, seed=0, **options):
    """A block with J_g close to 0.45 times a rotation (``tests.residual_cases.strong_weights``)."""
    block = backend.make("ResidualBlock", dim, HIDDEN, lipschitz=LIPSCHITZ, **options)
    weights, biases = strong_weights(dim, seed)
    values = {f"g.net.{i}.weight": w for i, w in zip((0, 2, 4), weights)}
    values.update({f"g.net.{i}.bias": b for i, b in zip((0, 2, 4), biases)})
    return backend.with_arrays(block, values)


def _exact_twin(backend, block, **options):
    """``block``'s weights in a block of the same size in exact mode."""
    return backend.with_arrays(
        backend.make("ResidualBlock", block.dim, HIDDEN, lipschitz=LIPSCHITZ, estimator="exact", **options),
        backend.params(block),
    )


def _jacobian(backend, block, y):
    """The autodiff Jacobian of the data-to-noise map at ``y``."""
    return backend.layer_jacobian_of(block, "inverse_and_ladj", y)


def _reference_series(jac_g, terms=None):
    """``log det(I + J)`` by LAPACK, or its first ``terms`` power-series terms."""
    if terms is None:
        return float(np.linalg.slogdet(np.eye(len(jac_g)) + jac_g)[1])
    return sum((-1) ** (k + 1) * np.trace(np.linalg.matrix_power(jac_g, k)) / k for k in range(1, terms + 1))


# --------------------------------------------------------------------------- the map
@pytest.mark.jax_keep(lambda dim: dim == 3)
@pytest.mark.parametrize("dim", [1, 3])
def test_inverse_is_y_plus_g_with_svd_normalised_weights(backend, dim):
    block = _block(backend, dim, scale=2.0, seed=dim, estimator="exact")
    p = backend.params(block)
    ys = np.random.default_rng(dim).standard_normal((7, dim))
    x, _ = backend.apply(block, "inverse_and_ladj", ys)
    coeff = block.g.net[0].coeff
    ref = numpy_residual(
        ys,
        [p[f"g.net.{i}.weight"] for i in (0, 2, 4)],
        [p[f"g.net.{i}.bias"] for i in (0, 2, 4)],
        [p[f"g.net.{i}.beta"] for i in (1, 3)],
        coeff,
    )
    np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12)
    # scale 2 perturbations make every raw weight exceed the bound, so normalisation acted
    for i in (0, 2, 4):
        assert np.linalg.norm(p[f"g.net.{i}.weight"], 2) > coeff


def test_spectral_norm_matches_lapack(backend):
    def spectral_norm(w, n):
        return float(backend.fn("nn.spectral_norm", w, static=(n,)))

    rng = np.random.default_rng(0)
    for shape in [(16, 16), (16, 2), (2, 16), (1, 5), (5, 1), (40, 40)]:
        for _ in range(5):
            w = rng.standard_normal(shape)
            np.testing.assert_allclose(spectral_norm(w, 4096), np.linalg.norm(w, 2), rtol=1e-12)
    # a flat top spectrum, the slowest case: the documented bound (m - 1) / (2 e N) holds
    m, n = 40, 4096
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((m, m)))
    s = 1.0 - 1e-3 * rng.random(m)
    s[0] = 1.0
    shortfall = 1.0 - spectral_norm(u @ np.diag(s) @ v.T, n)
    assert 0 <= shortfall <= (m - 1) / (2 * math.e * n)
    # the zero matrix (an output layer at init): norm 0 and a zero, not NaN, gradient
    zero = np.zeros((4, 3))
    assert spectral_norm(zero, 4096) == 0.0
    np.testing.assert_array_equal(backend.grad_fn("nn.spectral_norm", zero, static=(4096,)), np.zeros((4, 3)))


# --------------------------------------------------------------------------- exact log-det
@pytest.mark.jax_keep(lambda dim: dim == 3)
@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_exact_log_det_is_the_autodiff_jacobian_log_det_in_both_directions(backend, dim):
    ys = np.random.default_rng(dim).standard_normal((4, dim))
    blocks = [_block(backend, dim, seed=10 + dim, scale=s, estimator="exact") for s in (0.5, 1.0)]
    for block in (*blocks, _strong_block(backend, dim, estimator="exact")):
        _, ildj = backend.apply(block, "inverse_and_ladj", ys)
        _, ladj = backend.apply(block, "call_and_ladj", ys)  # the forward from the same points
        for i in range(4):
            jac = _jacobian(backend, block, ys[i])
            np.testing.assert_allclose(ildj[i], np.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-12)
            fwd = backend.layer_jacobian_of(block, "call_and_ladj", ys[i])
            np.testing.assert_allclose(ladj[i], np.linalg.slogdet(fwd)[1], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- stochastic series
SERIES = [
    ("roulette", 1, "rademacher"),
    ("roulette", 3, "rademacher"),
    ("roulette", 3, "gaussian"),
    ("truncated", 1, "rademacher"),
    ("truncated", 3, "rademacher"),
    ("truncated", 3, "gaussian"),
]


# JAX: a roulette in one dimension (only its own randomness) and in three with Gaussian
# probes, and the exact truncated series in one dimension (each case a compilation).
@pytest.mark.jax_keep(
    lambda estimator, dim, noise: (
        (estimator, dim, noise)
        in (("roulette", 1, "rademacher"), ("roulette", 3, "gaussian"), ("truncated", 1, "rademacher"))
    )
)
@pytest.mark.parametrize("estimator,dim,noise", SERIES)
def test_series_estimates_are_unbiased(backend, estimator, dim, noise):
    """Mean of 4000 draws within 4 standard errors of the reference; in one dimension a
    Rademacher probe is exact, so only the roulette's randomness is left (the sharpest test)."""
    # truncated: 3 terms, so that its bias (against the exact log-det) is visible here
    block = _strong_block(
        backend, dim, estimator=estimator, noise=noise, num_terms=None if estimator == "roulette" else 3
    )
    y = np.array([0.3, -0.5, 0.8])[:dim]
    jac_g = _jacobian(backend, _exact_twin(backend, block), y) - np.eye(dim)
    assert np.linalg.norm(jac_g, 2) > 0.4  # terms past the second matter
    exact = _reference_series(jac_g)
    ref = exact if estimator == "roulette" else _reference_series(jac_g, 3)
    n = 4000
    _, est = backend.apply(block, "inverse_and_ladj", np.broadcast_to(y, (n, dim)), seed=1)
    if estimator == "truncated" and dim == 1 and noise == "rademacher":
        # nothing random is left: every draw is the 3-term series, which misses the tail
        np.testing.assert_allclose(est, ref, rtol=1e-12)
        assert abs(ref - exact) > 1e-3
        return
    se = est.std(ddof=1) / math.sqrt(n)
    assert est.var() > 0
    assert abs(est.mean() - ref) < 4 * se, (est.mean(), ref, se)


def _log_det_gradients_by_finite_differences(backend, block, y, names, h=1e-5):
    """Central differences of LAPACK's log det of the autodiff Jacobian, in ``y`` and in the
    weights ``names``: an independent reference for the exact mode's gradients."""

    def logdet(b, v):
        return np.linalg.slogdet(_jacobian(backend, b, v))[1]

    gy = np.array([(logdet(block, y + h * e) - logdet(block, y - h * e)) / (2 * h) for e in np.eye(len(y))])
    params = backend.params(block)
    gw = {}
    for name in names:
        w = params[name]
        gw[name] = np.zeros_like(w)
        for idx in np.ndindex(*w.shape):
            step = np.zeros_like(w)
            step[idx] = h
            up, down = (backend.with_arrays(block, {name: w + sgn * step}) for sgn in (1, -1))
            gw[name][idx] = (logdet(up, y) - logdet(down, y)) / (2 * h)
    return gy, gw


@pytest.mark.parametrize("neumann_gradient", [True, False])
def test_series_gradients_are_unbiased(backend, neumann_gradient):
    """Gradients in the input and in two layers' weights: the exact mode's match central
    differences of LAPACK's log-det, and the estimator's means over draws match the exact
    mode's within 4 standard errors."""
    block = _strong_block(backend, 3, neumann_gradient=neumann_gradient, noise="rademacher")
    exact = _exact_twin(backend, block)
    y = np.array([0.3, -0.5, 0.8])
    names = ["g.net.2.weight", "g.net.4.weight"]
    only_log_det = np.array([[0.0, 0.0, 0.0, 1.0]])
    _, grads, grad_y = backend.value_and_grads(exact, "inverse_and_ladj", y[None], only_log_det)
    fd_y, fd_w = _log_det_gradients_by_finite_differences(backend, exact, y, names)
    np.testing.assert_allclose(grad_y[0], fd_y, atol=1e-7)
    for name in names:
        np.testing.assert_allclose(grads[name], fd_w[name], atol=1e-7)
    groups, per_group = 10, 400
    gy, gw = [], {name: [] for name in names}
    for group in range(groups):  # batch means give the weights' gradients a standard error
        _, g, g_rows = backend.value_and_grads(
            block,
            "inverse_and_ladj",
            np.broadcast_to(y, (per_group, 3)),
            np.broadcast_to(only_log_det, (per_group, 4)),
            seed=2 + group,
        )
        gy.append(g_rows)
        for name in names:
            gw[name].append(g[name] / per_group)
    gy = np.concatenate(gy)
    se_y = gy.std(0, ddof=1) / math.sqrt(len(gy))
    assert np.all(np.abs(gy.mean(0) - grad_y[0]) < 4 * se_y), (gy.mean(0), grad_y[0], se_y)
    for name in names:
        g = np.stack(gw[name])
        se_w = g.std(0, ddof=1) / math.sqrt(groups)
        # 4 SE per entry, with a floor for entries whose estimates are (near) constant
        assert np.all(np.abs(g.mean(0) - grads[name]) < 4 * se_w + 1e-10), name
    assert gy.var(0).min() > 0


# --------------------------------------------------------------------------- the inverse
def test_forward_solves_the_residual_equation_with_implicit_gradients(backend):
    block = _strong_block(backend, 3, estimator="exact")
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal((20, 3)), [[30.0, -30.0, 8.0], [-30.0, 30.0, 0.0]]])
    y, ladj = backend.apply(block, "call_and_ladj", x)
    x_back, ildj = backend.apply(block, "inverse_and_ladj", y)
    assert np.all(np.abs(x_back - x) <= block.inverse_tol * (1 + np.abs(y)))
    np.testing.assert_allclose(ladj, -ildj, atol=1e-12)
    # The forward's derivative is the inverse of the data-to-noise map's (implicit function theorem).
    dy_dx = backend.layer_jacobian_of(block, "call_and_ladj", x[0])
    np.testing.assert_allclose(dy_dx, np.linalg.inv(_jacobian(backend, block, y[0])), atol=1e-10)
    # a cap on the iterations still returns finite values, and the Newton step refines them
    capped = _strong_block(backend, 3, estimator="exact", max_inverse_iter=3)
    y3, _ = backend.apply(capped, "call_and_ladj", x)
    assert np.all(np.isfinite(y3))
    assert np.abs(backend.apply(block, "inverse_and_ladj", y3)[0] - x).max() < 1e-2


@pytest.mark.parametrize("method", ["inverse_and_ladj", "call_and_ladj"])
def test_exact_gradients_match_finite_differences(backend, method):
    """In every parameter and input; for the forward through the fixed-point solve."""
    block = _block(backend, 3, seed=3, scale=1.0, estimator="exact")
    x = np.random.default_rng(6).standard_normal((3, 3))
    check_gradients(backend, block, method, x, h=1e-6, tol=1e-6)


# --------------------------------------------------------------------------- options and builder
def test_build_flow_defaults_and_structure(backend):
    flow = backend.pf.build_flow("residual", 3)
    t = backend.transforms()
    blocks = flow.parts[0::2]
    assert len(blocks) == 8 and all(isinstance(b, t.ResidualBlock) for b in blocks)
    assert all(isinstance(a, t.ElementwiseAffine) for a in flow.parts[1::2])
    b = blocks[0]
    got = (b.estimator, b.num_terms, b.noise, b.neumann_gradient, b.is_stochastic)
    assert got == ("roulette", 2, "gaussian", True, True)
    assert backend.pf.build_flow("residual", 3, estimator="truncated").parts[0].num_terms == 10
    assert not backend.pf.build_flow("residual", 3, estimator="exact").parts[0].is_stochastic
    # a fresh flow is the identity (zero output layers), whatever noise the estimator draws
    x = np.random.default_rng(7).standard_normal((5, 3))
    y, ladj = backend.apply(backend.build_flow("residual", 3), "inverse_and_ladj", x, seed=8)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(ladj, np.zeros(5))


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_bad_options_raise_value_errors_that_name_them(backend, options, message):
    with pytest.raises(ValueError, match=message):
        backend.pf.build_flow("residual", 2, **options)
    with pytest.raises(ValueError, match=message):
        backend.make("ResidualBlock", 2, (4,), **options)
