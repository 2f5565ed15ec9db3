"""Checks shared by the per-family torch tests."""

from __future__ import annotations

import torch


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
