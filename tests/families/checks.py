"""Reference checks shared by the per-family tests: gradients against central differences."""

from __future__ import annotations

import numpy as np


def _weighted(out, weights):
    y, ladj = out[:2]
    return float((weights[..., :-1] * y).sum() + (weights[..., -1] * ladj).sum())


def check_gradients(backend, module, method, x, *, h=1e-6, tol=1e-6, per_param=None, inputs=True, seed=123):
    """Autodiff gradients of ``L = sum(w * [out, ladj])`` for ``module.<method>(x)`` (random
    weights ``w``) against central differences, entry by entry: in every parameter
    (``per_param`` random entries of each, all when ``None``) and, with ``inputs``, in ``x``."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    weights = rng.standard_normal(x.shape[:-1] + (x.shape[-1] + 1,))
    _, grads, grad_x = backend.value_and_grads(module, method, x, weights)
    params = backend.params(module)
    assert set(grads) == set(params), set(grads) ^ set(params)
    checked = 0
    for name, p in params.items():
        flat = p.reshape(-1)
        entries = range(flat.size) if per_param is None else rng.permutation(flat.size)[:per_param]
        for k in entries:
            values = []
            for step in (h, -h):
                moved = flat.copy()
                moved[k] += step
                other = backend.with_arrays(module, {name: moved.reshape(p.shape)})
                values.append(_weighted(backend.apply(other, method, x), weights))
            fd = (values[0] - values[1]) / (2 * h)
            g = grads[name].reshape(-1)[k]
            assert abs(g - fd) <= tol * (1 + abs(fd)), (name, k, g, fd)
            checked += 1
    if inputs:
        for idx in np.ndindex(*x.shape):
            values = []
            for step in (h, -h):
                moved = x.copy()
                moved[idx] += step
                values.append(_weighted(backend.apply(module, method, moved), weights))
            fd = (values[0] - values[1]) / (2 * h)
            assert abs(grad_x[idx] - fd) <= tol * (1 + abs(fd)), ("input", idx, grad_x[idx], fd)
    assert checked > 0
