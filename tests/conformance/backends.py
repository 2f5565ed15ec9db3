"""What the conformance suite needs from a backend, behind one small adapter per backend.

Each adapter works on numpy arrays at its boundary, so the properties in
``test_properties.py`` are written once and run on every backend. The JAX adapter
joins ``ADAPTERS`` when ``pyroflows.jax`` lands.
"""

from __future__ import annotations

import numpy as np

from pyroflows.registry import SPECS

SMALL_HIDDEN = (16, 16)
# The estimator families join the suite in their exact modes (the log-det property of
# tests/conformance/test_properties.py); their stochastic estimators are tested for
# unbiasedness in their own test files.
EXACT_MODE = {"ffjord": {"estimator": "exact"}, "residual": {"estimator": "exact"}}


def small_config(name, backend_names):
    """Options that keep a conformance build small; families without hidden dims get none."""
    spec = SPECS.get(name)
    kwargs = {"num_layers": 2, **EXACT_MODE.get(name, {})}
    if spec is not None and spec.hidden_dims is not None:
        kwargs["hidden_dims"] = SMALL_HIDDEN
    return kwargs


class TorchAdapter:
    name = "torch"

    def __init__(self):
        import torch

        import pyroflows.torch as pf

        self.torch, self.pf = torch, pf

    def names(self):
        return self.pf.available_flows()

    def dtype(self, dtype):
        return {"float32": self.torch.float32, "float64": self.torch.float64}[dtype]

    def build(self, name, dim, dtype="float64", seed=0, perturb=0.1, **kwargs):
        torch = self.torch
        torch.manual_seed(seed)
        kwargs = {**small_config(name, self.names()), **kwargs}
        flow = self.pf.build_flow(name, dim, **kwargs).to(self.dtype(dtype))
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(perturb * torch.randn_like(p))
        return flow

    def tensor(self, a, dtype):
        return self.torch.as_tensor(np.array(a), dtype=self.dtype(dtype))

    def forward(self, flow, x, dtype="float64"):
        with self.torch.no_grad():
            y, ladj = flow.call_and_ladj(self.tensor(x, dtype))
        return y.numpy(), ladj.numpy()

    def inverse(self, flow, y, dtype="float64"):
        with self.torch.no_grad():
            x, ildj = flow.inverse_and_ladj(self.tensor(y, dtype))
        return x.numpy(), ildj.numpy()

    def jacobian(self, flow, x, direction="forward", dtype="float64"):
        """Autodiff Jacobian of one point's map, and the flow's own log|det| there."""
        torch = self.torch
        fn = flow.call_and_ladj if direction == "forward" else flow.inverse_and_ladj
        xt = self.tensor(x, dtype)
        jac = torch.autograd.functional.jacobian(lambda v: fn(v)[0], xt)
        with torch.no_grad():
            ladj = fn(xt)[1]
        return jac.numpy(), float(ladj)

    def layers(self, flow):
        return list(flow.parts)

    def layer_jacobian(self, layer, x, dtype="float64"):
        jac = self.torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], self.tensor(x, dtype))
        return jac.numpy()

    def is_autoregressive(self, layer):
        return bool(getattr(layer, "autoregressive", False))

    def permutation(self, layer):
        return layer.get_permutation().numpy()

    def distribution(self, flow, dim, dtype):
        import pyro.distributions as dist

        torch = self.torch
        base = dist.Normal(
            torch.zeros(dim, dtype=self.dtype(dtype)), torch.ones(dim, dtype=self.dtype(dtype))
        ).to_event(1)
        return dist.TransformedDistribution(base, [flow])

    def sample_and_log_prob(self, flow, dim, batch_shape, dtype):
        d = self.distribution(flow, dim, dtype)
        with self.torch.no_grad():
            x = d.sample(batch_shape)
            lp = d.log_prob(x)
            lp_fresh = d.log_prob(x.clone())
        return x.numpy(), lp.numpy(), lp_fresh.numpy()

    def shapes(self, flow, shape):
        return tuple(flow.forward_shape(shape)), tuple(flow.inverse_shape(shape))

    def train(self, flow, data, dim, dtype, steps=5, lr=1e-2, rescore=True):
        """A few Adam steps on -log_prob of one fixed batch, scoring it twice per step (once
        without ``rescore``)."""
        torch = self.torch
        d = self.distribution(flow, dim, dtype)
        x = self.tensor(data, dtype)
        opt = torch.optim.Adam(flow.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = -d.log_prob(x).mean()
            loss.backward()
            if rescore:
                again = -d.log_prob(x).mean()  # scoring the same tensor again must work
                again.backward()
            opt.step()
            losses.append(float(loss.detach()))
        grads_finite = all(bool(torch.isfinite(p).all()) for p in flow.parameters())
        return np.array(losses), grads_finite

    def reparam_grad(self, flow, dim, dtype, n=16):
        """Gradient of a sample-path objective (reverse KL style): rsample then score it."""
        torch = self.torch
        d = self.distribution(flow, dim, dtype)
        x = d.rsample((n,))
        loss = (d.log_prob(x) + 0.5 * (x**2).sum(-1)).mean()
        loss.backward()
        grads = [p.grad for p in flow.parameters() if p.grad is not None]
        return float(loss.detach()), all(bool(torch.isfinite(g).all()) for g in grads), len(grads)

    def moved(self, flow, dim):
        """Log-densities of the flow after ``.to(float64)`` and a device move, against the original."""
        import copy

        torch = self.torch
        f32 = copy.deepcopy(flow).float()
        x = torch.randn(4, dim)
        with torch.no_grad():
            lp32 = self.distribution(f32, dim, "float32").log_prob(x)
            f64 = f32.to(torch.float64).to("cpu")
            lp64 = self.distribution(f64, dim, "float64").log_prob(x.double())
        return lp32.numpy(), lp64.numpy()

    # ------------------------------------------------------------------ layers, for tests/families
    # The per-family tests build single layers by class name, read and set their arrays by
    # their (torch-style) names, and run them on numpy batches; every method below takes and
    # returns numpy arrays, so those tests are written once for both backends.

    def transforms(self):
        return self.pf.transforms

    def module(self, path):
        """``pyroflows.torch.<path>``, e.g. ``"transforms.gaussianization"``."""
        import importlib

        return importlib.import_module(f"pyroflows.torch.{path}")

    def make(self, cls, *args, seed=0, perturb=0.0, dtype="float64", **kwargs):
        """``cls(*args, **kwargs)`` (a class or its name in ``transforms``), in ``dtype``, with
        every parameter moved by ``perturb`` * N(0, 1) (numpy's generator seeded by ``seed``)."""
        cls = getattr(self.pf.transforms, cls) if isinstance(cls, str) else cls
        with self._default_dtype(dtype):
            self.torch.manual_seed(seed)
            layer = cls(*args, **kwargs).to(self.dtype(dtype))
        return self.perturbed(layer, perturb, seed)

    def build_flow(self, name, dim, seed=0, perturb=0.0, dtype="float64", **kwargs):
        """``build_flow`` with the registry's defaults (no test-size overrides), perturbed like ``make``."""
        with self._default_dtype(dtype):
            self.torch.manual_seed(seed)
            flow = self.pf.build_flow(name, dim, **kwargs).to(self.dtype(dtype))
        return self.perturbed(flow, perturb, seed)

    def _default_dtype(self, dtype):
        """Layers initialised in ``dtype`` itself (not rounded through float32)."""
        import contextlib

        torch = self.torch

        @contextlib.contextmanager
        def scope():
            old = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype(dtype))
            try:
                yield
            finally:
                torch.set_default_dtype(old)

        return scope()

    def perturbed(self, module, scale, seed=0):
        if not scale:
            return module
        rng = np.random.default_rng(seed)
        params = self.params(module)
        return self.with_arrays(module, {k: v + scale * rng.standard_normal(v.shape) for k, v in params.items()})

    def params(self, module):
        """The trainable arrays, by name."""
        return {k: v.detach().cpu().numpy().copy() for k, v in module.named_parameters()}

    def arrays(self, module):
        """Every array (parameters and buffers), by name."""
        return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}

    def with_arrays(self, module, values):
        """A copy of ``module`` whose arrays named in ``values`` hold those values."""
        import copy

        module = copy.deepcopy(module)
        state = module.state_dict()
        with self.torch.no_grad():
            for name, value in values.items():
                state[name].copy_(self.torch.as_tensor(np.asarray(value)))
        return module

    def astype(self, module, dtype):
        import copy

        return copy.deepcopy(module).to(self.dtype(dtype))

    def float_dtype(self, module):
        return str(next(iter(module.parameters())).dtype).replace("torch.", "")

    def _to_numpy(self, out):
        if isinstance(out, (tuple, list)):
            return tuple(self._to_numpy(o) for o in out)
        if isinstance(out, self.torch.Tensor):
            return out.detach().cpu().numpy()
        return out

    def _input(self, module, x):
        return self.torch.as_tensor(np.array(x), dtype=getattr(self.torch, self.float_dtype(module)))

    def apply(self, module, method, x, seed=None, probes=None):
        """``module.<method>`` on the rows of ``x`` (a batch, or one point): a tuple of numpy arrays.

        ``seed`` seeds the noise of stochastic layers (torch: the global generator);
        ``probes`` (one row per row of ``x``) replaces a CNF's Hutchinson probes."""
        fn = getattr(module, method)
        if probes is not None:
            rows = self._input(module, probes)
            module._probe = lambda v: rows
        try:
            if seed is not None:
                self.torch.manual_seed(seed)
            with self.torch.no_grad():
                return self._to_numpy(fn(self._input(module, x)))
        finally:
            if probes is not None:
                del module._probe

    def method(self, module, name, *args):
        """Any other method of ``module`` (``constrained``, ``q``, ``matrix``...), on numpy arguments."""
        with self.torch.no_grad():
            return self._to_numpy(getattr(module, name)(*(self._input(module, a) for a in args)))

    def layer_jacobian_of(self, module, method, x):
        """Autodiff Jacobian of ``module.<method>(x)[0]`` at one point ``x``."""
        fn = getattr(module, method)
        return self.torch.autograd.functional.jacobian(lambda v: fn(v)[0], self._input(module, x)).numpy()

    def layer_jacobians(self, module, method, xs):
        """Autodiff Jacobians of ``module.<method>(x)[0]`` at each row of ``xs`` (rows map independently)."""
        fn = getattr(module, method)
        jac = self.torch.autograd.functional.jacobian(lambda v: fn(v)[0].sum(0), self._input(module, xs))
        return jac.permute(1, 0, 2).numpy()

    def value_and_grads(self, module, method, x, weights, seed=None):
        """``L = sum(weights[..., :-1] * out) + sum(weights[..., -1] * ladj)`` (plus the sum of a
        third output, such as a CNF's regulariser) for ``(out, ladj) = module.<method>(x)``: its
        value, its gradients in every parameter (by name; zeros for unused ones) and in ``x``."""
        torch = self.torch
        xt = self._input(module, x).requires_grad_(True)
        w = self._input(module, weights)
        if seed is not None:
            torch.manual_seed(seed)
        out, ladj, *extra = getattr(module, method)(xt)
        loss = (w[..., :-1] * out).sum() + (w[..., -1] * ladj).sum() + sum(e.sum() for e in extra)
        names, params = zip(*module.named_parameters())
        grads = torch.autograd.grad(loss, [xt, *params], allow_unused=True)
        named = {n: (torch.zeros_like(p) if g is None else g).numpy() for n, p, g in zip(names, params, grads[1:])}
        return float(loss.detach()), named, grads[0].numpy()

    def fn(self, f, *args, dtype="float64", static=()):
        """``f`` (a backend function, or a path ``"module.name"`` under ``pyroflows.torch``) on
        numpy arguments, followed by the plain Python arguments ``static``."""
        f = self._function(f)
        with self.torch.no_grad():
            return self._to_numpy(f(*(self.tensor(a, dtype) for a in args), *static))

    def method_jacobian(self, module, name, args, argnum=0):
        """Autodiff Jacobian of ``module.<name>(*args)[0]`` in ``args[argnum]`` (numpy arguments)."""
        args = [self._input(module, a) for a in args]

        def fn(v):
            return getattr(module, name)(*args[:argnum], v, *args[argnum + 1 :])[0]

        return self.torch.autograd.functional.jacobian(fn, args[argnum]).numpy()

    def _function(self, f):
        if isinstance(f, str):
            module, name = f.rsplit(".", 1)
            return getattr(self.module(module), name)
        return f

    def derivatives(self, f, x, order=1):
        """The first ``order`` derivatives of an elementwise function ``f`` at the entries of ``x``."""
        f = self._function(f)
        xt = self.tensor(x, "float64").requires_grad_(True)
        out, derivs = f(xt), []
        for _ in range(order):
            (out,) = self.torch.autograd.grad(out.sum(), xt, create_graph=True)
            derivs.append(out.detach().numpy())
        return derivs

    def grad_fn(self, f, x, static=()):
        """Gradient of a scalar backend function ``f`` of one array, at ``x``."""
        xt = self.tensor(x, "float64").requires_grad_(True)
        (g,) = self.torch.autograd.grad(self._function(f)(xt, *static), xt)
        return g.numpy()

    def jacobian_fn(self, f, x):
        """Autodiff Jacobian of a backend function ``f`` of one vector, at ``x``."""
        return self.torch.autograd.functional.jacobian(f, self.tensor(x, "float64")).numpy()

    def call(self, flow, x):
        """The flow as a Pyro transform on a batch: ``flow(x)``."""
        with self.torch.no_grad():
            return flow(self.tensor(x, "float64")).numpy()

    def inv(self, flow, y):
        with self.torch.no_grad():
            return flow.inv(self.tensor(y, "float64")).numpy()

    def key_kwargs(self, seed):
        """Keywords that seed a builder (JAX takes a key; torch uses the global generator)."""
        self.torch.manual_seed(seed)
        return {}


def available_adapters():
    adapters = [TorchAdapter()]
    try:
        import pyroflows.jax  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - lands with the JAX backend
        from .jax_adapter import JaxAdapter

        adapters.append(JaxAdapter())
    return adapters


ADAPTERS = available_adapters()
