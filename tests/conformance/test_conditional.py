"""Conditional flows (``build_flow(..., context_dim=k)``): the properties of
``test_properties.py`` at fixed contexts, on a reduced grid (dim 2, float64, one batch
shape; the suite must fit its budget), and what a context adds: the density depends on
it, batched contexts broadcast, and the two backends agree on saved weights.

Every conditional family reads its context in the same two places, ``Coupling`` and
``MaskedAutoregressive`` (``transforms/conditioners.py``). torch runs the properties on
every conditional family; JAX, where each case is an XLA compilation, on one family of
each conditioner (nsf: coupling, maf: autoregressive), and the parity test checks every
family's JAX numbers against torch's."""

from __future__ import annotations

import numpy as np
import pytest

from pyroflows.registry import conditional_flows

from . import test_properties as properties
from .backends import ADAPTERS

DIM, CONTEXT_DIM = 2, 3
BY_NAME = {a.name: a for a in ADAPTERS}


class Conditioned:
    """A backend's adapter whose ``build`` returns a conditional flow at a fixed context, so
    every property test written for flows runs on it unchanged."""

    def __init__(self, base):
        self.base, self.name = base, base.name

    def __getattr__(self, attr):
        return getattr(self.base, attr)

    def conditional(self, name, dim=DIM, dtype="float64", seed=0, **kwargs):
        return self.base.build(name, dim, dtype, seed=seed, perturb=0.3, context_dim=CONTEXT_DIM, **kwargs)

    def context(self, shape, dtype="float64", seed=0):
        return self.base.tensor(np.random.default_rng(100 + seed).standard_normal(shape + (CONTEXT_DIM,)), dtype)

    def build(self, name, dim, dtype="float64", seed=0, perturb=None, **kwargs):
        return self.conditional(name, dim, dtype, seed, **kwargs).condition(self.context((), dtype, seed))

    def log_prob(self, flow, x, context):
        """``log q(x | context)`` of the conditional flow, numpy in and out."""
        out = flow.log_prob(self.base.tensor(x, "float64"), context)
        return np.asarray(out.detach() if hasattr(out, "detach") else out)


JAX_FAMILIES = ("nsf", "maf")
CASES = [
    pytest.param(Conditioned(a), n, id=f"{a.name}-{n}")
    for a in ADAPTERS
    for n in conditional_flows()
    if a.name == "torch" or n in JAX_FAMILIES
]


@pytest.mark.parametrize("adapter,name", CASES)
def test_round_trip_log_det_and_finite_extremes_at_a_fixed_context(adapter, name):
    flow = adapter.build(name, DIM)
    x = properties._points((3, DIM))
    y, ladj = adapter.forward(flow, x)
    x2, ildj = adapter.inverse(flow, y)
    assert y.shape == x.shape and ladj.shape == (3,)
    np.testing.assert_allclose(x2, x, atol=1e-5)
    np.testing.assert_allclose(ildj, -ladj, atol=1e-5 * (1 + np.abs(ladj)).max())
    for direction in ("forward", "inverse"):
        properties.test_log_det_matches_autodiff_jacobian(adapter, name, DIM, "float64", direction)
    properties.test_extreme_inputs_stay_finite(adapter, name, DIM)


@pytest.mark.parametrize("adapter,name", CASES)
def test_sampling_scoring_and_training_at_a_fixed_context(adapter, name):
    properties.test_shapes(adapter, name, DIM, (3, 4))
    properties.test_training_steps_stay_finite_and_rescoring_works(adapter, name, "float64")


@pytest.mark.parametrize("adapter,name", CASES)
def test_the_density_depends_on_the_context_and_batched_contexts_broadcast(adapter, name):
    flow = adapter.conditional(name)
    x = properties._points((4, DIM), seed=1)
    contexts = adapter.context((4,), seed=2)
    batched = adapter.log_prob(flow, x, contexts)
    assert batched.shape == (4,) and np.all(np.isfinite(batched))
    # Row i at context i is the density of the flow at that one context.
    for i in range(4):
        np.testing.assert_allclose(adapter.log_prob(flow, x[i], contexts[i]), batched[i], atol=1e-9)
    # One context broadcasts against a batch of points; the density moves with it.
    single = adapter.log_prob(flow, x, contexts[0])
    assert single.shape == (4,)
    np.testing.assert_allclose(single[0], batched[0], atol=1e-9)
    assert np.abs(single[1:] - batched[1:]).max() > 1e-3


@pytest.mark.parametrize("name", conditional_flows())
def test_saved_conditional_flows_have_the_same_numbers_on_the_other_backend(name, tmp_path):
    from pyroflows import checkpoint

    x = properties._points((5, DIM), seed=3)
    c = np.random.default_rng(4).standard_normal((5, CONTEXT_DIM))
    for source, target in (("torch", "jax"), ("jax", "torch")):
        src, dst = Conditioned(BY_NAME[source]), Conditioned(BY_NAME[target])
        flow = src.conditional(name)
        if hasattr(flow, "eval"):
            flow.eval()  # torch's fresh ActNorm (glow) initialises from the first batch it inverts in training
        path = tmp_path / f"{name}-{source}.npz"
        src.pf.save_flow(flow, path)
        assert checkpoint.read(path)[0]["context_dim"] == CONTEXT_DIM
        other = dst.pf.load_flow(path)
        assert type(other).__name__ == "ConditionalFlow" and other.context_dim == CONTEXT_DIM
        lp_src = src.log_prob(flow, x, src.base.tensor(c, "float64"))
        lp_dst = dst.log_prob(other, x, dst.base.tensor(c, "float64"))
        np.testing.assert_allclose(lp_dst, lp_src, atol=1e-9, rtol=1e-9, err_msg=f"{source} to {target}")


@pytest.mark.parametrize("adapter,name", [c for c in CASES if c.values[1] in ("iaf", "maf", "naf")])  # MADE families
def test_an_autoregressive_layer_stays_triangular_with_a_context(adapter, name):
    flow = adapter.build(name, 4, num_layers=1)
    for direction in ("forward", "inverse"):
        jac, _ = adapter.jacobian(flow, properties._points((4,), seed=5), direction)
        assert np.allclose(np.triu(jac, 1), 0.0, atol=1e-12), jac
        assert np.abs(np.tril(jac, -1)).max() > 1e-6


def test_torch_conditional_flow_is_a_pyro_conditional_transform_module():
    import pyro.distributions as dist
    import torch
    from pyro.distributions.conditional import ConditionalTransformModule

    import pyroflows.torch as pf

    torch.manual_seed(0)
    flow = pf.build_flow("nsf", DIM, context_dim=CONTEXT_DIM, hidden_dims=(8,))
    assert isinstance(flow, ConditionalTransformModule)
    base = dist.Normal(torch.zeros(DIM), 1.0).to_event(1)
    c = torch.randn(6, CONTEXT_DIM)
    d = dist.ConditionalTransformedDistribution(base, [flow]).condition(c)
    x = d.rsample()
    assert x.shape == (6, DIM)
    torch.testing.assert_close(d.log_prob(x), flow.log_prob(x, c))
    (-d.log_prob(x).mean()).backward()  # gradients reach the conditioner
    assert all(p.grad is not None for p in flow.parameters())
    with pytest.raises(ValueError, match="needs a context"):
        flow(torch.zeros(DIM))
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(torch.zeros(DIM), torch.zeros(CONTEXT_DIM + 1))


def test_jax_conditional_transform_works_under_jit_and_vmap():
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import pyroflows.jax as pj

    flow = pj.build_flow("realnvp", DIM, context_dim=CONTEXT_DIM, hidden_dims=(8,), key=jax.random.key(1))
    flow = jax.tree.map(lambda a: a + 0.3 if eqx.is_inexact_array(a) else a, flow)
    x = jnp.asarray(properties._points((4, DIM), seed=6))
    c = jnp.asarray(np.random.default_rng(7).standard_normal((4, CONTEXT_DIM)))
    eager = flow.to_transform(context=c).call_with_intermediates(x)
    jitted = jax.jit(lambda f, x, c: f.to_transform(context=c).call_with_intermediates(x))(flow, x, c)
    vmapped = jax.vmap(lambda v, k: flow.call_and_ladj(v, k))(x, c)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, atol=1e-12)
    for a, b in zip(eager, vmapped):
        np.testing.assert_allclose(a, b, atol=1e-12)
    with pytest.raises(ValueError, match="needs a context"):
        flow.to_transform()


def test_context_dim_is_checked_and_only_conditional_families_take_it():
    import pyroflows.torch as pf

    with pytest.raises(ValueError, match="no conditional version"):
        pf.build_flow("planar", DIM, context_dim=2)
    with pytest.raises(ValueError, match="context_dim"):
        pf.build_flow("realnvp", DIM, context_dim=0)
    assert type(pf.build_flow("realnvp", DIM)).__name__ == "Flow"  # without context_dim nothing changes
    assert "context_dim" not in pf.build_flow("realnvp", DIM).config
