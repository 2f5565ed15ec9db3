"""Residual flows (torch) against independent references: numpy and LAPACK for the map and
the spectral norms, autodiff Jacobians for the log-det and the implicit gradients, Monte
Carlo standard errors for the stochastic series, finite differences for the gradients."""

import math

import numpy as np
import pytest
import torch

import pyroflows.torch as pf
from pyroflows.torch.nn import spectral_norm
from pyroflows.torch.transforms import ElementwiseAffine, ResidualBlock

from tests.residual_cases import BAD_OPTIONS, numpy_residual, strong_weights
from tests.torch.helpers import param_grad_check


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _block(dim, hidden=(8, 8), seed=0, scale=0.5, **options):
    torch.manual_seed(seed)
    block = ResidualBlock(dim, hidden, **options).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(scale * torch.randn_like(p))
    return block


def _strong_block(dim=3, seed=0, **options):
    """A block with J_g close to 0.45 times a rotation (``tests.residual_cases.strong_weights``)."""
    block = ResidualBlock(dim, (8, 8), lipschitz=0.85, **options).double()
    weights, biases = strong_weights(dim, seed)
    with torch.no_grad():
        for layer, w, b in zip(block.g.net[0::2], weights, biases):
            layer.weight.copy_(torch.as_tensor(w))
            layer.bias.copy_(torch.as_tensor(b))
    return block


def _autodiff_jacobian(block, y):
    return torch.autograd.functional.jacobian(lambda v: block.inverse_and_ladj(v)[0], y)


def _reference_series(jac_g, terms=None):
    """``log det(I + J)`` by LAPACK, or its first ``terms`` power-series terms."""
    if terms is None:
        return float(torch.linalg.slogdet(torch.eye(len(jac_g)) + jac_g)[1])
    return sum((-1) ** (k + 1) * float(torch.trace(torch.linalg.matrix_power(jac_g, k))) / k for k in range(1, terms + 1))


# --------------------------------------------------------------------------- the map
@pytest.mark.parametrize("dim", [1, 3])
def test_inverse_is_y_plus_g_with_svd_normalised_weights(dim):
    block = _block(dim, scale=2.0, seed=dim, estimator="exact")
    ys = torch.randn(7, dim)
    x, _ = block.inverse_and_ladj(ys)
    linear, acts = block.g.net[0::2], block.g.net[1::2]
    ref = numpy_residual(
        ys.numpy(), [l.weight.detach().numpy() for l in linear], [l.bias.detach().numpy() for l in linear],
        [a.beta.item() for a in acts], linear[0].coeff,
    )
    np.testing.assert_allclose(x.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    # scale 2 perturbations make every raw weight exceed the bound, so normalisation acted
    for layer in block.g.net[0::2]:
        assert torch.linalg.matrix_norm(layer.weight, 2) > layer.coeff


def test_spectral_norm_matches_lapack():
    torch.manual_seed(0)
    for shape in [(16, 16), (16, 2), (2, 16), (1, 5), (5, 1), (40, 40)]:
        for _ in range(5):
            w = torch.randn(shape)
            np.testing.assert_allclose(float(spectral_norm(w, 4096)), float(torch.linalg.matrix_norm(w, 2)), rtol=1e-12)
    # a flat top spectrum, the slowest case: the documented bound (m - 1) / (2 e N) holds
    m, n = 40, 4096
    u, _ = torch.linalg.qr(torch.randn(m, m))
    v, _ = torch.linalg.qr(torch.randn(m, m))
    s = 1.0 - 1e-3 * torch.rand(m)
    s[0] = 1.0
    shortfall = 1.0 - float(spectral_norm(u @ torch.diag(s) @ v.T, n))
    assert 0 <= shortfall <= (m - 1) / (2 * math.e * n)
    # the zero matrix (an output layer at init): norm 0 and a zero, not NaN, gradient
    zero = torch.zeros(4, 3, requires_grad=True)
    sigma = spectral_norm(zero, 4096)
    sigma.backward()
    assert float(sigma.detach()) == 0.0 and torch.equal(zero.grad, torch.zeros(4, 3))


# --------------------------------------------------------------------------- exact log-det
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_exact_log_det_is_the_autodiff_jacobian_log_det(dim):
    for block in (_block(dim, seed=10 + dim, scale=1.0, estimator="exact"), _strong_block(dim, estimator="exact")):
        ys = torch.randn(4, dim)
        with torch.no_grad():
            _, ildj = block.inverse_and_ladj(ys)
            _, ladj = block.call_and_ladj(ys)  # the forward from the same points
        for i in range(4):
            jac = _autodiff_jacobian(block, ys[i])
            np.testing.assert_allclose(float(ildj[i]), float(torch.linalg.slogdet(jac)[1]), rtol=1e-10, atol=1e-12)
            fwd = torch.autograd.functional.jacobian(lambda v: block.call_and_ladj(v)[0], ys[i])
            np.testing.assert_allclose(float(ladj[i]), float(torch.linalg.slogdet(fwd)[1]), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- stochastic series
def _draws(block, y, n):
    ys = y.expand(n, len(y)).clone().requires_grad_(True)
    _, ildj = block.inverse_and_ladj(ys)
    return ys, ildj


@pytest.mark.parametrize("estimator", ["roulette", "truncated"])
@pytest.mark.parametrize("dim,noise", [(1, "rademacher"), (3, "rademacher"), (3, "gaussian")])
def test_series_estimates_are_unbiased(estimator, dim, noise):
    """Mean of 4000 draws within 4 standard errors of the reference; in one dimension a
    Rademacher probe is exact, so only the roulette's randomness is left (the sharpest test)."""
    # truncated: 3 terms, so that its bias (against the exact log-det) is visible here
    block = _strong_block(dim, estimator=estimator, noise=noise, num_terms=None if estimator == "roulette" else 3)
    y = torch.tensor([0.3, -0.5, 0.8])[:dim]
    jac_g = _autodiff_jacobian(block, y) - torch.eye(dim)
    assert float(torch.linalg.matrix_norm(jac_g, 2)) > 0.4  # terms past the second matter
    exact = _reference_series(jac_g)
    ref = exact if estimator == "roulette" else _reference_series(jac_g, 3)
    torch.manual_seed(1)
    n = 4000
    with torch.no_grad():
        _, est = block.inverse_and_ladj(y.expand(n, dim))
    if estimator == "truncated" and dim == 1 and noise == "rademacher":
        # nothing random is left: every draw is the 3-term series, which misses the tail
        np.testing.assert_allclose(est.numpy(), ref, rtol=1e-12)
        assert abs(ref - exact) > 1e-3
        return
    se = float(est.std()) / math.sqrt(n)
    assert float(est.var()) > 0
    assert abs(float(est.mean()) - ref) < 4 * se, (float(est.mean()), ref, se)


@pytest.mark.parametrize("neumann_gradient", [True, False])
def test_series_gradients_are_unbiased(neumann_gradient):
    """Input and weight gradients: the mean over draws matches the exact mode's gradients."""
    block = _strong_block(3, neumann_gradient=neumann_gradient, noise="rademacher")
    exact = _strong_block(3, estimator="exact")
    exact.load_state_dict(block.state_dict())
    y = torch.tensor([0.3, -0.5, 0.8])
    # exact gradients (checked against finite differences in test_exact_gradients_...)
    ye = y.clone().requires_grad_(True)
    logdet = exact.inverse_and_ladj(ye)[1]
    w = exact.g.net[2].weight
    grad_y, grad_w = torch.autograd.grad(logdet, [ye, w])
    torch.manual_seed(2)
    groups, per_group = 10, 400
    gy, gw = [], []
    for _ in range(groups):  # batch means give the weight gradient's standard error
        ys, est = _draws(block, y, per_group)
        g_rows, g_w = torch.autograd.grad(est.sum(), [ys, block.g.net[2].weight])
        gy.append(g_rows)
        gw.append(g_w / per_group)
    gy, gw = torch.cat(gy), torch.stack(gw)
    se_y = gy.std(0) / math.sqrt(len(gy))
    assert torch.all((gy.mean(0) - grad_y).abs() < 4 * se_y), (gy.mean(0), grad_y, se_y)
    se_w = gw.std(0) / math.sqrt(groups)
    # 4 SE per entry, with a floor for entries whose estimates are (near) constant
    assert torch.all((gw.mean(0) - grad_w).abs() < 4 * se_w + 1e-10), ((gw.mean(0) - grad_w).abs() / se_w).max()
    assert float(gy.var(0).min()) > 0


def test_noise_comes_from_the_global_generator():
    block = _strong_block(3)
    ys = torch.randn(5, 3)
    torch.manual_seed(7)
    a = block.inverse_and_ladj(ys)[1]
    torch.manual_seed(7)
    b = block.inverse_and_ladj(ys)[1]
    c = block.inverse_and_ladj(ys)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- the inverse
def test_forward_solves_the_residual_equation_to_tolerance():
    block = _strong_block(3, estimator="exact")
    x = torch.cat([torch.randn(20, 3), torch.tensor([[30.0, -30.0, 8.0], [-30.0, 30.0, 0.0]])])
    y, ladj = block.call_and_ladj(x)
    x_back, ildj = block.inverse_and_ladj(y)
    assert torch.all((x_back - x).abs() <= block.inverse_tol * (1 + y.abs()))
    np.testing.assert_allclose(ladj.detach().numpy(), -ildj.detach().numpy(), atol=1e-12)
    # a cap on the iterations still returns finite values, and the Newton step refines them
    capped = _strong_block(3, estimator="exact", max_inverse_iter=3)
    y3, _ = capped.call_and_ladj(x)
    assert torch.all(torch.isfinite(y3))
    assert (capped.inverse_and_ladj(y3)[0] - x).abs().max() < 1e-2


def test_forward_gradients_follow_the_implicit_function_theorem():
    block = _strong_block(3, estimator="exact")
    x = torch.randn(3)
    y = block.call_and_ladj(x)[0].detach()
    dy_dx = torch.autograd.functional.jacobian(lambda v: block.call_and_ladj(v)[0], x)
    np.testing.assert_allclose(dy_dx.numpy(), torch.linalg.inv(_autodiff_jacobian(block, y)).numpy(), atol=1e-10)


@pytest.mark.parametrize("method", ["inverse_and_ladj", "call_and_ladj"])
def test_exact_gradients_match_finite_differences(method):
    block = _block(2, hidden=(4, 4), seed=3, scale=1.0, estimator="exact")
    fn = getattr(block, method)
    x = torch.randn(3, 2)
    param_grad_check(block, fn, x, h=1e-6, tol=1e-6)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: fn(v), (xg,), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- the Lipschitz bound
def test_lipschitz_bound_holds_after_training_pushes_it():
    torch.manual_seed(4)
    dim, coeff = 3, 0.9
    block = ResidualBlock(dim, (16, 16), estimator="exact", lipschitz=coeff).double()
    with torch.no_grad():  # off the zero output layer, where this objective has zero gradient
        block.g.net[4].weight.normal_(0.0, 0.1)
    opt = torch.optim.Adam(block.parameters(), lr=0.2)
    pts = torch.randn(64, dim)

    def stretch():  # mean squared Jacobian-vector product: maximising it raises Lip(g)
        weights = block.g.weights()
        _, slopes = block.g.forward_and_slopes(pts, weights)
        v = torch.nn.functional.normalize(torch.randn(64, dim), dim=-1)
        return block.g.jvp(weights, slopes, v).square().sum(-1).mean()

    for _ in range(40):
        opt.zero_grad()
        (-stretch()).backward()
        opt.step()
    n = block.g.net[2].power_iterations
    for layer in block.g.net[0::2]:
        with torch.no_grad():
            raw = float(torch.linalg.matrix_norm(layer.weight, 2))
            normalised = float(torch.linalg.matrix_norm(layer.normalized_weight(), 2))
        m = min(layer.weight.shape)
        assert raw > coeff  # training pushed past the bound ...
        assert normalised <= coeff * (1 + (m - 1) / (2 * math.e * n))  # ... and the layer stays within it
    lips = [float(torch.linalg.matrix_norm(_autodiff_jacobian(block, p) - torch.eye(dim), 2)) for p in 2 * torch.randn(50, dim)]
    assert max(lips) < coeff
    assert max(lips) > 0.3  # the push worked: the bound is not met trivially


# --------------------------------------------------------------------------- options and builder
def test_build_flow_defaults_and_structure():
    flow = pf.build_flow("residual", 3)
    blocks = flow.parts[0::2]
    assert len(blocks) == 8 and all(isinstance(b, ResidualBlock) for b in blocks)
    assert all(isinstance(a, ElementwiseAffine) for a in flow.parts[1::2])
    b = blocks[0]
    assert (b.estimator, b.num_terms, b.noise, b.neumann_gradient, b.is_stochastic) == ("roulette", 2, "gaussian", True, True)
    assert pf.build_flow("residual", 3, estimator="truncated").parts[0].num_terms == 10
    assert not pf.build_flow("residual", 3, estimator="exact").parts[0].is_stochastic
    # a fresh flow is the identity (zero output layers), whatever noise the estimator draws
    x = torch.randn(5, 3)
    y, ladj = flow.inverse_and_ladj(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(5))


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_bad_options_raise_value_errors_that_name_them(options, message):
    with pytest.raises(ValueError, match=message):
        pf.build_flow("residual", 2, **options)
    with pytest.raises(ValueError, match=message):
        ResidualBlock(2, (4,), **options)


def test_roulette_flow_scores_and_trains_inside_pyro():
    import pyro.distributions as dist

    torch.manual_seed(5)
    flow = pf.build_flow("residual", 2, num_layers=2, hidden_dims=(8,))
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    d = dist.TransformedDistribution(base, [flow])
    data = torch.randn(64, 2) * torch.tensor([2.0, 0.5]) + 1.0
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        loss = -d.log_prob(data).mean()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    x = d.rsample((16,))
    lp = d.log_prob(x)
    lp.mean().backward()
    assert torch.all(torch.isfinite(lp))
