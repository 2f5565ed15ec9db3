"""What the conformance suite needs from a backend, behind one small adapter per backend.

Each adapter works on numpy arrays at its boundary, so the properties in
``test_properties.py`` are written once and run on every backend. The JAX adapter
joins ``ADAPTERS`` when ``pyroflows.jax`` lands.
"""

from __future__ import annotations

import numpy as np

from pyroflows.registry import SPECS

SMALL_HIDDEN = (16, 16)
# The estimator families join the suite in their exact modes (the log-det property of tests/conformance/test_properties.py);
# their stochastic estimators are tested for unbiasedness in their own test files.
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
        return self.torch.as_tensor(np.asarray(a), dtype=self.dtype(dtype))

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
        base = dist.Normal(torch.zeros(dim, dtype=self.dtype(dtype)), torch.ones(dim, dtype=self.dtype(dtype))).to_event(1)
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
