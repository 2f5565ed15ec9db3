"""JAX GDN against independent references: a loop-based numpy evaluation of the formula,
autodiff Jacobians, central differences through the numerical forward (jit + vmap +
grad), the torch layer for the dense variant, and option handling."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.transforms import GDN, ElementwiseAffine, InvertibleLinear  # noqa: E402
from pyroflows.jax.transforms.base import astype  # noqa: E402

VARIANTS = ["diagonal", "dense"]


def perturb(module, seed, scale):
    params, static = eqx.partition(module, eqx.is_inexact_array)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape)), params)
    return eqx.combine(params, static)


def make_layer(dim, variant, seed=0, scale=0.5, max_exponent=0.4):
    return perturb(astype(GDN(dim, variant, max_exponent), jnp.float64), seed, scale)


def reference_normalise(layer, z):
    """y_i = z_i / (beta_i + sum_j gamma_ij z_j^2)^eps_i, one point and one coordinate at a time."""
    beta = layer.beta_min + np.logaddexp(0.0, np.asarray(layer.unconstrained_beta))
    gamma = np.logaddexp(0.0, np.asarray(layer.unconstrained_gamma))
    if layer.variant == "diagonal":
        gamma = np.diag(gamma)
    eps = layer.max_exponent / (1.0 + np.exp(-np.asarray(layer.unconstrained_exponent)))
    y = np.empty_like(z)
    for n in range(z.shape[0]):
        for i in range(z.shape[1]):
            denominator = beta[i] + sum(gamma[i, j] * z[n, j] ** 2 for j in range(z.shape[1]))
            y[n, i] = z[n, i] / denominator ** eps[i]
    return y


@jax.jit
def both_directions(layer, x):
    """Forward, inverse of the result, and the autodiff Jacobians of both, batched."""
    y, ladj = jax.vmap(layer.call_and_ladj)(x)
    x2, ildj = jax.vmap(layer.inverse_and_ladj)(y)
    jac_fwd = jax.vmap(jax.jacfwd(lambda v: layer.call_and_ladj(v)[0]))(x)
    jac_inv = jax.vmap(jax.jacfwd(lambda v: layer.inverse_and_ladj(v)[0]))(y)
    return y, ladj, x2, ildj, jac_fwd, jac_inv


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_directions_against_the_loop_reference_and_autodiff(variant):
    layer = make_layer(3, variant, seed=1, scale=1.0)
    x = np.random.default_rng(1).standard_normal((5, 3)) * 3
    x = np.concatenate([x, [[30.0, -30.0, 0.0], [1e-8, 0.0, -1e-8]]])
    y, ladj, x2, ildj, jac_fwd, jac_inv = (np.asarray(a) for a in both_directions(layer, jnp.asarray(x)))
    # The data side is the closed form: it must be the formula.
    np.testing.assert_allclose(x, reference_normalise(layer, y), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(x2, x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ildj, -ladj, rtol=1e-10, atol=1e-10)
    sign, logdet = np.linalg.slogdet(jac_fwd)
    assert np.all(sign > 0)  # det J > 0 for any parameters
    np.testing.assert_allclose(ladj, logdet, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ildj, np.linalg.slogdet(jac_inv)[1], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.einsum("nij,njk->nik", jac_fwd, jac_inv), np.broadcast_to(np.eye(3), jac_fwd.shape),
                               atol=1e-9)


def test_dense_newton_converges_fast_and_stays_bounded_on_bad_input():
    layer = make_layer(4, "dense", seed=2, scale=1.5, max_exponent=0.49)
    y = np.random.default_rng(2).standard_normal((20, 4)) * np.array([1e-6, 1.0, 30.0, 1e6])
    steps = jax.jit(jax.vmap(layer.newton_steps))
    assert int(np.max(steps(jnp.asarray(y)))) <= 12
    # Under jit there is no exception: NaN in gives NaN out after at most max_newton_steps.
    bad = jnp.array([[jnp.nan, 1.0, 2.0, 3.0], [jnp.inf, 1.0, 2.0, 3.0]])
    assert np.all(np.asarray(steps(bad)) <= GDN.max_newton_steps)
    z = np.asarray(jax.jit(jax.vmap(layer.call_and_ladj))(bad)[0])
    assert np.all(np.isnan(z[0]))
    with pytest.raises(ValueError, match="dense"):
        make_layer(2, "diagonal").newton_steps(jnp.zeros(2))
    # Single precision: the Newton tolerance becomes 8 float32 epsilons.
    layer32 = astype(layer, jnp.float32)

    @jax.jit
    def round_trip(layer, y):
        z, ladj = jax.vmap(layer.call_and_ladj)(y)
        return z, ladj, *jax.vmap(layer.inverse_and_ladj)(z)

    z, ladj, y2, ildj = round_trip(layer32, jnp.asarray(y, jnp.float32))
    assert z.dtype == ladj.dtype == y2.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y2), y.astype(np.float32), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ladj), -np.asarray(ildj), atol=2e-3)


def test_dense_with_vanishing_off_diagonal_equals_diagonal():
    dense, diag = make_layer(3, "dense", seed=3), make_layer(3, "diagonal", seed=3)
    raw = np.full((3, 3), -200.0)  # softplus(-200) ~ 1e-87: no coupling
    np.fill_diagonal(raw, np.asarray(diag.unconstrained_gamma))
    dense = eqx.tree_at(lambda l: (l.unconstrained_beta, l.unconstrained_gamma, l.unconstrained_exponent), dense,
                        (diag.unconstrained_beta, jnp.asarray(raw), diag.unconstrained_exponent))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 3)) * 4)
    run = jax.jit(lambda layer, x: (jax.vmap(layer.call_and_ladj)(x), jax.vmap(layer.inverse_and_ladj)(x)))
    for a, b in zip(jax.tree.leaves(run(dense, x)), jax.tree.leaves(run(diag, x))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_numerical_forward_has_exact_gradients_under_jit_vmap_and_grad(variant):
    layer = make_layer(2, variant, seed=4, scale=0.8)
    x = jnp.array([[0.3, -1.2], [2.5, 0.7], [-4.0, 6.0]])
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def loss(p, x):
        y, ladj = jax.vmap(eqx.combine(p, static).call_and_ladj)(x)
        return jnp.sum(jnp.sin(y)) + jnp.sum(ladj)

    _, (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    dx = jnp.asarray(rng.standard_normal(x.shape))
    h = 1e-5
    loss_jit = jax.jit(loss)

    def shifted(s):
        return float(loss_jit(jax.tree.map(lambda a, d: a + s * h * d, params, direction), x + s * h * dx))

    numeric = (shifted(1) - shifted(-1)) / (2 * h)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(g_params), jax.tree.leaves(direction)))
    analytic += float(jnp.vdot(g_x, dx))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_dense_variant_matches_torch_after_save_and_load(tmp_path):
    torch = pytest.importorskip("torch")
    pt = pytest.importorskip("pyroflows.torch")
    torch.manual_seed(6)
    torch_flow = pt.build_flow("gdn", 3, num_layers=2, variant="dense", max_exponent=0.45).double()
    with torch.no_grad():
        for p in torch_flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    pt.save_flow(torch_flow, tmp_path / "gdn.npz")
    flow = pf.load_flow(tmp_path / "gdn.npz")
    assert all(p.variant == "dense" and p.max_exponent == 0.45 for p in flow.parts[:-1:2])
    x = np.random.default_rng(6).standard_normal((5, 3)) * 2
    with torch.no_grad():
        y_t, ladj_t = torch_flow.call_and_ladj(torch.tensor(x))
        x_t, ildj_t = torch_flow.inverse_and_ladj(y_t)
    y, ladj = flow.to_transform().call_with_intermediates(jnp.asarray(x))
    x_j, ildj = flow.to_transform().inverse_and_ladj(jnp.asarray(y_t.numpy()))
    for a, b in [(y, y_t), (ladj, ladj_t), (x_j, x_t), (ildj, ildj_t)]:
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-9, atol=1e-9)


def test_invalid_options_raise_value_errors():
    with pytest.raises(ValueError, match="variant"):
        GDN(2, variant="full")
    with pytest.raises(ValueError, match="max_exponent"):
        GDN(2, max_exponent=0.5)
    with pytest.raises(ValueError, match="0.5"):
        pf.build_flow("gdn", 2, max_exponent=0.5)
    with pytest.raises(ValueError, match="variant"):
        pf.build_flow("gdn", 2, variant="full")


@pytest.mark.parametrize("options", [{}, {"variant": "dense"}, {"max_exponent": 0.1}])
def test_builder_structure_names_and_constraints(options):
    pt = pytest.importorskip("pyroflows.torch")
    from pyroflows.jax.io import named_arrays

    flow = pf.build_flow("gdn", 3, num_layers=2, key=jax.random.key(7), **options)
    assert [type(p) for p in flow.parts] == [GDN, InvertibleLinear, GDN, InvertibleLinear, ElementwiseAffine]
    for part in flow.parts[:-1:2]:
        assert part.variant == options.get("variant", "diagonal")
        assert part.max_exponent == options.get("max_exponent", 0.4)
    names = {n: tuple(a.shape) for n, a in named_arrays(flow).items()}
    torch_flow = pt.build_flow("gdn", 3, num_layers=2, **options)
    assert names == {n: tuple(t.shape) for n, t in torch_flow.state_dict().items()}
    # Constraints hold for any raw values, including extreme ones.
    layer = flow.parts[0]
    shape = layer.unconstrained_gamma.shape
    extreme = (jnp.array([-60.0, 0.0, 60.0]), jnp.linspace(-60, 60, int(np.prod(shape))).reshape(shape),
               jnp.array([-60.0, 0.0, 60.0]))
    raw = lambda l: (l.unconstrained_beta, l.unconstrained_gamma, l.unconstrained_exponent)  # noqa: E731
    layer = eqx.tree_at(raw, layer, extreme)
    assert np.all(np.asarray(layer.beta()) >= layer.beta_min) and np.all(np.asarray(layer.gamma()) >= 0)
    eps = np.asarray(layer.exponent())
    assert np.all(eps >= 0) and np.all(eps <= layer.max_exponent)
