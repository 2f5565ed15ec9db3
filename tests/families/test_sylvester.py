"""Sylvester flows and Householder reflections against independent references (scipy's
matrix exponential, explicit reflection matrices, the paper's equations in loops), on
every backend."""

import math

import numpy as np
import pytest
import scipy.linalg

from tests.families.checks import check_gradients

DEFAULT = dict(variant="orthogonal")
CONFIGS = [
    pytest.param(DEFAULT, id="orthogonal"),
    pytest.param(dict(variant="orthogonal", num_vectors=2), id="orthogonal-M2"),
    pytest.param(dict(variant="orthogonal", num_vectors=1), id="orthogonal-M1"),
    pytest.param(dict(variant="householder"), id="householder"),
    pytest.param(dict(variant="triangular"), id="triangular"),
    pytest.param(dict(variant="triangular", reverse=True), id="triangular-reverse"),
]
# On JAX every (variant, M, reverse, dim) is a compilation of each function (seconds each
# for the sequential root finds). JAX runs each way of making Q (matrix exponential, with
# M = dim and M < dim; reflections; fixed) at dim 5, the general case, and the default at
# dim 1 too, the degenerate size (M = 1: sizes are variant-independent code). The reversed
# triangular variant differs from the plain one only in the values of its fixed Q (checked
# in test_sylvester_builder_structure and test_triangular_variant_jacobian_structure).
JAX_CONFIGS = ("orthogonal", "orthogonal-M2", "householder", "triangular")


def _config_id(config):
    name = config["variant"]
    if "num_vectors" in config:
        name += f"-M{config['num_vectors']}"
    return name + ("-reverse" if config.get("reverse") else "")


JAX_GRID = pytest.mark.jax_keep(
    lambda config, dim: (dim == 5 and _config_id(config) in JAX_CONFIGS) or (dim == 1 and config is DEFAULT)
)


def _points(shape, seed, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


def _layer(backend, dim, variant="orthogonal", num_vectors=None, reverse=False, scale=0.5, seed=0, dtype="float64"):
    return backend.make("Sylvester", dim, variant, num_vectors, reverse, seed=seed, perturb=scale, dtype=dtype)


def _fit(config, dim):
    """``config`` with num_vectors capped at ``dim``."""
    if "num_vectors" in config:
        config = dict(config, num_vectors=min(config["num_vectors"], dim))
    return config


def _reflection(v):
    v = np.asarray(v, dtype=np.float64)
    return np.eye(len(v)) - 2.0 * np.outer(v, v) / (v @ v)


def _reference_q(layer, p):
    """Q built from the raw parameters with scipy / explicit reflection matrices."""
    dim, m = layer.dim, layer.num_vectors
    if layer.variant == "orthogonal":
        upper = np.triu(p["skew"], 1)
        return scipy.linalg.expm(upper - upper.T)[:, :m]
    if layer.variant == "householder":
        q = np.eye(dim)
        for v in p["vectors"]:
            q = q @ _reflection(v)
        return q
    eye = np.eye(dim)
    return eye[:, ::-1] if layer.reverse else eye


def _reference(layer, p, xs):
    """van den Berg et al. (2018), eq. (9)-(13): y = z + Q R h(R~ Q^T z + b), with explicit loops."""
    q = _reference_q(layer, p)
    m = layer.num_vectors
    r = np.triu(p["r_offdiag"], 1) + np.diag(np.tanh(p["raw_r_diag"]))
    rt = np.triu(p["r_tilde_offdiag"], 1) + np.diag(np.tanh(p["raw_r_tilde_diag"]))
    b = p["bias"]
    ys, ladjs = [], []
    for x in np.asarray(xs):
        v = [sum(q[k, i] * x[k] for k in range(layer.dim)) for i in range(m)]
        pre = [sum(rt[i, j] * v[j] for j in range(i, m)) + b[i] for i in range(m)]
        h = [math.tanh(p) for p in pre]
        rh = [sum(r[i, j] * h[j] for j in range(i, m)) for i in range(m)]
        ys.append(x + q @ np.array(rh))
        ladjs.append(sum(math.log(abs(1 + r[i, i] * rt[i, i] * (1 - h[i] ** 2))) for i in range(m)))
    return np.array(ys), np.array(ladjs)


@JAX_GRID
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dim", [2, 5])
def test_sylvester_matches_paper_formula_and_inverts(backend, config, dim):
    layer = _layer(backend, dim, scale=1.0, seed=dim, **_fit(config, dim))
    p = backend.params(layer)
    q = _reference_q(layer, p)
    np.testing.assert_allclose(backend.method(layer, "q"), q, atol=1e-12)
    x = np.concatenate([_points((5, dim), seed=dim, scale=2.0), np.full((1, dim), 30.0), np.full((1, dim), -30.0)])
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    ref_y, ref_ladj = _reference(layer, p, x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj, ref_ladj, rtol=1e-10, atol=1e-12)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    np.testing.assert_allclose(x2, x, atol=1e-10 * (1 + np.abs(x).max()))
    np.testing.assert_allclose(ildj, -ladj, atol=1e-10)
    if layer.num_vectors < dim:
        # The map moves x only inside span(Q); the inverse restores the complement too.
        complement = np.eye(dim) - q @ q.T
        np.testing.assert_allclose(y @ complement, x @ complement, atol=1e-12)


@JAX_GRID
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_sylvester_log_det_is_the_dense_jacobian_log_det(backend, config, dim):
    layer = _layer(backend, dim, scale=1.0, seed=10 + dim, **_fit(config, dim))
    for i in range(3):
        x = _points(dim, seed=i, scale=2.0)
        sign, logdet = np.linalg.slogdet(backend.layer_jacobian_of(layer, "call_and_ladj", x))
        assert sign > 0  # continuous deformation of the identity: the determinant stays positive
        assert backend.apply(layer, "call_and_ladj", x)[1] == pytest.approx(logdet, abs=1e-10)


@pytest.mark.jax_keep(lambda config: _config_id(config) in JAX_CONFIGS)
@pytest.mark.parametrize("config", CONFIGS)
def test_q_has_orthonormal_columns_for_any_parameters(backend, config):
    for seed in range(5):
        layer = _layer(backend, 5, scale=5.0, seed=seed, **config)
        q = backend.method(layer, "q")
        assert q.shape == (5, layer.num_vectors)
        np.testing.assert_allclose(q.T @ q, np.eye(layer.num_vectors), atol=1e-12)


def test_diagonal_constraint_holds_for_random_raw_parameters(backend):
    rng = np.random.default_rng(0)
    zs = np.linspace(-6, 6, 121)[:, None]
    layer = _layer(backend, 5, "triangular")
    for scale in (0.1, 1.0, 5.0, 50.0, 500.0):
        p, q = scale * rng.standard_normal(5), scale * rng.standard_normal(5)
        layer = backend.with_arrays(layer, {"raw_r_diag": p, "raw_r_tilde_diag": q})
        r, rt, log_one_plus_d = backend.method(layer, "triangles")
        d = np.diagonal(r) * np.diagonal(rt)
        assert np.all(d > -1) or scale >= 50  # tanh rounds to +-1 for huge raw values...
        assert np.all(np.isfinite(log_one_plus_d))  # ...but log(1 + d) is computed without rounding
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # used for scale <= 5 only
            exact = np.log(np.cosh(p + q) / (np.cosh(p) * np.cosh(q)))
        if scale <= 5:
            np.testing.assert_allclose(log_one_plus_d, np.log1p(d), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(log_one_plus_d, exact, rtol=1e-9, atol=1e-12)
            assert np.all(1 + d * (1 - np.tanh(zs) ** 2) > 0)
        y, ladj = backend.apply(layer, "call_and_ladj", 30 * rng.standard_normal((6, 5)))
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(ladj))


@JAX_GRID
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_sylvester_numerical_inverse_meets_its_tolerance(backend, config, dim):
    sylvester = backend.transforms().Sylvester
    assert sylvester.numerical_inverse and sylvester.inverse_tol == 1e-10
    layer = _layer(backend, dim, scale=1.0, seed=20 + dim, **_fit(config, dim))
    x = np.concatenate([_points((40, dim), seed=dim, scale=3.0), np.full((1, dim), 30.0), np.full((1, dim), -30.0)])
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    assert np.abs(x2 - x).max() <= 1e-10 * (1 + np.abs(x).max())
    assert np.abs(ildj + ladj).max() <= 1e-10
    # The triangular system Q^T y = v + R tanh(R~ v + b) is solved: check its residual.
    q = backend.method(layer, "q")
    r, rt, _ = backend.method(layer, "triangles")
    v = x2 @ q
    resid = np.abs(v + np.tanh(v @ rt.T + backend.params(layer)["bias"]) @ r.T - y @ q).max()
    assert resid <= 1e-12 * (1 + np.abs(y).max())


def test_fewer_vectors_than_dimensions(backend):
    dim, m = 5, 2
    layer = _layer(backend, dim, num_vectors=m, scale=1.0, seed=3)
    q = backend.method(layer, "q")
    assert layer.num_vectors == m and q.shape == (dim, m)
    x = _points((10, dim), seed=3)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    # The map moves x only inside span(Q): the orthogonal complement passes through.
    complement = np.eye(dim) - q @ q.T
    np.testing.assert_allclose(y @ complement, x @ complement, atol=1e-12)
    x2, _ = backend.apply(layer, "inverse_and_ladj", y)
    np.testing.assert_allclose(x2, x, atol=1e-10)
    # Sylvester's identity: det(I_d + Q R D R~ Q^T) = det(I_M + D R~ R), an M x M determinant.
    jac = backend.layer_jacobian_of(layer, "call_and_ladj", x[0])
    assert ladj[0] == pytest.approx(np.linalg.slogdet(jac)[1], abs=1e-10)
    assert np.linalg.matrix_rank(jac - np.eye(dim), tol=1e-10) <= m


def test_sylvester_float32_inverse(backend):
    layer = _layer(backend, 5, seed=4, dtype="float32")
    x = _points((20, 5), seed=4).astype(np.float32)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    assert x2.dtype == ildj.dtype == np.float32
    assert np.abs(x2 - x).max() < 2e-5
    assert np.abs(ildj + ladj).max() < 2e-5


# On JAX, whose differentiated root finds take the longest to compile, the variant with a
# matrix exponential and M < dim (the same solve serves every variant).
@pytest.mark.jax_keep(lambda config: config.get("num_vectors") == 2)
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[5]])
def test_sylvester_inverse_has_exact_first_derivatives(backend, config):
    dim = 5
    layer = _layer(backend, dim, seed=5, **config)
    y = _points(dim, seed=5)
    x = backend.apply(layer, "inverse_and_ladj", y)[0]
    jac_inv = backend.layer_jacobian_of(layer, "inverse_and_ladj", y)
    jac_fwd = backend.layer_jacobian_of(layer, "call_and_ladj", x)
    np.testing.assert_allclose(jac_inv @ jac_fwd, np.eye(dim), atol=1e-9)
    # Gradients through the sequential root finds (and the matrix exponential) in the
    # parameters and the input, against central differences.
    check_gradients(backend, layer, "inverse_and_ladj", _points((4, dim), seed=6), per_param=9)


@pytest.mark.parametrize("reverse", [False, True])
def test_triangular_variant_jacobian_structure(backend, reverse):
    layer = _layer(backend, 5, "triangular", reverse=reverse, seed=6)
    jac = backend.layer_jacobian_of(layer, "call_and_ladj", _points(5, seed=7))
    # Q = I: upper triangular; Q = reversal: lower triangular. Both triangles are used across a stack.
    zero, used = (np.tril(jac, -1), np.triu(jac, 1)) if not reverse else (np.triu(jac, 1), np.tril(jac, -1))
    assert np.abs(zero).max() < 1e-14 and np.abs(used).max() > 1e-3


def test_variant_and_num_vectors_validation(backend):
    def sylvester(*args):
        return backend.make("Sylvester", *args)

    with pytest.raises(ValueError, match="must lie in"):
        sylvester(3, "orthogonal", 4)
    for variant in ("householder", "triangular"):
        with pytest.raises(ValueError, match="'orthogonal' variant"):
            sylvester(3, variant, 2)
    with pytest.raises(ValueError, match="not one of"):
        sylvester(3, "diagonal")
    assert sylvester(3).num_vectors == 3 and sylvester(3, "householder").num_vectors == 3
    with pytest.raises(ValueError, match="'orthogonal' variant"):
        backend.pf.build_flow("sylvester", 3, variant="householder", num_vectors=2)
    with pytest.raises(ValueError, match="must lie in"):
        backend.pf.build_flow("sylvester", 3, num_vectors=5)
    with pytest.raises(ValueError, match="not one of.*orthogonal"):
        backend.pf.build_flow("sylvester", 3, variant="qr")


BUILDER_OPTIONS = [
    pytest.param({}, id="default"),
    pytest.param({"variant": "orthogonal", "num_vectors": 2}, id="orthogonal-M2"),
    pytest.param({"variant": "householder"}, id="householder"),
    pytest.param({"variant": "triangular"}, id="triangular"),
]


@pytest.mark.parametrize("options", BUILDER_OPTIONS)
def test_sylvester_builder_structure(backend, options):
    flow = backend.pf.build_flow("sylvester", 4, num_layers=3, **options, **backend.key_kwargs(7))
    assert len(flow.parts) == 3 and all(type(p) is backend.transforms().Sylvester for p in flow.parts)
    assert {p.variant for p in flow.parts} == {options.get("variant", "orthogonal")}
    if options.get("variant") == "triangular":
        assert [p.reverse for p in flow.parts] == [False, True, False]
        np.testing.assert_array_equal(backend.arrays(flow)["1.q_fixed"], np.eye(4)[:, ::-1])
    assert all(p.num_vectors == options.get("num_vectors", 4) for p in flow.parts)
    assert len(backend.pf.build_flow("sylvester", 4, **options).parts) == 4


# Torch only: on JAX each option set is a compilation of the whole flow. The layers of every
# variant are checked above on both backends, the structure of the stacks just above, and
# tests/parity checks that a stack of triangular layers gives torch's numbers on JAX.
@pytest.mark.jax_keep(lambda options: False)
@pytest.mark.parametrize("options", BUILDER_OPTIONS)
def test_sylvester_builder_round_trip(backend, options):
    flow = backend.build_flow("sylvester", 4, num_layers=3, seed=7, **options)
    x = _points((6, 4), seed=8)
    y, ladj = backend.forward(flow, x)
    x2, ildj = backend.inverse(flow, y)
    np.testing.assert_allclose(x2, x, atol=1e-9)
    np.testing.assert_allclose(ildj, -ladj, atol=1e-9)
    jac, ladj0 = backend.jacobian(flow, x[0])
    assert ladj0 == pytest.approx(np.linalg.slogdet(jac)[1], abs=1e-9)


def test_fresh_sylvester_is_a_mild_map_with_the_documented_initial_scheme(backend):
    flow = backend.build_flow("sylvester", 6, seed=0)
    x = _points((200, 6), seed=9)
    parts = [backend.forward(flow, x[i : i + 16]) for i in range(0, len(x), 16)]  # 16 rows: one compilation
    y, ladj = (np.concatenate(a) for a in zip(*parts))
    assert 0 < np.abs(y - x).max() < 1.5
    assert np.abs(ladj).max() < 1.0
    arrays = backend.arrays(flow)
    assert len(flow.parts) == 4 and all(p.variant == "orthogonal" for p in flow.parts)
    # R~ diagonal tanh(1), R small, zero bias, strictly upper off-diagonals, random frames.
    np.testing.assert_array_equal(arrays["0.raw_r_tilde_diag"], np.ones(6))
    np.testing.assert_array_equal(arrays["0.bias"], np.zeros(6))
    assert 0 < np.abs(arrays["0.raw_r_diag"]).max() < 0.5
    for name in ("r_offdiag", "r_tilde_offdiag", "skew"):
        np.testing.assert_array_equal(np.tril(arrays[f"0.{name}"]), 0.0)
        assert np.abs(arrays[f"0.{name}"]).max() > 0
    assert not np.allclose(arrays["0.skew"], arrays["1.skew"])


# --------------------------------------------------------------------------- Householder
def test_householder_is_the_product_of_its_reflections(backend):
    layer = backend.make("Householder", 4, 3, seed=8)
    expected = np.eye(4)
    for v in backend.params(layer)["vectors"]:
        h = _reflection(v)
        np.testing.assert_allclose(h, h.T, atol=1e-15)
        np.testing.assert_allclose(h @ h.T, np.eye(4), atol=1e-14)
        assert np.linalg.det(h) == pytest.approx(-1.0)
        expected = h @ expected  # y = H_K ... H_1 x
    np.testing.assert_allclose(backend.method(layer, "matrix"), expected, atol=1e-13)
    x = _points((7, 4), seed=10)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    np.testing.assert_allclose(y, x @ expected.T, atol=1e-13)
    assert ladj.shape == (7,) and np.all(ladj == 0)
    jac = backend.layer_jacobian_of(layer, "call_and_ladj", x[0])
    assert np.linalg.slogdet(jac)[1] == pytest.approx(0.0, abs=1e-13)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    np.testing.assert_allclose(x2, x, atol=1e-13)
    assert np.all(ildj == 0)


def test_householder_zero_vector_is_the_identity_with_finite_gradients(backend):
    layer = backend.with_arrays(backend.make("Householder", 3, 2), {"vectors": np.zeros((2, 3))})
    x = _points((4, 3), seed=11)
    y, _ = backend.apply(layer, "call_and_ladj", x)
    np.testing.assert_array_equal(y, x)
    _, grads, grad_x = backend.value_and_grads(layer, "call_and_ladj", x, np.ones((4, 4)))
    assert np.all(np.isfinite(grads["vectors"])) and np.all(np.isfinite(grad_x))


# On JAX each option is a compilation of the whole flow: it runs the one with more
# reflections than dimensions (the layers themselves are checked above).
@pytest.mark.jax_keep(lambda num_reflections: num_reflections == 7)
@pytest.mark.parametrize("num_reflections", [None, 1, 7])
def test_householder_builder(backend, num_reflections):
    flow = backend.build_flow("householder", 3, num_layers=2, num_reflections=num_reflections, seed=9)
    t = backend.transforms()
    assert [type(p) for p in flow.parts] == [t.ElementwiseAffine, t.Householder, t.Householder]
    assert all(p.num_reflections == (num_reflections or 3) for p in flow.parts[1:])
    arrays = backend.arrays(flow)
    assert arrays["1.vectors"].shape == ((num_reflections or 3), 3)
    assert not np.allclose(arrays["1.vectors"], arrays["2.vectors"])
    flow = backend.with_arrays(flow, {"0.loc": [0.5, -1.0, 2.0], "0.unconstrained_log_scale": [0.3, -0.7, 1.1]})
    # The whole flow is the affine map y = Q (loc + diag(exp(s)) x), Q = the product of the layers' matrices.
    q = backend.method(flow.parts[2], "matrix") @ backend.method(flow.parts[1], "matrix")
    scale = np.exp(backend.method(flow.parts[0], "log_scale"))
    x = _points((5, 3), seed=12)
    y, ladj = backend.forward(flow, x)
    np.testing.assert_allclose(y, (np.array([0.5, -1.0, 2.0]) + scale * x) @ q.T, atol=1e-12)
    np.testing.assert_allclose(ladj, np.full(5, np.log(scale).sum()), atol=1e-12)
    # Its covariance under N(0, I) noise, Q diag(scale^2) Q^T, is a full (non-diagonal) matrix.
    cov = q @ np.diag(scale**2) @ q.T
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 1e-2
    x2, _ = backend.inverse(flow, y)
    np.testing.assert_allclose(x2, x, atol=1e-12)


def test_householder_default_build_and_bad_reflections(backend):
    flow = backend.pf.build_flow("householder", 4)
    assert len(flow.parts) == 2 and flow.parts[1].num_reflections == 4
    with pytest.raises(ValueError, match="positive integer"):
        backend.make("Householder", 3, 0)
