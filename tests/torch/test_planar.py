"""Planar and radial flows against the paper's formulas, written out independently here."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

import pyroflows.torch as pf
from pyroflows.torch.transforms import Planar, Radial

from tests.torch.helpers import param_grad_check


@pytest.fixture(autouse=True)
def _float64():
    # Every tensor made in these tests is float64; the default is restored for other files.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _perturbed(cls, dim, scale=0.5, seed=0):
    torch.manual_seed(seed)
    layer = cls(dim).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def _set(layer, **values):
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(torch.as_tensor(value, dtype=torch.float64))
    return layer


def _autodiff_logdet(fn, x):
    jac = torch.autograd.functional.jacobian(fn, x)
    sign, logdet = torch.linalg.slogdet(jac)
    assert sign != 0
    return float(logdet), jac


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


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_planar_matches_paper_formula(dim):
    layer = _perturbed(Planar, dim, seed=dim)
    x = torch.randn(6, dim)
    y, ladj = layer.call_and_ladj(x)
    ref_y, ref_ladj, ref_u_hat = _planar_reference(
        layer.u.detach().numpy(), layer.w.detach().numpy(), layer.b.item(), x.detach().numpy()
    )
    np.testing.assert_allclose(layer.u_hat().detach().numpy(), ref_u_hat, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y.detach().numpy(), ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj.detach().numpy(), ref_ladj, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 3, 6])
def test_planar_log_det_is_the_dense_jacobian_log_det(dim):
    layer = _perturbed(Planar, dim, seed=10 + dim)
    for i in range(4):
        x = 2 * torch.randn(dim)
        logdet, _ = _autodiff_logdet(lambda v: layer.call_and_ladj(v)[0], x)
        assert layer.call_and_ladj(x)[1].item() == pytest.approx(logdet, abs=1e-10)


def test_planar_invertibility_condition_holds_for_random_raw_parameters():
    torch.manual_seed(0)
    zs = torch.linspace(-5, 5, 101)
    for scale in (0.1, 1.0, 10.0, 100.0):
        for _ in range(50):
            layer = Planar(4).double()
            _set(layer, u=scale * torch.randn(4), w=scale * torch.randn(4), b=torch.randn(()))
            u_hat, one_plus_c = layer.constrained()
            wu_hat = float((layer.w @ u_hat).detach())
            assert wu_hat > -1.0
            # The cancellation-free 1 + w.u_hat agrees with the direct one where the latter is accurate.
            assert one_plus_c.item() == pytest.approx(1.0 + wu_hat, abs=1e-9 * (1 + abs(wu_hat)))
            slopes = 1.0 + wu_hat * (1.0 - torch.tanh(zs) ** 2)
            assert bool((slopes > 0).all())
            x = 30 * torch.randn(5, 4)
            y, ladj = layer.call_and_ladj(x)
            assert torch.isfinite(y).all() and torch.isfinite(ladj).all()


def test_planar_log_det_stays_accurate_near_the_singular_limit():
    # w.u = -12: 1 + w.u_hat = softplus(-12) ~ 6e-6, where 1 + c loses half the digits.
    sp = math.log1p(math.exp(-12.0))
    layer = _set(Planar(2).double(), u=[-12.0, 0.0], w=[1.0, 0.0], b=0.0)
    u_hat, one_plus_c = layer.constrained()
    assert one_plus_c.item() == pytest.approx(sp, rel=1e-12)
    x = torch.tensor([[0.0, 0.3], [1e-3, 0.0], [2.0, 1.0], [-0.1, 0.0]])
    _, ladj = layer.call_and_ladj(x)
    # log(tanh^2 z + softplus(a) sech^2 z), evaluated here in closed form.
    z = x[:, 0]
    ref = torch.log(torch.tanh(z) ** 2 + sp / torch.cosh(z) ** 2)
    np.testing.assert_allclose(ladj.detach().numpy(), ref.numpy(), rtol=1e-10)
    x2, ildj = layer.inverse_and_ladj(layer.call_and_ladj(x)[0])
    np.testing.assert_allclose(x2.detach().numpy(), x.numpy(), atol=1e-9)
    np.testing.assert_allclose(ildj.detach().numpy(), -ladj.detach().numpy(), rtol=1e-6)


def test_planar_softplus_floor_keeps_the_layer_invertible():
    # w.u = -40: softplus underflows towards 0; the 1e-6 floor keeps 1 + w.u_hat >= 1e-6,
    # and the map and its log-det stay consistent (the autodiff Jacobian agrees).
    layer = _set(Planar(2).double(), u=[-40.0, 0.5], w=[1.0, 0.0], b=0.2)
    _, one_plus_c = layer.constrained()
    assert one_plus_c.item() == pytest.approx(1e-6, rel=1e-9)
    for x in (torch.tensor([-0.2, 0.1]), torch.tensor([1.0, -2.0])):
        logdet, _ = _autodiff_logdet(lambda v: layer.call_and_ladj(v)[0], x)
        assert layer.call_and_ladj(x)[1].item() == pytest.approx(logdet, abs=1e-8)
    x = torch.randn(10, 2)
    x2, _ = layer.inverse_and_ladj(layer.call_and_ladj(x)[0])
    np.testing.assert_allclose(x2.detach().numpy(), x.numpy(), atol=1e-8)


def test_planar_w_at_zero_is_the_identity_plus_a_shift():
    layer = _set(Planar(3).double(), u=[0.5, -1.0, 2.0], w=[0.0, 0.0, 0.0], b=0.7)
    x = torch.randn(4, 3)
    y, ladj = layer.call_and_ladj(x)
    np.testing.assert_allclose((y - x).detach().numpy(), np.tile([0.5, -1.0, 2.0], (4, 1)) * math.tanh(0.7))
    assert torch.all(ladj == 0)
    x2, _ = layer.inverse_and_ladj(y)
    np.testing.assert_allclose(x2.detach().numpy(), x.detach().numpy(), atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_planar_numerical_inverse_meets_its_tolerance(dim):
    assert Planar.numerical_inverse and Planar.inverse_tol == 1e-10
    layer = _perturbed(Planar, dim, scale=1.0, seed=20 + dim)
    x = torch.cat([3 * torch.randn(50, dim), torch.full((1, dim), 30.0), torch.full((1, dim), -30.0)])
    y, ladj = layer.call_and_ladj(x)
    x2, ildj = layer.inverse_and_ladj(y)
    # Bisection to 1e-10 relative, then a Newton step: far below the stated tolerance.
    assert (x2 - x).abs().max().item() <= 1e-10 * (1 + x.abs().max().item())
    assert (ildj + ladj).abs().max().item() <= 1e-10
    # Along w the inverse solves w.y = a + (w.u_hat) tanh(a + b): check the residual directly.
    a = x2 @ layer.w
    c = float((layer.w @ layer.u_hat()).detach())
    resid = (a + c * torch.tanh(a + layer.b) - y @ layer.w).abs().max().item()
    assert resid <= 1e-12 * (1 + (y @ layer.w).abs().max().item())


def test_planar_float32_inverse():
    layer = _perturbed(Planar, 4, seed=3).float()
    x = torch.randn(20, 4, dtype=torch.float32)
    y, ladj = layer.call_and_ladj(x)
    x2, ildj = layer.inverse_and_ladj(y)
    assert x2.dtype == torch.float32
    assert (x2 - x).abs().max().item() < 1e-5
    assert (ildj + ladj).abs().max().item() < 1e-5


def test_planar_inverse_has_exact_first_derivatives():
    layer = _perturbed(Planar, 3, seed=4)
    y = torch.randn(3)
    x = layer.inverse_and_ladj(y)[0].detach()
    jac_inv = torch.autograd.functional.jacobian(lambda v: layer.inverse_and_ladj(v)[0], y)
    jac_fwd = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x)
    np.testing.assert_allclose((jac_inv @ jac_fwd).detach().numpy(), np.eye(3), atol=1e-9)
    # Parameter gradients of the numerical inverse (and its log-det) against central differences.
    ys = torch.randn(4, 3)
    param_grad_check(layer, layer.inverse_and_ladj, ys, tol=1e-3)


def test_fresh_planar_is_close_to_the_identity():
    torch.manual_seed(0)
    layer = Planar(6).double()
    x = torch.randn(100, 6)
    y, ladj = layer.call_and_ladj(x)
    # u_hat starts orthogonal to w: a small volume-preserving shear.
    assert abs(float((layer.w @ layer.u_hat()).detach())) < 1e-12
    assert ladj.abs().max().item() < 1e-12
    assert 0 < (y - x).abs().max().item() < 0.5


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


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_radial_matches_paper_formula(dim):
    layer = _perturbed(Radial, dim, seed=dim)
    alpha, beta, s = (t.item() for t in layer.constrained())
    assert alpha == pytest.approx(math.log1p(math.exp(layer.raw_alpha.item())), rel=1e-14)
    assert beta == pytest.approx(-alpha + math.log1p(math.exp(layer.raw_beta.item())), rel=1e-12, abs=1e-14)
    x = torch.randn(6, dim) + layer.x0.detach()
    y, ladj = layer.call_and_ladj(x)
    ref_y, ref_ladj = _radial_reference(layer.x0.detach().numpy(), alpha, beta, x.detach().numpy())
    np.testing.assert_allclose(y.detach().numpy(), ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj.detach().numpy(), ref_ladj, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 3, 6])
def test_radial_log_det_is_the_dense_jacobian_log_det(dim):
    layer = _perturbed(Radial, dim, scale=1.0, seed=10 + dim)
    for i in range(4):
        x = layer.x0.detach() + torch.randn(dim) * 10.0 ** (i - 2)
        logdet, _ = _autodiff_logdet(lambda v: layer.call_and_ladj(v)[0], x)
        assert layer.call_and_ladj(x)[1].item() == pytest.approx(logdet, abs=1e-10)


def test_radial_invertibility_condition_holds_for_random_raw_parameters():
    torch.manual_seed(1)
    rs = torch.cat([torch.zeros(1), torch.logspace(-8, 4, 200)])
    for scale in (0.1, 1.0, 10.0, 50.0):
        for _ in range(50):
            layer = _set(Radial(3).double(), raw_alpha=scale * torch.randn(()), raw_beta=scale * torch.randn(()))
            alpha, beta, _ = layer.constrained()
            assert alpha.item() > 0 and beta.item() >= -alpha.item()
            # The radius map r -> r (1 + beta / (alpha + r)) is strictly increasing from 0.
            radius = rs * (1 + beta / (alpha + rs))
            assert radius[0] == 0 and bool((torch.diff(radius) > 0).all())
            x = layer.x0.detach() + 30 * torch.randn(5, 3)
            y, ladj = layer.call_and_ladj(x)
            x2, ildj = layer.inverse_and_ladj(y)
            assert torch.isfinite(y).all() and torch.isfinite(ladj).all() and torch.isfinite(x2).all()


@pytest.mark.parametrize(
    "raw_alpha,raw_beta", [(0.0, 0.0), (0.0, 3.0), (2.0, -8.0), (-6.0, 5.0), (-3.0, -12.0), (5.0, 5.0)]
)
def test_radial_closed_form_inverse_matches_a_root_finder(raw_alpha, raw_beta):
    assert not Radial.numerical_inverse
    # x0 = 0 so that |x - x0| is measured without rounding at small radii.
    layer = _set(Radial(3).double(), raw_alpha=raw_alpha, raw_beta=raw_beta, x0=torch.zeros(3))
    alpha, beta, _ = (t.item() for t in layer.constrained())
    torch.manual_seed(2)
    y = torch.randn(8, 3) * torch.logspace(-6, 2, 8).unsqueeze(-1)
    x, ildj = layer.inverse_and_ladj(y)
    for yi, xi in zip(y, x):
        r_y = float(torch.linalg.vector_norm(yi - layer.x0.detach()))
        upper = 2 * r_y * max(1.0, alpha / (alpha + beta))  # the radius map is >= r min(1, (alpha + beta) / alpha)
        r = brentq(lambda r: r * (1 + beta / (alpha + r)) - r_y, 0.0, upper, xtol=1e-300, rtol=1e-15)
        assert float(torch.linalg.vector_norm(xi - layer.x0).detach()) == pytest.approx(r, rel=1e-12, abs=1e-300)
    y2, ladj = layer.call_and_ladj(x)
    np.testing.assert_allclose(y2.detach().numpy(), y.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ildj.detach().numpy(), -ladj.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_radial_inverse_at_the_centre():
    layer = _perturbed(Radial, 4, seed=5)
    alpha, beta, _ = (t.item() for t in layer.constrained())
    x0 = layer.x0.detach().clone()
    x, ildj = layer.inverse_and_ladj(x0)
    assert torch.equal(x, x0)
    # At the centre J = (1 + beta / alpha) I, so log|det dx/dy| = -4 log(1 + beta / alpha).
    assert ildj.item() == pytest.approx(-4 * math.log1p(beta / alpha), rel=1e-12)
    jac = torch.autograd.functional.jacobian(lambda v: layer.inverse_and_ladj(v)[0], x0)
    assert torch.isfinite(jac).all()
    np.testing.assert_allclose(jac.detach().numpy(), np.eye(4) * alpha / (alpha + beta), rtol=1e-12, atol=1e-15)
    # And just off the centre (at x0 = 0, so y - x0 is exact), down to subnormal radii.
    _set(layer, x0=torch.zeros(4))
    for eps in (1e-310, 1e-300, 1e-150, 1e-12):
        y = eps * torch.tensor([1.0, -1.0, 0.5, 0.0])
        x, _ = layer.inverse_and_ladj(y)
        assert torch.isfinite(x).all()
        np.testing.assert_allclose(x.detach().numpy() / eps, y.numpy() / eps * alpha / (alpha + beta), rtol=1e-9)
    _set(layer, x0=x0)
    # Gradients with respect to every parameter exist and are finite at the centre.
    x, ildj = layer.inverse_and_ladj(x0)
    grads = torch.autograd.grad(x.sum() + ildj, list(layer.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_radial_gradients_match_finite_differences():
    layer = _perturbed(Radial, 3, seed=6)
    xs = layer.x0.detach() + torch.randn(4, 3)
    param_grad_check(layer, layer.call_and_ladj, xs, tol=1e-3)
    param_grad_check(layer, layer.inverse_and_ladj, layer.call_and_ladj(xs)[0].detach(), tol=1e-3)


# --------------------------------------------------------------------------- builders
@pytest.mark.parametrize("name,cls", [("planar", Planar), ("radial", Radial)])
def test_builders_stack_num_layers(name, cls):
    for n in (1, 3):
        flow = pf.build_flow(name, 4, num_layers=n)
        assert len(flow.parts) == n and all(type(p) is cls for p in flow.parts)
    assert len(pf.build_flow(name, 4).parts) == 8
    flow = pf.build_flow(name, 4, num_layers=3).double()
    x = torch.randn(5, 4)
    y, ladj = flow.call_and_ladj(x)
    x2, ildj = flow.inverse_and_ladj(y)
    np.testing.assert_allclose(x2.detach().numpy(), x.detach().numpy(), atol=1e-9)
    np.testing.assert_allclose(ildj.detach().numpy(), -ladj.detach().numpy(), atol=1e-9)
    logdet, _ = _autodiff_logdet(lambda v: flow.call_and_ladj(v)[0], x[0])
    assert ladj[0].item() == pytest.approx(logdet, abs=1e-9)
    with pytest.raises(ValueError, match="no option"):
        pf.build_flow(name, 4, variant="orthogonal")
    with pytest.raises(ValueError, match="hidden_dims"):
        pf.build_flow(name, 4, hidden_dims=(8,))
