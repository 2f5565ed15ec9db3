"""Gaussianization flows against independent references: scipy's normal and logistic
distributions, a direct float64 evaluation of Phi^-1(F(H y)), and autodiff Jacobians."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

import pyroflows.torch as pf
from tests.torch.helpers import call_with_params
from pyroflows.torch.transforms import Gaussianization
from pyroflows.torch.transforms.gaussianization import ndtri_exp

LOG_P = -np.logspace(-12, 4, 1601)


def make_layer(dim, num_components=4, num_reflections=None, seed=0, perturb=0.3):
    torch.manual_seed(seed)
    layer = Gaussianization(dim, num_components, num_reflections).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(perturb * torch.randn_like(p))
    return layer


def reference_inverse(layer, y):
    """Phi^-1(F(H y)) and its log-det, written directly from the paper with scipy in float64."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    dim = y.shape[-1]
    rotation = np.eye(dim)
    for v in layer.reflections.detach().double().numpy():
        v = v / np.linalg.norm(v)
        rotation = (np.eye(dim) - 2 * np.outer(v, v)) @ rotation
    logits = layer.logits.detach().double().numpy()
    log_w = logits - special.logsumexp(logits, axis=-1, keepdims=True)
    means = layer.means.detach().double().numpy()
    bound = layer.log_scale_bound
    scales = np.exp(bound * np.tanh(layer.unconstrained_log_scales.detach().double().numpy() / bound))
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


def plain_reference(layer, y):
    """The same map in probability space: norm.ppf of a sum of logistic CDFs (moderate inputs only)."""
    rotation = np.eye(y.shape[-1])
    for v in layer.reflections.detach().double().numpy():
        v = v / np.linalg.norm(v)
        rotation = (np.eye(len(v)) - 2 * np.outer(v, v)) @ rotation
    logits = layer.logits.detach().double().numpy()
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    means = layer.means.detach().double().numpy()
    bound = layer.log_scale_bound
    scales = np.exp(bound * np.tanh(layer.unconstrained_log_scales.detach().double().numpy() / bound))
    u = y @ rotation.T
    cdf = (weights * stats.logistic.cdf(u[..., None], loc=means, scale=scales)).sum(-1)
    pdf = (weights * stats.logistic.pdf(u[..., None], loc=means, scale=scales)).sum(-1)
    z = stats.norm.ppf(cdf)
    return z, (np.log(pdf) - stats.norm.logpdf(z)).sum(-1)


# --- ndtri_exp ---------------------------------------------------------------------------
def test_ndtri_exp_matches_scipy_float64():
    z = ndtri_exp(torch.tensor(LOG_P, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(z, special.ndtri_exp(LOG_P), rtol=1e-13, atol=1e-14)
    # Where p = exp(log_p) is a normal float well away from 1, the plain ndtri(p) agrees.
    moderate = (LOG_P > -700) & (LOG_P < -0.1)
    np.testing.assert_allclose(z[moderate], special.ndtri(np.exp(LOG_P[moderate])), rtol=1e-12, atol=1e-14)
    # Round trip through scipy's log_ndtr, as tight as rounding z to float64 allows; above
    # p = 1/2 through the upper tail 1 - p, which is what z determines there.
    lower = LOG_P < math.log(0.5)
    np.testing.assert_allclose(special.log_ndtr(z[lower]), LOG_P[lower], rtol=2e-15, atol=0)
    np.testing.assert_allclose(special.log_ndtr(-z[~lower]), np.log(-np.expm1(LOG_P[~lower])), rtol=2e-15)


def test_ndtri_exp_upper_half_and_special_values():
    log_p = torch.tensor([-1e-300, -1e-100, -1e-20, -1e-5, -0.1, math.log(0.5), 0.0, -math.inf], dtype=torch.float64)
    z = ndtri_exp(log_p).numpy()
    np.testing.assert_allclose(z[:6], special.ndtri_exp(log_p[:6].numpy()), rtol=1e-13, atol=1e-15)
    assert z[0] > 37 and z[5] == 0.0
    assert z[6] == math.inf and z[7] == -math.inf


def test_ndtri_exp_float32_is_finite_and_accurate():
    log_p32 = torch.tensor(LOG_P, dtype=torch.float32)
    z = ndtri_exp(log_p32).double().numpy()
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z, special.ndtri_exp(log_p32.double().numpy()), rtol=2e-6, atol=1e-6)


def test_ndtri_exp_gradient_is_phi_over_density():
    log_p = torch.tensor(LOG_P[::40], dtype=torch.float64, requires_grad=True)
    z = ndtri_exp(log_p)
    (grad,) = torch.autograd.grad(z.sum(), log_p)
    zn = z.detach().numpy()
    # Phi(z) / phi(z) = sqrt(pi / 2) erfcx(-z / sqrt 2): no cancellation in the tail, where
    # exp(log Phi - log phi) is only good to about eps z^2.
    expected = math.sqrt(math.pi / 2) * special.erfcx(-zn / math.sqrt(2))
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-13)
    few = torch.tensor([-3000.0, -50.0, -2.0, -0.5, -1e-3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ndtri_exp, (few,))


# --- the layer against scipy ---------------------------------------------------------------
@pytest.mark.parametrize("dim,num_components,num_reflections", [(1, 1, None), (2, 3, 1), (3, 8, None), (4, 5, 6)])
def test_inverse_matches_direct_scipy_evaluation(dim, num_components, num_reflections):
    layer = make_layer(dim, num_components, num_reflections, seed=dim)
    y = np.random.default_rng(dim).standard_normal((6, dim)) * 2
    z, ladj = layer.inverse_and_ladj(torch.tensor(y))
    z_ref, ladj_ref = reference_inverse(layer, y)
    np.testing.assert_allclose(z.detach().numpy(), z_ref, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ladj.detach().numpy(), ladj_ref, rtol=1e-11, atol=1e-11)
    # Moderate points: the textbook formula with probabilities, not logs, agrees too.
    z_plain, ladj_plain = plain_reference(layer, y)
    np.testing.assert_allclose(z.detach().numpy(), z_plain, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ladj.detach().numpy(), ladj_plain, rtol=1e-8, atol=1e-8)


def test_inverse_in_the_far_tails_with_the_smallest_scales():
    layer = make_layer(2, 3, seed=3)
    with torch.no_grad():
        layer.unconstrained_log_scales.fill_(-100.0)  # soft-clamped to the smallest scale e^-5
    y = np.array([[30.0, -30.0], [-30.0, 30.0], [30.0, 30.0], [0.0, 1e-8]])
    z, ladj = layer.inverse_and_ladj(torch.tensor(y))
    z_ref, ladj_ref = reference_inverse(layer, y)
    assert np.all(np.isfinite(z.detach().numpy())) and np.abs(z_ref).max() > 50  # log F ~ -1e3 or below
    np.testing.assert_allclose(z.detach().numpy(), z_ref, rtol=1e-12)
    np.testing.assert_allclose(ladj.detach().numpy(), ladj_ref, rtol=1e-11, atol=1e-9)  # log f - log phi cancel at ~1e4
    # And the numerical forward gets back there, in float64 and float32.
    y2, _ = layer.call_and_ladj(z)
    # Between narrow components the map is nearly flat (dz/du ~ 1e-7 at the last point),
    # so rounding in z alone moves y by ~1e-9 there.
    np.testing.assert_allclose(y2.detach().numpy(), y, rtol=1e-9, atol=1e-7)
    z2, _ = layer.inverse_and_ladj(y2)
    np.testing.assert_allclose(z2.detach().numpy(), z.detach().numpy(), rtol=1e-12, atol=1e-12)
    layer32 = layer.float()
    for direction in (layer32.call_and_ladj, layer32.inverse_and_ladj):
        out, ld = direction(torch.tensor(y, dtype=torch.float32))
        assert torch.isfinite(out).all() and torch.isfinite(ld).all()


def test_each_coordinate_is_increasing_after_the_rotation():
    dim = 3
    layer = make_layer(dim, 5, seed=4, perturb=1.0)
    units = layer._unit_reflections().detach()
    grid = torch.linspace(-40, 40, 2001, dtype=torch.float64)
    for i in range(dim):
        u = torch.zeros(len(grid), dim, dtype=torch.float64)
        u[:, i] = grid
        y = Gaussianization._reflect(u, units.flip(0))  # y with rotated coordinates u
        z, _ = layer.inverse_and_ladj(y)
        z = z.detach()
        assert torch.all(torch.diff(z[:, i]) > 0)
        others = [j for j in range(dim) if j != i]
        # Other coordinates see u_j = 0 throughout.
        assert torch.allclose(z[:, others], z[:1, others].expand(len(grid), -1), atol=1e-12)


def test_log_det_matches_autodiff_in_both_directions():
    layer = make_layer(3, 4, seed=5, perturb=0.5)
    for seed in range(3):
        x = torch.tensor(np.random.default_rng(seed).standard_normal(3) * 3)
        for fn in (layer.call_and_ladj, layer.inverse_and_ladj):
            jac = torch.autograd.functional.jacobian(lambda v: fn(v)[0], x)
            logdet = float(torch.linalg.slogdet(jac)[1])
            np.testing.assert_allclose(float(fn(x)[1].detach()), logdet, rtol=1e-9, atol=1e-9)


# --- the numerical forward -----------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_round_trip_tolerance(dtype, tol):
    layer = make_layer(4, 8, seed=6, perturb=0.5).to(dtype)
    x = torch.randn(200, 4, dtype=dtype) * torch.tensor([0.1, 1.0, 3.0, 8.0], dtype=dtype)
    with torch.no_grad():
        y, ladj = layer.call_and_ladj(x)
        x2, ildj = layer.inverse_and_ladj(y)
        assert float(((x2 - x).abs() / (1 + x.abs())).max()) < tol
        assert float((ladj + ildj).abs().max()) < tol * 10
        # The data side is solved to inverse_tol: mapping y again reproduces it.
        if dtype == torch.float64:
            y2, _ = layer.call_and_ladj(x2)
            assert float(((y2 - y).abs() / (1 + y.abs())).max()) < 1e-9


@pytest.mark.parametrize("method", ["call_and_ladj", "inverse_and_ladj"])
def test_gradcheck_float64(method):
    layer = make_layer(2, 3, seed=7, perturb=0.5)
    fn, params = call_with_params(layer, method)
    x = torch.tensor([[0.3, -1.2], [2.5, 0.7]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,) + params)


# --- construction, options, builder -------------------------------------------------------
def test_initial_marginal_map_is_close_to_the_identity():
    layer = Gaussianization(1, 8).double()
    with torch.no_grad():
        layer.reflections.fill_(1.0)  # the 1-D reflection is x -> -x
    u = torch.linspace(-3, 3, 61, dtype=torch.float64)
    z, _ = layer.inverse_and_ladj(-u.unsqueeze(-1))
    assert float((z.detach()[:, 0] - u).abs().max()) < 0.1


def test_parameters_are_valid_for_any_values():
    layer = make_layer(3, 4, seed=8, perturb=5.0)
    with torch.no_grad():
        layer.reflections[0].zero_()  # a degenerate reflection stays finite
    x = torch.randn(20, 3, dtype=torch.float64) * 5
    with torch.no_grad():
        y, ladj = layer.call_and_ladj(x)
        x2, _ = layer.inverse_and_ladj(y)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    assert float(((x2 - x).abs() / (1 + x.abs())).max()) < 1e-8


@pytest.mark.parametrize("options", [{}, {"num_components": 1}, {"num_components": 3, "num_reflections": 1},
                                     {"num_reflections": 5}])
def test_builder_options(options):
    flow = pf.build_flow("gaussianization", 3, num_layers=2, **options).double()
    assert len(flow.parts) == 2 and all(isinstance(p, Gaussianization) for p in flow.parts)
    for part in flow.parts:
        assert part.num_components == options.get("num_components", 8)
        assert part.num_reflections == (options.get("num_reflections") or 3)
    x = torch.randn(5, 3, dtype=torch.float64)
    y, ladj = flow.call_and_ladj(x)
    x2, ildj = flow.inverse_and_ladj(y)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(ildj, -ladj, atol=1e-8, rtol=1e-8)


def test_builder_rejects_bad_options():
    with pytest.raises(ValueError, match="num_components"):
        pf.build_flow("gaussianization", 2, num_components=0)
    with pytest.raises(ValueError, match="hidden_dims"):
        pf.build_flow("gaussianization", 2, hidden_dims=[8])


# --- large base values (issue 17) -------------------------------------------------------------
# Base values out to |z| = 1e3; a layer maps z to about s z^2 / 2, so the default four layers
# reach ~1e37. The log-det used to be log f(u) - log phi(z), two numbers near -z^2/2 that
# cancelled to garbage, then NaN, from |z| ~ 20 (float32) and 100 (float64).
BASE = np.array([-1e3, -300.0, -100.0, -25.0, -20.0, -8.0, 0.0, 8.0, 15.0, 19.0, 20.0, 25.0, 100.0, 300.0, 1e3])


def perturbed_flow(num_layers, seed=0, perturb=0.2):
    torch.manual_seed(seed)
    flow = pf.build_flow("gaussianization", 2, num_layers=num_layers).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(perturb * torch.randn_like(p))
    return flow


# float32: the reflections mix coordinates of sizes 1e37 and 1e30, so the smaller one keeps
# only a few digits; mapped back through the square-root-like inverse that is ~1e-4.
@pytest.mark.parametrize("dtype,perturb,tol", [(torch.float64, 0.2, 1e-9), (torch.float32, 0.0, 1e-3)])
def test_large_base_values_stay_finite_and_invert(dtype, perturb, tol):
    # The default depth; in float32 the fresh flow of build_flow, as in the report.
    flow = perturbed_flow(4, perturb=perturb).to(dtype)
    z = torch.tensor(np.stack([BASE, BASE[::-1]], -1), dtype=dtype)
    with torch.no_grad():
        y, ladj = flow.call_and_ladj(z)
        z2, ildj = flow.inverse_and_ladj(y.clone())  # a new tensor: no cache hit
    for a in (y, ladj, z2, ildj):
        assert torch.isfinite(a).all()
    assert float(y.abs().max()) > 1e30  # the map really does reach far out
    assert float(((z2 - z).abs() / (1 + z.abs())).max()) < tol
    assert float(((ladj + ildj).abs() / (1 + ladj.abs())).max()) < tol


def test_large_base_value_log_dets_agree_across_dtypes():
    """float32 against the same flow in float64: the hazard form keeps single precision."""
    flow64 = perturbed_flow(2)
    flow32 = copy.deepcopy(flow64).float()
    z = np.stack([BASE, BASE[::-1]], -1)
    with torch.no_grad():
        y64, ladj64 = flow64.call_and_ladj(torch.tensor(z))
        y32, ladj32 = flow32.call_and_ladj(torch.tensor(z, dtype=torch.float32))
        _, ildj32 = flow32.inverse_and_ladj(y64.float())  # float32 data near the float64 path
    np.testing.assert_allclose(y32.numpy(), y64.numpy(), rtol=1e-4)
    np.testing.assert_allclose(ladj32.numpy(), ladj64.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ildj32.numpy(), -ladj64.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("value", [8.0, 15.0, 25.0])
def test_log_det_matches_autodiff_at_large_base_values(value):
    flow = perturbed_flow(4, seed=1)
    z = torch.tensor([value, -0.6 * value], dtype=torch.float64)
    y = flow.call_and_ladj(z)[0].detach()
    for fn, point in ((flow.call_and_ladj, z), (flow.inverse_and_ladj, y)):
        jac = torch.autograd.functional.jacobian(lambda v: fn(v)[0], point)
        sign, logdet = torch.linalg.slogdet(jac)
        assert sign != 0
        np.testing.assert_allclose(float(fn(point)[1].detach()), float(logdet), rtol=1e-8, atol=1e-8)
