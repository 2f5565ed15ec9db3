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


# --------------------------------------------------------------------------- layers (tests/families)
# Module level and keyed on the module's structure only (methods are static strings), so
# every test that runs a family's layer at one size shares one compilation.
@eqx.filter_jit
def _apply(module, method, x, keys):
    fn = getattr(module, method)
    if keys is None:
        return jax.vmap(fn)(x)
    return jax.vmap(lambda v, k: fn(v, key=k))(x, keys)


@eqx.filter_jit
def _method(module, name, args):
    return getattr(module, name)(*args)


@eqx.filter_jit
def _layer_jacobian(module, method, x):
    return jax.jacfwd(lambda v: getattr(module, method)(v)[0])(x)


@eqx.filter_jit
def _method_jacobian(module, name, args, argnum):
    def fn(v):
        return getattr(module, name)(*args[:argnum], v, *args[argnum + 1 :])[0]

    return jax.jacfwd(fn)(args[argnum])


@functools.cache
def _jitted(f, static_argnums):
    return jax.jit(f, static_argnums=static_argnums)


@functools.cache
def _derivatives(f, order):
    fns, g = [], f
    for _ in range(order):
        g = jax.grad(g)
        fns.append(g)
    return jax.jit(jax.vmap(lambda v: tuple(h(v) for h in fns)))


@eqx.filter_jit
def _layer_jacobians(module, method, xs):
    return jax.vmap(jax.jacfwd(lambda v: getattr(module, method)(v)[0]))(xs)


@eqx.filter_jit
def _value_and_grads(params, static, method, x, weights, keys):
    def loss(p, x):
        out, ladj, *extra = _apply(eqx.combine(p, static), method, x, keys)
        return (weights[..., :-1] * out).sum() + (weights[..., -1] * ladj).sum() + sum(e.sum() for e in extra)

    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


class JaxAdapter:
    name = "jax"

    def __init__(self):
        import jax

        jax.config.update("jax_enable_x64", True)
        import equinox as eqx
        import jax.numpy as jnp

        import pyroflows.jax as pf

        self.jax, self.jnp, self.eqx, self.pf = jax, jnp, eqx, pf

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

    # ------------------------------------------------------------------ layers, for tests/families
    # The same interface as the torch adapter's (see backends.py): numpy in, numpy out.

    def transforms(self):
        return self.pf.transforms

    def module(self, path):
        import importlib

        return importlib.import_module(f"pyroflows.jax.{path}")

    def make(self, cls, *args, seed=0, perturb=0.0, dtype="float64", **kwargs):
        import inspect

        cls = getattr(self.pf.transforms, cls) if isinstance(cls, str) else cls
        if "key" in inspect.signature(cls.__init__).parameters:
            kwargs["key"] = jax.random.key(seed)
        return self.perturbed(self.astype(cls(*args, **kwargs), dtype), perturb, seed)

    def build_flow(self, name, dim, seed=0, perturb=0.0, dtype="float64", **kwargs):
        flow = self.pf.build_flow(name, dim, key=jax.random.key(seed), **kwargs)
        return self.perturbed(self.astype(flow, dtype), perturb, seed)

    def perturbed(self, module, scale, seed=0):
        if not scale:
            return module
        rng = np.random.default_rng(seed)
        params = self.params(module)
        return self.with_arrays(module, {k: v + scale * rng.standard_normal(v.shape) for k, v in params.items()})

    def params(self, module):
        from pyroflows.jax.io import named_arrays

        floating = self.jnp.floating
        return {k: np.asarray(v) for k, v in named_arrays(module).items() if self.jnp.issubdtype(v.dtype, floating)}

    def arrays(self, module):
        from pyroflows.jax.io import named_arrays

        return {k: np.asarray(v) for k, v in named_arrays(module).items()}

    def with_arrays(self, module, values):
        from pyroflows.jax.io import _replace_arrays, named_arrays

        current = named_arrays(module)
        missing = set(values) - set(current)
        assert not missing, missing
        values = {k: self.jnp.asarray(np.asarray(v), current[k].dtype) for k, v in values.items()}
        return _replace_arrays(module, values)

    def astype(self, module, dtype):
        from pyroflows.jax.transforms.base import astype

        return astype(module, self.dtype(dtype) if isinstance(dtype, str) else dtype)

    def float_dtype(self, module):
        from pyroflows.jax.transforms.base import float_dtype

        return np.dtype(float_dtype(module)).name

    def _to_numpy(self, out):
        if isinstance(out, (tuple, list)):
            return tuple(self._to_numpy(o) for o in out)
        return np.asarray(out) if isinstance(out, jax.Array) else out

    def _input(self, module, x):
        return self.jnp.asarray(np.asarray(x), self.float_dtype(module))

    def _keys(self, seed, n):
        return None if seed is None else jax.random.split(jax.random.key(seed), n)

    def apply(self, module, method, x, seed=None, probes=None):
        """``module.<method>`` on the rows of ``x``, vmapped and jitted; ``seed`` splits one key
        per row for stochastic layers; ``probes`` replace a CNF's Hutchinson probes (passed
        where the keys go, with ``CNF._probe`` returning them)."""
        x = np.asarray(x)
        single = x.ndim == 1
        rows = self._input(module, x.reshape(-1, x.shape[-1]))
        if probes is not None:
            from pyroflows.jax.transforms import CNF

            original = CNF.__dict__["_probe"]
            CNF._probe = lambda self, v, key: key
            try:
                # A fresh trace: the patched probe must not reach the shared cache.
                run = jax.jit(jax.vmap(lambda v, e: getattr(module, method)(v, key=e)))
                out = run(rows, self._input(module, probes))
            finally:
                CNF._probe = original
        else:
            # Rows padded (with zeros) to a power of two, at least 64: every batch of up to
            # 64 rows shares one compilation per layer structure and method.
            n = len(rows)
            size = max(64, 1 << (n - 1).bit_length())
            padded = self.jnp.concatenate([rows, self.jnp.zeros((size - n, rows.shape[1]), rows.dtype)])
            out = _apply(module, method, padded, self._keys(seed, size))
            out = tuple(a[:n] for a in out)
        out = tuple(np.asarray(a) for a in out)
        if single:
            return tuple(a[0] for a in out)
        return tuple(a.reshape(x.shape[:-1] + a.shape[1:]) for a in out)

    def method(self, module, name, *args):
        return self._to_numpy(_method(module, name, tuple(self._input(module, a) for a in args)))

    def layer_jacobian_of(self, module, method, x):
        return np.asarray(_layer_jacobian(module, method, self._input(module, x)))

    def layer_jacobians(self, module, method, xs):
        xs = np.asarray(xs)
        n = len(xs)
        size = max(64, 1 << (n - 1).bit_length())  # padded like ``apply``
        padded = np.concatenate([xs, np.zeros((size - n, xs.shape[1]))])
        return np.asarray(_layer_jacobians(module, method, self._input(module, padded)))[:n]

    def value_and_grads(self, module, method, x, weights, seed=None):
        from pyroflows.jax.io import named_arrays

        params, static = eqx.partition(module, eqx.is_inexact_array)
        xs = self._input(module, x)
        value, (g_params, g_x) = _value_and_grads(
            params, static, method, xs, self._input(module, weights), self._keys(seed, len(xs))
        )
        grads = {k: np.asarray(v) for k, v in named_arrays(g_params).items()}
        return float(value), grads, np.asarray(g_x)

    def _function(self, f):
        if isinstance(f, str):
            module, name = f.rsplit(".", 1)
            return getattr(self.module(module), name)
        return f

    def fn(self, f, *args, dtype="float64", static=()):
        """Library functions (named by path) jitted once per function and shapes, with the
        plain Python arguments ``static``; a test's own closures eagerly (a jit would compile
        each new closure again)."""
        args = [self.tensor(a, dtype) for a in args]
        if isinstance(f, str):
            fn = _jitted(self._function(f), tuple(range(len(args), len(args) + len(static))))
            return self._to_numpy(fn(*args, *static))
        return self._to_numpy(f(*args, *static))

    def method_jacobian(self, module, name, args, argnum=0):
        args = tuple(self._input(module, a) for a in args)
        return np.asarray(_method_jacobian(module, name, args, argnum))

    def derivatives(self, f, x, order=1):
        return [np.asarray(a) for a in _derivatives(self._function(f), order)(self.tensor(x, "float64"))]

    def grad_fn(self, f, x, static=()):
        f = self._function(f)
        return np.asarray(jax.grad(lambda v: f(v, *static))(self.tensor(x, "float64")))

    def jacobian_fn(self, f, x):
        return np.asarray(jax.jacfwd(f)(self.tensor(x, "float64")))

    def call(self, flow, x):
        return np.asarray(flow.to_transform()(self.tensor(x, "float64")))

    def inv(self, flow, y):
        return np.asarray(flow.to_transform().inv(self.tensor(y, "float64")))

    def key_kwargs(self, seed):
        return {"key": jax.random.key(seed)}
