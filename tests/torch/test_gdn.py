"""GDN against independent references: a loop-based numpy evaluation of the formula,
finite-difference and autodiff Jacobians, and the invertibility conditions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyroflows.torch as pf
from tests.torch.helpers import call_with_params
from pyroflows.torch.transforms import GDN, ElementwiseAffine, InvertibleLinear

VARIANTS = ["diagonal", "dense"]


def make_layer(dim, variant, seed=0, perturb=0.5, max_exponent=0.4, scale=None):
    torch.manual_seed(seed)
    layer = GDN(dim, variant, max_exponent).double()
    with torch.no_grad():
        for p in layer.parameters():
            if scale is None:
                p.add_(perturb * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return layer


def numpy_params(layer):
    """beta, the full gamma matrix and eps from the raw parameters, in numpy."""
    raw_b = layer.unconstrained_beta.detach().double().numpy()
    raw_g = layer.unconstrained_gamma.detach().double().numpy()
    raw_e = layer.unconstrained_exponent.detach().double().numpy()
    beta = layer.beta_min + np.logaddexp(0.0, raw_b)
    gamma = np.logaddexp(0.0, raw_g)
    if layer.variant == "diagonal":
        gamma = np.diag(gamma)
    eps = layer.max_exponent / (1.0 + np.exp(-raw_e))
    return beta, gamma, eps


def reference_normalise(layer, z):
    """y_i = z_i / (beta_i + sum_j gamma_ij z_j^2)^eps_i, one point and one coordinate at a time."""
    beta, gamma, eps = numpy_params(layer)
    z = np.atleast_2d(z)
    y = np.empty_like(z)
    for n in range(z.shape[0]):
        for i in range(z.shape[1]):
            denominator = beta[i]
            for j in range(z.shape[1]):
                denominator += gamma[i, j] * z[n, j] ** 2
            y[n, i] = z[n, i] / denominator ** eps[i]
    return y


def finite_difference_log_det(layer, point, h=1e-6):
    dim = len(point)
    jac = np.empty((dim, dim))
    for k in range(dim):
        step = np.zeros(dim)
        step[k] = h * (1 + abs(point[k]))
        up, down = reference_normalise(layer, point + step)[0], reference_normalise(layer, point - step)[0]
        jac[:, k] = (up - down) / (2 * step[k])
    sign, logdet = np.linalg.slogdet(jac)
    return sign, logdet


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dim", [1, 2, 4])
def test_normalisation_matches_loop_reference(variant, dim):
    layer = make_layer(dim, variant, seed=dim)
    z = np.random.default_rng(dim).standard_normal((5, dim)) * 3
    with torch.no_grad():
        y, ladj = layer.inverse_and_ladj(torch.tensor(z))
    np.testing.assert_allclose(y.numpy(), reference_normalise(layer, z), rtol=1e-13, atol=1e-14)
    for n in range(len(z)):
        sign, logdet = finite_difference_log_det(layer, z[n])
        assert sign > 0
        np.testing.assert_allclose(float(ladj[n]), logdet, rtol=1e-7, atol=1e-7)


def test_dense_with_vanishing_off_diagonal_equals_diagonal():
    dim = 3
    diagonal = make_layer(dim, "diagonal", seed=3)
    dense = GDN(dim, "dense").double()
    with torch.no_grad():
        dense.unconstrained_beta.copy_(diagonal.unconstrained_beta)
        dense.unconstrained_exponent.copy_(diagonal.unconstrained_exponent)
        dense.unconstrained_gamma.fill_(-800.0)  # softplus underflows to exactly 0
        dense.unconstrained_gamma.diagonal().copy_(diagonal.unconstrained_gamma)
    x = torch.randn(7, dim, dtype=torch.float64) * 4
    with torch.no_grad():
        for method in ("call_and_ladj", "inverse_and_ladj"):
            out_a, ld_a = getattr(diagonal, method)(x)
            out_b, ld_b = getattr(dense, method)(x)
            torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ld_b, ld_a, rtol=1e-12, atol=1e-12)


def test_dense_jacobian_has_positive_determinant_for_random_parameters():
    """Many draws of wide raw parameters: det J > 0, log-det matches autodiff, rho(M) < 2 max eps."""
    rng = np.random.default_rng(0)
    for draw in range(60):
        dim = 2 + draw % 4
        max_exponent = float(rng.uniform(0.05, 0.49))
        layer = make_layer(dim, "dense", seed=draw, scale=2.5, max_exponent=max_exponent)
        z = torch.tensor(rng.standard_normal((8, dim)) * 10.0 ** rng.integers(-2, 2, (8, 1)))
        jac = torch.func.vmap(torch.func.jacrev(lambda v: layer.inverse_and_ladj(v)[0]))(z).detach()
        sign, logdet = torch.linalg.slogdet(jac)
        assert torch.all(sign > 0), draw
        with torch.no_grad():
            ladj = layer.inverse_and_ladj(z)[1]
        torch.testing.assert_close(ladj, logdet, rtol=1e-9, atol=1e-9)
        # The argument in the docstring: M = I - diag(s)^-1 J has spectral radius below 2 max eps.
        beta, gamma, eps = numpy_params(layer)
        for point in z.numpy():
            d = beta + gamma @ point**2
            m = 2 * (eps * point / d)[:, None] * gamma * point[None, :]
            assert np.abs(np.linalg.eigvals(m)).max() < 2 * eps.max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_numerical_forward_inverts_for_random_parameters(variant):
    rng = np.random.default_rng(1)
    worst = 0.0
    for draw in range(40):
        dim = 1 + draw % 4
        layer = make_layer(dim, variant, seed=draw, scale=2.0, max_exponent=float(rng.uniform(0.05, 0.45)))
        x = torch.tensor(rng.standard_normal((16, dim)) * 10.0 ** rng.integers(-3, 2, (16, 1)))
        x[0] = 30.0
        x[1, 0] = -30.0
        x[2] = 0.0
        with torch.no_grad():
            y, ladj = layer.call_and_ladj(x)
            x2, ildj = layer.inverse_and_ladj(y)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        # The data side is found to inverse_tol; mapping it back reproduces the noise.
        worst = max(worst, float(((x2 - x).abs() / (1 + x.abs())).max()))
        torch.testing.assert_close(ildj, -ladj, rtol=1e-10, atol=1e-10)
        assert torch.all(y[2] == 0.0)
    assert worst < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_in_float32(variant):
    layer = make_layer(3, variant, seed=5).float()
    x = torch.randn(100, 3) * 5
    with torch.no_grad():
        y, ladj = layer.call_and_ladj(x)
        x2, ildj = layer.inverse_and_ladj(y)
    assert float(((x2 - x).abs() / (1 + x.abs())).max()) < 1e-5
    assert float((ladj + ildj).abs().max()) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whole_flow_stays_finite_at_extremes(variant, dtype):
    torch.manual_seed(6)
    flow = pf.build_flow("gdn", 2, variant=variant).to(dtype)  # default 3 layers
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    grid = torch.tensor([[-30.0, 30.0], [30.0, -30.0], [-8.0, 8.0], [0.0, 0.0], [1e-8, -1e-8]], dtype=dtype)
    with torch.no_grad():
        for direction in (flow.call_and_ladj, flow.inverse_and_ladj):
            out, ladj = direction(grid)
            assert torch.isfinite(out).all() and torch.isfinite(ladj).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["call_and_ladj", "inverse_and_ladj"])
def test_gradcheck_float64(variant, method):
    layer = make_layer(2 if variant == "diagonal" else 3, variant, seed=7)
    fn, params = call_with_params(layer, method)
    x = torch.tensor(np.random.default_rng(7).standard_normal((2, layer.dim)) * 2, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,) + params)


def test_parameter_constraints_hold_for_any_raw_values():
    layer = GDN(4, "dense", max_exponent=0.3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.linspace(-60, 60, p.numel(), dtype=torch.float64).reshape(p.shape))
    assert torch.all(layer.beta() >= layer.beta_min)
    assert torch.all(layer.gamma() >= 0)
    eps = layer.exponent()
    assert torch.all(eps >= 0) and torch.all(eps <= 0.3)  # the bound itself once sigmoid rounds to 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_layer_is_a_mild_map(variant):
    layer = GDN(3, variant).double()
    z = torch.linspace(-3, 3, 31, dtype=torch.float64).unsqueeze(-1).expand(-1, 3)
    with torch.no_grad():
        y, _ = layer.inverse_and_ladj(z)
    ratio = y[z != 0] / z[z != 0]
    assert torch.all(ratio > 0.85) and torch.all(ratio <= 1.0 + 1e-6)  # beta = 1 up to float32 rounding


def test_dense_solver_reports_failure_clearly():
    layer = make_layer(2, "dense")
    with pytest.raises(RuntimeError, match="Newton"):
        layer.call_and_ladj(torch.tensor([[float("nan"), 1.0]], dtype=torch.float64))


def test_invalid_options_raise_value_errors():
    with pytest.raises(ValueError, match="variant"):
        GDN(2, variant="full")
    with pytest.raises(ValueError, match="max_exponent"):
        GDN(2, max_exponent=0.5)
    with pytest.raises(ValueError, match="0.5"):
        pf.build_flow("gdn", 2, max_exponent=0.5)
    with pytest.raises(ValueError, match="variant"):
        pf.build_flow("gdn", 2, variant="full")


@pytest.mark.parametrize(
    "options", [{}, {"variant": "dense"}, {"max_exponent": 0.1}, {"variant": "dense", "max_exponent": 0.49}]
)
def test_builder_options_and_structure(options):
    flow = pf.build_flow("gdn", 3, num_layers=2, **options).double()
    kinds = [type(p) for p in flow.parts]
    assert kinds == [GDN, InvertibleLinear, GDN, InvertibleLinear, ElementwiseAffine]
    for part in flow.parts[:-1:2]:
        assert part.variant == options.get("variant", "diagonal")
        assert part.max_exponent == options.get("max_exponent", 0.4)
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        y, ladj = flow.call_and_ladj(x)
        x2, ildj = flow.inverse_and_ladj(y)
    torch.testing.assert_close(x2, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ildj, -ladj, rtol=1e-9, atol=1e-9)
