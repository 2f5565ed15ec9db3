"""JAX Sylvester flows and Householder reflections: the paper's formulas, every variant's
inverse and its gradients, the matrix exponential, traced size independent of dim, torch
files with non-default options, option handling."""

import math

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.transforms import ElementwiseAffine, Householder, Sylvester  # noqa: E402
from pyroflows.jax.transforms.base import astype  # noqa: E402


def _perturbed(module, scale=0.5, seed=0):
    """``module`` in float64 with every float array moved by ``scale`` * N(0, 1)."""
    rng = np.random.default_rng(seed)
    params, static = eqx.partition(astype(module, jnp.float64), eqx.is_inexact_array)
    params = jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape), params)
    return eqx.combine(params, static)


def _layer(dim, variant="orthogonal", num_vectors=None, reverse=False, scale=0.5, seed=0):
    layer = Sylvester(dim, variant, num_vectors, reverse, key=jax.random.key(seed))
    return _perturbed(layer, scale, seed)


@eqx.filter_jit
def _forward(layer, x):
    return jax.vmap(layer.call_and_ladj)(x)


@eqx.filter_jit
def _inverse(layer, y):
    return jax.vmap(layer.inverse_and_ladj)(y)


def _reflection(v):
    v = np.asarray(v, dtype=np.float64)
    return np.eye(len(v)) - 2.0 * np.outer(v, v) / (v @ v)


def _reference(layer, xs):
    """van den Berg et al. (2018), eq. (9)-(13): y = z + Q R h(R~ Q^T z + b), loops in numpy."""
    dim, m = layer.dim, layer.num_vectors
    if layer.variant == "orthogonal":
        upper = np.triu(np.asarray(layer.skew), 1)
        q = scipy.linalg.expm(upper - upper.T)[:, :m]
    elif layer.variant == "householder":
        q = np.eye(dim)
        for v in np.asarray(layer.vectors):
            q = q @ _reflection(v)
    else:
        q = np.eye(dim)[:, ::-1] if layer.reverse else np.eye(dim)
    r = np.triu(np.asarray(layer.r_offdiag), 1) + np.diag(np.tanh(np.asarray(layer.raw_r_diag)))
    rt = np.triu(np.asarray(layer.r_tilde_offdiag), 1) + np.diag(np.tanh(np.asarray(layer.raw_r_tilde_diag)))
    b = np.asarray(layer.bias)
    ys, ladjs = [], []
    for x in np.asarray(xs):
        v = [sum(q[k, i] * x[k] for k in range(dim)) for i in range(m)]
        h = [math.tanh(sum(rt[i, j] * v[j] for j in range(i, m)) + b[i]) for i in range(m)]
        ys.append(x + q @ np.array([sum(r[i, j] * h[j] for j in range(i, m)) for i in range(m)]))
        ladjs.append(sum(math.log(abs(1 + r[i, i] * rt[i, i] * (1 - h[i] ** 2))) for i in range(m)))
    return q, np.array(ys), np.array(ladjs)


# The default (orthogonal, M = dim) is checked against torch by the parity suite.
CONFIGS = [
    pytest.param(dict(variant="orthogonal", num_vectors=2), id="orthogonal-M2"),
    pytest.param(dict(variant="householder"), id="householder"),
    pytest.param(dict(variant="triangular", reverse=True), id="triangular-reverse"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_sylvester_matches_paper_formula_and_inverts(config):
    dim = 3
    layer = _layer(dim, scale=1.0, seed=1, **config)
    x = 2 * np.random.default_rng(2).standard_normal((6, dim))
    x = np.concatenate([x, np.full((1, dim), 30.0), np.full((1, dim), -30.0)])
    q, ref_y, ref_ladj = _reference(layer, x)
    y, ladj = _forward(layer, jnp.asarray(x))
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj, ref_ladj, rtol=1e-10, atol=1e-12)
    x2, ildj = _inverse(layer, y)
    np.testing.assert_allclose(x2, x, atol=1e-10 * (1 + np.abs(x).max()))
    np.testing.assert_allclose(ildj, -ladj, atol=1e-10)
    if layer.num_vectors < dim:
        # The map moves x only inside span(Q); the inverse restores the complement too.
        complement = np.eye(dim) - q @ q.T
        np.testing.assert_allclose(np.asarray(y) @ complement, x @ complement, atol=1e-12)


def test_sylvester_inverse_gradients_match_finite_differences():
    # Reverse mode through the fori_loop of sequential root finds (and the matrix
    # exponential), under jit and vmap, against central differences in every parameter
    # and in the input.
    layer = _layer(3, num_vectors=2, seed=3)
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    y = jnp.asarray(np.random.default_rng(4).standard_normal((4, 3)))
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((4, 4)))

    @jax.jit
    def objective(params, y):
        x, ildj = jax.vmap(eqx.combine(params, static).inverse_and_ladj)(y)
        return jnp.sum(weights[:, :3] * x) + jnp.sum(weights[:, 3] * ildj)

    check_grads(objective, (params, y), order=1, modes=("rev",), eps=1e-5, atol=1e-6, rtol=1e-6)


def test_matrix_exponential_matches_scipy():
    from pyroflows.jax.transforms.sylvester import expm

    rng = np.random.default_rng(6)
    for scale in (0.0, 0.3, 3.0, 30.0):
        a = np.triu(scale * rng.standard_normal((5, 5)), 1)
        a = a - a.T
        e = np.asarray(jax.jit(expm)(jnp.asarray(a)))
        np.testing.assert_allclose(e, scipy.linalg.expm(a), atol=1e-12)
        np.testing.assert_allclose(e.T @ e, np.eye(5), atol=1e-12)
    # Its derivative is the Frechet derivative of exp.
    direction = rng.standard_normal((5, 5))
    tangent = jax.jit(lambda a, e: jax.jvp(expm, (a,), (e,))[1])(jnp.asarray(a), jnp.asarray(direction))
    np.testing.assert_allclose(tangent, scipy.linalg.expm_frechet(a, direction)[1], atol=1e-10)


@pytest.mark.parametrize("variant", ["orthogonal", "householder", "triangular"])
def test_traced_program_does_not_grow_with_dim(variant):
    # The coordinate solve and the reflections are lax loops: the traced inverse (and
    # forward) has the same number of top-level operations for dim 3 and dim 40.
    def size(dim, direction):
        layer = Sylvester(dim, variant, key=jax.random.key(0))
        fn = layer.inverse_and_ladj if direction == "inverse" else layer.call_and_ladj
        return len(jax.make_jaxpr(fn)(jnp.zeros(dim)).jaxpr.eqns)

    for direction in ("forward", "inverse"):
        assert size(3, direction) == size(40, direction)


def test_torch_file_of_the_triangular_variant_loads_with_the_same_numbers(tmp_path):
    # The parity suite covers the default options; here the alternating triangular
    # variant, whose float masks and fixed Q arrive from torch where JAX builds booleans.
    options = {"variant": "triangular"}
    torch = pytest.importorskip("torch")
    import pyroflows.torch as pt

    torch.manual_seed(11)
    tflow = pt.build_flow("sylvester", 3, num_layers=2, **options).double()
    with torch.no_grad():
        for p in tflow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    pt.save_flow(tflow, tmp_path / "t.npz")
    jflow = pf.load_flow(tmp_path / "t.npz")
    x = np.random.default_rng(12).standard_normal((5, 3))
    with torch.no_grad():
        ty, tladj = tflow.call_and_ladj(torch.as_tensor(x))
        tx, tildj = tflow.inverse_and_ladj(ty)
    t = jflow.to_transform()
    jy, jladj = t.call_with_intermediates(jnp.asarray(x))
    jx, jildj = t.inverse_and_ladj(jnp.asarray(ty.numpy()))
    for a, b in ((jy, ty), (jladj, tladj), (jx, tx), (jildj, tildj)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-9, rtol=1e-9)
    # And back: the JAX flow's (boolean) constants load into torch's float buffers.
    pf.save_flow(jflow, tmp_path / "j.npz")
    back = pt.load_flow(tmp_path / "j.npz")
    with torch.no_grad():
        np.testing.assert_allclose(back.call_and_ladj(torch.as_tensor(x))[0].numpy(), ty.numpy(), atol=1e-12)


# --------------------------------------------------------------------------- Householder
def test_householder_is_the_product_of_its_reflections():
    layer = _perturbed(Householder(4, num_reflections=3, key=jax.random.key(13)), scale=0.0)
    expected = np.eye(4)
    for v in np.asarray(layer.vectors):
        expected = _reflection(v) @ expected  # y = H_K ... H_1 x
    np.testing.assert_allclose(layer.matrix(), expected, atol=1e-13)
    x = jnp.asarray(np.random.default_rng(14).standard_normal((7, 4)))
    y, ladj = _forward(layer, x)
    np.testing.assert_allclose(y, np.asarray(x) @ expected.T, atol=1e-13)
    assert ladj.shape == (7,) and np.all(np.asarray(ladj) == 0)
    x2, ildj = _inverse(layer, y)
    np.testing.assert_allclose(x2, x, atol=1e-13)
    assert np.all(np.asarray(ildj) == 0)


def test_householder_zero_vector_is_the_identity_with_finite_gradients():
    layer = eqx.tree_at(lambda m: m.vectors, Householder(3, 2, key=jax.random.key(0)), jnp.zeros((2, 3)))
    x = jnp.asarray(np.random.default_rng(15).standard_normal((4, 3)))
    y, _ = _forward(layer, x)
    np.testing.assert_array_equal(y, x)
    g_layer, g_x = jax.jit(jax.grad(lambda m, x: jax.vmap(m.call_and_ladj)(x)[0].sum(), argnums=(0, 1)))(layer, x)
    assert bool(jnp.all(jnp.isfinite(g_layer.vectors))) and bool(jnp.all(jnp.isfinite(g_x)))


def test_householder_builder():
    flow = pf.build_flow("householder", 3, num_layers=2, num_reflections=5, key=jax.random.key(16))
    assert [type(p) for p in flow.parts] == [ElementwiseAffine, Householder, Householder]
    assert all(p.num_reflections == 5 and p.vectors.shape == (5, 3) for p in flow.parts[1:])
    assert not np.allclose(flow.parts[1].vectors, flow.parts[2].vectors)
    assert len(pf.build_flow("householder", 4, key=jax.random.key(0)).parts) == 2
    assert pf.build_flow("householder", 4, key=jax.random.key(0)).parts[1].num_reflections == 4
    with pytest.raises(ValueError, match="positive integer"):
        Householder(3, 0, key=jax.random.key(0))


# --------------------------------------------------------------------------- options
def test_variant_and_num_vectors_validation():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="must lie in"):
        Sylvester(3, "orthogonal", num_vectors=4, key=key)
    for variant in ("householder", "triangular"):
        with pytest.raises(ValueError, match="'orthogonal' variant"):
            Sylvester(3, variant, num_vectors=2, key=key)
    with pytest.raises(ValueError, match="not one of"):
        Sylvester(3, "diagonal", key=key)
    with pytest.raises(ValueError, match="'orthogonal' variant"):
        pf.build_flow("sylvester", 3, variant="householder", num_vectors=2)
    with pytest.raises(ValueError, match="must lie in"):
        pf.build_flow("sylvester", 3, num_vectors=5)
    with pytest.raises(ValueError, match="orthogonal"):
        pf.build_flow("sylvester", 3, variant="qr")


def test_builder_layers_and_constants():
    flow = pf.build_flow("sylvester", 4, num_layers=3, variant="triangular", key=jax.random.key(17))
    assert [p.reverse for p in flow.parts] == [False, True, False]
    np.testing.assert_array_equal(flow.parts[1].q_fixed, np.eye(4, dtype=bool)[:, ::-1])
    for p in flow.parts:
        # Constants are boolean, so NumPyro's eqx_module never registers them as parameters.
        assert p.upper_mask.dtype == jnp.bool_ and p.q_fixed.dtype == jnp.bool_
        assert p.skew is None and p.vectors is None and p.num_vectors == 4
    default = pf.build_flow("sylvester", 4, key=jax.random.key(18))
    assert len(default.parts) == 4 and all(p.variant == "orthogonal" for p in default.parts)
    layer = default.parts[0]
    assert layer.skew_mask.dtype == jnp.bool_ and layer.vectors is None and layer.q_fixed is None
    # The initial scheme: R~ diagonal tanh(1), R small, zero bias, strictly upper off-diagonals.
    np.testing.assert_array_equal(layer.raw_r_tilde_diag, np.ones(4))
    np.testing.assert_array_equal(layer.bias, np.zeros(4))
    assert 0 < float(jnp.abs(layer.raw_r_diag).max()) < 0.5
    for a in (layer.r_offdiag, layer.r_tilde_offdiag, layer.skew):
        np.testing.assert_array_equal(np.tril(np.asarray(a)), 0.0)
        assert float(jnp.abs(a).max()) > 0
    assert not np.allclose(default.parts[0].skew, default.parts[1].skew)
