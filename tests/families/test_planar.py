"""Planar and radial flows against the paper's formulas, written out independently here,
on every backend (Rezende & Mohamed 2015, appendix A)."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from tests.families.checks import check_gradients

# Dims: 1 (the degenerate case), 2 and 5 (the general case). On JAX every dim is a
# compilation of each function, so JAX runs 1 and 5 (dim 2 adds no code path; as in the
# conformance suite), and the tests with one size use 5.
DIMS = [1, 2, 5]
JAX_DIMS = pytest.mark.jax_keep(lambda dim, **_: dim != 2)


def _points(shape, seed, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


def _dense_log_det(backend, module, x, method="call_and_ladj"):
    jac = backend.layer_jacobian_of(module, method, x)
    sign, logdet = np.linalg.slogdet(jac)
    assert sign != 0
    return logdet, jac


# --------------------------------------------------------------------------- planar
def _planar_reference(u, w, b, xs):
    """Rezende & Mohamed (2015), appendix A.1 and eq. (11)-(12), one point at a time in numpy."""
    u, w, b = np.asarray(u), np.asarray(w), float(b)
    wu = float(w @ u)
    m = -1.0 + math.log1p(math.exp(wu))
    u_hat = u + (m - wu) * w / float(w @ w)
    ys, ladjs = [], []
    for x in np.asarray(xs):
        pre = float(w @ x) + b
        ys.append(x + u_hat * math.tanh(pre))
        psi = (1.0 - math.tanh(pre) ** 2) * w
        ladjs.append(math.log(abs(1.0 + float(u_hat @ psi))))
    return np.array(ys), np.array(ladjs), u_hat


@JAX_DIMS
@pytest.mark.parametrize("dim", DIMS)
def test_planar_matches_paper_formula_and_inverts(backend, dim):
    layer = backend.make("Planar", dim, seed=dim, perturb=0.5)
    p = backend.params(layer)
    x = _points((6, dim), seed=dim, scale=2.0)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    ref_y, ref_ladj, ref_u_hat = _planar_reference(p["u"], p["w"], p["b"], x)
    np.testing.assert_allclose(backend.method(layer, "u_hat"), ref_u_hat, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj, ref_ladj, rtol=1e-10, atol=1e-12)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    np.testing.assert_allclose(x2, x, atol=1e-10 * (1 + np.abs(x).max()))
    np.testing.assert_allclose(ildj, -ladj, atol=1e-10)


@JAX_DIMS
@pytest.mark.parametrize("dim", DIMS)
def test_planar_log_det_is_the_dense_jacobian_log_det(backend, dim):
    layer = backend.make("Planar", dim, seed=10 + dim, perturb=0.5)
    for i in range(4):
        x = _points(dim, seed=i, scale=2.0)
        logdet, _ = _dense_log_det(backend, layer, x)
        assert backend.apply(layer, "call_and_ladj", x)[1] == pytest.approx(logdet, abs=1e-10)


def test_planar_invertibility_condition_holds_for_random_raw_parameters(backend):
    rng = np.random.default_rng(0)
    zs = np.linspace(-5, 5, 101)
    layer = backend.make("Planar", 5)
    for scale in (0.1, 1.0, 10.0, 100.0):
        for _ in range(50):
            w = scale * rng.standard_normal(5)
            u, b = scale * rng.standard_normal(5), rng.standard_normal(())
            layer = backend.with_arrays(layer, {"u": u, "w": w, "b": b})
            u_hat, one_plus_c = backend.method(layer, "constrained")
            wu_hat = float(w @ u_hat)
            assert wu_hat > -1.0
            # The cancellation-free 1 + w.u_hat agrees with the direct one where the latter is accurate.
            assert float(one_plus_c) == pytest.approx(1.0 + wu_hat, abs=1e-9 * (1 + abs(wu_hat)))
            slopes = 1.0 + wu_hat * (1.0 - np.tanh(zs) ** 2)
            assert np.all(slopes > 0)
            y, ladj = backend.apply(layer, "call_and_ladj", 30 * rng.standard_normal((5, 5)))
            assert np.all(np.isfinite(y)) and np.all(np.isfinite(ladj))


def test_planar_log_det_stays_accurate_near_the_singular_limit(backend):
    # w.u = -12: 1 + w.u_hat = softplus(-12) ~ 6e-6, where 1 + c loses half the digits.
    sp = math.log1p(math.exp(-12.0))
    layer = backend.with_arrays(backend.make("Planar", 5), {"u": [-12.0, 0, 0, 0, 0], "w": [1.0, 0, 0, 0, 0], "b": 0.0})
    _, one_plus_c = backend.method(layer, "constrained")
    assert float(one_plus_c) == pytest.approx(sp, rel=1e-12)
    x = np.array([[0.0, 0.3], [1e-3, 0.0], [2.0, 1.0], [-0.1, 0.0]]) @ np.eye(2, 5)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    # log(tanh^2 z + softplus(a) sech^2 z), evaluated here in closed form.
    z = x[:, 0]
    np.testing.assert_allclose(ladj, np.log(np.tanh(z) ** 2 + sp / np.cosh(z) ** 2), rtol=1e-10)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    np.testing.assert_allclose(x2, x, atol=1e-9)
    np.testing.assert_allclose(ildj, -ladj, rtol=1e-6)


def test_planar_softplus_floor_keeps_the_layer_invertible(backend):
    # w.u = -40: softplus underflows towards 0; the 1e-6 floor keeps 1 + w.u_hat >= 1e-6,
    # and the map and its log-det stay consistent (the autodiff Jacobian agrees).
    layer = backend.with_arrays(
        backend.make("Planar", 5), {"u": [-40.0, 0.5, 0.3, 0, -1], "w": [1.0, 0.0, 0, 0, 0], "b": 0.2}
    )
    _, one_plus_c = backend.method(layer, "constrained")
    assert float(one_plus_c) == pytest.approx(1e-6, rel=1e-9)
    for x in (np.array([-0.2, 0.1, 0.5, 0, 1]), np.array([1.0, -2.0, 0, 0.3, 0])):
        logdet, _ = _dense_log_det(backend, layer, x)
        assert backend.apply(layer, "call_and_ladj", x)[1] == pytest.approx(logdet, abs=1e-8)
    x = _points((10, 5), seed=1)
    x2, _ = backend.apply(layer, "inverse_and_ladj", backend.apply(layer, "call_and_ladj", x)[0])
    np.testing.assert_allclose(x2, x, atol=1e-8)


def test_planar_w_at_zero_is_the_identity_plus_a_shift_with_finite_gradients(backend):
    u = [0.5, -1.0, 2.0, 0.0, 0.3]
    layer = backend.with_arrays(backend.make("Planar", 5), {"u": u, "w": np.zeros(5), "b": 0.7})
    x = _points((4, 5), seed=2)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    np.testing.assert_allclose(y - x, np.tile(u, (4, 1)) * math.tanh(0.7))
    assert np.all(ladj == 0)
    x2, _ = backend.apply(layer, "inverse_and_ladj", y)
    np.testing.assert_allclose(x2, x, atol=1e-12)
    for method in ("call_and_ladj", "inverse_and_ladj"):
        _, grads, grad_x = backend.value_and_grads(layer, method, y, np.ones((4, 6)))
        assert all(np.all(np.isfinite(g)) for g in (*grads.values(), grad_x))


@JAX_DIMS
@pytest.mark.parametrize("dim", DIMS)
def test_planar_numerical_inverse_meets_its_tolerance(backend, dim):
    planar = backend.transforms().Planar
    assert planar.numerical_inverse and planar.inverse_tol == 1e-10
    layer = backend.make("Planar", dim, seed=20 + dim, perturb=1.0)
    x = np.concatenate([_points((50, dim), seed=dim, scale=3.0), np.full((1, dim), 30.0), np.full((1, dim), -30.0)])
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    # Bisection to 1e-10 relative, then a Newton step: far below the stated tolerance.
    assert np.abs(x2 - x).max() <= 1e-10 * (1 + np.abs(x).max())
    assert np.abs(ildj + ladj).max() <= 1e-10
    # Along w the inverse solves w.y = a + (w.u_hat) tanh(a + b): check the residual directly.
    p = backend.params(layer)
    a = x2 @ p["w"]
    c = float(p["w"] @ backend.method(layer, "u_hat"))
    resid = np.abs(a + c * np.tanh(a + p["b"]) - y @ p["w"]).max()
    assert resid <= 1e-12 * (1 + np.abs(y @ p["w"]).max())


def test_planar_float32_inverse(backend):
    layer = backend.make("Planar", 5, seed=3, perturb=0.5, dtype="float32")
    x = _points((20, 5), seed=3).astype(np.float32)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    assert x2.dtype == ildj.dtype == np.float32
    assert np.abs(x2 - x).max() < 1e-5
    assert np.abs(ildj + ladj).max() < 1e-5


def test_planar_inverse_has_exact_first_derivatives(backend):
    layer = backend.make("Planar", 5, seed=4, perturb=1.0)
    y = _points(5, seed=4)
    x = backend.apply(layer, "inverse_and_ladj", y)[0]
    jac_inv = backend.layer_jacobian_of(layer, "inverse_and_ladj", y)
    jac_fwd = backend.layer_jacobian_of(layer, "call_and_ladj", x)
    np.testing.assert_allclose(jac_inv @ jac_fwd, np.eye(5), atol=1e-9)
    # Gradients of the numerical inverse (and its log-det) in every parameter and input,
    # through the bisection (never differentiated) and the implicit step, against central
    # differences.
    check_gradients(backend, layer, "inverse_and_ladj", _points((4, 5), seed=5), tol=1e-6)


def test_fresh_planar_is_close_to_the_identity(backend):
    layer = backend.make("Planar", 5, seed=0)
    p = backend.params(layer)
    x = _points((100, 5), seed=6)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    # u_hat starts orthogonal to w: a small volume-preserving shear.
    assert abs(float(p["w"] @ backend.method(layer, "u_hat"))) < 1e-12
    assert np.abs(ladj).max() < 1e-12
    assert 0 < np.abs(y - x).max() < 0.5


# --------------------------------------------------------------------------- radial
def _radial_reference(x0, alpha, beta, xs):
    """Rezende & Mohamed (2015), appendix A.2 and eq. (14), one point at a time in numpy."""
    d = len(x0)
    ys, ladjs = [], []
    for x in np.asarray(xs):
        r = float(np.linalg.norm(x - x0))
        h = 1.0 / (alpha + r)
        dh = -1.0 / (alpha + r) ** 2
        ys.append(x + beta * h * (x - x0))
        det = (1 + beta * h) ** (d - 1) * (1 + beta * h + beta * dh * r)
        ladjs.append(math.log(abs(det)))
    return np.array(ys), np.array(ladjs)


def _radius(alpha, beta, r_y):
    """The radius r with r (1 + beta / (alpha + r)) = r_y, by a root finder."""
    upper = 2 * r_y * max(1.0, alpha / (alpha + beta))  # the radius map is >= r min(1, (alpha + beta) / alpha)
    return brentq(lambda r: r * (1 + beta / (alpha + r)) - r_y, 0.0, upper, xtol=1e-300, rtol=1e-15)


@JAX_DIMS
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("perturb", [0.5, 1.0])
def test_radial_matches_paper_formula_and_a_root_finder(backend, dim, perturb):
    layer = backend.make("Radial", dim, seed=dim, perturb=perturb)
    p = backend.params(layer)
    alpha, beta, _ = (float(t) for t in backend.method(layer, "constrained"))
    assert alpha == pytest.approx(math.log1p(math.exp(p["raw_alpha"])), rel=1e-14)
    assert beta == pytest.approx(-alpha + math.log1p(math.exp(p["raw_beta"])), rel=1e-12, abs=1e-14)
    # Radii from 1e-4 to 10.
    x = p["x0"] + _points((6, dim), seed=dim) * np.logspace(-4, 1, 6)[:, None]
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    ref_y, ref_ladj = _radial_reference(p["x0"], alpha, beta, x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj, ref_ladj, rtol=1e-10, atol=1e-12)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    for yi, xi in zip(y, x2):
        r = _radius(alpha, beta, np.linalg.norm(yi - p["x0"]))
        assert np.linalg.norm(xi - p["x0"]) == pytest.approx(r, rel=1e-10)
    np.testing.assert_allclose(x2, x, atol=1e-10)
    np.testing.assert_allclose(ildj, -ladj, atol=1e-10)


@JAX_DIMS
@pytest.mark.parametrize("dim", DIMS)
def test_radial_log_det_is_the_dense_jacobian_log_det(backend, dim):
    layer = backend.make("Radial", dim, seed=10 + dim, perturb=1.0)
    x0 = backend.params(layer)["x0"]
    for i in range(4):
        x = x0 + _points(dim, seed=i) * 10.0 ** (i - 2)
        logdet, _ = _dense_log_det(backend, layer, x)
        assert backend.apply(layer, "call_and_ladj", x)[1] == pytest.approx(logdet, abs=1e-10)


def test_radial_invertibility_condition_holds_for_random_raw_parameters(backend):
    rng = np.random.default_rng(1)
    rs = np.concatenate([np.zeros(1), np.logspace(-8, 4, 200)])
    layer = backend.make("Radial", 5)
    x0 = backend.params(layer)["x0"]
    for scale in (0.1, 1.0, 10.0, 50.0):
        for _ in range(50):
            layer = backend.with_arrays(
                layer, {"raw_alpha": scale * rng.standard_normal(()), "raw_beta": scale * rng.standard_normal(())}
            )
            alpha, beta, _ = (float(t) for t in backend.method(layer, "constrained"))
            assert alpha > 0 and beta >= -alpha
            # The radius map r -> r (1 + beta / (alpha + r)) is strictly increasing from 0.
            radius = rs * (1 + beta / (alpha + rs))
            assert radius[0] == 0 and np.all(np.diff(radius) > 0)
            x = x0 + 30 * rng.standard_normal((5, 5))
            y, ladj = backend.apply(layer, "call_and_ladj", x)
            x2, _ = backend.apply(layer, "inverse_and_ladj", y)
            assert np.all(np.isfinite(y)) and np.all(np.isfinite(ladj)) and np.all(np.isfinite(x2))


@pytest.mark.parametrize(
    "raw_alpha,raw_beta", [(0.0, 0.0), (0.0, 3.0), (2.0, -8.0), (-6.0, 5.0), (-3.0, -12.0), (5.0, 5.0)]
)
def test_radial_closed_form_inverse_matches_a_root_finder(backend, raw_alpha, raw_beta):
    assert not backend.transforms().Radial.numerical_inverse
    # x0 = 0 so that |x - x0| is measured without rounding at small radii.
    layer = backend.with_arrays(
        backend.make("Radial", 5), {"raw_alpha": raw_alpha, "raw_beta": raw_beta, "x0": np.zeros(5)}
    )
    alpha, beta, _ = (float(t) for t in backend.method(layer, "constrained"))
    y = _points((8, 5), seed=2) * np.logspace(-6, 2, 8)[:, None]
    x, ildj = backend.apply(layer, "inverse_and_ladj", y)
    for yi, xi in zip(y, x):
        assert np.linalg.norm(xi) == pytest.approx(_radius(alpha, beta, np.linalg.norm(yi)), rel=1e-12, abs=1e-300)
    y2, ladj = backend.apply(layer, "call_and_ladj", x)
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ildj, -ladj, rtol=1e-12, atol=1e-12)


def test_radial_inverse_and_gradients_at_the_centre(backend):
    layer = backend.make("Radial", 5, seed=5, perturb=0.5)
    alpha, beta, _ = (float(t) for t in backend.method(layer, "constrained"))
    x0 = backend.params(layer)["x0"]
    x, ildj = backend.apply(layer, "inverse_and_ladj", x0)
    np.testing.assert_array_equal(x, x0)
    # At the centre J = (1 + beta / alpha) I, so log|det dx/dy| = -5 log(1 + beta / alpha).
    assert float(ildj) == pytest.approx(-5 * math.log1p(beta / alpha), rel=1e-12)
    jac = backend.layer_jacobian_of(layer, "inverse_and_ladj", x0)
    assert np.all(np.isfinite(jac))
    np.testing.assert_allclose(jac, np.eye(5) * alpha / (alpha + beta), rtol=1e-12, atol=1e-15)
    # |x - x0| has no derivative at x0: the gradients in every parameter and in the point
    # exist and are finite there (a plain norm would give NaN), in both directions.
    for method in ("call_and_ladj", "inverse_and_ladj"):
        _, grads, grad_x = backend.value_and_grads(layer, method, x0[None], np.ones((1, 6)))
        assert all(np.all(np.isfinite(g)) for g in (*grads.values(), grad_x)), method
    # And just off the centre (at x0 = 0, so y - x0 is exact), down to tiny radii.
    centred = backend.with_arrays(layer, {"x0": np.zeros(5)})
    # XLA's CPU kernels flush subnormal numbers to zero, so on JAX the radii stay normal.
    tiny = (1e-310, 1e-300, 1e-150, 1e-12) if backend.name == "torch" else (1e-300, 1e-150, 1e-12)
    for eps in tiny:
        y = eps * np.array([1.0, -1.0, 0.5, 0.0, 0.25])
        x, _ = backend.apply(centred, "inverse_and_ladj", y)
        assert np.all(np.isfinite(x))
        np.testing.assert_allclose(x / eps, y / eps * alpha / (alpha + beta), rtol=1e-9)


def test_radial_gradients_match_finite_differences(backend):
    layer = backend.make("Radial", 5, seed=6, perturb=0.5)
    xs = backend.params(layer)["x0"] + _points((4, 5), seed=6)
    check_gradients(backend, layer, "call_and_ladj", xs)
    check_gradients(backend, layer, "inverse_and_ladj", backend.apply(layer, "call_and_ladj", xs)[0])


# --------------------------------------------------------------------------- builders
@pytest.mark.parametrize("name,cls", [("planar", "Planar"), ("radial", "Radial")])
def test_builders_stack_num_layers(backend, name, cls):
    cls = getattr(backend.transforms(), cls)
    for n in (1, 3):
        flow = backend.pf.build_flow(name, 4, num_layers=n, **backend.key_kwargs(n))
        assert len(flow.parts) == n and all(type(p) is cls for p in flow.parts)
    assert len(backend.pf.build_flow(name, 4).parts) == 8
    # The stacked flow at the conformance suite's size (which it compiles already on JAX).
    flow = backend.build(name, 5, seed=1)
    assert len(flow.parts) == 2
    x = _points((5, 5), seed=7)
    y, ladj = backend.forward(flow, x)
    x2, ildj = backend.inverse(flow, y)
    np.testing.assert_allclose(x2, x, atol=1e-9)
    np.testing.assert_allclose(ildj, -ladj, atol=1e-9)
    jac, ladj0 = backend.jacobian(flow, x[0])
    assert ladj0 == pytest.approx(np.linalg.slogdet(jac)[1], abs=1e-9)
    with pytest.raises(ValueError, match="no option"):
        backend.pf.build_flow(name, 4, variant="orthogonal")
    with pytest.raises(ValueError, match="hidden_dims"):
        backend.pf.build_flow(name, 4, hidden_dims=(8,))
