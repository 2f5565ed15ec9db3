"""The JAX base machinery: NumPyro integration, scanned blocks, ActNorm initialisation, errors."""

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from numpyro.contrib.module import eqx_module  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
import pyroflows.torch as pt  # noqa: E402
from pyroflows.jax.transforms import ActNorm, EqxTransform, Flow, Permute  # noqa: E402
from pyroflows.jax.transforms.glow import initialize_actnorm  # noqa: E402


def test_flow_guide_trains_inside_numpyro_svi_and_constants_stay_fixed():
    """A guide that registers a flow with ``eqx_module`` and scores its own samples."""
    dim = 3
    flow = pf.build_flow("iaf", dim, key=jax.random.key(0))
    target = dist.MultivariateNormal(jnp.array([1.0, -1.0, 0.5]), jnp.diag(jnp.array([0.5, 2.0, 1.0])))

    def model():
        numpyro.sample("z", target)

    def guide():
        net = eqx_module("flow", flow)
        base = dist.Normal(jnp.zeros(dim), 1.0).to_event(1)
        numpyro.sample("z", dist.TransformedDistribution(base, net.to_transform()))

    svi = SVI(model, guide, optax.adam(2e-2), Trace_ELBO(num_particles=8))
    state = svi.init(jax.random.key(1))
    update = jax.jit(svi.update)
    losses = []
    for _ in range(200):
        state, loss = update(state)
        losses.append(float(loss))
    # The target is normalised, so the loss is KL(q || p): 1.625 nats at the identity start.
    assert np.mean(losses[-50:]) < 0.05
    params = svi.get_params(state)["flow$params"]
    trained = eqx.combine(params, eqx.partition(flow, eqx.is_inexact_array)[1])
    # Integer/boolean constants (permutations, masks) are not parameters.
    for a, b in zip(
        jax.tree.leaves(eqx.filter(flow, eqx.is_array)), jax.tree.leaves(eqx.filter(trained, eqx.is_array))
    ):
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            assert jnp.array_equal(a, b)
    samples = dist.TransformedDistribution(dist.Normal(jnp.zeros(dim), 1.0).to_event(1), trained.to_transform()).sample(
        jax.random.key(2), (4000,)
    )
    # KL < 0.05 allows mean errors up to about 0.2 sd; the start is 1 sd away.
    np.testing.assert_allclose(samples.mean(0), [1.0, -1.0, 0.5], atol=0.25)


def test_repeated_blocks_are_scanned_so_the_program_does_not_grow_with_depth():
    def size(num_layers):
        flow = pf.build_flow("realnvp", 4, key=jax.random.key(0), num_layers=num_layers, hidden_dims=(8,))
        return len(jax.make_jaxpr(lambda x: flow.call_and_ladj(x))(jnp.zeros(4)).jaxpr.eqns)

    assert size(3) == size(9)
    flow = pf.build_flow("realnvp", 4, key=jax.random.key(0), num_layers=9, hidden_dims=(8,))
    assert flow.segments[0][1:] == (2, 8)  # (coupling, permute) x 8, then the last coupling


def test_scanned_flow_equals_running_its_layers_one_by_one():
    flow = pf.build_flow("realnvp", 3, key=jax.random.key(0), num_layers=5, hidden_dims=(8,))
    flow = jax.tree.map(lambda a: a + 0.1 if eqx.is_inexact_array(a) else a, flow)
    x = jnp.array([0.3, -1.2, 2.0])
    y, ladj = flow.call_and_ladj(x)
    total, v = 0.0, x
    for layer in flow.parts:
        v, lad = layer.call_and_ladj(v)
        total += lad
    np.testing.assert_allclose(y, v, atol=1e-12)
    np.testing.assert_allclose(ladj, total, atol=1e-12)
    back, ildj = flow.inverse_and_ladj(y)
    np.testing.assert_allclose(back, x, atol=1e-12)
    np.testing.assert_allclose(ildj, -ladj, atol=1e-12)


def test_actnorm_initialisation_matches_torch(tmp_path):
    torch.manual_seed(0)
    data = np.random.default_rng(0).standard_normal((200, 3)) * [2.0, 0.5, 3.0] + [1.0, -2.0, 0.0]
    tflow = pt.build_flow("glow", 3, num_layers=2, hidden_dims=(8,)).double()
    pt.save_flow(tflow, tmp_path / "before.npz")
    tflow.inv(torch.as_tensor(data))  # torch initialises on its first inverse call
    jflow = initialize_actnorm(pf.load_flow(tmp_path / "before.npz"), jnp.asarray(data))
    pt.save_flow(tflow, tmp_path / "after.npz")
    expected = pf.load_flow(tmp_path / "after.npz")
    for a, b in zip(jflow.parts, expected.parts):
        if isinstance(a, ActNorm):
            assert bool(a.initialized) and bool(b.initialized)
            np.testing.assert_allclose(a.loc, b.loc, atol=1e-10)
            np.testing.assert_allclose(a.unconstrained_log_scale, b.unconstrained_log_scale, atol=1e-8)


def test_errors_name_the_problem():
    flow = pf.build_flow("realnvp", 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="last dimension must be 3"):
        flow.to_transform()(jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="unknown flow 'nope'"):
        pf.build_flow("nope", 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no option 'bins'"):
        pf.build_flow("realnvp", 3, key=jax.random.key(0), bins=3)


def test_transform_is_a_pytree_with_the_flow_as_its_child():
    flow = pf.build_flow("realnvp", 2, key=jax.random.key(0))
    t = flow.to_transform()
    leaves, treedef = jax.tree_util.tree_flatten(t)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, EqxTransform) and isinstance(rebuilt.module, Flow)
    x = jnp.ones((5, 2))
    np.testing.assert_allclose(rebuilt(x), t(x))


def test_permute_round_trip():
    layer = Permute(jnp.array([2, 0, 1]))
    y, ladj = layer.call_and_ladj(jnp.arange(3.0))
    assert y.tolist() == [2.0, 0.0, 1.0] and float(ladj) == 0.0


def test_log_prob_runs_one_inverse_pass_not_the_sequential_forward(monkeypatch):
    # MAF's density direction is one parallel pass; its forward is a loop over
    # coordinates. log_prob must reuse the inverse's log-det rather than rerun forward.
    from pyroflows.jax.transforms.conditioners import MaskedAutoregressive

    sequential_calls = []
    original = MaskedAutoregressive._sequential

    def counting(self, given, inverse, *context):
        sequential_calls.append(not inverse)  # True: the forward direction
        return original(self, given, inverse, *context)

    monkeypatch.setattr(MaskedAutoregressive, "_sequential", counting)
    # an unusual width, so no compiled program from another test is reused
    flow = pf.build_flow("maf", 4, key=jax.random.key(0), num_layers=2, hidden_dims=(13,))
    flow = jax.tree.map(lambda a: a + 0.05 if eqx.is_inexact_array(a) else a, flow)
    base = dist.Normal(jnp.zeros(4), 1.0).to_event(1)
    y = jnp.array([[0.5, -1.0, 2.0, 0.1], [1.0, 0.0, -0.3, 0.7], [0.0, 0.2, 0.4, -2.0]])
    log_p = jax.jit(lambda y: dist.TransformedDistribution(base, flow.to_transform()).log_prob(y))(y)
    assert sequential_calls == []
    x, ildj = flow.to_transform().inverse_and_ladj(y)
    np.testing.assert_allclose(log_p, base.log_prob(x) + ildj, rtol=1e-6)
    # a pair it did not just invert gets the forward log-det (the sequential pass)
    np.testing.assert_allclose(flow.to_transform().log_abs_det_jacobian(x, y), -ildj, rtol=1e-5)
    assert sequential_calls and all(sequential_calls)


class _NoisyLogDet(pf.transforms.FlowTransform):
    """The identity with a random 'log-det estimate' N(0, 1): stands in for a stochastic estimator."""

    stochastic = True

    def call_and_ladj(self, x, key=None):
        if key is None:
            raise ValueError("no key")
        return x, jax.random.normal(key, (), x.dtype)

    def inverse_and_ladj(self, y, key=None):
        return self.call_and_ladj(y, key)


def test_layers_that_draw_noise_get_fresh_keys_from_numpyro_or_the_caller():
    # scanned: (noisy, permute) x 2 then noisy; every part gets its own key
    flow = Flow([_NoisyLogDet(dim=2), Permute.reverse(2)] * 2 + [_NoisyLogDet(dim=2)], dim=2)
    assert flow.is_stochastic and flow.segments[0][1:] == (2, 2)
    x = jnp.zeros((200, 2))
    # Only the log-det draws noise: without a key it raises, naming both ways to give one ...
    with pytest.raises(ValueError, match=r"key=jax\.random\.key.*numpyro\.handlers\.seed"):
        flow.to_transform().call_with_intermediates(x)
    with pytest.raises(ValueError, match=r"key="):
        flow.to_transform().log_abs_det_jacobian(x, x)
    # ... while the maps alone need none (issue 17).
    np.testing.assert_array_equal(flow.to_transform()(x), x)
    np.testing.assert_array_equal(flow.to_transform().inv(x + 1.0), x + 1.0)
    _, a = flow.to_transform(key=jax.random.key(1)).call_with_intermediates(x)
    _, b = flow.to_transform(key=jax.random.key(1)).call_with_intermediates(x)
    np.testing.assert_array_equal(a, b)
    # three independent N(0, 1) per row: variance 3 (not 9, as one key shared by the parts would give)
    assert 2.3 < float(jnp.var(a)) < 3.8

    def ladj():
        return flow.to_transform().call_with_intermediates(x)[1]

    with numpyro.handlers.seed(rng_seed=0):
        first, second = ladj(), ladj()
    assert not np.allclose(first, second)
    jitted = jax.jit(lambda k: numpyro.handlers.seed(ladj, rng_seed=k)())
    assert not np.allclose(jitted(jax.random.key(0)), jitted(jax.random.key(1)))


# --- inputs: dtypes and shapes (issue 17) ---------------------------------------------------
def test_integer_and_boolean_inputs_are_cast_to_the_flow_dtype():
    # An unusual width, so the programs compiled here are this test's own; three layers, so
    # (coupling, permutation) repeats and runs in a lax.scan.
    flow = pf.build_flow("realnvp", 2, key=jax.random.key(0), num_layers=3, hidden_dims=(7,))
    assert any(repeats > 1 for _, _, repeats in flow.segments)
    t = flow.to_transform()
    xi = jnp.array([[1, -2], [0, 3]])
    y_ref, ladj_ref = t.call_with_intermediates(xi.astype(jnp.float64))  # the same points as floats
    y, ladj = t.call_with_intermediates(xi)
    assert y.dtype == ladj.dtype == jnp.float64
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(ladj, ladj_ref)
    np.testing.assert_array_equal(t(xi), y_ref)
    np.testing.assert_array_equal(t.inv(xi), t.inv(xi.astype(jnp.float64)))
    # The scanned Flow itself (an integer carry used to fail inside lax.scan).
    y0, ladj0 = flow.call_and_ladj(xi[0])
    np.testing.assert_allclose(y0, y_ref[0], rtol=1e-12)
    np.testing.assert_allclose(ladj0, ladj_ref[0], rtol=1e-12)
    assert flow.inverse_and_ladj(np.array([True, False]))[0].dtype == jnp.float64
    base = dist.Normal(jnp.zeros(2), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, t)
    np.testing.assert_allclose(d.log_prob(xi), d.log_prob(xi.astype(jnp.float64)), rtol=1e-12)
    # A float32 flow casts integers to float32.
    from pyroflows.jax.transforms.base import astype

    assert astype(flow, jnp.float32).to_transform()(xi).dtype == jnp.float32


def test_wrong_shapes_are_clear_errors():
    flow = pf.build_flow("realnvp", 2, key=jax.random.key(0), num_layers=2, hidden_dims=(7,))
    t = flow.to_transform()
    for bad in (jnp.zeros((4, 3)), jnp.zeros(()), jnp.zeros((2, 1))):
        for call in (t, t.inv, t.call_with_intermediates, t.inverse_and_ladj):
            with pytest.raises(ValueError, match="the last dimension must be 2"):
                call(bad)
    # The module methods map one vector; a batch points to the transform or vmap.
    for call in (flow.call_and_ladj, flow.inverse_and_ladj):
        with pytest.raises(ValueError, match=r"one vector of shape \(2,\), got shape \(4, 2\).*to_transform"):
            call(jnp.zeros((4, 2)))
