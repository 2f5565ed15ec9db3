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


# --- inputs: dtypes and shapes (issue 17) ---------------------------------------------------
def _small_flow():
    torch.manual_seed(0)
    return pf.build_flow("realnvp", 2, num_layers=2, hidden_dims=[8])


def test_integer_and_boolean_inputs_are_cast_to_the_flow_dtype():
    flow = _small_flow()
    xi = torch.tensor([[1, -2], [0, 3]])
    with torch.no_grad():
        y_ref, ladj_ref = flow.call_and_ladj(xi.float())  # the same points given as floats
        x_ref, ildj_ref = flow.inverse_and_ladj(xi.float())
        y, ladj = flow.call_and_ladj(xi)
        x, ildj = flow.inverse_and_ladj(xi)
        assert y.dtype == x.dtype == ladj.dtype == torch.float32
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(ladj, ladj_ref)
        torch.testing.assert_close(x, x_ref)
        torch.testing.assert_close(ildj, ildj_ref)
        torch.testing.assert_close(flow(xi), y_ref)
        torch.testing.assert_close(flow.inv(xi), x_ref)
        torch.testing.assert_close(flow(torch.tensor([[True, False]])), flow(torch.tensor([[1.0, 0.0]])))
        d = dist.TransformedDistribution(_normal(2), [flow])
        torch.testing.assert_close(d.log_prob(xi), d.log_prob(xi.float()))
        # A float64 flow casts integers to float64.
        assert flow.double()(xi).dtype == torch.float64


def _entry_points(flow):
    """Every way to run a flow on a point: both maps, Pyro's call and inverse, and the log-det."""
    return [
        flow.call_and_ladj,
        flow.inverse_and_ladj,
        flow,
        flow.inv,
        lambda v: flow.log_abs_det_jacobian(v, v),
    ]


def test_a_float_dtype_mismatch_names_both_dtypes_and_the_fix():
    flow = _small_flow()
    x64 = torch.zeros(3, 2, dtype=torch.float64)
    message = (
        r"torch.float32 parameters but the input has dtype torch.float64; cast the flow with flow.to\(torch.float64\)"
    )
    for call in _entry_points(flow) + [dist.TransformedDistribution(_normal(2), [flow]).log_prob]:
        with pytest.raises(TypeError, match=message):
            call(x64)
    with pytest.raises(TypeError, match="torch.as_tensor"):
        flow.parts[0]([[0.0, 1.0]])
    # After the suggested fix the same input runs, and the other direction now raises.
    flow = flow.to(torch.float64)
    assert flow(x64).dtype == torch.float64
    with pytest.raises(TypeError, match=r"flow.to\(torch.float32\) or the input with .to\(torch.float64\)"):
        flow(x64.float())


def test_layers_without_float_parameters_take_any_float_dtype():
    perm = Permute.reverse(2)
    for dtype in (torch.float32, torch.float64):
        assert perm(torch.zeros(1, 2, dtype=dtype)).dtype == dtype
    assert perm(torch.tensor([[1, 2]])).dtype == torch.get_default_dtype()


def test_wrong_event_shapes_are_clear_errors_at_every_entry_point():
    flow = _small_flow()
    for bad in (torch.zeros(4, 3), torch.zeros(()), torch.zeros(2, 1)):
        for call in _entry_points(flow) + [flow.parts[0], flow.parts[0].inv]:
            with pytest.raises(ValueError, match="the last dimension must be 2"):
                call(bad)


def test_a_loaded_actnorm_keeps_its_weights_where_a_fresh_one_initialises_from_data():
    # A JAX glow trained without initialize_actnorm saves initialized=False; loading it must
    # not let the first training-mode inverse overwrite the trained weights.
    state = dict(ActNorm(2).state_dict(), loc=torch.tensor([1.0, -1.0]))
    y = torch.randn(5, 2) * 3 + 4
    fresh, loaded = ActNorm(2), ActNorm(2)
    loaded.load_state_dict(state)
    assert not bool(state["initialized"])
    fresh.inverse_and_ladj(y)
    loaded.inverse_and_ladj(y)
    assert fresh.loc.tolist() != [0.0, 0.0]
    assert loaded.loc.tolist() == [1.0, -1.0]
