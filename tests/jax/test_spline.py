"""JAX neural spline flows against an independent float64 numpy reference, plus JAX-specific checks.

Durkan, Bekasov, Murray & Papamakarios 2019, arXiv:1906.04032, eqs. (4)-(6). The
reference below is written from the paper with numpy (masks per bin, inverse by
bisection), sharing no code with ``pyroflows.jax.transforms.transformers``. The layers are
``Coupling`` and ``MaskedAutoregressive`` with the ``RationalQuadraticSpline`` transformer.
"""

import math

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.io import named_arrays  # noqa: E402
from pyroflows.jax.transforms import Coupling, MaskedAutoregressive, RationalQuadraticSpline  # noqa: E402
from pyroflows.jax.transforms.transformers import rational_quadratic_spline, spline_parts  # noqa: E402

MIN = 1e-3  # minimum bin width, bin height and interior derivative


# --- an independent numpy reference ---------------------------------------------------
def ref_parts(params, bound):
    """Knots and derivatives for params of shape (n, 3K - 1), float64."""
    params = np.asarray(params, np.float64)
    k = (params.shape[-1] + 1) // 3

    def knots(raw):
        e = np.exp(raw - raw.max(-1, keepdims=True))
        frac = MIN + (1 - MIN * k) * e / e.sum(-1, keepdims=True)
        inner = -bound + 2 * bound * np.cumsum(frac, -1)[:, :-1]
        ends = np.full((raw.shape[0], 1), bound)
        return np.concatenate([-ends, inner, ends], -1)

    c = math.log(math.expm1(1 - MIN))  # softplus(0 + c) + MIN == 1
    inner = MIN + np.logaddexp(0.0, params[:, 2 * k :] + c)
    ones = np.ones((params.shape[0], 1))
    return knots(params[:, :k]), knots(params[:, k : 2 * k]), np.concatenate([ones, inner, ones], -1)


def ref_forward(x, params, bound):
    """y and dy/dx for points x (n,) with their own parameters (n, 3K - 1)."""
    xs, ys, ds = ref_parts(params, bound)
    y, dy = np.array(x, np.float64), np.ones(len(x))
    for b in range(xs.shape[1] - 1):
        lo = (x >= xs[:, b]) if b > 0 else (x >= -bound)
        hi = (x < xs[:, b + 1]) if b < xs.shape[1] - 2 else (x <= bound)
        m = lo & hi
        w, h = xs[m, b + 1] - xs[m, b], ys[m, b + 1] - ys[m, b]
        s, d0, d1 = h / w, ds[m, b], ds[m, b + 1]
        xi = (x[m] - xs[m, b]) / w
        den = s + (d1 + d0 - 2 * s) * xi * (1 - xi)
        y[m] = ys[m, b] + h * (s * xi**2 + d0 * xi * (1 - xi)) / den
        dy[m] = s**2 * (d1 * xi**2 + 2 * s * xi * (1 - xi) + d0 * (1 - xi) ** 2) / den**2
    return y, dy


def ref_inverse(y, params, bound, iters=200):
    """x with ref_forward(x) = y, by bisection (the map is increasing)."""
    lo, hi = np.minimum(y, -bound) - 1.0, np.maximum(y, bound) + 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = ref_forward(mid, params, bound)[0] > y
        lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
    return 0.5 * (lo + hi)


def _params(k, scale, seed, n):
    return scale * np.random.default_rng(seed).standard_normal((n, 3 * k - 1))


def _points_with_knots(params, bound, n=60, seed=0):
    """Random points, every x- and y-knot, +-bound and far tails, each with its parameter row."""
    xs, ys, _ = ref_parts(params, bound)
    rows, pts = [], []
    rng = np.random.default_rng(seed)
    for r in range(params.shape[0]):
        extra = [-bound, bound, -30.0, 30.0, -bound - 1e-9, bound + 1e-9]
        p = np.concatenate([rng.uniform(-1.3 * bound, 1.3 * bound, n), xs[r], ys[r], extra])
        pts.append(p)
        rows.append(np.repeat(params[r : r + 1], len(p), 0))
    return np.concatenate(pts), np.concatenate(rows)


_jitted = jax.jit(rational_quadratic_spline, static_argnums=(2, 3))
_PAD = 4096


def _spline(x, p, bound, inverse):
    """The jitted spline on points (n,) with parameter rows (n, 3K - 1), padded to a fixed
    length so that tests with the same K, bound and dtype share one compilation."""
    x, p = jnp.asarray(x), jnp.asarray(p)
    n = x.shape[0]
    assert n <= _PAD
    xp = jnp.zeros(_PAD, x.dtype).at[:n].set(x)
    pp = jnp.zeros((_PAD, p.shape[-1]), p.dtype).at[:n].set(jnp.broadcast_to(p, (n, p.shape[-1])))
    out, logd = _jitted(xp, pp, bound, inverse)
    return out[:n], logd[:n]


# --- the spline function --------------------------------------------------------------
@pytest.mark.parametrize("k,bound", [(1, 3.0), (8, 3.0), (5, 1.0)])
def test_spline_matches_numpy_reference_forward_and_inverse(k, bound):
    params = _params(k, 1.5, seed=k, n=4)
    x, p = _points_with_knots(params, bound)
    y, logd = _spline(jnp.asarray(x), jnp.asarray(p), bound, False)
    y_ref, dy_ref = ref_forward(x, p, bound)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.exp(np.asarray(logd)), dy_ref, rtol=1e-10)
    # Inverse against bisection on the reference, at the y-knots, +-bound and tails too.
    x_inv, ildj = _spline(jnp.asarray(x), jnp.asarray(p), bound, True)
    x_ref = ref_inverse(x, p, bound)
    np.testing.assert_allclose(np.asarray(x_inv), x_ref, atol=1e-11, rtol=0)
    np.testing.assert_allclose(np.asarray(ildj), -np.log(ref_forward(x_ref, p, bound)[1]), atol=1e-8)


def test_round_trip_at_knots_and_bounds_and_extreme_bins():
    bound = 3.0
    for scale, tol in ((2.0, 1e-10), (20.0, None)):
        params = _params(8, scale, seed=7, n=30)
        x, p = _points_with_knots(params, bound, n=20)
        x, p = jnp.asarray(x), jnp.asarray(p)
        y, ladj = _spline(x, p, bound, False)
        x2, ildj = _spline(y, p, bound, True)
        assert np.all(np.isfinite(np.asarray(x2))) and np.all(np.isfinite(np.asarray(ildj)))
        if tol is not None:
            np.testing.assert_allclose(np.asarray(x2), np.asarray(x), atol=tol, rtol=0)
            np.testing.assert_allclose(np.asarray(ildj), -np.asarray(ladj), atol=1e-9)
        # forward(inverse(y)) == y up to the forward's conditioning, also for slopes 1e-3..1e3.
        x3, _ = _spline(x, p, bound, True)
        y3, ladj3 = _spline(x3, p, bound, False)
        eps = np.finfo(np.float64).eps
        err = np.abs(np.asarray(y3) - np.asarray(x))
        scale_err = eps * (1 + np.abs(np.asarray(x))) + eps * (1 + np.abs(np.asarray(x3))) * np.exp(np.asarray(ladj3))
        assert np.all(err <= 50 * scale_err)


@pytest.mark.parametrize("dtype,scale", [(np.float64, 20.0), (np.float32, 5.0), (np.float32, 20.0)])
def test_inverse_is_accurate_for_extreme_bins(dtype, scale):
    """Bins with slopes from 1e-3 to 1e3: forward(inverse(y)) is y up to the forward's conditioning.

    Near the top of a strongly curved bin the root from the lower knot cancels; the
    root from the knot with the larger ``b`` (as in torch) does not, even in float32.
    """
    params = _params(8, scale, seed=7, n=60)
    y, p = _points_with_knots(params, 3.0, n=30, seed=2)
    y, p = jnp.asarray(y, dtype), jnp.asarray(p, dtype)
    x, ildj = _spline(y, p, 3.0, True)
    y2, ladj = _spline(x, p, 3.0, False)
    assert x.dtype == dtype and np.all(np.isfinite(np.asarray(x))) and np.all(np.isfinite(np.asarray(ildj)))
    y, x, y2 = (np.asarray(a, np.float64) for a in (y, x, y2))
    eps = np.finfo(dtype).eps
    scale_err = eps * (1 + np.abs(y)) + eps * (1 + np.abs(x)) * np.exp(np.asarray(ladj, np.float64))
    assert np.all(np.abs(y2 - y) <= 50 * scale_err)


def test_same_numbers_as_the_torch_spline():
    from pyroflows.torch.transforms.transformers import (
        rational_quadratic_spline as torch_spline,
    )

    params = _params(8, 2.0, seed=9, n=20)
    y, p = _points_with_knots(params, 3.0, n=40, seed=1)
    for inverse in (False, True):
        ours, ld = _spline(jnp.asarray(y), jnp.asarray(p), 3.0, inverse)
        theirs, tld = torch_spline(torch.as_tensor(y), torch.as_tensor(p), 3.0, inverse)
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ld), tld.numpy(), rtol=1e-9, atol=1e-9)
    # Large raw derivatives: torch's softplus is linear above 20; so is ours (same knots).
    big = _params(8, 40.0, seed=10, n=5)
    from pyroflows.torch.transforms.transformers import spline_parts as torch_parts

    for ours, theirs in zip(spline_parts(jnp.asarray(big), 3.0), torch_parts(torch.as_tensor(big), 3.0)):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-14, atol=1e-14)


def test_zero_parameters_identity_tails_and_constraints():
    x = jnp.linspace(-40.0, 40.0, 801)
    for k in (1, 8):
        for inverse in (False, True):
            y, logd = _spline(x, jnp.zeros((1, 3 * k - 1)), 3.0, inverse)
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-13)
            np.testing.assert_allclose(np.asarray(logd), 0.0, atol=1e-13)
    # Outside [-bound, bound]: exactly the identity, for any parameters.
    p = jnp.asarray(_params(8, 3.0, seed=3, n=1))
    out = jnp.concatenate([jnp.linspace(-30, -3.0000001, 20), jnp.linspace(3.0000001, 30, 20)])
    for inverse in (False, True):
        y, logd = _spline(out, p, 3.0, inverse)
        assert np.array_equal(np.asarray(y), np.asarray(out)) and np.all(np.asarray(logd) == 0)
    # Extreme raw values: pinned ends, minimum bin sizes and derivatives.
    xs, ys, ds = jax.jit(spline_parts, static_argnums=1)(jnp.asarray(_params(8, 30.0, seed=4, n=20)), 3.0)
    for knots in (np.asarray(xs), np.asarray(ys)):
        assert np.all(knots[:, 0] == -3.0) and np.all(knots[:, -1] == 3.0)
        assert np.all(np.diff(knots, axis=-1) >= 6.0 * MIN * (1 - 1e-9))
    assert np.all(np.asarray(ds)[:, 1:-1] >= MIN) and np.all(np.asarray(ds)[:, [0, -1]] == 1.0)


def test_spline_gradients_check_grads_both_directions():
    p = jnp.asarray(_params(4, 1.0, seed=5, n=6))
    x = jnp.linspace(-3.6, 3.6, 6) + 0.0123  # off the knots and the bounds (almost surely)
    # Both directions in one function, so one compile per mode.
    fn = jax.jit(lambda a, q: (rational_quadratic_spline(a, q, 3.0), rational_quadratic_spline(a, q, 3.0, True)))
    check_grads(fn, (x, p), order=1, modes=("rev",), eps=1e-6)


def test_float32_dtype_and_finiteness():
    p = jnp.asarray(_params(8, 5.0, seed=6, n=1), jnp.float32)
    x = jnp.asarray([-30.0, -3.0, -1.0, 0.0, 0.5, 3.0, 30.0], jnp.float32)

    def total(a, q):
        outs = rational_quadratic_spline(a, q, 3.0) + rational_quadratic_spline(a, q, 3.0, True)
        return sum(t.sum() for t in outs), outs

    g, outs = jax.jit(jax.grad(total, (0, 1), has_aux=True))(x, p)
    assert all(t.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(t))) for t in outs + g)


# --- layers ----------------------------------------------------------------------------
def _perturb(module, scale=0.3, seed=0):
    params, static = eqx.partition(module, eqx.is_inexact_array)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: a + scale * jnp.asarray(rng.standard_normal(a.shape)), params)
    return eqx.combine(params, static)


def test_spline_coupling_matches_reference_and_inverts():
    dim, split = 5, 2
    layer = _perturb(Coupling(dim, RationalQuadraticSpline(count_bins=5, bound=2.0), (16,), key=jax.random.key(1)))
    x = 2 * jnp.asarray(np.random.default_rng(2).standard_normal((7, dim)))
    y, ladj = jax.jit(jax.vmap(layer.call_and_ladj))(x)
    assert np.array_equal(np.asarray(y[:, :split]), np.asarray(x[:, :split]))
    # The MLP's output is parameter-major: 14 blocks of dim - split = 3, one row per coordinate after .T
    params = np.asarray(jax.vmap(lambda xa: layer.conditioner(xa).reshape(14, dim - split).T)(x[:, :split]))
    params = params.reshape(-1, 14)
    y_ref, dy_ref = ref_forward(np.asarray(x[:, split:]).ravel(), params, 2.0)
    np.testing.assert_allclose(np.asarray(y[:, split:]).ravel(), y_ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ladj), np.log(dy_ref).reshape(7, -1).sum(-1), atol=1e-10)
    x2, ildj = jax.jit(jax.vmap(layer.inverse_and_ladj))(y)
    np.testing.assert_allclose(np.asarray(x2), np.asarray(x), atol=1e-10)
    np.testing.assert_allclose(np.asarray(ildj), -np.asarray(ladj), atol=1e-10)


def test_spline_autoregressive_triangular_exact_inverse_and_gradients():
    dim = 4
    tau = RationalQuadraticSpline(count_bins=4, bound=2.5)
    layer = _perturb(MaskedAutoregressive(dim, tau, (16,), key=jax.random.key(2)), 0.4)
    assert layer.autoregressive and np.array_equal(np.asarray(layer.get_permutation()), np.arange(dim))
    x = 1.5 * jnp.asarray(np.random.default_rng(3).standard_normal(dim))
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    w0 = params.made.net[0].weight

    def inverse_loss(w, y):
        inv = eqx.combine(eqx.tree_at(lambda m: m.made.net[0].weight, params, w), static).inverse_and_ladj(y)
        return jnp.sum(jnp.sin(inv[0])) + inv[1]

    @jax.jit
    def everything(x):
        y, ladj = layer.call_and_ladj(x)
        jac = jax.jacfwd(lambda v: layer.call_and_ladj(v)[0])(x)
        # Reverse mode through the fori_loop: w.r.t. the input and a weight matrix.
        inv_jac = jax.jacrev(lambda v: layer.inverse_and_ladj(v)[0])(y)
        return y, ladj, jac, layer.inverse_and_ladj(y), inv_jac, jax.grad(inverse_loss)(w0, y)

    y, ladj, jac, (x2, ildj), inv_jac, grad_w = everything(x)
    jac = np.asarray(jac)
    assert np.all(np.triu(jac, 1) == 0) and np.abs(np.tril(jac, -1)).max() > 1e-6
    np.testing.assert_allclose(np.log(np.diagonal(jac)).sum(), float(ladj), atol=1e-12)
    np.testing.assert_allclose(np.asarray(x2), np.asarray(x), atol=1e-10)
    np.testing.assert_allclose(float(ildj), -float(ladj), atol=1e-10)
    np.testing.assert_allclose(np.asarray(inv_jac), np.linalg.inv(jac), atol=1e-10)
    # The weight gradient against a central difference along a random direction.
    direction = jnp.asarray(np.random.default_rng(4).standard_normal(w0.shape))
    loss = jax.jit(inverse_loss)
    eps = 1e-6
    fd = (loss(w0 + eps * direction, y) - loss(w0 - eps * direction, y)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(grad_w * direction)), float(fd), rtol=1e-6, atol=1e-8)


def test_jit_vmap_grad_together_on_a_flow_log_prob():
    """Per-example gradients of log_prob (which runs the sequential inverse) under jit(vmap(grad))."""
    import numpyro.distributions as dist

    flow = _perturb(
        pf.build_flow(
            "nsf", 2, num_layers=1, hidden_dims=(8,), count_bins=4, conditioner="autoregressive", key=jax.random.key(4)
        ),
        0.5,
    )
    data = 2 * jnp.asarray(np.random.default_rng(5).standard_normal((3, 2)))
    params, static = eqx.partition(flow, eqx.is_inexact_array)

    def nll(p, x):
        base = dist.Normal(jnp.zeros(2), 1.0).to_event(1)
        return -dist.TransformedDistribution(base, eqx.combine(p, static).to_transform()).log_prob(x)

    leaves = jax.tree.leaves(jax.jit(jax.vmap(jax.grad(nll), in_axes=(None, 0)))(params, data))
    assert all(a.shape[0] == 3 and np.all(np.isfinite(np.asarray(a))) for a in leaves)
    # Each example has its own, non-zero gradient.
    big = max(leaves, key=lambda a: float(jnp.abs(a).max()))
    assert float(jnp.abs(big).max()) > 0 and not np.allclose(np.asarray(big[0]), np.asarray(big[1]))


# --- the builder, options and torch parity ----------------------------------------------
@pytest.mark.parametrize("conditioner,cls", [("coupling", Coupling), ("autoregressive", MaskedAutoregressive)])
def test_builder_options_and_fresh_identity(conditioner, cls):
    flow = pf.build_flow(
        "nsf",
        3,
        num_layers=3,
        hidden_dims=(8,),
        count_bins=3,
        bound=1.5,
        conditioner=conditioner,
        permutation="random",
        activation="tanh",
        key=jax.random.key(0),
    )
    layers = [p for p in flow.parts if isinstance(p, cls)]
    assert len(layers) == 3 and len(flow.parts) == 5
    assert all(type(lay.transformer) is RationalQuadraticSpline for lay in layers)
    assert all(lay.transformer.count_bins == 3 and lay.transformer.bound == 1.5 for lay in layers)
    assert all(lay.reads == "input" for lay in layers if cls is MaskedAutoregressive)
    x = 4 * jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    y, ladj = flow.to_transform().call_with_intermediates(x)
    # Fresh layers are the identity; only the permutations move coordinates.
    np.testing.assert_allclose(np.sort(np.asarray(y), -1), np.sort(np.asarray(x), -1), atol=1e-12)
    np.testing.assert_allclose(np.asarray(ladj), 0.0, atol=1e-12)
    for bad in ({"conditioner": "mask"}, {"count_bins": 0}, {"bound": -1.0}):
        with pytest.raises(ValueError):
            pf.build_flow("nsf", 2, key=jax.random.key(0), **bad)


def _torch_autoregressive_nsf(dim):
    import pyroflows.torch as pt

    torch.manual_seed(3)
    flow = pt.build_flow(
        "nsf", dim, num_layers=2, hidden_dims=(8, 8), count_bins=5, bound=2.0, conditioner="autoregressive"
    ).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow


def test_torch_autoregressive_nsf_loads_with_the_same_numbers(tmp_path):
    """tests/parity covers nsf's default (coupling); this is the same check for conditioner="autoregressive"."""
    import pyroflows.torch as pt

    dim = 5
    tflow = _torch_autoregressive_nsf(dim)
    path = tmp_path / "nsf_ar.npz"
    pt.save_flow(tflow, path)
    jflow = pf.load_flow(path)
    assert set(named_arrays(jflow)) == set(tflow.state_dict())
    x = 1.5 * np.random.default_rng(8).standard_normal((6, dim))
    with torch.no_grad():
        ty, tladj = tflow.call_and_ladj(torch.as_tensor(x))
        tx, tildj = tflow.inverse_and_ladj(ty)
    t = jflow.to_transform()
    jy, jladj = t.call_with_intermediates(jnp.asarray(x))
    jx, jildj = t.inverse_and_ladj(jnp.asarray(ty.numpy()))
    for ours, theirs in ((jy, ty), (jladj, tladj), (jx, tx), (jildj, tildj)):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jx), x, atol=1e-10)
    # And back: the JAX flow saved and reloaded in torch is the same flow.
    pf.save_flow(jflow, tmp_path / "back.npz")
    with torch.no_grad():
        by, bladj = pt.load_flow(tmp_path / "back.npz").call_and_ladj(torch.as_tensor(x))
    np.testing.assert_allclose(by.numpy(), ty.numpy(), atol=1e-12)
    np.testing.assert_allclose(bladj.numpy(), tladj.numpy(), atol=1e-12)


def test_loaded_masks_are_constants_not_parameters(tmp_path):
    import pyroflows.torch as pt

    path = tmp_path / "nsf_ar.npz"
    pt.save_flow(_torch_autoregressive_nsf(2), path)
    masks = {k: v for k, v in named_arrays(pf.load_flow(path)).items() if k.endswith("mask")}
    assert masks and all(v.dtype == jnp.bool_ for v in masks.values())
