"""Stochastic normalizing flows (Pyro backend) against independent references: Gaussian
transition densities (scipy), the double well's log Z and P(x1 < 0) (quadrature
constants of pyroflows.toys), exact Gaussian samples, finite differences, Pyro's own
TransformedDistribution and a conjugate model's closed-form evidence."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value

import pyroflows.torch as pf
from pyroflows import toys
from pyroflows.diagnostics import ess
from pyroflows.torch import snf
from pyroflows.torch.transforms import ElementwiseAffine
from tests import snf_reference as ref
from tests.backend_checks import check_invariant_move, invariance_points, metropolis_blocks

DOUBLE_WELL = toys.log_density("double_well", "torch")


def gaussian_log_prob(y):
    d = dist.MultivariateNormal(torch.as_tensor(ref.MEAN), torch.as_tensor(ref.COV))
    return d.log_prob(y)


def test_langevin_weight_is_the_log_ratio_of_the_gaussian_transition_densities():
    y = torch.as_tensor(np.random.default_rng(0).normal(size=(6, 2)))
    e = 0.05
    block = snf.Langevin(e).double()
    with torch.no_grad():
        y1, ds = block(y, DOUBLE_WELL, torch.Generator().manual_seed(1))
    y0, y1 = y.numpy(), y1.numpy()
    np.testing.assert_allclose(ds.numpy(), ref.langevin_log_ratio(y0, y1, e), rtol=1e-10, atol=1e-10)
    # the step moved: the drift and noise were applied
    assert np.all(np.abs(y1 - y0) > 1e-3)

    # several steps are the sum of single steps with the same draws
    yy, total = y, 0
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(3):
            yy, d = block(yy, DOUBLE_WELL, g)
            total = total + d
        y3, ds3 = snf.Langevin(e, num_steps=3).double()(y, DOUBLE_WELL, torch.Generator().manual_seed(2))
    torch.testing.assert_close(y3, yy)
    torch.testing.assert_close(ds3, total)


def test_untrained_flow_with_annealed_metropolis_is_an_annealed_importance_sampler():
    torch.manual_seed(0)
    layers = []
    for _ in range(10):  # identity-initialised RealNVP, then an annealed Metropolis block
        layers += [
            pf.build_flow("realnvp", 2, num_layers=3, hidden_dims=(8,)),
            snf.MetropolisHastings(0.5, num_steps=5),
        ]
    flow = snf.StochasticFlow(layers, 2, DOUBLE_WELL).double()
    assert flow.schedule == tuple((i + 1) / 10 for i in range(10))
    z = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(layers[0].call_and_ladj(z), (z, torch.zeros(5, dtype=torch.float64)))
    with torch.no_grad():
        x, log_w = flow.sample_and_log_weight(20000, generator=torch.Generator().manual_seed(0))
    log_z, se_log_z, p_left, se_p = ref.log_z_and_p_left(x.numpy(), log_w.numpy())
    # The tolerances are 4 standard errors from the spread of 20 groups of 1000 paths
    # (measured: se(log Z) ~ 0.01, se(P) ~ 0.0025), plus the constants' rounding; the
    # first asserts keep those errors small, so the comparison has teeth.
    assert se_log_z < 0.03 and se_p < 0.01
    assert abs(log_z - toys.DOUBLE_WELL_LOG_Z) < 4 * se_log_z + 1e-4
    assert abs(p_left - toys.DOUBLE_WELL_P_LEFT) < 4 * se_p + 1e-4
    # without the blocks the same flow is plain importance sampling from N(0, I): worse
    with torch.no_grad():
        plain = snf.StochasticFlow(layers[::2], 2, DOUBLE_WELL).double()
        _, log_w_plain = plain.sample_and_log_weight(20000, generator=torch.Generator().manual_seed(0))
    assert ess(log_w.numpy()) > 3 * ess(log_w_plain.numpy())


@metropolis_blocks(snf)
def test_metropolis_type_blocks_leave_the_target_invariant(block):
    y = torch.as_tensor(invariance_points())
    with torch.no_grad():
        y_new, ds = block.double()(y, gaussian_log_prob, torch.Generator().manual_seed(3))
        log_p, log_p_new = gaussian_log_prob(y), gaussian_log_prob(y_new)
    # torch.testing.assert_close's float64 tolerance
    check_invariant_move(y.numpy(), y_new.numpy(), ds.numpy(), log_p.numpy(), log_p_new.numpy(), 1e-7)


def test_reverse_path_bound_is_exact_when_the_base_is_the_target():
    """q0 = p and an MH block for p: q = p, and every reverse path gives log p(x) exactly."""
    base = dist.MultivariateNormal(torch.as_tensor(ref.MEAN), torch.as_tensor(ref.COV))
    flow = snf.StochasticFlow([snf.MetropolisHastings(0.8, num_steps=3)], 2, gaussian_log_prob, base=base).double()
    x = base.sample((50,))
    bound = flow.log_prob_lower_bound(x)
    torch.testing.assert_close(bound, base.log_prob(x))
    # and the forward path's weight is p(x) / q0(z0) times the reversible block's ratio: 0
    _, log_w = flow.sample_and_log_weight(50)
    torch.testing.assert_close(log_w, torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)


def test_without_blocks_the_weight_is_the_flows_density_ratio():
    torch.manual_seed(0)
    flow = pf.build_flow("realnvp", 2, num_layers=2, hidden_dims=(8,)).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = snf.StochasticFlow([flow], 2, DOUBLE_WELL)
    x, log_w = path.sample_and_log_weight(100)
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    log_q = dist.TransformedDistribution(base, [flow]).log_prob(x.detach().clone())
    torch.testing.assert_close(log_w, DOUBLE_WELL(x) - log_q)
    torch.testing.assert_close(path.log_prob_lower_bound(x), log_q)


def test_gradients_flow_through_langevin_blocks():
    torch.manual_seed(0)
    affine = ElementwiseAffine(2)
    with torch.no_grad():
        affine.loc.copy_(torch.tensor([0.3, -0.2]))
        affine.unconstrained_log_scale.copy_(torch.tensor([-0.1, 0.2]))
    flow = snf.StochasticFlow(
        [affine, snf.Langevin(0.02, num_steps=2, learnable_step_size=True), snf.Langevin(0.01)], 2, DOUBLE_WELL
    ).double()

    def loss():  # the same noise on every call
        return flow.reverse_kl_loss(16, generator=torch.Generator().manual_seed(5))

    params = list(flow.parameters())
    assert len(params) == 3  # loc, log-scale, the learnable log step size
    grads = torch.autograd.grad(loss(), params)
    for p, g in zip(params, grads):
        assert torch.isfinite(g).all() and (g.abs() > 1e-6).all()
        flat = p.data.view(-1)
        for k in range(flat.numel()):
            old, h, vals = flat[k].item(), 1e-6, []
            for step in (h, -h):
                flat[k] = old + step
                with torch.no_grad():
                    vals.append(loss().item())
            flat[k] = old
            assert abs((vals[0] - vals[1]) / (2 * h) - g.view(-1)[k].item()) < 1e-5 * (1 + abs(g.view(-1)[k].item()))


def make_double_well_snf():
    torch.manual_seed(0)
    layers = [
        pf.build_flow("realnvp", 2, num_layers=2, hidden_dims=(16, 16)),
        snf.MetropolisHastings(0.25, num_steps=5),
    ]
    return snf.StochasticFlow(layers, 2, DOUBLE_WELL).double()


def test_fit_reverse_kl_improves_the_expected_log_weight_on_the_double_well():
    flow = make_double_well_snf()
    fitted, history = pf.fit_reverse_kl(flow, num_steps=120, num_samples=128, lr=3e-3, progress=False)
    # each step's loss is a 128-path estimate of E[-log w] at that step's weights
    loss = np.asarray(history.loss)
    assert len(loss) == 120 and np.isfinite(loss).all()
    before, after, se = -loss[:5].mean(), -loss[-20:].mean(), loss[-20:].std() / math.sqrt(20)
    # measured: 5.0 -> 9.9 (torch), 5.4 -> 7.7 (JAX; se 0.3); E[log w] <= log Z for every flow
    assert after > before + 1.0
    assert after < toys.DOUBLE_WELL_LOG_Z + 4 * se
    assert fitted is flow


def test_fit_mle_trains_through_reverse_paths():
    flow = make_double_well_snf()
    data = ref.double_well_samples(1000)
    fitted, history = pf.fit_mle(flow, data, num_steps=60, eval_every=20, lr=3e-3, progress=False)
    assert fitted is flow and np.isfinite(history.validation_loss).all()
    assert history.validation_loss[-1] < history.validation_loss[0]


def test_a_torch_module_that_is_not_a_flow_layer_is_named():
    # the errors both backends share are in tests/test_snf.py
    with pytest.raises(ValueError, match="neither a flow layer nor a stochastic block"):
        snf.StochasticFlow([torch.nn.Linear(2, 2)], 2, DOUBLE_WELL)


# --------------------------------------------------------------------------- AutoSNF
def conjugate_model(data):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
    with pyro.plate("obs", len(data)):
        pyro.sample("x", dist.Normal(mu, ref.NOISE).to_event(1), obs=data)


def test_autosnf_elbo_is_a_lower_bound_and_its_weights_are_unbiased():
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.importance import vectorized_importance_weights

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    # starts at the posterior mean, wider than the posterior (sd 0.22), so the blocks move
    # the draws and the weights stay light-tailed
    data = torch.as_tensor(ref.OBS)
    guide = pf.AutoSNF(
        conjugate_model,
        hidden_dims=(8,),
        init_loc_fn=init_to_value(values={"mu": torch.as_tensor(ref.POSTERIOR_MEAN)}),
        init_scale=0.3,
        stochastic=[snf.MALA(0.02, num_steps=2), snf.MetropolisHastings(0.1, num_steps=2)],
    )
    svi = SVI(conjugate_model, guide, pyro.optim.Adam({"lr": 5e-3}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(30)]
    assert np.all(np.isfinite(losses))
    vectorized = SVI(
        conjugate_model, guide, pyro.optim.Adam({"lr": 5e-3}), Trace_ELBO(num_particles=4, vectorize_particles=True)
    )
    assert np.isfinite(vectorized.step(data))

    with torch.no_grad():
        log_w = vectorized_importance_weights(
            conjugate_model, guide, data, num_samples=4000, max_plate_nesting=1, normalized=False
        )[0].numpy()
    ref.check_evidence_bound(log_w)  # measured: iwelbo within 0.015 of log p(x), the ELBO about 0.1 below
    with pytest.raises(NotImplementedError, match="NeuTraReparam"):
        guide.get_transform()
    median = guide.median(data, num_samples=200)
    assert median["mu"].shape == (2,)
