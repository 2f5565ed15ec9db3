"""JAX planar and radial flows: the paper's formulas, gradients of the numerical inverse,
jit + vmap + grad together, options (float32 and dtypes: the conformance suite)."""

import math

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.test_util import check_grads  # noqa: E402
from scipy.optimize import brentq  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.transforms import Planar, Radial  # noqa: E402
from pyroflows.jax.transforms.base import astype  # noqa: E402


def _perturbed(layer, scale=0.5, seed=0):
    """``layer`` in float64 with every float array moved by ``scale`` * N(0, 1)."""
    rng = np.random.default_rng(seed)
    params, static = eqx.partition(astype(layer, jnp.float64), eqx.is_inexact_array)
    params = jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape), params)
    return eqx.combine(params, static)


def _set(layer, **values):
    names = list(values)
    return eqx.tree_at(
        lambda m: [getattr(m, n) for n in names], layer, [jnp.asarray(values[n], jnp.float64) for n in names]
    )


@eqx.filter_jit
def _forward(layer, x):
    return jax.vmap(layer.call_and_ladj)(x)


@eqx.filter_jit
def _inverse(layer, y):
    return jax.vmap(layer.inverse_and_ladj)(y)


# --------------------------------------------------------------------------- planar
def _planar_reference(u, w, b, xs):
    """Rezende & Mohamed (2015), appendix A.1 and eq. (11)-(12), one point at a time in numpy."""
    u, w, b = np.asarray(u), np.asarray(w), float(b)
    wu = float(w @ u)
    u_hat = u + (-1.0 + math.log1p(math.exp(wu)) - wu) * w / float(w @ w)
    ys, ladjs = [], []
    for x in np.asarray(xs):
        pre = float(w @ x) + b
        ys.append(x + u_hat * math.tanh(pre))
        ladjs.append(math.log(abs(1.0 + (1.0 - math.tanh(pre) ** 2) * float(u_hat @ w))))
    return np.array(ys), np.array(ladjs)


def test_planar_matches_paper_formula_and_inverts():
    layer = _perturbed(Planar(3, key=jax.random.key(0)), seed=1)
    x = 2 * np.random.default_rng(2).standard_normal((6, 3))
    y, ladj = _forward(layer, jnp.asarray(x))
    ref_y, ref_ladj = _planar_reference(layer.u, layer.w, layer.b, x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj, ref_ladj, rtol=1e-10, atol=1e-12)
    x2, ildj = _inverse(layer, y)
    np.testing.assert_allclose(x2, x, atol=1e-10 * (1 + np.abs(x).max()))
    np.testing.assert_allclose(ildj, -ladj, atol=1e-10)


def test_planar_inverse_gradients_match_finite_differences():
    # Reverse mode through the bisection (never differentiated) and the implicit step,
    # under jit and vmap, against central differences in every parameter and input.
    layer = _perturbed(Planar(3, key=jax.random.key(3)), scale=1.0, seed=4)
    y = jnp.asarray(np.random.default_rng(5).standard_normal((4, 3)))
    weights = jnp.asarray(np.random.default_rng(6).standard_normal((4, 4)))

    @jax.jit
    def objective(u, w, b, y):
        lay = eqx.tree_at(lambda m: (m.u, m.w, m.b), layer, (u, w, b))
        x, ildj = jax.vmap(lay.inverse_and_ladj)(y)
        return jnp.sum(weights[:, :3] * x) + jnp.sum(weights[:, 3] * ildj)

    check_grads(objective, (layer.u, layer.w, layer.b, y), order=1, modes=("rev",), eps=1e-5, atol=1e-6, rtol=1e-6)


def test_planar_inverse_jacobian_is_the_inverse_of_the_forward_jacobian():
    layer = _perturbed(Planar(3, key=jax.random.key(7)), seed=8)
    y = jnp.asarray(np.random.default_rng(9).standard_normal(3))

    @jax.jit
    def jacobians(y):
        x = layer.inverse_and_ladj(y)[0]
        return jax.jacrev(lambda v: layer.inverse_and_ladj(v)[0])(y), jax.jacfwd(lambda v: layer.call_and_ladj(v)[0])(x)

    jac_inv, jac_fwd = jacobians(y)
    np.testing.assert_allclose(jac_inv @ jac_fwd, np.eye(3), atol=1e-9)


def test_planar_flow_per_example_score_under_jit_vmap_grad():
    # The score d/dy log q(y) of a planar flow density, per example: jit(vmap(grad)) of a
    # log-density that runs the numerical inverse, against central differences.
    flow = _perturbed(pf.build_flow("planar", 2, num_layers=3, key=jax.random.key(10)), seed=11)

    def log_q(y):
        x, ildj = flow.inverse_and_ladj(y)
        return -0.5 * jnp.sum(x**2) - math.log(2 * math.pi) + ildj

    ys = jnp.asarray(np.random.default_rng(12).standard_normal((5, 2)))
    scores = jax.jit(jax.vmap(jax.grad(log_q)))(ys)
    h = 1e-5
    # One batch holds y + h e_k and y - h e_k for k = 0, 1: lq[sign, k, example].
    shifted = jnp.concatenate([ys + sign * h * e for sign in (1.0, -1.0) for e in np.eye(2)])
    lq = jax.jit(jax.vmap(log_q))(shifted).reshape(2, 2, 5)
    np.testing.assert_allclose(scores.T, (lq[0] - lq[1]) / (2 * h), atol=1e-7)


def test_planar_singular_limit_and_zero_w():
    # w.u = -40: softplus underflows; the 1e-6 floor keeps the layer invertible.
    layer = _set(Planar(3, key=jax.random.key(0)), u=[-40.0, 0.5, 0.0], w=[1.0, 0.0, 0.0], b=0.2)
    assert float(layer.constrained()[1]) == pytest.approx(1e-6, rel=1e-9)
    x = jnp.asarray(np.random.default_rng(16).standard_normal((6, 3)))
    x2, _ = _inverse(layer, _forward(layer, x)[0])
    np.testing.assert_allclose(x2, x, atol=1e-8)
    # w = 0: the identity plus a shift u tanh(b), with finite gradients.
    layer = _set(layer, u=[0.5, -1.0, 2.0], w=[0.0, 0.0, 0.0], b=0.7)
    y, ladj = _forward(layer, x)
    np.testing.assert_allclose(y - x, np.tile([0.5, -1.0, 2.0], (6, 1)) * math.tanh(0.7))
    assert np.all(np.asarray(ladj) == 0)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m, y: jax.vmap(m.inverse_and_ladj)(y)[0].sum()))(layer, y)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- radial
def test_radial_matches_paper_formula_and_a_root_finder():
    layer = _perturbed(Radial(3, key=jax.random.key(17)), scale=1.0, seed=18)
    alpha, beta, _ = (float(t) for t in layer.constrained())
    x0 = np.asarray(layer.x0)
    x = x0 + np.random.default_rng(19).standard_normal((6, 3)) * np.logspace(-4, 1, 6)[:, None]
    y, ladj = _forward(layer, jnp.asarray(x))
    for xi, yi, li in zip(x, np.asarray(y), np.asarray(ladj)):
        r = np.linalg.norm(xi - x0)
        h, dh = 1 / (alpha + r), -1 / (alpha + r) ** 2
        np.testing.assert_allclose(yi, xi + beta * h * (xi - x0), rtol=1e-12, atol=1e-12)
        assert li == pytest.approx(math.log((1 + beta * h) ** 2 * (1 + beta * h + beta * dh * r)), abs=1e-10)
    x2, ildj = _inverse(layer, y)
    for yi, xi in zip(np.asarray(y), np.asarray(x2)):
        r_y = np.linalg.norm(yi - x0)
        r = brentq(lambda r: r * (1 + beta / (alpha + r)) - r_y, 0.0, 10 * r_y + 10, xtol=1e-300, rtol=1e-15)
        assert np.linalg.norm(xi - x0) == pytest.approx(r, rel=1e-10)
    np.testing.assert_allclose(x2, x, atol=1e-10)
    np.testing.assert_allclose(ildj, -ladj, atol=1e-10)


def test_radial_gradients_are_finite_at_the_centre():
    # |x - x0| has no derivative at x0; JAX's plain norm would give NaN there, the layer a 0 subgradient.
    layer = _perturbed(Radial(3, key=jax.random.key(20)), seed=21)

    def loss(m, x):
        y, ladj = m.call_and_ladj(x)
        x2, ildj = m.inverse_and_ladj(y)
        return y.sum() + ladj + x2.sum() + ildj

    g_layer, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(layer, layer.x0)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in (*jax.tree.leaves(g_layer), g_x))
    # Away from the centre the gradient matches finite differences.
    x = layer.x0 + 0.3
    check_grads(jax.jit(lambda v: loss(layer, v)), (x,), order=1, modes=("rev",), eps=1e-5, atol=1e-7, rtol=1e-7)


# --------------------------------------------------------------------------- builders
@pytest.mark.parametrize("name,cls", [("planar", Planar), ("radial", Radial)])
def test_builders_and_option_handling(name, cls):
    flow = pf.build_flow(name, 4, num_layers=3, key=jax.random.key(22))
    assert [type(p) for p in flow.parts] == [cls] * 3
    assert len(pf.build_flow(name, 4).parts) == 8
    # Keys differ per layer, so the layers do not start identical; the same key gives the same flow.
    assert not np.allclose(flow.parts[0].x0 if cls is Radial else flow.parts[0].w,
                           flow.parts[1].x0 if cls is Radial else flow.parts[1].w)
    again = pf.build_flow(name, 4, num_layers=3, key=jax.random.key(22))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(flow), jax.tree.leaves(again)))
    with pytest.raises(ValueError, match="no option"):
        pf.build_flow(name, 4, variant="orthogonal")
    with pytest.raises(ValueError, match="hidden_dims"):
        pf.build_flow(name, 4, hidden_dims=(8,))
    assert cls.numerical_inverse == (cls is Planar)
