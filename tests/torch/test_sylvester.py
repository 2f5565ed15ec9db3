"""Sylvester flows and Householder reflections against independent references."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import pyroflows.torch as pf
from pyroflows.torch.transforms import ElementwiseAffine, Householder, Sylvester

from tests.torch.helpers import param_grad_check


@pytest.fixture(autouse=True)
def _float64():
    # Every tensor made in these tests is float64; the default is restored for other files.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _np(t):
    return t.detach().numpy()


def _layer(dim, variant="orthogonal", num_vectors=None, reverse=False, scale=0.5, seed=0):
    torch.manual_seed(seed)
    layer = Sylvester(dim, variant, num_vectors, reverse=reverse).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def _reflection(v):
    v = np.asarray(v, dtype=np.float64)
    return np.eye(len(v)) - 2.0 * np.outer(v, v) / (v @ v)


def _reference_q(layer):
    """Q built from the raw parameters with scipy / explicit reflection matrices."""
    dim, m = layer.dim, layer.num_vectors
    if layer.variant == "orthogonal":
        upper = np.triu(_np(layer.skew), 1)
        return scipy.linalg.expm(upper - upper.T)[:, :m]
    if layer.variant == "householder":
        q = np.eye(dim)
        for v in _np(layer.vectors):
            q = q @ _reflection(v)
        return q
    eye = np.eye(dim)
    return eye[:, ::-1] if layer.reverse else eye


def _reference(layer, xs):
    """van den Berg et al. (2018), eq. (9)-(13): y = z + Q R h(R~ Q^T z + b), with explicit loops."""
    q = _reference_q(layer)
    m = layer.num_vectors
    r = np.triu(_np(layer.r_offdiag), 1) + np.diag(np.tanh(_np(layer.raw_r_diag)))
    rt = np.triu(_np(layer.r_tilde_offdiag), 1) + np.diag(np.tanh(_np(layer.raw_r_tilde_diag)))
    b = _np(layer.bias)
    ys, ladjs = [], []
    for x in np.asarray(xs):
        v = [sum(q[k, i] * x[k] for k in range(layer.dim)) for i in range(m)]
        pre = [sum(rt[i, j] * v[j] for j in range(i, m)) + b[i] for i in range(m)]
        h = [math.tanh(p) for p in pre]
        rh = [sum(r[i, j] * h[j] for j in range(i, m)) for i in range(m)]
        ys.append(x + q @ np.array(rh))
        ladjs.append(sum(math.log(abs(1 + r[i, i] * rt[i, i] * (1 - h[i] ** 2))) for i in range(m)))
    return np.array(ys), np.array(ladjs)


def _fit(config, dim):
    """``config`` with num_vectors capped at ``dim``."""
    if "num_vectors" in config:
        config = dict(config, num_vectors=min(config["num_vectors"], dim))
    return config


CONFIGS = [
    pytest.param(dict(variant="orthogonal"), id="orthogonal"),
    pytest.param(dict(variant="orthogonal", num_vectors=2), id="orthogonal-M2"),
    pytest.param(dict(variant="orthogonal", num_vectors=1), id="orthogonal-M1"),
    pytest.param(dict(variant="householder"), id="householder"),
    pytest.param(dict(variant="triangular"), id="triangular"),
    pytest.param(dict(variant="triangular", reverse=True), id="triangular-reverse"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dim", [2, 5])
def test_sylvester_matches_paper_formula(config, dim):
    layer = _layer(dim, seed=dim, **config)
    np.testing.assert_allclose(_np(layer.q()), _reference_q(layer), atol=1e-12)
    x = 2 * torch.randn(5, dim)
    y, ladj = layer.call_and_ladj(x)
    ref_y, ref_ladj = _reference(layer, _np(x))
    np.testing.assert_allclose(_np(y), ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(ladj), ref_ladj, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dim", [1, 3, 6])
def test_sylvester_log_det_is_the_dense_jacobian_log_det(config, dim):
    config = _fit(config, dim)
    layer = _layer(dim, scale=1.0, seed=10 + dim, **config)
    for i in range(3):
        x = 2 * torch.randn(dim)
        jac = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x)
        sign, logdet = torch.linalg.slogdet(jac)
        assert sign > 0  # continuous deformation of the identity: the determinant stays positive
        assert layer.call_and_ladj(x)[1].item() == pytest.approx(logdet.item(), abs=1e-10)


@pytest.mark.parametrize("config", CONFIGS)
def test_q_has_orthonormal_columns_for_any_parameters(config):
    for seed in range(5):
        layer = _layer(5, scale=5.0, seed=seed, **config)
        q = layer.q()
        assert q.shape == (5, layer.num_vectors)
        np.testing.assert_allclose(_np(q.T @ q), np.eye(layer.num_vectors), atol=1e-12)


def test_diagonal_constraint_holds_for_random_raw_parameters():
    torch.manual_seed(0)
    zs = torch.linspace(-6, 6, 121).unsqueeze(-1)
    for scale in (0.1, 1.0, 5.0, 50.0, 500.0):
        layer = Sylvester(4, "triangular").double()
        with torch.no_grad():
            layer.raw_r_diag.copy_(scale * torch.randn(4))
            layer.raw_r_tilde_diag.copy_(scale * torch.randn(4))
        r, rt, log_one_plus_d = layer.triangles()
        d = torch.diagonal(r) * torch.diagonal(rt)
        assert bool((d > -1).all()) or scale >= 50  # tanh rounds to +-1 for huge raw values...
        assert torch.isfinite(log_one_plus_d).all()  # ...but log(1 + d) is computed without rounding
        p, q = layer.raw_r_diag.detach(), layer.raw_r_tilde_diag.detach()
        exact = torch.log(torch.cosh(p + q) / (torch.cosh(p) * torch.cosh(q)))
        if scale <= 5:
            np.testing.assert_allclose(_np(log_one_plus_d), _np(torch.log1p(d)), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(_np(log_one_plus_d), _np(exact), rtol=1e-9, atol=1e-12)
            assert bool((1 + d * (1 - torch.tanh(zs) ** 2) > 0).all())
        x = 30 * torch.randn(6, 4)
        y, ladj = layer.call_and_ladj(x)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_sylvester_numerical_inverse_meets_its_tolerance(config, dim):
    config = _fit(config, dim)
    assert Sylvester.numerical_inverse and Sylvester.inverse_tol == 1e-10
    layer = _layer(dim, scale=1.0, seed=20 + dim, **config)
    x = torch.cat([3 * torch.randn(40, dim), torch.full((1, dim), 30.0), torch.full((1, dim), -30.0)])
    y, ladj = layer.call_and_ladj(x)
    x2, ildj = layer.inverse_and_ladj(y)
    assert (x2 - x).abs().max().item() <= 1e-10 * (1 + x.abs().max().item())
    assert (ildj + ladj).abs().max().item() <= 1e-10
    # The triangular system Q^T y = v + R tanh(R~ v + b) is solved: check its residual.
    q = layer.q()
    r, rt, _ = layer.triangles()
    v = x2 @ q
    resid = (v + torch.tanh(v @ rt.T + layer.bias) @ r.T - y @ q).abs().max().item()
    assert resid <= 1e-12 * (1 + y.abs().max().item())


def test_fewer_vectors_than_dimensions():
    dim, m = 5, 2
    layer = _layer(dim, num_vectors=m, scale=1.0, seed=3)
    assert layer.num_vectors == m and layer.q().shape == (dim, m)
    x = torch.randn(10, dim)
    y, ladj = layer.call_and_ladj(x)
    q = _np(layer.q())
    # The map moves x only inside span(Q): the orthogonal complement passes through.
    complement = np.eye(dim) - q @ q.T
    np.testing.assert_allclose(_np(y) @ complement, _np(x) @ complement, atol=1e-12)
    x2, _ = layer.inverse_and_ladj(y)
    np.testing.assert_allclose(_np(x2), _np(x), atol=1e-10)
    # Sylvester's identity: det(I_d + Q R D R~ Q^T) = det(I_M + D R~ R), an M x M determinant.
    jac = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x[0])
    assert ladj[0].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)
    assert np.linalg.matrix_rank(_np(jac) - np.eye(dim), tol=1e-10) <= m


def test_sylvester_float32_inverse():
    layer = _layer(4, seed=4).float()
    x = torch.randn(20, 4, dtype=torch.float32)
    y, ladj = layer.call_and_ladj(x)
    x2, ildj = layer.inverse_and_ladj(y)
    assert x2.dtype == torch.float32 and ildj.dtype == torch.float32
    assert (x2 - x).abs().max().item() < 2e-5
    assert (ildj + ladj).abs().max().item() < 2e-5


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[5]])
def test_sylvester_inverse_has_exact_first_derivatives(config):
    dim = 3
    layer = _layer(dim, seed=5, **config)
    y = torch.randn(dim)
    x = layer.inverse_and_ladj(y)[0].detach()
    jac_inv = torch.autograd.functional.jacobian(lambda v: layer.inverse_and_ladj(v)[0], y)
    jac_fwd = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x)
    np.testing.assert_allclose(_np(jac_inv @ jac_fwd), np.eye(dim), atol=1e-9)
    # Parameter gradients through the sequential root finds, against central differences.
    param_grad_check(layer, layer.inverse_and_ladj, torch.randn(4, dim), per_param=9)


@pytest.mark.parametrize("reverse", [False, True])
def test_triangular_variant_jacobian_structure(reverse):
    layer = _layer(5, "triangular", reverse=reverse, seed=6)
    jac = _np(torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], torch.randn(5)))
    # Q = I: upper triangular; Q = reversal: lower triangular. Both triangles are used across a stack.
    zero, used = (np.tril(jac, -1), np.triu(jac, 1)) if not reverse else (np.triu(jac, 1), np.tril(jac, -1))
    assert np.abs(zero).max() < 1e-14 and np.abs(used).max() > 1e-3


def test_variant_and_num_vectors_validation():
    with pytest.raises(ValueError, match="must lie in"):
        Sylvester(3, "orthogonal", num_vectors=4)
    for variant in ("householder", "triangular"):
        with pytest.raises(ValueError, match="'orthogonal' variant"):
            Sylvester(3, variant, num_vectors=2)
    with pytest.raises(ValueError, match="not one of"):
        Sylvester(3, "diagonal")
    assert Sylvester(3).num_vectors == 3 and Sylvester(3, "householder").num_vectors == 3
    with pytest.raises(ValueError, match="'orthogonal' variant"):
        pf.build_flow("sylvester", 3, variant="householder", num_vectors=2)
    with pytest.raises(ValueError, match="must lie in"):
        pf.build_flow("sylvester", 3, num_vectors=5)
    with pytest.raises(ValueError, match="not one of"):
        pf.build_flow("sylvester", 3, variant="qr")


@pytest.mark.parametrize(
    "options",
    [{}, {"variant": "orthogonal", "num_vectors": 2}, {"variant": "householder"}, {"variant": "triangular"}],
    ids=["default", "orthogonal-M2", "householder", "triangular"],
)
def test_sylvester_builder_options(options):
    torch.manual_seed(7)
    flow = pf.build_flow("sylvester", 4, num_layers=3, **options).double()
    assert len(flow.parts) == 3 and all(type(p) is Sylvester for p in flow.parts)
    assert {p.variant for p in flow.parts} == {options.get("variant", "orthogonal")}
    if options.get("variant") == "triangular":
        assert [p.reverse for p in flow.parts] == [False, True, False]
    assert all(p.num_vectors == options.get("num_vectors", 4) for p in flow.parts)
    x = torch.randn(6, 4)
    y, ladj = flow.call_and_ladj(x)
    x2, ildj = flow.inverse_and_ladj(y)
    np.testing.assert_allclose(_np(x2), _np(x), atol=1e-9)
    np.testing.assert_allclose(_np(ildj), -_np(ladj), atol=1e-9)
    jac = torch.autograd.functional.jacobian(lambda v: flow.call_and_ladj(v)[0], x[0])
    assert ladj[0].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-9)
    assert len(pf.build_flow("sylvester", 4, **options).parts) == 4


def test_fresh_sylvester_is_a_mild_map():
    torch.manual_seed(0)
    flow = pf.build_flow("sylvester", 6).double()
    x = torch.randn(200, 6)
    y, ladj = flow.call_and_ladj(x)
    assert 0 < (y - x).abs().max().item() < 1.5
    assert ladj.abs().max().item() < 1.0


# --------------------------------------------------------------------------- Householder
def test_householder_reflections_are_orthogonal():
    torch.manual_seed(8)
    layer = Householder(4, num_reflections=3).double()
    expected = np.eye(4)
    for v in _np(layer.vectors):
        h = _reflection(v)
        np.testing.assert_allclose(h, h.T, atol=1e-15)
        np.testing.assert_allclose(h @ h.T, np.eye(4), atol=1e-14)
        assert np.linalg.det(h) == pytest.approx(-1.0)
        expected = h @ expected  # y = H_K ... H_1 x
    np.testing.assert_allclose(_np(layer.matrix()), expected, atol=1e-13)
    x = torch.randn(7, 4)
    y, ladj = layer.call_and_ladj(x)
    np.testing.assert_allclose(_np(y), _np(x) @ expected.T, atol=1e-13)
    assert torch.all(ladj == 0) and ladj.shape == (7,)
    jac = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x[0])
    assert torch.linalg.slogdet(jac)[1].item() == pytest.approx(0.0, abs=1e-13)
    x2, ildj = layer.inverse_and_ladj(y)
    np.testing.assert_allclose(_np(x2), _np(x), atol=1e-13)
    assert torch.all(ildj == 0)


def test_householder_zero_vector_is_the_identity():
    layer = Householder(3, num_reflections=2).double()
    with torch.no_grad():
        layer.vectors.zero_()
    x = torch.randn(4, 3, requires_grad=True)
    y, _ = layer.call_and_ladj(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.isfinite(layer.vectors.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("num_reflections", [None, 1, 7])
def test_householder_builder(num_reflections):
    torch.manual_seed(9)
    flow = pf.build_flow("householder", 3, num_layers=2, num_reflections=num_reflections).double()
    assert type(flow.parts[0]) is ElementwiseAffine
    assert [type(p) for p in flow.parts[1:]] == [Householder, Householder]
    assert all(p.num_reflections == (num_reflections or 3) for p in flow.parts[1:])
    with torch.no_grad():
        flow.parts[0].loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
        flow.parts[0].unconstrained_log_scale.copy_(torch.tensor([0.3, -0.7, 1.1]))
    # The whole flow is the affine map y = Q (loc + diag(exp(s)) x), Q = the product of the layers' matrices.
    q = flow.parts[2].matrix() @ flow.parts[1].matrix()
    scale = torch.exp(flow.parts[0].log_scale())
    x = torch.randn(5, 3)
    y, ladj = flow.call_and_ladj(x)
    np.testing.assert_allclose(_np(y), _np((flow.parts[0].loc + scale * x) @ q.T), atol=1e-12)
    np.testing.assert_allclose(_np(ladj), np.full(5, _np(torch.log(scale).sum())), atol=1e-12)
    # Its covariance under N(0, I) noise, Q diag(scale^2) Q^T, is a full (non-diagonal) matrix.
    cov = _np(q @ torch.diag(scale**2) @ q.T)
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 1e-2
    x2, _ = flow.inverse_and_ladj(y)
    np.testing.assert_allclose(_np(x2), _np(x), atol=1e-12)


def test_householder_default_build():
    flow = pf.build_flow("householder", 4)
    assert len(flow.parts) == 2 and flow.parts[1].num_reflections == 4
