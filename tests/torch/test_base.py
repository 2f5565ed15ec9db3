"""The base machinery: the training-safe cache, ActNorm's data initialisation, LU linear maps."""

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import affine_autoregressive

import pyroflows.torch as pf
from pyroflows.torch.transforms import ActNorm, InvertibleLinear, Permute


def _normal(dim):
    return dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)


def _fit_fixed_batch(flow, x, steps=3):
    d = dist.TransformedDistribution(_normal(x.shape[-1]), [flow])
    opt = torch.optim.Adam(flow.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (-d.log_prob(x).mean()).backward()
        opt.step()


def test_pyro_flows_fail_where_ours_train():
    """The reference failure: Pyro's cache hands back a freed graph on the second step."""
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _fit_fixed_batch(affine_autoregressive(3), x)
    _fit_fixed_batch(pf.build_flow("realnvp", 3), x)


def test_cache_serves_a_sample_only_while_it_is_valid():
    torch.manual_seed(0)
    flow = pf.build_flow("realnvp", 2, num_layers=1)
    layer = flow.parts[0]
    calls = []
    layer.conditioner.register_forward_hook(lambda *a: calls.append(1))
    z = torch.randn(5, 2)
    y = layer(z)
    assert layer.inv(y) is z and len(calls) == 1  # scoring one's own sample is free
    # A sample drawn without gradients is rescored with them when they are wanted.
    with torch.no_grad():
        y = layer(z)
    ladj = layer.log_abs_det_jacobian(z, y)
    assert ladj.requires_grad
    # After an optimiser step the cached result is stale and recomputed.
    y = layer(z)
    before = layer.log_abs_det_jacobian(z, y).detach().clone()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5)
    after = layer.log_abs_det_jacobian(z, y)
    assert not torch.allclose(before, after)


def test_backward_consumes_the_cache_entry():
    flow = pf.build_flow("realnvp", 2, num_layers=1)
    d = dist.TransformedDistribution(_normal(2), [flow])
    x = torch.randn(8, 2)
    d.log_prob(x).sum().backward()
    d.log_prob(x).sum().backward()  # a fresh graph, not the freed one


def test_actnorm_initialises_from_the_first_data_batch():
    torch.manual_seed(0)
    layer = ActNorm(3)
    data = torch.randn(500, 3) * torch.tensor([2.0, 0.5, 3.0]) + torch.tensor([1.0, -2.0, 0.0])
    z = layer.inv(data)
    assert bool(layer.initialized)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(3), atol=1e-4)
    loc = layer.loc.detach().clone()
    layer.inv(data * 10)  # only the first batch initialises
    assert torch.equal(layer.loc, loc)
    state = layer.state_dict()
    fresh = ActNorm(3)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized) and torch.equal(fresh.loc, loc)


def test_actnorm_run_forward_first_keeps_its_identity_start():
    layer = ActNorm(2)
    layer(torch.randn(4, 2))
    layer.inv(torch.randn(100, 2) * 5)
    assert torch.equal(layer.loc, torch.zeros(2))


def test_invertible_linear_matches_its_dense_matrix():
    torch.manual_seed(0)
    layer = InvertibleLinear(4).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    w = layer.weight()
    x = torch.randn(6, 4, dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x)
    assert torch.allclose(y, x @ w.T)
    assert torch.allclose(ladj, torch.linalg.slogdet(w)[1].expand(6))
    assert torch.allclose(layer.inverse_and_ladj(y)[0], x)


def test_permute_round_trip_and_zero_log_det():
    layer = Permute(torch.tensor([2, 0, 1]))
    x = torch.arange(3.0)
    y, ladj = layer.call_and_ladj(x)
    assert y.tolist() == [2.0, 0.0, 1.0] and float(ladj) == 0.0
    assert torch.equal(layer.inverse_and_ladj(y)[0], x)


def test_flow_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    a = pf.build_flow("glow", 3)
    a.inv(torch.randn(50, 3))  # data-dependent initialisation
    b = pf.build_flow("glow", 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 3)
    assert torch.equal(a.inverse_and_ladj(x)[1], b.inverse_and_ladj(x)[1])
