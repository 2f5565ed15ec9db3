"""The JAX backend behind the conformance suite's adapter interface (see backends.py)."""

from __future__ import annotations

import numpy as np

from .backends import small_config


def _jacobian_and_ladj(module, x, inverse):
    import equinox as eqx
    import jax

    @eqx.filter_jit
    def run(module, x, inverse):
        fn = module.inverse_and_ladj if inverse else module.call_and_ladj
        return jax.jacfwd(lambda v: fn(v)[0])(x), fn(x)[1]

    return run(module, x, inverse)


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

    def forward(self, flow, x, dtype="float64"):
        y, ladj = flow.to_transform().call_with_intermediates(self.tensor(x, dtype))
        return np.asarray(y), np.asarray(ladj)

    def inverse(self, flow, y, dtype="float64"):
        x, ildj = flow.to_transform().inverse_and_ladj(self.tensor(y, dtype))
        return np.asarray(x), np.asarray(ildj)

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
        import numpyro.distributions as dist

        jnp = self.jnp
        base = dist.Normal(jnp.zeros(dim, self.dtype(dtype)), jnp.ones(dim, self.dtype(dtype))).to_event(1)
        return dist.TransformedDistribution(base, flow.to_transform())

    def sample_and_log_prob(self, flow, dim, batch_shape, dtype):
        d = self.distribution(flow, dim, dtype)
        x, intermediates = d.sample_with_intermediates(self.jax.random.key(3), batch_shape)
        lp = d.log_prob(x, intermediates)
        lp_fresh = d.log_prob(x)
        return np.asarray(x), np.asarray(lp), np.asarray(lp_fresh)

    def shapes(self, flow, shape):
        t = flow.to_transform()
        return tuple(t.forward_shape(shape)), tuple(t.inverse_shape(shape))

    def train(self, flow, data, dim, dtype, steps=5, lr=1e-2):
        import optax

        eqx = self.eqx
        x = self.tensor(data, dtype)
        params, static = eqx.partition(flow, eqx.is_inexact_array)
        opt = optax.adam(lr)
        state = opt.init(params)

        def loss_fn(p):
            return -self.distribution(eqx.combine(p, static), dim, dtype).log_prob(x).mean()

        @self.jax.jit
        def step(p, s):
            loss, g = self.jax.value_and_grad(loss_fn)(p)
            again = loss_fn(p)  # scoring the same array again
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss, again

        losses = []
        for _ in range(steps):
            params, state, loss, again = step(params, state)
            losses.append(float(loss))
            assert np.isfinite(float(again))
        finite = all(bool(self.jnp.all(self.jnp.isfinite(a))) for a in self.jax.tree.leaves(params))
        return np.array(losses), finite

    def reparam_grad(self, flow, dim, dtype, n=16):
        eqx, jnp = self.eqx, self.jnp
        params, static = eqx.partition(flow, eqx.is_inexact_array)

        def loss_fn(p):
            d = self.distribution(eqx.combine(p, static), dim, dtype)
            x, inter = d.sample_with_intermediates(self.jax.random.key(4), (n,))
            return (d.log_prob(x, inter) + 0.5 * (x**2).sum(-1)).mean()

        loss, grads = self.jax.value_and_grad(loss_fn)(params)
        leaves = self.jax.tree.leaves(grads)
        return float(loss), all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), len(leaves)

    def jit_and_vmap(self, flow, x):
        """Outputs of the transform eagerly, under jit, and vmapped over a leading axis."""
        jax = self.jax
        t = flow.to_transform()
        eager = t.call_with_intermediates(x)
        jitted = jax.jit(lambda t, x: t.call_with_intermediates(x))(t, x)
        vmapped = jax.vmap(lambda v: t.call_with_intermediates(v))(x)
        inv = jax.jit(lambda t, y: t.inv(y))(t, eager[0])
        return [np.asarray(a) for a in (*eager, *jitted, *vmapped, inv)]
