"""FFJORD (CNF) on JAX: divergences against autodiff, log-dets against the autodiff Jacobian
of the computed map, the Hutchinson estimator's mean and variance against the quadratic
form it samples, keys, the diffrax paths against the scan and torch, gradients, options."""

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
import pyroflows.torch as pt  # noqa: E402
from pyroflows.jax.io import named_arrays  # noqa: E402
from pyroflows.jax.transforms import CNF  # noqa: E402
from pyroflows.jax.transforms.base import astype  # noqa: E402
from tests.hutchinson import assert_one_probe_moments, probe_basis, symmetric_form  # noqa: E402


def _perturbed(layer, scale=0.3, seed=0):
    rng = np.random.default_rng(seed)
    params, static = eqx.partition(astype(layer, jnp.float64), eqx.is_inexact_array)
    params = jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape), params)
    return eqx.combine(params, static)


def _layer(dim, estimator="exact", scale=0.3, seed=0, hidden_dims=(8, 8), **options):
    return _perturbed(CNF(dim, hidden_dims, estimator=estimator, **options, key=jax.random.key(seed)), scale, seed)


OPTIONS = ("activation", "estimator", "noise", "solver", "num_steps", "atol", "rtol", "adjoint", "time_length",
           "kinetic_energy", "jacobian_norm")


def _with(layer, **options):
    """A layer with the same weights under other options (the same kind of network)."""
    net = layer.net
    hidden = [l.weight.shape[-2] for l in (net.layers if hasattr(net, "w_in") else net.layers[:-1])]
    options = {**{n: getattr(layer, n) for n in OPTIONS}, **options}
    return eqx.tree_at(lambda m: m.net, CNF(layer.dim, hidden, **options, key=jax.random.key(0)), net)


def _points(n, dim, seed=1, scale=1.5):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal((n, dim)))


@eqx.filter_jit
def _forward(layer, x, keys=None):
    if keys is None:
        return jax.vmap(layer.call_and_ladj)(x)
    return jax.vmap(lambda v, k: layer.call_and_ladj(v, key=k))(x, keys)


@eqx.filter_jit
def _inverse(layer, y, keys=None):
    if keys is None:
        return jax.vmap(layer.inverse_and_ladj)(y)
    return jax.vmap(lambda v, k: layer.inverse_and_ladj(v, key=k))(y, keys)


# --------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("activation", ["tanh", "softplus", "silu"])
def test_dynamics_divergence_and_tangents_are_the_autodiff_jacobian(activation):
    dim = 4
    mlp = _layer(dim, "exact", activation=activation).net
    hollow = _layer(dim, "hollow", activation=activation).net
    eye = jnp.eye(dim)

    @jax.jit
    def check(x, t):
        return (jax.jacfwd(lambda v: mlp(t, v)[0])(x), mlp(t, x, eye)[1],
                jax.jacfwd(lambda v: hollow(t, v)[0])(x), *hollow(t, x, eye)[1:])

    for i, x in enumerate(_points(3, dim, seed=2)):
        jac, jv, hjac, hjv, div = check(x, 0.3 * i)
        np.testing.assert_allclose(jv.T, jac, atol=1e-12)
        np.testing.assert_allclose(hjv.T, hjac, atol=1e-12)
        assert float(div) == pytest.approx(float(jnp.trace(hjac)), abs=1e-12)
        assert abs(float(jnp.trace(hjac))) > 1e-3


# --------------------------------------------------------------------------- exact log-dets
def test_hollow_log_det_is_the_autodiff_jacobian_and_the_inverse_round_trips():
    # (exact mode: the conformance suite)
    dim = 3
    layer = _layer(dim, "hollow", seed=3, num_steps=32)

    @eqx.filter_jit
    def both(layer, x):
        y, ladj = layer.call_and_ladj(x)
        x2, ildj = layer.inverse_and_ladj(y)
        jac = jax.jacfwd(lambda v: layer.call_and_ladj(v)[0])(x)
        ijac = jax.jacfwd(lambda v: layer.inverse_and_ladj(v)[0])(x)
        return y, ladj, x2, ildj, jac, ijac, layer.inverse_and_ladj(x)[1]

    for x in _points(2, dim, seed=3, scale=2.0):
        y, ladj, x2, ildj, jac, ijac, ildj_x = both(layer, x)
        for j, l in ((jac, ladj), (ijac, ildj_x)):
            sign, logdet = np.linalg.slogdet(np.asarray(j))
            assert sign > 0 and abs(logdet) > 1e-2
            assert float(l) == pytest.approx(logdet, abs=1e-7)
        assert float(jnp.abs(y - x).max()) > 0.1
        np.testing.assert_allclose(x2, x, atol=1e-8)
        assert float(ildj) == pytest.approx(-float(ladj), abs=1e-8)


def test_adaptive_diffrax_solve_agrees_with_torchdiffeq():
    """dopri5 through diffrax.diffeqsolve against torchdiffeq with the same weights: each
    backend controls its own steps, so at tight tolerances they agree to those tolerances."""
    dim = 3
    tight = dict(solver="dopri5", atol=1e-10, rtol=1e-10)
    layer = _with(_layer(dim, scale=0.5, seed=4), **tight)
    x = _points(4, dim, seed=4)
    y, ladj = _forward(layer, x)
    torch_layer = pt.transforms.CNF(dim, (8, 8), estimator="exact", **tight).double()
    torch_layer.net.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in named_arrays(layer.net).items()})
    with torch.no_grad():
        yt, ladjt = torch_layer.call_and_ladj(torch.as_tensor(np.array(x)))
    np.testing.assert_allclose(y, yt.numpy(), atol=1e-8)
    np.testing.assert_allclose(ladj, ladjt.numpy(), atol=1e-8)
    assert float(jnp.abs(ladj).min()) > 0.05


# --------------------------------------------------------------------------- Hutchinson
@pytest.mark.parametrize("noise,inverse", [("gaussian", False), ("rademacher", True)])
def test_hutchinson_is_unbiased_with_the_variance_of_one_probe_per_solve(noise, inverse, monkeypatch):
    dim, n = 3, 4000
    layer = _layer(dim, "hutchinson", noise=noise, scale=0.5, seed=7)
    run = _inverse if inverse else _forward
    x0 = _points(1, dim, seed=8)
    y_exact, ladj_exact = run(_with(layer, estimator="exact"), x0)
    keys = jax.random.split(jax.random.key(9), n)
    y, est = run(layer, jnp.broadcast_to(x0, (n, dim)), keys)
    np.testing.assert_array_equal(est, run(layer, jnp.broadcast_to(x0, (n, dim)), keys)[1])
    np.testing.assert_allclose(y, jnp.broadcast_to(y_exact, (n, dim)), atol=1e-12)
    # The estimate is linear in e e^T: chosen probes (passed in place of the key) recover
    # its quadratic form.
    probes = jnp.asarray(probe_basis(dim))
    monkeypatch.setattr(CNF, "_probe", lambda self, x, key: key)
    q = run(layer, jnp.broadcast_to(x0, probes.shape), probes)[1]
    monkeypatch.undo()
    assert_one_probe_moments(np.asarray(est), float(ladj_exact[0]), symmetric_form(q, dim), noise)


def test_noise_keys_come_from_the_caller_or_numpyro_and_exact_modes_need_none():
    flow = _perturbed(pf.build_flow("ffjord", 2, hidden_dims=(8,), key=jax.random.key(0)), 0.5)
    x = _points(64, 2, seed=10)
    with pytest.raises(ValueError, match="key"):
        flow.parts[0].call_and_ladj(x[0])
    with pytest.raises(ValueError, match="numpyro.handlers.seed"):
        flow.to_transform().call_with_intermediates(x)
    y1, a = flow.to_transform(key=jax.random.key(1)).call_with_intermediates(x)
    _, b = flow.to_transform(key=jax.random.key(1)).call_with_intermediates(x)
    np.testing.assert_array_equal(a, b)
    with numpyro.handlers.seed(rng_seed=0):
        y2, c = flow.to_transform().call_with_intermediates(x)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(y2, y1, atol=1e-12)  # the noise moves the log-det, never the map
    # So the maps alone need no key (issue 17): the ODE for x without the divergence.
    t = flow.to_transform()
    np.testing.assert_allclose(t(x), y1, atol=1e-12)
    back = flow.to_transform(key=jax.random.key(1)).inverse_and_ladj(y1)[0]
    np.testing.assert_allclose(t.inv(y1), back, atol=1e-12)
    np.testing.assert_allclose(back, x, atol=1e-5)  # rk4's error on these dynamics
    np.testing.assert_allclose(flow.forward_map(x[0]), y1[0], atol=1e-12)
    exact = eqx.tree_at(lambda f: f.parts, flow, tuple(_with(p, estimator="exact") for p in flow.parts))
    assert not exact.is_stochastic
    exact.to_transform()(x)


# --------------------------------------------------------------------------- gradients
def test_hollow_gradients_match_finite_differences():
    layer = _layer(2, "hollow", hidden_dims=(4,), num_steps=4)
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    x = _points(3, 2, seed=11)
    w = jnp.asarray(np.random.default_rng(12).standard_normal((3, 3)))

    @jax.jit
    def loss(p):  # (the inverse runs the same code with the time reversed)
        y, ladj = jax.vmap(eqx.combine(p, static).call_and_ladj)(x)
        return (w[:, :2] * y).sum() + (w[:, 2] * ladj).sum()

    grad = jax.jit(jax.grad(loss))(params)
    rng = np.random.default_rng(13)
    for _ in range(3):  # central differences along random directions in parameter space
        d = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
        h = 1e-6
        up = loss(jax.tree.map(lambda a, b: a + h * b, params, d))
        down = loss(jax.tree.map(lambda a, b: a - h * b, params, d))
        fd = float(up - down) / (2 * h)
        ad = sum(float((g * e).sum()) for g, e in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
        assert ad == pytest.approx(fd, abs=1e-6 * (1 + abs(ad)))


def test_backsolve_adjoint_agrees_with_backpropagation_in_torch():
    """adjoint=True: diffrax.diffeqsolve with the same tableau and steps, so the value is
    torch's to rounding, and BacksolveAdjoint gradients, which match backpropagation
    through the solver (torch, itself checked against finite differences) to the
    solver's accuracy."""
    layer = _with(_layer(2, "exact", num_steps=16), adjoint=True)
    x = _points(5, 2, seed=13)
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def loss(p):
        y, ladj = jax.vmap(eqx.combine(p, static).call_and_ladj)(x)
        return (y**2).sum() + ladj.sum()

    value, grad = jax.jit(jax.value_and_grad(loss))(params)
    torch_layer = pt.transforms.CNF(2, (8, 8), estimator="exact", num_steps=16).double()
    torch_layer.net.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in named_arrays(layer.net).items()})
    y, ladj = torch_layer.call_and_ladj(torch.as_tensor(np.array(x)))
    torch_value = (y**2).sum() + ladj.sum()
    torch_value.backward()
    assert float(value) == pytest.approx(torch_value.item(), abs=1e-12)
    torch_grads = dict(torch_layer.net.named_parameters())
    for name, g in named_arrays(grad.net).items():
        expected = torch_grads[name].grad.numpy()
        np.testing.assert_allclose(g, expected, atol=1e-6 * (1 + np.abs(expected).max()))


# --------------------------------------------------------------------------- regularisers
@pytest.mark.parametrize("estimator", ["exact", "hollow"])
def test_constant_dynamics_have_closed_form_map_and_regularisers(estimator):
    dim, T = 3, 2.0
    layer = astype(CNF(dim, (8,), estimator=estimator, time_length=T, kinetic_energy=1.0, jacobian_norm=1.0,
                       key=jax.random.key(0)), jnp.float64)
    layer = jax.tree.map(lambda a: jnp.zeros_like(a) if eqx.is_inexact_array(a) else a, layer)
    c = jnp.array([0.5, -1.0, 2.0])
    where = (lambda m: m.net.b_out) if estimator == "hollow" else (lambda m: m.net.layers[-1].bias)
    layer = eqx.tree_at(where, layer, c)
    x = _points(4, dim, seed=14)
    y, ladj, reg = jax.jit(jax.vmap(layer.call_ladj_and_regularization))(x)
    np.testing.assert_allclose(y, x + T * c, atol=1e-12)
    np.testing.assert_allclose(ladj, 0.0, atol=1e-12)
    np.testing.assert_allclose(reg, T * float((c**2).sum()), rtol=1e-12)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "options,match",
    [
        ({"estimator": "trace"}, "estimator='trace' is not one of"),
        ({"solver": "tsit5"}, "solver='tsit5' is not one of"),
        ({"activation": "relu"}, "activation='relu' is not one of"),
        ({"num_steps": 0}, "num_steps=0 must be a positive integer"),
        ({"adjoint": 1}, "adjoint=1 must be True or False"),
        ({"jacobian_norm": float("inf")}, "jacobian_norm=inf must be a finite number >= 0"),
    ],
)
def test_bad_options_are_value_errors_naming_the_fix(options, match):
    with pytest.raises(ValueError, match=match):
        pf.build_flow("ffjord", 2, key=jax.random.key(0), **options)
    with pytest.raises(ValueError, match=match):
        CNF(2, **options, key=jax.random.key(0))


def test_build_flow_gives_identity_cnf_layers_with_the_registry_defaults():
    flow = pf.build_flow("ffjord", 2, num_layers=2, hidden_dims=[8], estimator="exact", key=jax.random.key(0))
    assert [type(p) for p in flow.parts] == [CNF, CNF]
    layer = flow.parts[0]
    assert (layer.solver, layer.num_steps, layer.noise, layer.time_length) == ("rk4", 8, "gaussian", 1.0)
    x = _points(4, 2, seed=15)
    y, ladj = flow.to_transform().call_with_intermediates(x)
    np.testing.assert_allclose(y, x, atol=1e-12)
    np.testing.assert_allclose(ladj, 0.0, atol=1e-12)
