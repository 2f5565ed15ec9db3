"""The conditioner x transformer families (NICE, RealNVP, IAF, MAF, NAF, NSF), on every backend.

The pieces the families are built from, each checked on its own:

* every element-wise transformer (``Additive``, ``Affine``, ``RationalQuadraticSpline``,
  ``DeepSigmoid``) inverts itself and its log-derivative is the autodiff derivative
  (``torch.autograd`` / ``jax.grad``), in float64 on random parameters;
* the torch and JAX transformers give the same numbers on the same parameters;
* ``MaskedAutoregressive``'s sequential direction inverts its parallel one, for each
  transformer and both sides the MADE may read;
* ``Coupling`` reads its MLP's output parameter-major: entry ``p * (dim - split) + j`` is
  parameter ``p`` of moved coordinate ``j``.

The families' own properties (naive formulas, references, builders) are tested per
backend in tests/{torch,jax}/test_autoregressive.py and test_spline.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.conformance.backends import ADAPTERS

# Small options, so that the spline has few bins (every bin is hit by the grids below)
# and the sigmoid few units.
TRANSFORMERS = {
    "additive": ("Additive", {}),
    "affine": ("Affine", {"log_scale_bound": 2.0}),
    "spline": ("RationalQuadraticSpline", {"count_bins": 4, "bound": 2.5}),
    "sigmoid": ("DeepSigmoid", {"hidden_units": 4}),
}
#: Points per transformer call: one shape, so JAX compiles each direction of each transformer once.
N = 64


def _transformer(backend, name):
    cls, options = TRANSFORMERS[name]
    return getattr(backend.module("transforms.transformers"), cls)(**options)


@functools.cache
def _jax_runner(tau, inverse):
    """jit of ``(out, log-derivative, d out / d in)`` of one direction of ``tau``, elementwise."""
    import jax

    def run(v, params):
        def total(u):
            out, logd = (tau.inverse if inverse else tau.forward)(u, params)
            return out.sum(), (out, logd)

        grad, (out, logd) = jax.grad(total, has_aux=True)(v)
        return out, logd, grad

    return jax.jit(run)


def _run(backend, tau, v, params, inverse=False):
    """``tau.forward(v, params)`` (or ``inverse``) on numpy float64 arrays: ``(out, log-derivative,
    d out / d v by autodiff)``, each of ``v``'s shape."""
    v, params = np.asarray(v, np.float64), np.asarray(params, np.float64)
    if backend.name == "torch":
        import torch

        vt = torch.as_tensor(v).requires_grad_(True)
        out, logd = (tau.inverse if inverse else tau.forward)(vt, torch.as_tensor(params))
        (grad,) = torch.autograd.grad(out.sum(), vt)
        return out.detach().numpy(), logd.detach().numpy(), grad.numpy()
    out = _jax_runner(tau, inverse)(backend.tensor(v, "float64"), backend.tensor(params, "float64"))
    return tuple(np.asarray(a) for a in out)


def _points(seed):
    """``N`` points over ``[-4, 4]`` (inside and outside the spline's interval) and random
    parameters, float64."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.linspace(-4.0, 4.0, N - 8), 3.0 * rng.standard_normal(8)])
    return x, rng


# --------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_inverts_itself_and_its_log_derivative_is_the_autodiff_one(backend, name):
    tau = _transformer(backend, name)
    x, rng = _points(seed=1)
    params = 1.5 * rng.standard_normal((N, tau.num_params))
    y, logd, dy = _run(backend, tau, x, params)
    assert np.isfinite(y).all() and np.isfinite(logd).all()
    assert (dy > 0).all()
    np.testing.assert_allclose(np.exp(logd), dy, rtol=1e-10, atol=0)
    x2, ildj, dx = _run(backend, tau, y, params, inverse=True)
    np.testing.assert_allclose(x2, x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ildj, -logd, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.exp(ildj), dx, rtol=1e-9, atol=0)
    # The other way round: inverse first, from the same points taken as y.
    x3, ildj3, _ = _run(backend, tau, x, params, inverse=True)
    y3, logd3, _ = _run(backend, tau, x3, params)
    np.testing.assert_allclose(y3, x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(logd3, -ildj3, rtol=0, atol=1e-10)
    # All-zero parameters: the identity (the deep sigmoidal map is only near it: tests/*/test_autoregressive.py).
    if name != "sigmoid":
        y0, logd0, _ = _run(backend, tau, x, np.zeros((N, tau.num_params)))
        np.testing.assert_allclose(y0, x, rtol=0, atol=1e-13)
        np.testing.assert_allclose(logd0, 0.0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_torch_and_jax_transformers_agree(name):
    adapters = {a.name: a for a in ADAPTERS}
    if "jax" not in adapters:
        pytest.skip("the JAX backend is not installed")
    x, rng = _points(seed=2)
    taus = {b: _transformer(adapters[b], name) for b in ("torch", "jax")}
    params = 1.5 * rng.standard_normal((N, taus["torch"].num_params))
    for inverse in (False, True):
        theirs, ours = (_run(adapters[b], taus[b], x, params, inverse) for b in ("torch", "jax"))
        for t, o in zip(theirs, ours):  # value, log-derivative and autodiff derivative
            np.testing.assert_allclose(o, t, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- masked autoregressive
@pytest.mark.parametrize("reads", ["input", "output"])
@pytest.mark.parametrize("name", ["affine", "spline", "sigmoid"])
def test_masked_autoregressive_sequential_direction_inverts_the_parallel_one(backend, name, reads):
    dim = 4
    tau = _transformer(backend, name)
    layer = backend.make("MaskedAutoregressive", dim, tau, (16,), "tanh", reads=reads, seed=3, perturb=0.5)
    assert layer.reads == reads and layer.transformer == tau
    parallel, sequential = ("call_and_ladj", "inverse_and_ladj")[:: 1 if reads == "input" else -1]
    v = 2.0 * np.random.default_rng(4).standard_normal((12, dim))
    # The sequential direction undoes the parallel one...
    out, ladj = backend.apply(layer, parallel, v)
    back, back_ladj = backend.apply(layer, sequential, out)
    np.testing.assert_allclose(back, v, rtol=0, atol=1e-10)
    np.testing.assert_allclose(back_ladj, -ladj, rtol=0, atol=1e-10)
    # ...and the parallel one undoes the sequential one.
    out, ladj = backend.apply(layer, sequential, v)
    back, back_ladj = backend.apply(layer, parallel, out)
    np.testing.assert_allclose(back, v, rtol=0, atol=1e-10)
    np.testing.assert_allclose(back_ladj, -ladj, rtol=0, atol=1e-10)
    # The layer is not the identity (the check above would then be empty).
    assert np.abs(out - v).max() > 1e-2


# --------------------------------------------------------------------------- coupling layout
def _last_layer(backend, layer):
    """Names of the weight and bias of the coupling MLP's output layer."""
    names = [k for k in backend.params(layer) if k.startswith("conditioner.") and k.endswith(".weight")]
    last = max(names, key=lambda k: int(k.split(".")[-2]))
    return last, last[: -len("weight")] + "bias"


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_coupling_output_is_parameter_major(backend, name):
    """With the MLP's output layer zero except the bias of entry ``p * moved + j``, only moved
    coordinate ``j`` changes, and it is mapped by the transformer with parameter ``p`` set."""
    dim, split = 5, 2
    moved = dim - split
    tau = _transformer(backend, name)
    layer = backend.make("Coupling", dim, tau, (8,), "tanh", seed=5, perturb=0.5)
    weight, bias = _last_layer(backend, layer)
    shapes = {k: v.shape for k, v in backend.params(layer).items()}
    assert shapes[weight][0] == shapes[bias][0] == tau.num_params * moved
    x, rng = _points(seed=6)
    rows = np.empty((N, dim))
    rows[:, :split] = rng.standard_normal((N, split))
    for j in range(moved):  # every moved coordinate sweeps the grid, in its own order
        rows[:, split + j] = np.roll(x, 7 * j)
    zeros = np.zeros((N, tau.num_params))
    identity = [_run(backend, tau, rows[:, split + j], zeros)[:2] for j in range(moved)]
    c = 1.0
    for p in range(tau.num_params):
        theta = zeros.copy()
        theta[:, p] = c
        for j in range(moved):
            b = np.zeros(shapes[bias])
            b[p * moved + j] = c
            probe = backend.with_arrays(layer, {weight: np.zeros(shapes[weight]), bias: b})
            y, ladj = backend.apply(probe, "call_and_ladj", rows)
            np.testing.assert_array_equal(y[:, :split], rows[:, :split])
            expected, expected_logd, _ = _run(backend, tau, rows[:, split + j], theta)
            total = expected_logd.copy()
            for i in range(moved):
                if i == j:
                    np.testing.assert_allclose(y[:, split + i], expected, rtol=1e-13, atol=1e-13)
                    # Parameter p of coordinate j moves coordinate j's map.
                    assert np.abs(expected - identity[i][0]).max() > 1e-3, (p, j)
                else:
                    np.testing.assert_allclose(y[:, split + i], identity[i][0], rtol=1e-13, atol=1e-13)
                    total = total + identity[i][1]
            np.testing.assert_allclose(ladj, total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ADAPTERS, ids=lambda a: a.name)
@pytest.mark.parametrize(
    "cls,options,option",
    [
        ("Affine", {"log_scale_bound": 0.0}, "log_scale_bound"),
        ("Affine", {"log_scale_bound": float("inf")}, "log_scale_bound"),
        ("RationalQuadraticSpline", {"count_bins": 0}, "count_bins"),
        ("RationalQuadraticSpline", {"bound": float("nan")}, "bound"),
        ("DeepSigmoid", {"hidden_units": True}, "hidden_units"),
    ],
)
def test_a_transformer_built_by_hand_checks_its_options(backend, cls, options, option):
    with pytest.raises(ValueError, match=f"option {option}="):
        getattr(backend.module("transforms.transformers"), cls)(**options)
