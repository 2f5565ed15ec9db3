"""GDN against independent references, on every backend: a loop-based numpy evaluation of
the formula, finite-difference and autodiff Jacobians, central differences through the
numerical forward, and the invertibility conditions."""

from __future__ import annotations

import numpy as np
import pytest

from tests.families.checks import check_gradients

VARIANTS = ["diagonal", "dense"]
# On JAX every (variant, dim, max_exponent) is a compilation of each function (both are
# static), so the JAX runs keep to dim 3 and the default exponent bound where they can.
JAX_DIM = 3


def make_layer(backend, dim, variant, seed=0, perturb=0.5, max_exponent=0.4, scale=None, dtype="float64"):
    """A GDN layer moved by ``perturb`` * N(0, 1), or with every raw parameter ``scale`` * N(0, 1)."""
    layer = backend.make("GDN", dim, variant, max_exponent, dtype=dtype)
    rng = np.random.default_rng(seed)
    params = backend.params(layer)
    if scale is None:
        values = {k: v + perturb * rng.standard_normal(v.shape) for k, v in params.items()}
    else:
        values = {k: scale * rng.standard_normal(v.shape) for k, v in params.items()}
    return backend.with_arrays(layer, values)


def numpy_params(layer, p):
    """beta, the full gamma matrix and eps from the raw parameters, in numpy."""
    beta = layer.beta_min + np.logaddexp(0.0, p["unconstrained_beta"])
    gamma = np.logaddexp(0.0, p["unconstrained_gamma"])
    if layer.variant == "diagonal":
        gamma = np.diag(gamma)
    eps = layer.max_exponent / (1.0 + np.exp(-p["unconstrained_exponent"]))
    return beta, gamma, eps


def reference_normalise(layer, p, z):
    """y_i = z_i / (beta_i + sum_j gamma_ij z_j^2)^eps_i, one point and one coordinate at a time."""
    beta, gamma, eps = numpy_params(layer, p)
    z = np.atleast_2d(z)
    y = np.empty_like(z)
    for n in range(z.shape[0]):
        for i in range(z.shape[1]):
            denominator = beta[i]
            for j in range(z.shape[1]):
                denominator += gamma[i, j] * z[n, j] ** 2
            y[n, i] = z[n, i] / denominator ** eps[i]
    return y


def finite_difference_log_det(layer, p, point, h=1e-6):
    dim = len(point)
    jac = np.empty((dim, dim))
    for k in range(dim):
        step = np.zeros(dim)
        step[k] = h * (1 + abs(point[k]))
        up, down = reference_normalise(layer, p, point + step)[0], reference_normalise(layer, p, point - step)[0]
        jac[:, k] = (up - down) / (2 * step[k])
    return np.linalg.slogdet(jac)


@pytest.mark.jax_keep(lambda variant, dim: dim == JAX_DIM)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_both_directions_against_the_loop_reference_and_autodiff(backend, variant, dim):
    layer = make_layer(backend, dim, variant, seed=dim, perturb=1.0 if dim == 3 else 0.5)
    p = backend.params(layer)
    rng = np.random.default_rng(dim)
    z = np.concatenate(
        [
            rng.standard_normal((5, dim)) * 3,
            30.0 * np.sign(rng.standard_normal((1, dim))),
            1e-8 * np.ones((1, dim)),
            np.zeros((1, dim)),
        ]
    )
    # The data side is the closed form: it must be the formula.
    y, ildj = backend.apply(layer, "inverse_and_ladj", z)
    np.testing.assert_allclose(y, reference_normalise(layer, p, z), rtol=1e-13, atol=1e-14)
    for n in range(5):
        sign, logdet = finite_difference_log_det(layer, p, z[n])
        assert sign > 0
        np.testing.assert_allclose(ildj[n], logdet, rtol=1e-7, atol=1e-7)
    # The numerical forward inverts it, and both log-dets are the autodiff ones.
    z2, ladj = backend.apply(layer, "call_and_ladj", y)
    np.testing.assert_allclose(z2, z, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ladj, -ildj, rtol=1e-10, atol=1e-10)
    jacs_inv = backend.layer_jacobians(layer, "inverse_and_ladj", z)
    jacs_fwd = backend.layer_jacobians(layer, "call_and_ladj", y)
    for n, (jac_inv, jac_fwd) in enumerate(zip(jacs_inv, jacs_fwd)):
        sign, logdet = np.linalg.slogdet(jac_fwd)
        assert sign > 0  # det J > 0 for any parameters
        np.testing.assert_allclose(ladj[n], logdet, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ildj[n], np.linalg.slogdet(jac_inv)[1], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(jac_fwd @ jac_inv, np.eye(dim), atol=1e-9)


def test_dense_with_vanishing_off_diagonal_equals_diagonal(backend):
    dim = JAX_DIM
    diagonal = make_layer(backend, dim, "diagonal", seed=3)
    p = backend.params(diagonal)
    raw = np.full((dim, dim), -800.0)  # softplus underflows to exactly 0
    np.fill_diagonal(raw, p["unconstrained_gamma"])
    dense = backend.with_arrays(
        backend.make("GDN", dim, "dense"),
        {
            "unconstrained_beta": p["unconstrained_beta"],
            "unconstrained_exponent": p["unconstrained_exponent"],
            "unconstrained_gamma": raw,
        },
    )
    x = np.random.default_rng(3).standard_normal((7, dim)) * 4
    for method in ("call_and_ladj", "inverse_and_ladj"):
        for a, b in zip(backend.apply(dense, method, x), backend.apply(diagonal, method, x)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# max_exponent is static on JAX (a compilation per value), so the random bounds run on torch
# and JAX runs the largest allowed bound, 0.49, where invertibility is hardest.
EXPONENTS = [pytest.param("random", id="random-bound"), pytest.param(0.49, id="bound-0.49")]


@pytest.mark.jax_keep(lambda exponent, dim: exponent == 0.49 and dim == JAX_DIM)
@pytest.mark.parametrize("exponent", EXPONENTS)
@pytest.mark.parametrize("dim", [2, 3, 4, 5])
def test_dense_jacobian_has_positive_determinant_for_random_parameters(backend, exponent, dim):
    """Many draws of wide raw parameters: det J > 0, log-det matches autodiff, rho(M) < 2 max eps."""
    rng = np.random.default_rng(dim)
    for draw in range(15):
        max_exponent = float(rng.uniform(0.05, 0.49)) if exponent == "random" else exponent
        layer = make_layer(backend, dim, "dense", seed=100 * dim + draw, scale=2.5, max_exponent=max_exponent)
        z = rng.standard_normal((8, dim)) * 10.0 ** rng.integers(-2, 2, (8, 1))
        ladj = backend.apply(layer, "inverse_and_ladj", z)[1]
        beta, gamma, eps = numpy_params(layer, backend.params(layer))
        sign, logdet = np.linalg.slogdet(backend.layer_jacobians(layer, "inverse_and_ladj", z))
        assert np.all(sign > 0), draw
        np.testing.assert_allclose(ladj, logdet, rtol=1e-9, atol=1e-9)
        for point in z:
            # The argument in the docstring: M = I - diag(s)^-1 J has spectral radius below 2 max eps.
            d = beta + gamma @ point**2
            m = 2 * (eps * point / d)[:, None] * gamma * point[None, :]
            assert np.abs(np.linalg.eigvals(m)).max() < 2 * eps.max()


@pytest.mark.jax_keep(lambda variant, exponent, dim: exponent == 0.49 and dim == JAX_DIM)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("exponent", EXPONENTS)
@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_numerical_forward_inverts_for_random_parameters(backend, variant, exponent, dim):
    rng = np.random.default_rng(dim)
    worst = 0.0
    for draw in range(10):
        max_exponent = float(rng.uniform(0.05, 0.45)) if exponent == "random" else exponent
        layer = make_layer(backend, dim, variant, seed=100 * dim + draw, scale=2.0, max_exponent=max_exponent)
        x = rng.standard_normal((16, dim)) * 10.0 ** rng.integers(-3, 2, (16, 1))
        x[0] = 30.0
        x[1, 0] = -30.0
        x[2] = 0.0
        y, ladj = backend.apply(layer, "call_and_ladj", x)
        x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(ladj))
        # The data side is found to inverse_tol; mapping it back reproduces the noise.
        worst = max(worst, float((np.abs(x2 - x) / (1 + np.abs(x))).max()))
        np.testing.assert_allclose(ildj, -ladj, rtol=1e-10, atol=1e-10)
        assert np.all(y[2] == 0.0)
    assert worst < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_in_float32(backend, variant):
    layer = make_layer(backend, JAX_DIM, variant, seed=5, dtype="float32")
    x = (np.random.default_rng(5).standard_normal((100, JAX_DIM)) * 5).astype(np.float32)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    assert y.dtype == ladj.dtype == x2.dtype == np.float32
    assert float((np.abs(x2 - x) / (1 + np.abs(x))).max()) < 1e-5
    assert float(np.abs(ladj + ildj).max()) < 1e-4


# On JAX each (variant, dtype) is a compilation of a whole flow; the conformance suite runs
# the default (diagonal) flow at extreme inputs, so JAX runs the dense one here.
@pytest.mark.jax_keep(lambda variant, dtype: variant == "dense")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_whole_flow_stays_finite_at_extremes(backend, variant, dtype):
    flow = backend.build_flow("gdn", 2, variant=variant, seed=6, perturb=0.1, dtype=dtype)  # default 3 layers
    grid = np.array([[-30.0, 30.0], [30.0, -30.0], [-8.0, 8.0], [0.0, 0.0], [1e-8, -1e-8]], dtype=dtype)
    for direction in (backend.forward, backend.inverse):
        out, ladj = direction(flow, grid, dtype)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(ladj))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["call_and_ladj", "inverse_and_ladj"])
def test_gradients_match_finite_differences(backend, variant, method):
    """In every parameter and input; for the forward through the numerical solve."""
    layer = make_layer(backend, JAX_DIM, variant, seed=7, perturb=0.8)
    x = np.random.default_rng(7).standard_normal((3, JAX_DIM)) * 2
    check_gradients(backend, layer, method, x)


def test_parameter_constraints_hold_for_any_raw_values(backend):
    layer = backend.make("GDN", 4, "dense", 0.3)
    layer = backend.with_arrays(
        layer, {k: np.linspace(-60, 60, v.size).reshape(v.shape) for k, v in backend.params(layer).items()}
    )
    assert np.all(backend.method(layer, "beta") >= layer.beta_min)
    assert np.all(backend.method(layer, "gamma") >= 0)
    eps = backend.method(layer, "exponent")
    assert np.all(eps >= 0) and np.all(eps <= 0.3)  # the bound itself once sigmoid rounds to 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_layer_is_a_mild_map(backend, variant):
    layer = backend.make("GDN", JAX_DIM, variant)
    z = np.linspace(-3, 3, 31)[:, None] * np.ones(JAX_DIM)
    y, _ = backend.apply(layer, "inverse_and_ladj", z)
    ratio = y[z != 0] / z[z != 0]
    assert np.all(ratio > 0.85) and np.all(ratio <= 1.0 + 1e-6)  # beta = 1 up to float32 rounding


def test_invalid_options_raise_value_errors(backend):
    with pytest.raises(ValueError, match="variant"):
        backend.make("GDN", 2, "full")
    with pytest.raises(ValueError, match="max_exponent"):
        backend.make("GDN", 2, max_exponent=0.5)
    with pytest.raises(ValueError, match="0.5"):
        backend.pf.build_flow("gdn", 2, max_exponent=0.5)
    with pytest.raises(ValueError, match="variant"):
        backend.pf.build_flow("gdn", 2, variant="full")


BUILDER_OPTIONS = [{}, {"variant": "dense"}, {"max_exponent": 0.1}, {"variant": "dense", "max_exponent": 0.49}]


@pytest.mark.parametrize("options", BUILDER_OPTIONS, ids=str)
def test_builder_options_and_structure(backend, options):
    flow = backend.pf.build_flow("gdn", 3, num_layers=2, **options)
    t = backend.transforms()
    assert [type(p) for p in flow.parts] == [t.GDN, t.InvertibleLinear, t.GDN, t.InvertibleLinear, t.ElementwiseAffine]
    for part in flow.parts[:-1:2]:
        assert part.variant == options.get("variant", "diagonal")
        assert part.max_exponent == options.get("max_exponent", 0.4)


# Torch only: on JAX each option set is a compilation of the whole flow; the layers are
# checked above on both backends, the stacks' structure just above, and tests/parity checks
# that the dense stack gives torch's numbers on JAX.
@pytest.mark.jax_keep(lambda options: False)
@pytest.mark.parametrize("options", BUILDER_OPTIONS, ids=str)
def test_builder_round_trip(backend, options):
    flow = backend.build_flow("gdn", 3, num_layers=2, seed=8, **options)
    x = np.random.default_rng(8).standard_normal((6, 3))
    y, ladj = backend.forward(flow, x)
    x2, ildj = backend.inverse(flow, y)
    np.testing.assert_allclose(x2, x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ildj, -ladj, rtol=1e-9, atol=1e-9)
