"""The properties every registered flow must have, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from .backends import ADAPTERS

CASES = [pytest.param(a, n, id=f"{a.name}-{n}") for a in ADAPTERS for n in a.names()]
DIMS = [1, 2, 5]
DTYPES = ["float64", "float32"]
BATCHES = [(), (3,), (3, 4)]
# float64 properties hold to solver precision; float32 ones to what single precision allows.
TOL = {"float64": 1e-6, "float32": 2e-3}


def grid(*axes, jax_keep=None):
    """Parameter sets: the full product for torch; for JAX, where every case is an XLA
    compilation, the cases ``jax_keep(*values)`` accepts (the suite must fit 20 minutes
    on 2 cores). What JAX skips here is family-independent code: the batch reshaping
    of ``EqxTransform`` (covered by the round-trip test, which runs every batch shape)
    and float32 Jacobians (float32 is covered by the round trip and training)."""
    import itertools

    out = []
    for case in CASES:
        for values in itertools.product(*axes):
            if case.values[0].name == "jax" and jax_keep is not None and not jax_keep(*values):
                continue
            out.append(pytest.param(*case.values, *values, id="-".join([case.id, *map(str, values)])))
    return out


def _points(shape, seed=0, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("adapter,name", CASES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_round_trip(adapter, name, dim, dtype):
    """Every batch shape, in one test: on JAX they share one compilation (the adapter pads
    the rows), which one test keeps on one xdist worker."""
    flow = adapter.build(name, dim, dtype)
    tol = TOL[dtype]
    for batch in BATCHES:
        x = _points(batch + (dim,))
        y, ladj = adapter.forward(flow, x, dtype)
        x2, ildj = adapter.inverse(flow, y, dtype)
        assert y.shape == x.shape and ladj.shape == batch and ildj.shape == batch, batch
        assert y.dtype == x2.dtype == ladj.dtype == np.dtype(dtype)  # no silent promotion
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(ladj)), batch
        np.testing.assert_allclose(x2, x, atol=tol * 10, rtol=tol * 10, err_msg=str(batch))
        np.testing.assert_allclose(ildj, -ladj, atol=tol * 10 * (1 + np.abs(ladj)).max(), err_msg=str(batch))


@pytest.mark.parametrize(
    "adapter,name,dim,dtype,direction",
    grid(DIMS, DTYPES, ["forward", "inverse"], jax_keep=lambda dim, dtype, d: dtype == "float64"),
)
def test_log_det_matches_autodiff_jacobian(adapter, name, dim, dtype, direction):
    flow = adapter.build(name, dim, dtype, seed=1)
    for i in range(3):
        x = _points((dim,), seed=10 + i)
        if direction == "inverse":
            x = adapter.forward(flow, x, dtype)[0]
        jac, ladj = adapter.jacobian(flow, x, direction, dtype)
        sign, logdet = np.linalg.slogdet(jac.astype(np.float64))
        assert sign != 0 and np.isfinite(logdet)
        np.testing.assert_allclose(ladj, logdet, atol=TOL[dtype] * 10 * (1 + abs(logdet)))


AR_CASES = [
    c
    for c in CASES
    if any(c.values[0].is_autoregressive(l) for l in c.values[0].layers(c.values[0].build(c.values[1], 3)))
]


@pytest.mark.parametrize("adapter,name", AR_CASES)
def test_autoregressive_layers_have_triangular_jacobians(adapter, name):
    dim = 5
    flow = adapter.build(name, dim, "float64", seed=2)
    checked = 0
    for layer in adapter.layers(flow):
        if not adapter.is_autoregressive(layer):
            continue
        jac = adapter.layer_jacobian(layer, _points((dim,), seed=3))
        perm = adapter.permutation(layer)
        unpermuted = jac[np.ix_(perm, perm)]
        assert np.allclose(np.triu(unpermuted, 1), 0.0, atol=1e-12), unpermuted
        # The lower triangle must actually be used (a diagonal map would pass trivially).
        assert np.abs(np.tril(unpermuted, -1)).max() > 1e-8
        checked += 1
    assert checked > 0


# JAX: one shape (the sampling program compiles per shape; dim 1 is in the round trip).
@pytest.mark.parametrize(
    "adapter,name,dim,batch", grid(DIMS, BATCHES, jax_keep=lambda dim, batch: batch == (3, 4) and dim == 5)
)
def test_shapes(adapter, name, dim, batch):
    flow = adapter.build(name, dim, "float64")
    x, lp, lp_fresh = adapter.sample_and_log_prob(flow, dim, batch, "float64")
    assert x.shape == batch + (dim,)
    assert lp.shape == batch
    assert np.all(np.isfinite(lp))
    # Scoring a sample through the cache and through a fresh inverse agree.
    np.testing.assert_allclose(lp, lp_fresh, atol=1e-6 * (1 + np.abs(lp)).max())
    shape = batch + (dim,)
    assert adapter.shapes(flow, shape) == (shape, shape)


@pytest.mark.parametrize("adapter,name", CASES)
def test_default_build_is_a_working_flow(adapter, name):
    """``build_flow(name, dim)`` with the family's own defaults (no test-size overrides).

    torch runs it; JAX, where running it means compiling the largest build of the suite,
    checks that its default build holds the same arrays as torch's (tests/parity checks
    that equal arrays give equal numbers)."""
    dim = 3
    flow = adapter.build(name, dim, "float64", num_layers=None, hidden_dims=None)
    if adapter.name == "jax":
        torch_adapter = next(a for a in ADAPTERS if a.name == "torch")
        torch_flow = torch_adapter.build(name, dim, "float64", num_layers=None, hidden_dims=None)
        shapes = {k: np.shape(v) for k, v in adapter.arrays(flow).items()}
        assert shapes == {k: np.shape(v) for k, v in torch_adapter.arrays(torch_flow).items()}
        assert all(np.all(np.isfinite(np.asarray(v, float))) for v in adapter.arrays(flow).values())
        return
    x = _points((7, dim), seed=4)
    y, ladj = adapter.forward(flow, x)
    x2, _ = adapter.inverse(flow, y)
    np.testing.assert_allclose(x2, x, atol=1e-5)
    assert np.all(np.isfinite(ladj))


@pytest.mark.parametrize("adapter,name", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_steps_stay_finite_and_rescoring_works(adapter, name, dtype):
    """A few steps at a moderate learning rate (rescoring the batch each step), then 30 at
    learning rate 0.1: bounded scales (soft-clamped log-scales, softplus, Lipschitz
    constraints) must keep every loss and parameter finite (issue 17). One test, so that
    JAX (float32 only, see conftest.py) reuses the compiled step on the same worker;
    torch runs the high learning rate in float64."""
    dim = 2
    # JAX trains one layer: finiteness is a property of each layer, and compiling the
    # gradient of a second (unscanned) layer doubles the cost of the slowest JAX tests.
    layers = {"num_layers": 1} if adapter.name == "jax" else {}
    flow = adapter.build(name, dim, dtype, seed=5, **layers)
    data = _points((32, dim), seed=6) * np.array([2.0, 0.5])[:dim] + 1.0
    losses, params_finite = adapter.train(flow, data, dim, dtype, steps=5)
    assert np.all(np.isfinite(losses)) and params_finite
    loss, grads_finite, n_grads = adapter.reparam_grad(flow, dim, dtype)
    assert np.isfinite(loss) and grads_finite and n_grads > 0

    if adapter.name == "torch" and dtype == "float32":
        return  # torch's high learning rate run is the float64 one
    flow = adapter.build(name, dim, dtype, seed=11, **layers)
    data = _points((32, dim), seed=12) * 3.0 + 1.0
    losses, params_finite = adapter.train(flow, data, dim, dtype, steps=30, lr=0.1, rescore=False)
    assert np.all(np.isfinite(losses)), losses
    assert params_finite


# JAX at dim 5 only (conftest.py), where the round trip above compiles the flow's directions.
@pytest.mark.parametrize("adapter,name", CASES)
@pytest.mark.parametrize("dim", [2, 5])
def test_extreme_inputs_stay_finite(adapter, name, dim):
    flow = adapter.build(name, dim, "float64", seed=7)
    signs = np.resize([1.0, -1.0], dim)
    grid = np.stack([-30.0 * signs, 30.0 * signs, -8.0 * signs, np.zeros(dim), 1e-8 * signs])
    for direction in (adapter.forward, adapter.inverse):
        out, ladj = direction(flow, grid)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(ladj)), (direction.__name__, out, ladj)


@pytest.mark.parametrize("adapter,name", [c for c in CASES if c.values[0].name == "torch"])
def test_torch_dtype_and_device_moves(adapter, name):
    dim = 3
    flow = adapter.build(name, dim, "float32", seed=8)
    lp32, lp64 = adapter.moved(flow, dim)
    assert np.all(np.isfinite(lp64))
    np.testing.assert_allclose(lp64, lp32, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("adapter,name", [c for c in CASES if c.values[0].name == "jax"])
def test_jax_transform_survives_jit_and_vmap(adapter, name):
    dim = 3
    flow = adapter.build(name, dim, "float64", seed=9)
    x = adapter.tensor(_points((4, dim), seed=10), "float64")
    y, ladj, yj, ladjj, yv, ladjv, xinv = adapter.jit_and_vmap(flow, x)
    np.testing.assert_allclose(yj, y, atol=1e-12)
    np.testing.assert_allclose(ladjj, ladj, atol=1e-10)
    np.testing.assert_allclose(yv, y, atol=1e-12)
    np.testing.assert_allclose(ladjv, ladj, atol=1e-10)
    np.testing.assert_allclose(xinv, np.asarray(x), atol=1e-6)
