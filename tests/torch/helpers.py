"""Checks and small layers shared by the torch tests (tests/torch and the backend-neutral tests)."""

from __future__ import annotations

import math

import torch

import pyroflows.torch as pf
from pyroflows.torch.transforms.base import Flow, FlowTransform


def param_grad_check(layer, fn, inputs, h=1e-6, tol=1e-6, per_param=None):
    """Autograd gradients of ``sum(weights * fn(inputs))`` against central differences.

    ``fn`` returns a tuple of tensors; ``per_param`` random entries of every parameter are
    checked (all entries when ``None``).
    """
    torch.manual_seed(123)
    out = fn(inputs)
    weights = [torch.randn_like(o) for o in out]
    loss = sum((w * o).sum() for w, o in zip(weights, out))
    params = list(layer.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        g = torch.zeros_like(p) if g is None else g
        flat = p.data.view(-1)
        entries = range(flat.numel()) if per_param is None else torch.randperm(flat.numel())[:per_param].tolist()
        for k in entries:
            old = flat[k].item()
            vals = []
            for step in (h, -h):
                flat[k] = old + step
                with torch.no_grad():
                    vals.append(sum((w * o).sum() for w, o in zip(weights, fn(inputs))).item())
            flat[k] = old
            fd = (vals[0] - vals[1]) / (2 * h)
            assert abs(g.view(-1)[k].item() - fd) <= tol * (1 + abs(fd)), (p.shape, k, g.view(-1)[k], fd)


def call_with_params(layer, method):
    """``(fn, params)``: ``fn(x, *params)`` runs ``layer.method`` with those parameters, flattened,
    for ``torch.autograd.gradcheck`` over inputs and parameters together."""
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *params):
        out, ladj = _call(layer, method, dict(zip(names, params)), x)
        return torch.cat([out.reshape(-1), ladj.reshape(-1)])

    return fn, tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())


def _call(layer, method, params, x):
    class Method(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, v):
            return getattr(self.layer, method)(v)

    return torch.func.functional_call(Method(), {f"layer.{n}": p for n, p in params.items()}, (x,))


class RawScale(FlowTransform):
    """y = scale * x with log|det| = sum(log scale), unclamped: NaN once a scale turns negative."""

    def __init__(self, scale):
        super().__init__(2)
        self.scale = torch.nn.Parameter(torch.full((2,), float(scale), dtype=torch.float64))

    def call_and_ladj(self, x):
        return self.scale * x, torch.log(self.scale).sum().expand(x.shape[:-1])

    def inverse_and_ladj(self, y):
        return y / self.scale, (-torch.log(self.scale).sum()).expand(y.shape[:-1])


class Sentinel(FlowTransform):
    """The identity, whose log-det is NaN at points whose first coordinate exceeds 100."""

    def _ladj(self, x):
        first = x[..., 0]
        return torch.where(first > 100, torch.full_like(first, math.nan), torch.zeros_like(first))

    def call_and_ladj(self, x):
        return x, self._ladj(x)

    def inverse_and_ladj(self, y):
        return y, self._ladj(y)


def sentinel_flow():
    torch.manual_seed(0)
    return Flow(list(pf.build_flow("maf", 2, num_layers=1, hidden_dims=(8,)).double().parts) + [Sentinel(2)], 2)


def uses_activation(layer, name):
    """Whether one of ``layer``'s modules is the activation ``name`` (e.g. ``"leaky_relu"``)."""
    return any(type(m).__name__.lower() == name.replace("_", "") for m in layer.modules())
