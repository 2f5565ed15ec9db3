"""Neural spline flows against a loop-based re-implementation of the paper's formulas.

Durkan, Bekasov, Murray & Papamakarios 2019, arXiv:1906.04032, eqs. (4)-(6) and
appendix A (the inverse). The layers are ``Coupling`` and ``MaskedAutoregressive``
with the ``RationalQuadraticSpline`` transformer.
"""

import math

import numpy as np
import pytest
import torch

import pyroflows.torch as pf
from pyroflows.torch.transforms import Coupling, MaskedAutoregressive, RationalQuadraticSpline
from pyroflows.torch.transforms.transformers import rational_quadratic_spline, spline_parts

MIN = 1e-3  # minimum bin width, bin height and interior derivative


# --- an independent scalar reference -------------------------------------------------
def _softmax(v):
    m = max(v)
    e = [math.exp(t - m) for t in v]
    return [t / sum(e) for t in e]


def ref_knots(raw, bound):
    """Knot positions from -bound to bound: softmax with a minimum fraction per bin."""
    k = len(raw)
    frac = [MIN + (1 - MIN * k) * p for p in _softmax(raw)]
    knots, acc = [-bound], 0.0
    for f in frac[:-1]:
        acc += f
        knots.append(-bound + 2 * bound * acc)
    knots.append(bound)
    return knots


def ref_parts(params, bound):
    k = (len(params) + 1) // 3
    xs = ref_knots(params[:k], bound)
    ys = ref_knots(params[k : 2 * k], bound)
    # softplus(raw + c) + MIN, with c chosen so that a zero raw value gives slope 1.
    c = math.log(math.expm1(1 - MIN))
    ds = [1.0] + [MIN + math.log1p(math.exp(r + c)) for r in params[2 * k :]] + [1.0]
    return xs, ys, ds


def ref_spline(x, params, bound):
    """y and dy/dx at a scalar x, straight from eqs. (4)-(5) of the paper."""
    if x < -bound or x > bound:
        return x, 1.0
    xs, ys, ds = ref_parts(params, bound)
    k = 0
    while k < len(xs) - 2 and x >= xs[k + 1]:
        k += 1
    w, h = xs[k + 1] - xs[k], ys[k + 1] - ys[k]
    s = h / w
    xi = (x - xs[k]) / w
    d0, d1 = ds[k], ds[k + 1]
    denom = s + (d1 + d0 - 2 * s) * xi * (1 - xi)
    y = ys[k] + h * (s * xi**2 + d0 * xi * (1 - xi)) / denom
    dy = s**2 * (d1 * xi**2 + 2 * s * xi * (1 - xi) + d0 * (1 - xi) ** 2) / denom**2
    return y, dy


def _params(k, scale, seed, n=None):
    g = torch.Generator().manual_seed(seed)
    shape = (3 * k - 1,) if n is None else (n, 3 * k - 1)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


def _grid(params, bound, n=201):
    """A grid over [-1.5 bound, 1.5 bound] plus every knot (x and y) and +-bound."""
    xs, ys, _ = spline_parts(params, bound)
    pts = torch.cat([torch.linspace(-1.5 * bound, 1.5 * bound, n, dtype=params.dtype), xs, ys])
    pts = torch.cat([pts, torch.tensor([-bound, bound, -30.0, 30.0], dtype=params.dtype)])
    return pts


def _spline(x, params, bound, inverse=False):
    """Evaluate one parameter vector at many points."""
    return rational_quadratic_spline(x, params.expand(*x.shape, params.shape[-1]), bound, inverse)


# --- the spline function -------------------------------------------------------------
@pytest.mark.parametrize("k,bound", [(1, 3.0), (3, 1.0), (8, 3.0), (16, 5.0)])
def test_spline_matches_loop_reference(k, bound):
    params = _params(k, 1.5, seed=k)
    x = _grid(params, bound, n=101)
    y, logd = _spline(x, params, bound)
    ref = [ref_spline(float(v), params.tolist(), bound) for v in x]
    np.testing.assert_allclose(y.numpy(), [r[0] for r in ref], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logd.exp().numpy(), [r[1] for r in ref], rtol=1e-10)


def test_parametrisation_constraints_hold_for_any_raw_values():
    k, bound = 8, 3.0
    params = _params(k, 20.0, seed=1, n=50)  # extreme raw values
    xs, ys, ds = spline_parts(params, bound)
    for knots in (xs, ys):
        assert torch.all(knots[:, 0] == -bound) and torch.all(knots[:, -1] == bound)
        assert torch.all(knots.diff(dim=-1) >= 2 * bound * MIN * (1 - 1e-9))
    assert torch.all(ds[:, 1:-1] >= MIN) and torch.all(ds[:, [0, -1]] == 1.0)
    # Zero parameters: uniform knots, unit slopes.
    xs, ys, ds = spline_parts(torch.zeros(3 * k - 1, dtype=torch.float64), bound)
    np.testing.assert_allclose(xs.numpy(), np.linspace(-bound, bound, k + 1), atol=1e-14)
    np.testing.assert_allclose(ds.numpy(), np.ones(k + 1), atol=1e-14)


def test_zero_parameters_give_the_identity():
    for k in (1, 4, 8):
        params = torch.zeros(3 * k - 1, dtype=torch.float64)
        x = torch.linspace(-40, 40, 1001, dtype=torch.float64)
        for inverse in (False, True):
            y, logd = _spline(x, params, 3.0, inverse)
            np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-13)
            np.testing.assert_allclose(logd.numpy(), 0.0, atol=1e-13)


def test_identity_outside_the_bound():
    params = _params(8, 2.0, seed=2)
    for bound in (0.5, 3.0):
        lin = lambda a, b: torch.linspace(a, b, 50, dtype=torch.float64)
        x = torch.cat([lin(-30, -bound - 1e-9), lin(bound + 1e-9, 30)])
        for inverse in (False, True):
            y, logd = _spline(x, params, bound, inverse)
            assert torch.equal(y, x) and torch.all(logd == 0)


def test_derivative_matches_finite_differences_and_autograd():
    params = _params(8, 1.5, seed=3)
    bound = 3.0
    x = torch.linspace(-3.5, 3.5, 157, dtype=torch.float64)  # off the knots (almost surely)
    h = 1e-6
    fd = (_spline(x + h, params, bound)[0] - _spline(x - h, params, bound)[0]) / (2 * h)
    xg = x.clone().requires_grad_()
    y, logd = _spline(xg, params, bound)
    (grad,) = torch.autograd.grad(y.sum(), xg)
    np.testing.assert_allclose(logd.exp().detach().numpy(), fd.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad.numpy(), logd.exp().detach().numpy(), rtol=1e-12)


def test_gradcheck_inputs_and_parameters_both_directions():
    params = _params(4, 1.0, seed=4, n=6).requires_grad_()
    x = torch.linspace(-3.6, 3.6, 6, dtype=torch.float64).requires_grad_()
    for inverse in (False, True):
        fn = lambda a, p: rational_quadratic_spline(a, p, 3.0, inverse)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, params), fast_mode=True)


@pytest.mark.parametrize("seed", range(5))
def test_monotone_on_a_dense_grid(seed):
    params = _params(8, 3.0, seed=10 + seed, n=4)
    x = torch.linspace(-4, 4, 20001, dtype=torch.float64)
    y, logd = rational_quadratic_spline(x[:, None], params, 3.0)
    assert torch.all(y.diff(dim=0) > 0)
    assert torch.all(torch.isfinite(logd))


def test_continuity_of_value_and_slope_at_knots_and_bound():
    bound = 3.0
    params = _params(8, 2.0, seed=5)
    xs, _, _ = spline_parts(params, bound)
    eps = 1e-9
    for knot in xs.tolist():
        pts = torch.tensor([knot - eps, knot, knot + eps], dtype=torch.float64)
        y, logd = _spline(pts, params, bound)
        slope = logd.exp()
        assert abs(y[2] - y[0]) <= 3 * eps * slope.max()
        np.testing.assert_allclose(slope.numpy(), slope[1].item(), rtol=1e-6)
    # At +-bound the slope is 1 on both sides and the value is +-bound.
    y, logd = _spline(torch.tensor([-bound, bound], dtype=torch.float64), params, bound)
    np.testing.assert_allclose(y.numpy(), [-bound, bound], atol=1e-15)
    np.testing.assert_allclose(logd.numpy(), 0.0, atol=1e-12)


@pytest.mark.parametrize("k,bound", [(2, 1.0), (8, 3.0), (12, 4.0)])
def test_inverse_round_trip_float64(k, bound):
    params = _params(k, 2.0, seed=20 + k)
    x = _grid(params, bound, n=1001)
    y, ladj = _spline(x, params, bound)
    x2, ildj = _spline(y, params, bound, inverse=True)
    np.testing.assert_allclose(x2.numpy(), x.numpy(), atol=1e-10, rtol=0)
    np.testing.assert_allclose(ildj.numpy(), -ladj.numpy(), atol=1e-9)
    # The other way round, over a grid holding the y-knots.
    y = _grid(params, bound, n=1001)
    y2, _ = _spline(_spline(y, params, bound, inverse=True)[0], params, bound)
    np.testing.assert_allclose(y2.numpy(), y.numpy(), atol=1e-10, rtol=0)


def test_inverse_round_trip_and_finiteness_float32():
    bound = 3.0
    params = _params(8, 1.0, seed=30).float()
    x = _grid(params, bound, n=1001).float()
    for forward_first in (True, False):
        xg = x.clone().requires_grad_()
        pg = params.clone().requires_grad_()
        a, la = _spline(xg, pg, bound, inverse=not forward_first)
        b, lb = _spline(a, pg, bound, inverse=forward_first)
        assert torch.all(torch.isfinite(a)) and torch.all(torch.isfinite(la))
        np.testing.assert_allclose(b.detach().numpy(), x.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(lb.detach().numpy(), -la.detach().numpy(), atol=1e-3)
        (b.sum() + la.sum() + lb.sum()).backward()
        assert torch.all(torch.isfinite(xg.grad)) and torch.all(torch.isfinite(pg.grad))


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 20.0), (torch.float32, 5.0), (torch.float32, 20.0)])
def test_inverse_is_accurate_for_extreme_bins(dtype, scale):
    """Bins with slopes from 1e-3 to 1e2: forward(inverse(y)) is y up to the forward's conditioning.

    Near the top of a strongly curved bin the root from the lower knot cancels; the
    implementation then solves from the upper knot instead.
    """
    g = torch.Generator().manual_seed(7)
    params = (scale * torch.randn(100, 23, generator=g, dtype=torch.float64)).to(dtype)
    xs, ys, _ = spline_parts(params, 3.0)
    y = torch.cat([8 * torch.rand(100, 40, generator=g, dtype=torch.float64).to(dtype) - 4, xs, ys], -1)
    p = params[:, None, :].expand(*y.shape, 23)
    x, ildj = rational_quadratic_spline(y, p, 3.0, inverse=True)
    y2, ladj = rational_quadratic_spline(x, p, 3.0)
    eps = torch.finfo(dtype).eps
    scale_err = eps * (1 + y.abs()) + eps * (1 + x.abs()) * ladj.exp()
    assert torch.all(torch.isfinite(x)) and torch.all(torch.isfinite(ildj))
    assert torch.all((y2 - y).abs() <= 50 * scale_err)


# --- layers --------------------------------------------------------------------------
def _perturb(module, scale=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _jacobian(fn, x):
    return torch.autograd.functional.jacobian(lambda v: fn(v)[0], x)


def _coupling_params(layer, xa):
    """The spline parameters ``(..., dim - split, 3K - 1)`` a coupling gives its moved half:
    its MLP's output read parameter-major (``3K - 1`` blocks of ``dim - split``)."""
    out = layer.conditioner(xa)
    return out.unflatten(-1, (layer.transformer.num_params, layer.dim - layer.split)).transpose(-1, -2)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_spline_coupling(dim):
    layer = _perturb(Coupling(dim, RationalQuadraticSpline(count_bins=5, bound=2.0), (16,))).double()
    split = dim // 2
    x = 2 * torch.randn(7, dim, dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x)
    assert torch.equal(y[:, :split], x[:, :split])
    # The moved half is the reference spline with the MLP's parameters.
    params = _coupling_params(layer, x[:, :split])
    for n in range(7):
        for i in range(dim - split):
            ref = ref_spline(x[n, split + i].item(), params[n, i].tolist(), 2.0)
            assert abs(y[n, split + i].item() - ref[0]) < 1e-12
    x2, ildj = layer.inverse_and_ladj(y)
    np.testing.assert_allclose(x2.detach().numpy(), x.numpy(), atol=1e-10)
    np.testing.assert_allclose(ildj.detach().numpy(), -ladj.detach().numpy(), atol=1e-10)
    jac = _jacobian(layer.call_and_ladj, x[0])
    assert torch.all(jac[:split, split:] == 0)
    np.testing.assert_allclose(torch.linalg.slogdet(jac)[1].item(), ladj[0].item(), atol=1e-10)


def test_spline_autoregressive_is_triangular_and_inverts_exactly():
    dim = 5
    layer = _perturb(MaskedAutoregressive(dim, RationalQuadraticSpline(count_bins=6, bound=2.5), (32, 32))).double()
    assert layer.autoregressive and torch.equal(layer.get_permutation(), torch.arange(dim))
    x = 1.5 * torch.randn(dim, dtype=torch.float64)
    jac = _jacobian(layer.call_and_ladj, x)
    assert torch.all(torch.triu(jac, 1) == 0)
    assert torch.tril(jac, -1).abs().max() > 1e-6
    ladj = layer.call_and_ladj(x)[1]
    np.testing.assert_allclose(torch.diagonal(jac).log().sum().item(), ladj.item(), atol=1e-12)
    # Exact sequential inverse, with exact derivatives through every pass.
    xb = 1.5 * torch.randn(4, 3, dim, dtype=torch.float64)
    y, ladj = layer.call_and_ladj(xb)
    x2, ildj = layer.inverse_and_ladj(y)
    np.testing.assert_allclose(x2.detach().numpy(), xb.numpy(), atol=1e-10)
    np.testing.assert_allclose(ildj.detach().numpy(), -ladj.detach().numpy(), atol=1e-10)
    y0 = layer.call_and_ladj(x)[0].detach()
    inv_jac = _jacobian(layer.inverse_and_ladj, y0)
    np.testing.assert_allclose(inv_jac.numpy(), torch.linalg.inv(jac).numpy(), atol=1e-10)
    # Parameter gradients of the inverse flow (no in-place writes break the graph).
    x2, ildj = layer.inverse_and_ladj(y0)
    (x2.sum() + ildj).backward()
    assert all(p.grad is not None and torch.all(torch.isfinite(p.grad)) for p in layer.parameters())


def test_autoregressive_inverse_gradcheck():
    layer = _perturb(MaskedAutoregressive(3, RationalQuadraticSpline(count_bins=3, bound=2.0), (8,))).double()
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer.inverse_and_ladj(v), (y,), fast_mode=True)


def test_fresh_layers_are_the_identity():
    x = torch.randn(6, 4, dtype=torch.float64) * 4
    for layer in (
        Coupling(4, RationalQuadraticSpline(), (8,)),
        MaskedAutoregressive(4, RationalQuadraticSpline(), (8,)),
    ):
        y, ladj = layer.double().call_and_ladj(x)
        np.testing.assert_allclose(y.detach().numpy(), x.numpy(), atol=1e-12)
        np.testing.assert_allclose(ladj.detach().numpy(), 0.0, atol=1e-12)


# --- the builder and its options -----------------------------------------------------
@pytest.mark.parametrize("conditioner,cls", [("coupling", Coupling), ("autoregressive", MaskedAutoregressive)])
@pytest.mark.parametrize("count_bins,bound", [(1, 3.0), (4, 1.0), (10, 5.0)])
def test_builder_options(conditioner, cls, count_bins, bound):
    torch.manual_seed(0)
    flow = pf.build_flow(
        "nsf",
        3,
        num_layers=3,
        hidden_dims=(8,),
        count_bins=count_bins,
        bound=bound,
        conditioner=conditioner,
        permutation="random",
        activation="tanh",
    ).double()
    layers = [p for p in flow.parts if isinstance(p, cls)]
    assert len(layers) == 3 and len(flow.parts) == 5
    assert all(type(l.transformer) is RationalQuadraticSpline for l in layers)
    assert all(l.transformer.count_bins == count_bins and l.transformer.bound == bound for l in layers)
    assert all(l.reads == "input" for l in layers if cls is MaskedAutoregressive)
    _perturb(flow, 0.5)
    x = torch.randn(5, 3, dtype=torch.float64) * bound
    y, ladj = flow.call_and_ladj(x)
    x2, ildj = flow.inverse_and_ladj(y)
    np.testing.assert_allclose(x2.detach().numpy(), x.numpy(), atol=1e-9)
    np.testing.assert_allclose(ildj.detach().numpy(), -ladj.detach().numpy(), atol=1e-9)


def test_builder_rejects_bad_options():
    for bad in ({"conditioner": "mask"}, {"count_bins": 0}, {"bound": -1.0}):
        with pytest.raises(ValueError):
            pf.build_flow("nsf", 2, **bad)


def test_float32_flow_at_extreme_inputs():
    for conditioner in ("coupling", "autoregressive"):
        flow = _perturb(pf.build_flow("nsf", 2, hidden_dims=(8,), conditioner=conditioner), 1.0)
        x = torch.tensor([[-30.0, 30.0], [30.0, -30.0], [3.0, -3.0], [0.0, 0.0]], requires_grad=True)
        y, ladj = flow.call_and_ladj(x)
        x2, ildj = flow.inverse_and_ladj(y)
        assert torch.all(torch.isfinite(y)) and torch.all(torch.isfinite(ladj))
        np.testing.assert_allclose(x2.detach().numpy(), x.detach().numpy(), atol=1e-4)
        (y.sum() + ladj.sum() + x2.sum() + ildj.sum()).backward()
        assert torch.all(torch.isfinite(x.grad))
