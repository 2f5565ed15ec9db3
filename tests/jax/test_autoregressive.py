"""JAX autoregressive layers (IAF, MAF, NAF, BNAF) against independent references.

IAF, MAF and NAF are ``MaskedAutoregressive`` layers with the ``Affine`` and the
``DeepSigmoid`` transformers; BNAF is its own layer.

References: the affine formulas re-implemented naively from MADE outputs, the deep
sigmoidal transformer evaluated directly in float64 (scipy) with finite differences,
the jaxpr (how many MADE passes, which loops), autodiff Jacobians, ``check_grads`` of
the numerical inverses, and the torch layers' names (parity of numbers: tests/parity).
"""

import functools

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.test_util import check_grads  # noqa: E402
from scipy.special import expit, logit  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.io import named_arrays  # noqa: E402
from pyroflows.jax.transforms import (  # noqa: E402
    Affine,
    BlockNeuralAutoregressive,
    DeepSigmoid,
    MaskedAutoregressive,
)
from tests.jax.helpers import perturbed  # noqa: E402


def _key(seed=0):
    return jax.random.key(seed)


def _randn(*shape, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


@eqx.filter_jit
def _forward(layer, x):
    return jax.vmap(layer.call_and_ladj)(x)


@eqx.filter_jit
def _inverse(layer, y):
    return jax.vmap(layer.inverse_and_ladj)(y)


@eqx.filter_jit
def _made(layer, v):
    return jax.vmap(layer.made)(v)


def _primitive_counts(jaxpr, counts=None):
    """Primitive names in ``jaxpr``, sub-jaxprs (loop bodies) included, each body counted once."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitive_counts(inner, counts)
    return counts


# --- IAF / MAF ----------------------------------------------------------------------


def _affine(dim, reads, bound=2.0, scale=0.7, seed=0, hidden=(16, 16)):
    layer = MaskedAutoregressive(dim, Affine(bound), hidden, "tanh", reads=reads, key=_key(seed))
    return perturbed(layer, scale, seed)


def _shift_log_scale(layer, v, bound):
    out = _made(layer, v)
    return out[..., 0], bound * jnp.tanh(out[..., 1] / bound)


def _made_at(reads, seed, bound=2.0):
    """An affine layer reading ``reads``, five points, and its MADE's shift and log-scale there."""
    layer = _affine(4, reads, bound)
    v = _randn(5, 4, seed=seed, scale=2.0)
    return (layer, v, *_shift_log_scale(layer, v, bound))


def test_maf_inverse_is_the_naive_formula_on_one_made_pass():
    bound = 2.0
    layer, y, m, s = _made_at("output", seed=3)
    x, ildj = _inverse(layer, y)
    np.testing.assert_allclose(x, (y - m) * np.exp(-s), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ildj, -s.sum(-1), rtol=1e-12, atol=1e-12)
    # The sequential forward satisfies the defining relation with MADE run on its output.
    y2, ladj = _forward(layer, x)
    m2, s2 = _shift_log_scale(layer, y2, bound)
    np.testing.assert_allclose(y2, x * np.exp(s2) + m2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y2, y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ladj, s2.sum(-1), rtol=1e-12, atol=1e-12)


def test_iaf_forward_formula_and_naive_sequential_inverse():
    dim, bound = 4, 2.0
    layer, x, m, s = _made_at("input", seed=2)
    y, ladj = _forward(layer, x)
    np.testing.assert_allclose(y, x * np.exp(s) + m, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj, s.sum(-1), rtol=1e-12, atol=1e-12)
    # Naive inverse: fill x one coordinate at a time, running MADE on the partial solution.
    x_naive = np.zeros_like(np.asarray(y))
    for i in range(dim):
        m, s = _shift_log_scale(layer, jnp.asarray(x_naive), bound)
        x_naive[:, i] = (y[:, i] - m[:, i]) * np.exp(-s[:, i])
    x2, ildj = _inverse(layer, y)
    np.testing.assert_allclose(x2, x_naive, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x2, x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ildj, -ladj, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["iaf", "maf", "naf"])
def test_parallel_direction_is_one_made_pass_and_the_other_a_scan_over_coordinates(kind):
    dim, hidden = 5, (16, 16)
    made_layers = len(hidden) + 1  # one dot_general per masked linear layer
    if kind == "naf":
        layer = MaskedAutoregressive(dim, DeepSigmoid(3), hidden, key=_key())
    else:
        layer = MaskedAutoregressive(dim, Affine(), hidden, reads={"iaf": "input", "maf": "output"}[kind], key=_key())
    parallel, sequential = layer.call_and_ladj, layer.inverse_and_ladj
    if kind == "maf":
        parallel, sequential = sequential, parallel
    v = jnp.zeros(dim)
    counts = _primitive_counts(jax.make_jaxpr(parallel)(v).jaxpr)
    assert counts.get("dot_general") == made_layers
    assert not {"scan", "while"} & set(counts)
    # The sequential direction: one scan of length dim whose body holds one MADE pass.
    jaxpr = jax.make_jaxpr(sequential)(v).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == dim
    assert _primitive_counts(jaxpr).get("dot_general") == made_layers
    assert "dot_general" not in {e.primitive.name for e in jaxpr.eqns}


def test_maf_density_path_has_no_sequential_loop():
    flow = pf.build_flow("maf", 8, num_layers=5, hidden_dims=(32, 32), key=_key())
    counts = _primitive_counts(jax.make_jaxpr(flow.inverse_and_ladj)(jnp.zeros(8)).jaxpr)
    assert "while" not in counts
    jaxpr = jax.make_jaxpr(flow.inverse_and_ladj)(jnp.zeros(8)).jaxpr
    # Scans here only stack identical layers (Flow), never run over the 8 coordinates.
    assert all(e.params["length"] < 8 for e in jaxpr.eqns if e.primitive.name == "scan")


@pytest.mark.parametrize("reads", ["input", "output"])
def test_sequential_direction_has_exact_gradients(reads):
    layer = _affine(3, reads, scale=0.5)
    fn = layer.inverse_and_ladj if reads == "input" else layer.call_and_ladj
    check_grads(jax.jit(lambda v: fn(v)), (_randn(3, seed=7),), order=1, modes=("rev",), eps=1e-5, atol=1e-7, rtol=1e-7)


def test_log_scale_bound_holds_for_any_parameters():
    dim, bound = 4, 2.0  # the layers of the tests above, so their compiled functions are reused
    for reads in ("input", "output"):
        layer = _affine(dim, reads, bound, scale=30.0)
        x = _randn(20, dim, seed=5, scale=3.0)
        _, s = _shift_log_scale(layer, x, bound)
        assert np.abs(s).max() <= bound
        y, ladj = _forward(layer, x)
        x2, ildj = _inverse(layer, y)
        assert np.isfinite(y).all() and np.isfinite(x2).all()
        assert (np.abs(ladj) <= dim * bound).all()
        np.testing.assert_allclose(ildj, -ladj, rtol=1e-12, atol=1e-12)


# --- NAF ----------------------------------------------------------------------------


def _naf(dim=3, k=4, scale=0.5, seed=0):
    return perturbed(MaskedAutoregressive(dim, DeepSigmoid(hidden_units=k), (16,), key=_key(seed)), scale, seed)


def test_naf_matches_direct_float64_formula_and_finite_differences():
    layer = _naf()
    x = _randn(6, 3, seed=8, scale=2.0)
    y, ladj = _forward(layer, x)
    a, b, log_w = (np.asarray(t) for t in jax.jit(jax.vmap(lambda v: layer.transformer.unpack(layer.made(v))))(x))
    w = np.exp(log_w)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-12)
    assert (a > 0).all()
    xn = np.asarray(x)

    def reference(u):  # logit(sum_k w_k sigmoid(a_k u + b_k)), directly
        return logit(np.sum(w * expit(a * u[..., None] + b), -1))

    np.testing.assert_allclose(y, reference(xn), rtol=1e-10, atol=1e-10)
    h = 1e-5
    fd = (reference(xn + h) - reference(xn - h)) / (2 * h)
    assert (fd > 0).all()
    np.testing.assert_allclose(ladj, np.log(fd).sum(-1), rtol=1e-7, atol=1e-7)


def test_naf_offsets_are_derived_from_static_config_not_trainable():
    layer = MaskedAutoregressive(3, DeepSigmoid(hidden_units=8), (8,), key=_key())
    # Only the MADE's weights are arrays; every float array is a torch parameter.
    assert set(named_arrays(layer)) == {f"made.net.{i}.{n}" for i in (0, 2) for n in ("weight", "bias", "mask")}
    x = jnp.asarray(np.broadcast_to(np.linspace(-5, 5, 41)[:, None], (41, 3)))
    a, b, log_w = jax.jit(jax.vmap(lambda v: layer.transformer.unpack(layer.made(v))))(x)
    np.testing.assert_allclose(a, 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.exp(log_w), 1 / 8, rtol=1e-12)
    assert len(np.unique(np.asarray(b[0, 0]))) == 8  # identical units would never separate
    y, ladj = _forward(layer, x)
    assert np.abs(y - x).max() < 0.25
    assert np.all(ladj / 3 < 0) and np.all(ladj / 3 > np.log(0.8))
    # The same numbers torch derives: both add pyroflows.structure.sigmoid_offset in unpack.
    torch = pytest.importorskip("torch")
    torch_tau = pytest.importorskip("pyroflows.torch.transforms.transformers")
    for k in (1, 2, 16):
        ours = DeepSigmoid(hidden_units=k).unpack(jnp.zeros(3 * k))
        theirs = torch_tau.DeepSigmoid(hidden_units=k).unpack(torch.zeros(3 * k, dtype=torch.float64))
        for o, t in zip(ours, theirs):
            np.testing.assert_allclose(np.asarray(o), t.numpy(), rtol=1e-12, atol=1e-15)


def test_naf_transformer_is_increasing_and_onto_for_random_parameters():
    rng = np.random.default_rng(9)
    transformers = {k: DeepSigmoid(hidden_units=k) for k in (1, 8)}

    @functools.partial(jax.jit, static_argnums=0)
    def curve(k, raw, u):
        a, b, log_w = transformers[k].unpack(raw)  # the fixed offsets are added by unpack
        return DeepSigmoid.evaluate(u, a, b, log_w)

    for k in transformers:
        raw = jnp.asarray(3.0 * rng.standard_normal((5, 3 * k)))
        u = np.concatenate([[-1e4], np.linspace(-60, 60, 2001), [1e4]])[:, None]
        y, log_d = curve(k, raw, jnp.asarray(u))
        assert (np.diff(y, axis=0) > 0).all() and np.isfinite(log_d).all()
        assert (y[0] < -5).all() and (y[-1] > 5).all()  # onto R


# --- BNAF ---------------------------------------------------------------------------


def _bnaf(dim, hidden_factors, scale=0.3, seed=0):
    return perturbed(BlockNeuralAutoregressive(dim, hidden_factors, key=_key(seed)), scale, seed)


@pytest.mark.parametrize("dim,hidden_factors", [(1, (2,)), (4, (3, 5, 2))])
def test_bnaf_log_det_matches_autodiff_jacobian(dim, hidden_factors):
    layer = _bnaf(dim, hidden_factors)

    @jax.jit
    def jac_and_ladj(v):
        return jax.jacfwd(lambda u: layer.call_and_ladj(u)[0])(v), layer.call_and_ladj(v)[1]

    for seed in range(3):
        jac, ladj = jac_and_ladj(_randn(dim, seed=10 + seed, scale=2.0))
        jac = np.asarray(jac)
        assert np.all(np.triu(jac, 1) == 0) and np.all(np.diag(jac) > 0)
        if dim > 1:
            assert np.abs(np.tril(jac, -1)).max() > 1e-6
        np.testing.assert_allclose(ladj, np.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)


def test_bnaf_weights_are_block_triangular_and_weight_normalised():
    dim, a, b = 3, 2, 4
    block = _bnaf(dim, (a, b)).layers[1]  # maps dim*a -> dim*b units
    assert block.diag_mask.dtype == jnp.bool_ and block.off_mask.dtype == jnp.bool_
    w, log_diag = eqx.filter_jit(lambda m: m.weights())(block)
    for i in range(dim):
        rows = slice(i * b, (i + 1) * b)
        np.testing.assert_allclose(w[rows, i * a : (i + 1) * a], np.exp(log_diag[i]), rtol=1e-12)
        assert np.all(w[rows, (i + 1) * a :] == 0)
    gains = 6.0 * np.tanh(np.asarray(block.raw_log_gain) / 6.0)
    np.testing.assert_allclose(np.linalg.norm(w, axis=-1), np.exp(gains), rtol=1e-12)
    # Huge raw weights neither overflow nor lose positivity of the diagonal blocks.
    w, log_diag = eqx.filter_jit(lambda m: m.weights())(eqx.tree_at(lambda m: m.raw, block, block.raw * 1e3))
    assert np.isfinite(w).all() and np.isfinite(log_diag).all()


# --- numerical inverses -------------------------------------------------------------


@pytest.mark.parametrize("name", ["naf", "bnaf"])
def test_numerical_inverse_is_exact_to_its_tolerance_with_exact_gradients_under_jit_vmap_grad(name):
    """Round trip at the stated tolerance, then per-example gradients (jit of vmap of
    grad) of a loss through the sequential bisection + implicit-step inverse, w.r.t. every
    parameter and the input, against central finite differences along random directions."""
    dim = 3
    options = {"hidden_dims": (8,), "hidden_units": 3} if name == "naf" else {"hidden_factors": (3,)}
    flow = perturbed(pf.build_flow(name, dim, num_layers=1, key=_key(1), **options), 0.5, seed=2)
    layer = flow.parts[0]
    assert layer.numerical_inverse and layer.inverse_tol <= 1e-10
    params, static = eqx.partition(flow, eqx.is_inexact_array)
    x = _randn(6, dim, seed=3, scale=3.0)
    y, ladj = _forward(flow, x)

    def nll(p, v):  # -log density of one point under N(0, I) pushed through the flow
        x, ildj = eqx.combine(p, static).inverse_and_ladj(v)
        return 0.5 * jnp.sum(x**2) - ildj, (x, ildj)

    # One compiled function serves the round trip, the gradients and the finite differences.
    value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(nll, argnums=(0, 1), has_aux=True), in_axes=(None, 0)))
    (_, (x2, ildj)), (grad_p, grad_y) = value_and_grad(params, y)
    np.testing.assert_allclose(x2, x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ildj, -ladj, rtol=1e-10, atol=1e-10)
    rng = np.random.default_rng(4)
    dp = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    dy = _randn(*y.shape, seed=5)
    h = 1e-5
    shifted = [(jax.tree.map(lambda p, d: p + c * h * d, params, dp), y + c * h * dy) for c in (1, -1)]
    fd = (value_and_grad(*shifted[0])[0][0] - value_and_grad(*shifted[1])[0][0]) / (2 * h)  # per example
    exact = jnp.sum(grad_y * dy, -1)
    exact += sum(jnp.einsum("n...,...->n", g, d) for g, d in zip(jax.tree.leaves(grad_p), jax.tree.leaves(dp)))
    np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-8)


# --- names (what build_flow builds, and the options it refuses: tests/test_autoregressive.py)


@pytest.mark.parametrize("name", ["iaf", "maf", "naf", "bnaf"])
def test_array_names_match_torch_state_dict_and_parameters(name):
    pt = pytest.importorskip("pyroflows.torch")
    kwargs = {"hidden_factors": (2, 3)} if name == "bnaf" else {"hidden_dims": (8, 6)}
    flow = pf.build_flow(name, 3, num_layers=3, key=_key(), **kwargs)
    torch_flow = pt.build_flow(name, 3, num_layers=3, **kwargs)
    ours = named_arrays(flow)
    # NAF's offset is derived from hidden_units on both sides (torch: a non-persistent buffer).
    state = torch_flow.state_dict()
    assert set(ours) == set(state)
    assert all(tuple(ours[k].shape) == tuple(v.shape) for k, v in state.items())
    trainable = {k for k, a in ours.items() if eqx.is_inexact_array(a)}
    assert trainable == {k for k, _ in torch_flow.named_parameters()}
