"""FFJORD (CNF) on torch: divergences against autodiff, log-dets against the autodiff Jacobian
of the computed map, the Hutchinson estimator's mean and variance against the quadratic
form it samples, torchdiffeq's tableaux, solvers against each other, gradients, options."""

import numpy as np
import pytest
import torch
from torchdiffeq import odeint

import pyroflows.torch as pf
from pyroflows.ode import TABLEAUX
from pyroflows.torch.transforms import CNF

from tests.hutchinson import assert_one_probe_moments, probe_basis, symmetric_form
from tests.torch.helpers import param_grad_check


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _layer(dim, estimator="exact", scale=0.3, seed=0, hidden_dims=(8, 8), **options):
    """A CNF whose weights (zero output layer included) are moved off their initial values."""
    torch.manual_seed(seed)
    layer = CNF(dim, hidden_dims, estimator=estimator, **options).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def _twin(layer, **options):
    """The same weights under other options (same network kind)."""
    torch.manual_seed(0)
    hidden = [l.weight.shape[-2] for l in layer.net.layers][: -1 if layer.estimator != "hollow" else None]
    other = CNF(layer.dim, hidden, estimator=options.pop("estimator", layer.estimator), **options).double()
    other.load_state_dict(layer.state_dict())
    return other


def _points(n, dim, seed=1, scale=1.5):
    return scale * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("activation", ["tanh", "softplus", "silu"])
def test_dynamics_divergence_and_tangents_are_the_autodiff_jacobian(activation):
    dim = 4
    mlp = _layer(dim, "exact", activation=activation).net
    hollow = _layer(dim, "hollow", activation=activation).net
    eye = torch.eye(dim)
    for i, x in enumerate(_points(3, dim, seed=2)):
        t = torch.tensor(0.3 * i)
        jac = torch.autograd.functional.jacobian(lambda v: mlp(t, v)[0], x)
        f, jv = mlp(t, x, eye)
        np.testing.assert_allclose(jv.detach().T, jac, atol=1e-12)  # row j of jv is J e_j
        jac = torch.autograd.functional.jacobian(lambda v: hollow(t, v)[0], x)
        f, jv, div = hollow(t, x, eye)
        np.testing.assert_allclose(jv.detach().T, jac, atol=1e-12)
        # The divergence from the transformer's own derivative is the full trace: the
        # conditioner of coordinate i does not see x_i.
        assert div.item() == pytest.approx(torch.trace(jac).item(), abs=1e-12)
        assert abs(torch.trace(jac).item()) > 1e-3


# --------------------------------------------------------------------------- exact log-dets
@pytest.mark.parametrize("estimator", ["exact", "hollow"])
@pytest.mark.parametrize("dim", [1, 3])
def test_exact_log_det_is_the_autodiff_jacobian_of_the_computed_map(estimator, dim):
    layer = _layer(dim, estimator, seed=dim, num_steps=32)
    for x in _points(2, dim, seed=3):
        for fn in (layer.call_and_ladj, layer.inverse_and_ladj):
            jac = torch.autograd.functional.jacobian(lambda v: fn(v)[0], x)
            sign, logdet = torch.linalg.slogdet(jac)
            assert sign > 0 and abs(logdet.item()) > 1e-2
            # The map is the solver's, the log-det the ODE's: they agree to the solver's error.
            assert fn(x)[1].item() == pytest.approx(logdet.item(), abs=1e-7)


@pytest.mark.parametrize("solver", sorted(TABLEAUX))
def test_fixed_step_solvers_use_torchdiffeqs_tableaux(solver):
    """One step of torchdiffeq's method equals the tableau that the JAX backend runs."""
    a, b, c = TABLEAUX[solver]

    def f(t, y):
        return torch.sin(3 * y) * (1 + t) + y**2

    y0, h = torch.tensor([0.3, -0.7]), 0.4
    ks = []
    for i, ci in enumerate(c):
        yi = y0 + h * sum(w * k for w, k in zip(a[i - 1], ks)) if i else y0
        ks.append(f(torch.tensor(ci * h), yi))
    expected = y0 + h * sum(w * k for w, k in zip(b, ks))
    got = odeint(f, y0, torch.tensor([0.0, h]), method=solver)[-1]
    np.testing.assert_allclose(got, expected, atol=1e-15)


def test_solvers_converge_to_the_same_flow_and_default_accuracy():
    dim = 3
    reference = _layer(dim, solver="dopri5", atol=1e-11, rtol=1e-11, scale=0.5)
    x = _points(8, dim, seed=4)
    with torch.no_grad():
        y_ref, ladj_ref = reference.call_and_ladj(x)
        # (options, error bound): the defaults (rk4, 8 steps) give 1e-5 on these dynamics
        # (log-dets about 0.3); stronger dynamics need more steps or an adaptive solver.
        for options, tol in [
            ({}, 3e-5),
            ({"solver": "rk4", "num_steps": 32}, 1e-7),
            ({"solver": "midpoint", "num_steps": 64}, 1e-4),
            ({"solver": "euler", "num_steps": 64}, 5e-2),
            ({"solver": "bosh3", "atol": 1e-9, "rtol": 1e-9}, 1e-6),
            ({"solver": "dopri5"}, 1e-3),  # atol = rtol = 1e-5 per step
        ]:
            y, ladj = _twin(reference, **options).call_and_ladj(x)
            err = max((y - y_ref).abs().max().item(), (ladj - ladj_ref).abs().max().item())
            assert err < tol, (options, err)
    assert ladj_ref.abs().min() > 0.05


@pytest.mark.parametrize(
    "estimator,options,tol",
    [("exact", {}, 1e-5), ("hollow", {}, 1e-5), ("exact", {"solver": "dopri5", "atol": 1e-9, "rtol": 1e-9}, 1e-6)],
)
def test_inverse_round_trips(estimator, options, tol):
    layer = _layer(3, estimator, scale=0.5, **options)
    x = _points(16, 3, seed=5, scale=3.0)
    with torch.no_grad():
        y, ladj = layer.call_and_ladj(x)
        x2, ildj = layer.inverse_and_ladj(y.clone())
    assert (y - x).abs().max() > 0.1
    np.testing.assert_allclose(x2, x, atol=tol)
    np.testing.assert_allclose(ildj, -ladj, atol=tol)


# --------------------------------------------------------------------------- Hutchinson
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("inverse", [False, True])
def test_hutchinson_is_unbiased_with_the_variance_of_one_probe_per_solve(noise, inverse, monkeypatch):
    dim, n = 3, 4000
    layer = _layer(dim, "hutchinson", noise=noise, scale=0.5, seed=7)
    exact = _twin(layer, estimator="exact", noise=noise)
    x0 = _points(1, dim, seed=8)[0]
    fn = layer.inverse_and_ladj if inverse else layer.call_and_ladj
    with torch.no_grad():
        y_exact, ladj_exact = (exact.inverse_and_ladj if inverse else exact.call_and_ladj)(x0)
        torch.manual_seed(9)
        y, est = fn(x0.expand(n, dim))
        torch.manual_seed(9)
        again = fn(x0.expand(n, dim))[1]
        # The estimate is linear in e e^T: chosen probes recover its quadratic form.
        probes = torch.as_tensor(probe_basis(dim))
        monkeypatch.setattr(layer, "_probe", lambda v: probes)
        q = fn(x0.expand(len(probes), dim))[1]
    # The global generator decides the probes; the map itself does not depend on them.
    assert torch.equal(est, again)
    np.testing.assert_allclose(y, y_exact.expand(n, dim), atol=1e-12)
    assert_one_probe_moments(est.numpy(), ladj_exact.item(), symmetric_form(q.numpy(), dim), noise)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("estimator", ["exact", "hollow"])
def test_exact_gradients_match_finite_differences(estimator):
    layer = _layer(2, estimator, hidden_dims=(4,), num_steps=4)
    x = _points(3, 2, seed=10)
    param_grad_check(layer, lambda v: layer.call_and_ladj(v), x, h=1e-6, tol=1e-6, per_param=3)
    param_grad_check(layer, lambda v: layer.inverse_and_ladj(v), x, h=1e-6, tol=1e-6, per_param=2)


def test_adjoint_gradients_agree_with_backpropagation_through_the_solver():
    layer = _layer(2, "exact", num_steps=16)
    adjoint = _twin(layer, adjoint=True, num_steps=16)
    x = _points(5, 2, seed=11)
    grads = []
    for m in (layer, adjoint):
        y, ladj = m.call_and_ladj(x)
        loss = (y**2).sum() + ladj.sum()
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for g, h in zip(*grads):
        np.testing.assert_allclose(h, g, atol=1e-6 * (1 + g.abs().max().item()))


def test_hutchinson_and_regularised_gradients_are_finite():
    layer = _layer(3, "hutchinson", noise="rademacher", kinetic_energy=0.1, jacobian_norm=0.1)
    x = _points(6, 3, seed=12, scale=10.0)
    y, ladj, reg = layer.call_ladj_and_regularization(x)
    grads = torch.autograd.grad((y**2).sum() + ladj.sum() + reg.sum(), list(layer.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and reg.shape == (6,) and (reg > 0).all()


# --------------------------------------------------------------------------- regularisers
@pytest.mark.parametrize("estimator", ["exact", "hollow"])
def test_constant_dynamics_have_closed_form_map_and_regularisers(estimator):
    dim, T = 3, 2.0
    layer = CNF(dim, (8,), estimator=estimator, time_length=T, kinetic_energy=1.0, jacobian_norm=1.0).double()
    c = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        (layer.net.b_out if estimator == "hollow" else layer.net.layers[-1].bias).copy_(c)
    x = _points(4, dim, seed=13)
    y, ladj, reg = layer.call_ladj_and_regularization(x)
    np.testing.assert_allclose(y.detach(), x + T * c, atol=1e-12)
    np.testing.assert_allclose(ladj.detach(), 0.0, atol=1e-12)
    np.testing.assert_allclose(reg.detach(), T * c.square().sum().item(), rtol=1e-12)  # |df/dx|_F = 0


def test_hutchinson_jacobian_norm_is_unbiased_for_the_exact_norm():
    dim, n = 3, 4000
    layer = _layer(dim, "hutchinson", scale=0.5, seed=14, jacobian_norm=1.0)
    exact = _twin(layer, estimator="exact", jacobian_norm=1.0)
    x0 = _points(1, dim, seed=15)[0]
    with torch.no_grad():
        reg_exact = exact.call_ladj_and_regularization(x0)[2].item()
        reg = layer.call_ladj_and_regularization(x0.expand(n, dim))[2]
    assert reg.var() > 0 and abs(reg.mean().item() - reg_exact) < 4 * (reg.var().item() / n) ** 0.5
    unregularised = _twin(layer)
    assert unregularised.call_ladj_and_regularization(x0)[2].item() == 0.0


# --------------------------------------------------------------------------- options and building
@pytest.mark.parametrize(
    "options,match",
    [
        ({"estimator": "trace"}, "estimator='trace' is not one of"),
        ({"noise": "uniform"}, "noise='uniform' is not one of"),
        ({"solver": "rk45"}, "solver='rk45' is not one of"),
        ({"activation": "relu"}, "activation='relu' is not one of"),
        ({"num_steps": 0}, "num_steps=0 must be a positive integer"),
        ({"atol": -1e-5}, "atol=-1e-05 must be a positive number"),
        ({"time_length": 0.0}, "time_length=0.0 must be a positive number"),
        ({"adjoint": "yes"}, "adjoint='yes' must be True or False"),
        ({"kinetic_energy": -0.1}, "kinetic_energy=-0.1 must be a finite number >= 0"),
        ({"steps": 4}, "no option 'steps'.*num_steps"),
    ],
)
def test_bad_options_are_value_errors_naming_the_fix(options, match):
    with pytest.raises(ValueError, match=match):
        pf.build_flow("ffjord", 2, **options)
    if "steps" not in options:
        with pytest.raises(ValueError, match=match):
            CNF(2, **options)


def test_build_flow_stacks_cnf_layers_with_the_registry_defaults():
    flow = pf.build_flow("ffjord", 2, num_layers=2, hidden_dims=[8], estimator="hollow", num_steps=3)
    assert [type(p) for p in flow.parts] == [CNF, CNF]
    layer = flow.parts[0]
    assert (layer.estimator, layer.solver, layer.num_steps, layer.noise) == ("hollow", "rk4", 3, "gaussian")
    assert flow.config["time_length"] == 1.0 and flow.config["adjoint"] is False
    x = _points(4, 2, seed=16)
    y, ladj = flow.call_and_ladj(x)
    # A fresh CNF is the identity (the dynamics start at zero).
    np.testing.assert_allclose(y.detach(), x, atol=1e-12)
    np.testing.assert_allclose(ladj.detach(), 0.0, atol=1e-12)
