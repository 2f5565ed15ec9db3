"""Autoregressive layers (IAF, MAF, NAF, BNAF) against independent references.

IAF, MAF and NAF are ``MaskedAutoregressive`` layers with the ``Affine`` and the
``DeepSigmoid`` transformers; BNAF is its own layer.

References: the affine formulas re-implemented naively from MADE outputs, the deep
sigmoidal transformer evaluated directly in float64 (scipy) with finite-difference
derivatives, autodiff Jacobians, and gradcheck of the numerical inverses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import expit, logit

from pyroflows.torch.nn import MADE
from pyroflows.torch.transforms import (
    Affine,
    BlockNeuralAutoregressive,
    DeepSigmoid,
    MaskedAutoregressive,
)


def _perturb(module, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- MADE ---------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 3, 6])
@pytest.mark.parametrize("hidden_dims", [(8,), (16, 16)])
@pytest.mark.parametrize("num_params", [1, 3])
def test_made_outputs_depend_on_strictly_earlier_inputs(dim, hidden_dims, num_params):
    torch.manual_seed(0)
    made = _perturb(MADE(dim, hidden_dims, num_params, "tanh").double(), 0.5)
    x = _randn(dim, seed=1)
    jac = torch.autograd.functional.jacobian(made, x)  # (dim, num_params, dim)
    assert jac.shape == (dim, num_params, dim)
    for i in range(dim):
        assert torch.all(jac[i, :, i:] == 0), (i, jac[i])
        if i > 0:  # hidden widths >= dim - 1 give every output its whole prefix
            assert torch.all(jac[i, :, :i].abs().amax(0) > 0), (i, jac[i])


# --- IAF / MAF ----------------------------------------------------------------------


def _affine(dim, reads, bound=2.0, scale=0.7, seed=0):
    torch.manual_seed(seed)
    layer = MaskedAutoregressive(dim, Affine(bound), (16, 16), "tanh", reads=reads).double()
    return _perturb(layer, scale, seed)


def _shift_log_scale(layer, v, bound):
    out = layer.made(v)
    return out[..., 0], bound * torch.tanh(out[..., 1] / bound)


def _parallel_pass(reads, seed, dim=4, bound=2.0):
    """``(layer, v, out, logdet, m, s)``: an affine MADE layer reading ``reads``, a point ``v``,
    the layer's one-pass direction at ``v`` (IAF's forward, MAF's inverse), and MADE's shift
    and log-scale at ``v``."""
    layer = _affine(dim, reads, bound)
    v = _randn(5, dim, seed=seed, scale=2.0)
    out, logdet = (layer.call_and_ladj if reads == "input" else layer.inverse_and_ladj)(v)
    return (layer, v, out, logdet, *_shift_log_scale(layer, v, bound))


def test_iaf_forward_and_inverse_match_naive_formulas():
    dim, bound = 4, 2.0
    layer, x, y, ladj, m, s = _parallel_pass("input", seed=2)
    torch.testing.assert_close(y, x * torch.exp(s) + m)
    torch.testing.assert_close(ladj, s.sum(-1))
    # Naive inverse: fill x one coordinate at a time, running MADE on the partial solution.
    x_naive = torch.zeros_like(y)
    for i in range(dim):
        m, s = _shift_log_scale(layer, x_naive, bound)
        x_naive[:, i] = (y[:, i] - m[:, i]) * torch.exp(-s[:, i])
    x2, ildj = layer.inverse_and_ladj(y)
    torch.testing.assert_close(x2, x_naive)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ildj, -ladj)


def test_maf_forward_and_inverse_match_naive_formulas():
    bound = 2.0
    layer, y, x, ildj, m, s = _parallel_pass("output", seed=3)
    torch.testing.assert_close(x, (y - m) * torch.exp(-s))
    torch.testing.assert_close(ildj, -s.sum(-1))
    # The forward output must satisfy the defining relation with MADE run on it.
    y2, ladj = layer.call_and_ladj(x)
    m2, s2 = _shift_log_scale(layer, y2, bound)
    torch.testing.assert_close(y2, x * torch.exp(s2) + m2)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(ladj, s2.sum(-1))


@pytest.mark.parametrize("dim", [1, 5])
def test_parallel_directions_are_one_made_pass_and_sequential_ones_dim_passes(dim):
    x = _randn(3, dim, seed=4)
    iaf, maf = _affine(dim, "input"), _affine(dim, "output")
    naf = _perturb(MaskedAutoregressive(dim, DeepSigmoid(3), (8,)).double(), 0.1)
    for layer, parallel in [(iaf, "forward"), (maf, "inverse"), (naf, "forward")]:
        calls = _count_calls(layer.made)
        layer.call_and_ladj(x)
        assert len(calls) == (1 if parallel == "forward" else dim)
        calls.clear()
        layer.inverse_and_ladj(x)
        assert len(calls) == (1 if parallel == "inverse" else dim)


def test_log_scale_bound_holds_for_any_parameters():
    dim, bound = 3, 1.5
    for reads in ("input", "output"):
        layer = _affine(dim, reads, bound, scale=30.0)
        x = _randn(20, dim, seed=5, scale=3.0)
        _, s = _shift_log_scale(layer, x, bound)
        assert s.abs().max() <= bound
        y, ladj = layer.call_and_ladj(x)
        x2, ildj = layer.inverse_and_ladj(y)
        assert torch.isfinite(y).all() and torch.isfinite(x2).all()
        assert (ladj.abs() <= dim * bound).all()
        torch.testing.assert_close(ildj, -ladj)


def test_fresh_affine_layers_are_the_identity():
    for reads in ("input", "output"):
        layer = MaskedAutoregressive(3, Affine(), (8,), reads=reads).double()
        x = _randn(4, 3, seed=6)
        y, ladj = layer.call_and_ladj(x)
        torch.testing.assert_close(y, x)
        assert torch.all(ladj == 0)


@pytest.mark.parametrize("reads", ["input", "output"])
def test_sequential_direction_has_exact_gradients(reads):
    layer = _affine(3, reads, scale=0.5)
    y = _randn(2, 3, seed=7)
    fn = layer.inverse_and_ladj if reads == "input" else layer.call_and_ladj
    assert torch.autograd.gradcheck(fn, (y.requires_grad_(),))


# --- NAF ----------------------------------------------------------------------------


def _naf(dim=3, k=4, scale=0.5, seed=0):
    torch.manual_seed(seed)
    return _perturb(MaskedAutoregressive(dim, DeepSigmoid(hidden_units=k), (16,)).double(), scale, seed)


def _dsf_reference(x, a, b, w):
    """logit(sum_k w_k sigmoid(a_k x + b_k)), directly in float64 numpy."""
    return logit(np.sum(w * expit(a * x[..., None] + b), -1))


def test_naf_matches_direct_float64_formula_and_finite_differences():
    layer = _naf()
    x = _randn(6, 3, seed=8, scale=2.0)
    y, ladj = layer.call_and_ladj(x)
    a, b, log_w = (t.detach().numpy() for t in layer.transformer.unpack(layer.made(x)))
    w = np.exp(log_w)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-12)
    assert (a > 0).all()
    xn = x.numpy()
    np.testing.assert_allclose(y.detach().numpy(), _dsf_reference(xn, a, b, w), rtol=1e-10, atol=1e-10)
    # Parameters of coordinate i depend on x_<i only, so dy_i/dx_i is a 1-D derivative.
    h = 1e-5
    fd = (_dsf_reference(xn + h, a, b, w) - _dsf_reference(xn - h, a, b, w)) / (2 * h)
    assert (fd > 0).all()
    np.testing.assert_allclose(ladj.detach().numpy(), np.log(fd).sum(-1), rtol=1e-7, atol=1e-7)


def test_naf_is_finite_and_accurate_at_extreme_inputs_in_float32():
    layer = _naf(dim=2)
    grid = torch.tensor([[-30.0, 30.0], [30.0, -30.0], [-8.0, 8.0], [0.0, 0.0]], dtype=torch.float64)
    y64, ladj64 = layer.call_and_ladj(grid)
    layer32 = layer.float()
    y32, ladj32 = layer32.call_and_ladj(grid.float())
    assert torch.isfinite(y32).all() and torch.isfinite(ladj32).all()
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ladj32.double(), ladj64, rtol=1e-4, atol=1e-4)
    x32, ildj32 = layer32.inverse_and_ladj(y32)
    assert torch.isfinite(x32).all() and torch.isfinite(ildj32).all()
    # Judged in y: where the map is flat, x is ill-conditioned in float32 whatever the solver.
    y_back, _ = layer32.double().call_and_ladj(x32.double())
    torch.testing.assert_close(y_back, y64, rtol=1e-4, atol=1e-4)


def test_naf_transformer_is_increasing_and_onto_for_random_parameters():
    gen = torch.Generator().manual_seed(9)
    for k in (1, 3, 8):
        raw = 3.0 * torch.randn(5, 1, 3 * k, generator=gen, dtype=torch.float64)
        tau = DeepSigmoid(hidden_units=k)
        a, b, log_w = tau.unpack(raw)  # the fixed offsets are added by unpack
        u = torch.linspace(-60, 60, 2001, dtype=torch.float64)[:, None]
        y, log_d = tau.evaluate(u, a[:, 0], b[:, 0], log_w[:, 0])
        assert (y.diff(dim=0) > 0).all() and torch.isfinite(log_d).all()
        far = torch.tensor([[-1e4], [1e4]], dtype=torch.float64)
        y_far, _ = tau.evaluate(far, a[:, 0], b[:, 0], log_w[:, 0])
        assert (y_far[0] < -5).all() and (y_far[1] > 5).all()


def test_naf_fresh_layer_is_a_smooth_near_identity_with_distinct_units():
    layer = MaskedAutoregressive(3, DeepSigmoid(hidden_units=8), (8,)).double()
    x = torch.linspace(-5, 5, 41, dtype=torch.float64)[:, None].expand(41, 3)
    a, b, log_w = layer.transformer.unpack(layer.made(x))
    torch.testing.assert_close(a, torch.ones_like(a))
    torch.testing.assert_close(log_w.exp(), torch.full_like(log_w, 1 / 8))
    assert len(torch.unique(b[0, 0])) == 8  # identical units would never separate
    y, ladj = layer.call_and_ladj(x)
    assert (y - x).abs().max() < 0.25
    assert torch.all(ladj / 3 < 0) and torch.all(ladj / 3 > math.log(0.8))
    # One unit at zero output is exactly the identity.
    single = MaskedAutoregressive(2, DeepSigmoid(hidden_units=1), (4,)).double()
    torch.testing.assert_close(single(x[:, :2]), x[:, :2])


# --- BNAF ---------------------------------------------------------------------------


def _bnaf(dim, hidden_factors, scale=0.3, seed=0):
    torch.manual_seed(seed)
    return _perturb(BlockNeuralAutoregressive(dim, hidden_factors).double(), scale, seed)


@pytest.mark.parametrize("hidden_factors", [(2,), (4, 4), (3, 5, 2)])
@pytest.mark.parametrize("dim", [1, 3, 4])
def test_bnaf_log_det_matches_autodiff_jacobian(dim, hidden_factors):
    layer = _bnaf(dim, hidden_factors)
    for seed in range(3):
        x = _randn(dim, seed=10 + seed, scale=2.0)
        jac = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x)
        assert torch.all(torch.triu(jac, 1) == 0)
        assert torch.all(torch.diagonal(jac) > 0)
        if dim > 1:
            assert torch.tril(jac, -1).abs().max() > 1e-6
        _, ladj = layer.call_and_ladj(x)
        torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)


def test_bnaf_weights_are_block_triangular_and_weight_normalised():
    dim, a, b = 3, 2, 4
    layer = _bnaf(dim, (a, b)).layers[1]  # maps dim*a -> dim*b units
    w, log_diag = layer.weights()
    for i in range(dim):
        rows = slice(i * b, (i + 1) * b)
        torch.testing.assert_close(w[rows, i * a : (i + 1) * a], log_diag[i].exp())
        assert (log_diag[i].exp() > 0).all()
        assert torch.all(w[rows, (i + 1) * a :] == 0)
    # Row norms equal the soft-clamped gains.
    gains = 6.0 * torch.tanh(layer.raw_log_gain / 6.0)
    torch.testing.assert_close(w.norm(dim=-1), gains.exp())
    # Huge raw weights neither overflow nor lose positivity of the diagonal blocks.
    with torch.no_grad():
        layer.raw.mul_(1e3)
    w, log_diag = layer.weights()
    assert torch.isfinite(w).all() and torch.isfinite(log_diag).all()


def test_bnaf_is_onto_and_finite_at_extreme_inputs():
    layer = _bnaf(2, (4, 4), scale=0.5)
    for dtype in (torch.float64, torch.float32):
        layer = layer.to(dtype)
        grid = torch.tensor([[-30.0, 30.0], [30.0, -30.0], [-1e3, 1e3], [0.0, 0.0]], dtype=dtype)
        y, ladj = layer.call_and_ladj(grid)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        assert y[2, 0] < -100 and y[2, 1] > 100  # the gated residual keeps it onto R
        x, ildj = layer.inverse_and_ladj(grid)
        assert torch.isfinite(x).all() and torch.isfinite(ildj).all()


# --- numerical inverses -------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda s: _naf(4, 5, scale=s), lambda s: _bnaf(4, (3, 3), scale=s)], ids=["naf", "bnaf"]
)
def test_numerical_inverse_round_trip_at_its_tolerance(make):
    layer = make(0.5)
    assert layer.numerical_inverse and layer.inverse_tol <= 1e-10
    x = _randn(40, 4, seed=11, scale=3.0)
    y, ladj = layer.call_and_ladj(x)
    x2, ildj = layer.inverse_and_ladj(y)
    torch.testing.assert_close(x2, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ildj, -ladj, rtol=1e-10, atol=1e-10)
    # float32: a milder layer, since flat stretches of a strongly perturbed one amplify
    # float32 rounding of y by 1/slope (conditioning, not solver error).
    layer32 = make(0.1).float()
    y32, ladj32 = layer32.call_and_ladj(x.float())
    x32, ildj32 = layer32.inverse_and_ladj(y32)
    torch.testing.assert_close(x32, x.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ildj32, -ladj32, rtol=1e-4, atol=1e-4)


class _Inverse(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, y):
        return self.layer.inverse_and_ladj(y)


@pytest.mark.parametrize(
    "make,param",
    [
        (lambda: _naf(3, 3), "made.net.2.bias"),
        (lambda: _naf(3, 3), "made.net.0.bias"),
        (lambda: _bnaf(3, (2,)), "layers.0.raw"),
        (lambda: _bnaf(3, (2,)), "gate"),
    ],
    ids=["naf-out", "naf-in", "bnaf-raw", "bnaf-gate"],
)
def test_numerical_inverse_gradients_are_exact(make, param):
    layer = make()
    wrapper = _Inverse(layer)
    name = "layer." + param
    p0 = dict(wrapper.named_parameters())[name].detach().clone()
    y0 = _randn(2, 3, seed=12)

    def fn(p, y):
        return torch.func.functional_call(wrapper, {name: p}, (y,))

    # Fast mode checks random projections u^T J v against finite differences: every
    # entry would cost two inverse solves per parameter.
    assert torch.autograd.gradcheck(fn, (p0.requires_grad_(), y0.requires_grad_()), fast_mode=True)
    # The Jacobian w.r.t. the input entry by entry.
    assert torch.autograd.gradcheck(layer.inverse_and_ladj, (y0,))


# builders, options and their errors: tests/test_autoregressive.py
