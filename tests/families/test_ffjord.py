"""FFJORD (CNF) on every backend: divergences against autodiff, log-dets against the
autodiff Jacobian of the computed map, the Hutchinson estimator's mean and variance against
the quadratic form it samples, solvers against each other, gradients against central
differences and against each other, closed forms, options.

Each CNF structure (estimator, solver, steps, dims) is a compilation of an ODE solve on
JAX; the tests with ``jax_keep`` say which cases JAX runs and why they suffice."""

import numpy as np
import pytest

from tests.families.checks import check_gradients
from tests.hutchinson import assert_one_probe_moments, probe_basis, symmetric_form


def _cnf(backend, dim, estimator="exact", hidden_dims=(8, 8), seed=0, scale=0.3, weights=None, **options):
    """A CNF with every weight ``scale`` * N(0, 1) from numpy's generator (the same network on
    every backend), or set to ``weights`` (those of a CNF of the same network kind, under
    other options)."""
    layer = backend.make("CNF", dim, hidden_dims, estimator=estimator, **options)
    if weights is None:
        rng = np.random.default_rng(seed)
        weights = {k: scale * rng.standard_normal(v.shape) for k, v in sorted(backend.params(layer).items())}
    return backend.with_arrays(layer, weights)


def _points(n, dim, seed=1, scale=1.5):
    return scale * np.random.default_rng(seed).standard_normal((n, dim))


# --------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("activation", ["tanh", "softplus", "silu"])
def test_dynamics_divergence_and_tangents_are_the_autodiff_jacobian(backend, activation):
    dim = 4
    mlp = _cnf(backend, dim, "exact", activation=activation).net
    hollow = _cnf(backend, dim, "hollow", activation=activation).net
    eye = np.eye(dim)
    for i, x in enumerate(_points(3, dim, seed=2)):
        t = np.asarray(0.3 * i)
        jac = backend.method_jacobian(mlp, "__call__", (t, x), argnum=1)
        _, jv = backend.method(mlp, "__call__", t, x, eye)
        np.testing.assert_allclose(jv.T, jac, atol=1e-12)  # row j of jv is J e_j
        jac = backend.method_jacobian(hollow, "__call__", (t, x), argnum=1)
        _, jv, div = backend.method(hollow, "__call__", t, x, eye)
        np.testing.assert_allclose(jv.T, jac, atol=1e-12)
        # The divergence from the transformer's own derivative is the full trace: the
        # conditioner of coordinate i does not see x_i.
        assert float(div) == pytest.approx(np.trace(jac), abs=1e-12)
        assert abs(np.trace(jac)) > 1e-3


# --------------------------------------------------------------------------- exact log-dets
# JAX: the hollow estimator (the conformance suite checks the exact one on every backend).
@pytest.mark.jax_keep(lambda estimator, dim: estimator == "hollow" and dim == 3)
@pytest.mark.parametrize("estimator", ["exact", "hollow"])
@pytest.mark.parametrize("dim", [1, 3])
def test_exact_log_det_is_the_autodiff_jacobian_of_the_computed_map(backend, estimator, dim):
    layer = _cnf(backend, dim, estimator, seed=5, num_steps=32)
    xs = _points(2, dim, seed=3, scale=2.0)
    for x in xs:
        for method in ("call_and_ladj", "inverse_and_ladj"):
            sign, logdet = np.linalg.slogdet(backend.layer_jacobian_of(layer, method, x))
            assert sign > 0 and abs(logdet) > 1e-2
            # The map is the solver's, the log-det the ODE's: they agree to the solver's error.
            assert backend.apply(layer, method, x)[1] == pytest.approx(logdet, abs=1e-7)
    # At 32 steps the inverse solve (the same ODE backwards) returns to the start closely.
    y, ladj = backend.apply(layer, "call_and_ladj", xs)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y)
    assert np.abs(y - xs).max() > 0.1
    np.testing.assert_allclose(x2, xs, atol=1e-8)
    np.testing.assert_allclose(ildj, -ladj, atol=1e-8)


# (options, error bound): the defaults (rk4, 8 steps) give 1e-5 on these dynamics (log-dets
# about 0.3); stronger dynamics need more steps or an adaptive solver. Torch only: every
# solver is an ODE compilation on JAX, which runs the same tableaux (checked against
# torchdiffeq in tests/torch/test_ffjord.py) and gives torch's numbers for the default
# fixed-step and an adaptive (diffrax) solve (tests/parity).
SOLVERS = [
    pytest.param({}, 3e-5, id="default"),
    pytest.param({"solver": "rk4", "num_steps": 32}, 1e-7, id="rk4-32"),
    pytest.param({"solver": "midpoint", "num_steps": 64}, 1e-4, id="midpoint-64"),
    pytest.param({"solver": "euler", "num_steps": 64}, 5e-2, id="euler-64"),
    pytest.param({"solver": "bosh3", "atol": 1e-9, "rtol": 1e-9}, 1e-6, id="bosh3"),
    pytest.param({"solver": "dopri5"}, 1e-3, id="dopri5"),  # atol = rtol = 1e-5 per step
]


@pytest.mark.jax_keep(lambda options, tol: False)
@pytest.mark.parametrize("options,tol", SOLVERS)
def test_solvers_converge_to_the_same_flow_and_default_accuracy(backend, options, tol):
    dim = 3
    reference = _cnf(backend, dim, solver="dopri5", atol=1e-11, rtol=1e-11, scale=0.5, seed=5)
    x = _points(8, dim, seed=4)
    y_ref, ladj_ref = backend.apply(reference, "call_and_ladj", x)
    assert np.abs(ladj_ref).min() > 0.05
    layer = _cnf(backend, dim, weights=backend.params(reference), **options)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    err = max(np.abs(y - y_ref).max(), np.abs(ladj - ladj_ref).max())
    assert err < tol, (options, err)


# JAX: the hollow network (the conformance suite round-trips the exact default on every
# backend, and tests/parity checks the adaptive solve's numbers against torch's both ways).
@pytest.mark.jax_keep(lambda estimator, options, tol: estimator == "hollow")
@pytest.mark.parametrize(
    "estimator,options,tol",
    [("exact", {}, 1e-5), ("hollow", {}, 1e-5), ("exact", {"solver": "dopri5", "atol": 1e-9, "rtol": 1e-9}, 1e-6)],
)
def test_inverse_round_trips(backend, estimator, options, tol):
    layer = _cnf(backend, 3, estimator, scale=0.5, **options)
    x = _points(16, 3, seed=5, scale=3.0)
    y, ladj = backend.apply(layer, "call_and_ladj", x)
    x2, ildj = backend.apply(layer, "inverse_and_ladj", y.copy())
    assert np.abs(y - x).max() > 0.1
    np.testing.assert_allclose(x2, x, atol=tol)
    np.testing.assert_allclose(ildj, -ladj, atol=tol)


# --------------------------------------------------------------------------- Hutchinson
@pytest.mark.jax_keep(lambda noise, inverse: (noise, inverse) in (("gaussian", False), ("rademacher", True)))
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("inverse", [False, True])
def test_hutchinson_is_unbiased_with_the_variance_of_one_probe_per_solve(backend, noise, inverse):
    dim, n = 3, 4000
    layer = _cnf(backend, dim, "hutchinson", noise=noise, scale=0.5, seed=7)
    exact = _cnf(backend, dim, "exact", noise=noise, weights=backend.params(layer))
    method = "inverse_and_ladj" if inverse else "call_and_ladj"
    x0 = _points(1, dim, seed=8)
    y_exact, ladj_exact = backend.apply(exact, method, x0)
    xs = np.broadcast_to(x0, (n, dim))
    y, est = backend.apply(layer, method, xs, seed=9)
    # The seed decides the probes; the map itself does not depend on them.
    np.testing.assert_array_equal(est, backend.apply(layer, method, xs, seed=9)[1])
    np.testing.assert_allclose(y, np.broadcast_to(y_exact, (n, dim)), atol=1e-12)
    # The estimate is linear in e e^T: chosen probes recover its quadratic form.
    probes = probe_basis(dim)
    q = backend.apply(layer, method, np.broadcast_to(x0, probes.shape), probes=probes)[1]
    assert_one_probe_moments(est, float(ladj_exact[0]), symmetric_form(q, dim), noise)


def test_hutchinson_jacobian_norm_is_unbiased_for_the_exact_norm(backend):
    dim, n = 3, 4000
    layer = _cnf(backend, dim, "hutchinson", scale=0.5, seed=14, jacobian_norm=1.0)
    exact = _cnf(backend, dim, "exact", jacobian_norm=1.0, weights=backend.params(layer))
    x0 = _points(1, dim, seed=15)
    reg_exact = float(backend.apply(exact, "call_ladj_and_regularization", x0)[2][0])
    reg = backend.apply(layer, "call_ladj_and_regularization", np.broadcast_to(x0, (n, dim)), seed=16)[2]
    assert reg.var() > 0 and abs(reg.mean() - reg_exact) < 4 * (reg.var() / n) ** 0.5
    unregularised = _cnf(backend, dim, "hutchinson", weights=backend.params(layer))
    assert backend.apply(unregularised, "call_ladj_and_regularization", x0, seed=17)[2][0] == 0.0


# --------------------------------------------------------------------------- gradients
# JAX: the hollow network, forward (the inverse runs the same code with the time reversed).
@pytest.mark.jax_keep(lambda estimator, method: estimator == "hollow" and method == "call_and_ladj")
@pytest.mark.parametrize("estimator", ["exact", "hollow"])
@pytest.mark.parametrize("method", ["call_and_ladj", "inverse_and_ladj"])
def test_exact_gradients_match_finite_differences(backend, estimator, method):
    layer = _cnf(backend, 2, estimator, hidden_dims=(4,), num_steps=4)
    check_gradients(backend, layer, method, _points(3, 2, seed=10), per_param=3)


# Torch here; tests/parity checks JAX's adjoint gradients against torch's backpropagation.
@pytest.mark.jax_keep(lambda: False)
def test_adjoint_gradients_agree_with_backpropagation_through_the_solver(backend):
    """adjoint=True (torchdiffeq's odeint_adjoint, diffrax's BacksolveAdjoint): the same
    value, and gradients that match backpropagation through the solver (itself checked
    against finite differences above) to the solver's accuracy."""
    layer = _cnf(backend, 2, "exact", num_steps=16)
    adjoint = _cnf(backend, 2, "exact", num_steps=16, adjoint=True, weights=backend.params(layer))
    x = _points(5, 2, seed=11)
    weights = np.random.default_rng(12).standard_normal((5, 3))
    value, grads, _ = backend.value_and_grads(layer, "call_and_ladj", x, weights)
    value_adjoint, grads_adjoint, _ = backend.value_and_grads(adjoint, "call_and_ladj", x, weights)
    assert value_adjoint == pytest.approx(value, abs=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(grads_adjoint[name], g, atol=1e-6 * (1 + np.abs(g).max()))


def test_hutchinson_and_regularised_gradients_are_finite(backend):
    layer = _cnf(backend, 3, "hutchinson", noise="rademacher", kinetic_energy=0.1, jacobian_norm=0.1)
    x = _points(6, 3, seed=12, scale=10.0)
    y, ladj, reg = backend.apply(layer, "call_ladj_and_regularization", x, seed=13)
    assert reg.shape == (6,) and np.all(reg > 0)
    _, grads, grad_x = backend.value_and_grads(layer, "call_ladj_and_regularization", x, np.ones((6, 4)), seed=13)
    assert all(np.all(np.isfinite(g)) for g in (*grads.values(), grad_x))


# --------------------------------------------------------------------------- regularisers
@pytest.mark.parametrize("estimator", ["exact", "hollow"])
def test_constant_dynamics_have_closed_form_map_and_regularisers(backend, estimator):
    dim, T = 3, 2.0
    layer = backend.make("CNF", dim, (8,), estimator=estimator, time_length=T, kinetic_energy=1.0, jacobian_norm=1.0)
    c = np.array([0.5, -1.0, 2.0])
    values = {k: np.zeros_like(v) for k, v in backend.params(layer).items()}
    values["net.b_out" if estimator == "hollow" else "net.layers.1.bias"] = c
    layer = backend.with_arrays(layer, values)
    x = _points(4, dim, seed=13)
    y, ladj, reg = backend.apply(layer, "call_ladj_and_regularization", x)
    np.testing.assert_allclose(y, x + T * c, atol=1e-12)
    np.testing.assert_allclose(ladj, 0.0, atol=1e-12)
    np.testing.assert_allclose(reg, T * (c**2).sum(), rtol=1e-12)  # |df/dx|_F = 0


# --------------------------------------------------------------------------- options and building
@pytest.mark.parametrize(
    "options,match",
    [
        ({"estimator": "trace"}, "estimator='trace' is not one of"),
        ({"noise": "uniform"}, "noise='uniform' is not one of"),
        ({"solver": "rk45"}, "solver='rk45' is not one of"),
        ({"solver": "tsit5"}, "solver='tsit5' is not one of"),
        ({"activation": "relu"}, "activation='relu' is not one of"),
        ({"num_steps": 0}, "num_steps=0 must be a positive integer"),
        ({"atol": -1e-5}, "atol=-1e-05 must be a positive number"),
        ({"time_length": 0.0}, "time_length=0.0 must be a positive number"),
        ({"adjoint": "yes"}, "adjoint='yes' must be True or False"),
        ({"adjoint": 1}, "adjoint=1 must be True or False"),
        ({"kinetic_energy": -0.1}, "kinetic_energy=-0.1 must be a finite number >= 0"),
        ({"jacobian_norm": float("inf")}, "jacobian_norm=inf must be a finite number >= 0"),
        ({"steps": 4}, "no option 'steps'.*num_steps"),
    ],
)
def test_bad_options_are_value_errors_naming_the_fix(backend, options, match):
    with pytest.raises(ValueError, match=match):
        backend.pf.build_flow("ffjord", 2, **options)
    if "steps" not in options:
        with pytest.raises(ValueError, match=match):
            backend.make("CNF", 2, **options)


@pytest.mark.parametrize("options", [{"estimator": "hollow", "num_steps": 3}, {"estimator": "exact"}], ids=str)
def test_build_flow_stacks_identity_cnf_layers_with_the_registry_defaults(backend, options):
    flow = backend.build_flow("ffjord", 2, num_layers=2, hidden_dims=[8], **options)
    assert [type(p) for p in flow.parts] == [backend.transforms().CNF] * 2
    layer = flow.parts[0]
    expected = ("rk4", options.get("num_steps", 8), "gaussian", 1.0)
    got = (layer.estimator, layer.solver, layer.num_steps, layer.noise, layer.time_length)
    assert got == (options["estimator"], *expected)
    assert flow.config["time_length"] == 1.0 and flow.config["adjoint"] is False
    x = _points(4, 2, seed=16)
    y, ladj = backend.forward(flow, x)
    # A fresh CNF is the identity (the dynamics start at zero).
    np.testing.assert_allclose(y, x, atol=1e-12)
    np.testing.assert_allclose(ladj, 0.0, atol=1e-12)
