"""The JAX backend behind the conformance suite's adapter interface (see backends.py)."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import numpy as np

from .backends import small_config


# Module level, so equinox's compilation cache (keyed on the flow's structure, not its
# values) is shared by every test that builds the same family at the same size.
@eqx.filter_jit
def _jacobian_and_ladj(module, x, inverse):
    fn = module.inverse_and_ladj if inverse else module.call_and_ladj
    return jax.jacfwd(lambda v: fn(v)[0])(x), fn(x)[1]


PAD_ROWS = 16


@functools.cache
def _adam():
    import optax

    # One optimiser object for every test, with the learning rate in its state rather than
    # in a closure: the jitted train step (which takes the optimiser as a static argument)
    # then compiles once per flow family and serves every learning rate and test.
    return optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)


def _distribution(flow, dim, dtype):
    import jax.numpy as jnp
    import numpyro.distributions as dist

    base = dist.Normal(jnp.zeros(dim, dtype), jnp.ones(dim, dtype)).to_event(1)
    return dist.TransformedDistribution(base, flow.to_transform())


@eqx.filter_jit
def _sample_and_log_prob(flow, dim, dtype, batch_shape, key):
    d = _distribution(flow, dim, dtype)
    x, intermediates = d.sample_with_intermediates(key, batch_shape)
    return x, d.log_prob(x, intermediates), d.log_prob(x)


@eqx.filter_jit
def _train_step(params, state, static, x, opt, dim):
    import optax

    def loss_fn(p):
        return -_distribution(eqx.combine(p, static), dim, x.dtype).log_prob(x).mean()

    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss


@eqx.filter_jit
def _reparam_loss_and_grad(params, static, dim, dtype, n):
    def loss_fn(p):
        d = _distribution(eqx.combine(p, static), dim, dtype)
        x, inter = d.sample_with_intermediates(jax.random.key(4), (n,))
        return (d.log_prob(x, inter) + 0.5 * (x**2).sum(-1)).mean()

    return jax.value_and_grad(loss_fn)(params)


class JaxAdapter:
    name = "jax"

    def __init__(self):
        import jax

        jax.config.update("jax_enable_x64", True)
        import equinox as eqx
        import jax.numpy as jnp

        import pyroflows.jax as pf
        from pyroflows.jax.transforms.base import astype

        self.jax, self.jnp, self.eqx, self.pf, self.astype = jax, jnp, eqx, pf, astype

    def names(self):
        return self.pf.available_flows()

    def dtype(self, dtype):
        return {"float32": self.jnp.float32, "float64": self.jnp.float64}[dtype]

    def build(self, name, dim, dtype="float64", seed=0, perturb=0.1, **kwargs):
        jax = self.jax
        kwargs = {**small_config(name, self.names()), **kwargs}
        flow = self.astype(self.pf.build_flow(name, dim, key=jax.random.key(seed), **kwargs), self.jnp.float64)
        params, static = self.eqx.partition(flow, self.eqx.is_inexact_array)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        rng = np.random.default_rng(seed)
        leaves = [self.jnp.asarray(np.asarray(a) + perturb * rng.standard_normal(a.shape)) for a in leaves]
        flow = self.eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)
        return self.astype(flow, self.dtype(dtype))

    def tensor(self, a, dtype):
        return self.jnp.asarray(np.asarray(a), dtype=self.dtype(dtype))

    def _padded(self, method, x, dtype):
        """Run a batch padded to PAD_ROWS rows, so every batch shape reuses one compilation."""
        x = np.asarray(x)
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        assert n <= PAD_ROWS
        padded = np.concatenate([flat, np.zeros((PAD_ROWS - n, flat.shape[1]))])
        out, ladj = method(self.tensor(padded, dtype))
        return np.asarray(out)[:n].reshape(x.shape), np.asarray(ladj)[:n].reshape(x.shape[:-1])

    def forward(self, flow, x, dtype="float64"):
        return self._padded(flow.to_transform().call_with_intermediates, x, dtype)

    def inverse(self, flow, y, dtype="float64"):
        return self._padded(flow.to_transform().inverse_and_ladj, y, dtype)

    def jacobian(self, flow, x, direction="forward", dtype="float64"):
        jac, ladj = _jacobian_and_ladj(flow, self.tensor(x, dtype), direction == "inverse")
        return np.asarray(jac), float(ladj)

    def layers(self, flow):
        return list(flow.parts)

    def layer_jacobian(self, layer, x, dtype="float64"):
        return np.asarray(_jacobian_and_ladj(layer, self.tensor(x, dtype), False)[0])

    def is_autoregressive(self, layer):
        return bool(getattr(layer, "autoregressive", False))

    def permutation(self, layer):
        return np.asarray(layer.get_permutation())

    def distribution(self, flow, dim, dtype):
        return _distribution(flow, dim, self.dtype(dtype))

    def sample_and_log_prob(self, flow, dim, batch_shape, dtype):
        out = _sample_and_log_prob(flow, dim, self.dtype(dtype), tuple(batch_shape), self.jax.random.key(3))
        return tuple(np.asarray(a) for a in out)

    def shapes(self, flow, shape):
        t = flow.to_transform()
        return tuple(t.forward_shape(shape)), tuple(t.inverse_shape(shape))

    def train(self, flow, data, dim, dtype, steps=5, lr=1e-2, rescore=True):
        """A few jitted Adam steps on -log_prob of one fixed batch (JAX has no cache to trip over,
        so ``rescore`` changes nothing here)."""
        opt = _adam()
        x = self.tensor(data, dtype)
        params, static = eqx.partition(flow, eqx.is_inexact_array)
        state = opt.init(params)
        state.hyperparams["learning_rate"] = self.jnp.asarray(lr, self.dtype(dtype))  # no float64 promotion
        losses = []
        for _ in range(steps):
            params, state, loss = _train_step(params, state, static, x, opt, dim)
            losses.append(float(loss))
        finite = all(bool(self.jnp.all(self.jnp.isfinite(a))) for a in jax.tree.leaves(params))
        return np.array(losses), finite

    def reparam_grad(self, flow, dim, dtype, n=16):
        params, static = eqx.partition(flow, eqx.is_inexact_array)
        loss, grads = _reparam_loss_and_grad(params, static, dim, self.dtype(dtype), n)
        leaves = jax.tree.leaves(grads)
        return float(loss), all(bool(self.jnp.all(self.jnp.isfinite(g))) for g in leaves), len(leaves)

    def jit_and_vmap(self, flow, x):
        """Outputs of the transform eagerly, under jit, and vmapped over a leading axis."""
        jax = self.jax
        t = flow.to_transform()
        eager = t.call_with_intermediates(x)
        jitted = jax.jit(lambda t, x: t.call_with_intermediates(x))(t, x)
        vmapped = jax.vmap(lambda v: t.call_with_intermediates(v))(x)
        inv = jax.jit(lambda t, y: t.inv(y))(t, eager[0])
        return [np.asarray(a) for a in (*eager, *jitted, *vmapped, inv)]
