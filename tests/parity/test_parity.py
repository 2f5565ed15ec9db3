"""torch == jax: a flow saved by one backend loads in the other with the same map and log-det.

For every family registered on both backends, weights moved off their initial values
(random perturbation) are saved from one backend and loaded in the other; the forward
map, its log-det, and the inverse agree to 1e-6 in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conformance.backends import ADAPTERS

BY_NAME = {a.name: a for a in ADAPTERS}
pytestmark = pytest.mark.skipif("jax" not in BY_NAME, reason="the JAX backend is not installed")
NAMES = sorted(set(BY_NAME["torch"].names()) & set(BY_NAME["jax"].names())) if "jax" in BY_NAME else []


def _save(adapter, flow, path):
    if adapter.name == "torch":
        import pyroflows.torch as pf
    else:
        import pyroflows.jax as pf
    pf.save_flow(flow, path)


def _load(adapter, path):
    if adapter.name == "torch":
        import pyroflows.torch as pf
    else:
        import pyroflows.jax as pf
    return pf.load_flow(path)


# Both directions (torch to JAX, JAX to torch) in one test: the JAX flow's programs are the
# same in both, and one test keeps them on one xdist worker (one compilation, not two).
DIRECTIONS = [("torch", "jax"), ("jax", "torch")]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_saved_flow_has_the_same_numbers_on_the_other_backend(name, dim, tmp_path):
    for source, target in DIRECTIONS:
        src, dst = BY_NAME[source], BY_NAME[target]
        flow = src.build(name, dim, "float64", seed=11, perturb=0.2)
        path = tmp_path / f"{name}-{source}.npz"
        _save(src, flow, path)
        other = _load(dst, path)
        x = np.random.default_rng(12).standard_normal((6, dim))
        y_src, ladj_src = src.forward(flow, x)
        y_dst, ladj_dst = dst.forward(other, x)
        msg = f"{source} to {target}"
        np.testing.assert_allclose(y_dst, y_src, atol=1e-6, rtol=1e-6, err_msg=msg)
        np.testing.assert_allclose(ladj_dst, ladj_src, atol=1e-6, rtol=1e-6, err_msg=msg)
        x_src, ildj_src = src.inverse(flow, y_src)
        x_dst, ildj_dst = dst.inverse(other, y_src)
        np.testing.assert_allclose(x_dst, x_src, atol=1e-6, rtol=1e-6, err_msg=msg)
        np.testing.assert_allclose(ildj_dst, ildj_src, atol=1e-6, rtol=1e-6, err_msg=msg)


def test_a_file_that_does_not_match_its_config_is_rejected(tmp_path):
    import pyroflows.torch as pt
    from pyroflows import checkpoint

    flow = pt.build_flow("realnvp", 3)
    path = tmp_path / "f.npz"
    pt.save_flow(flow, path)
    config, arrays, backend = checkpoint.read(path)
    arrays.pop(next(iter(arrays)))
    checkpoint.write(path, config, arrays, backend)
    with pytest.raises(ValueError, match="missing"):
        pt.load_flow(path)
    with pytest.raises(ValueError, match="missing"):
        BY_NAME["jax"] and __import__("pyroflows.jax").jax.load_flow(path)


# Non-default options whose layers take other code paths (moved here from the JAX family
# tests): the alternating triangular Sylvester stack, whose float masks and fixed Q arrive
# from torch where JAX builds booleans; the dense GDN; an adaptive CNF solve at tight
# tolerances, where each backend controls its own steps (diffrax against torchdiffeq), so
# they agree to those tolerances.
OPTION_CASES = [
    pytest.param("sylvester", 3, {"variant": "triangular"}, 0.3, 1e-9, id="sylvester-triangular"),
    pytest.param("gdn", 3, {"variant": "dense", "max_exponent": 0.45}, 0.3, 1e-9, id="gdn-dense"),
    pytest.param(
        "ffjord",
        3,
        {"num_layers": 1, "hidden_dims": (8, 8), "solver": "dopri5", "atol": 1e-10, "rtol": 1e-10},
        0.6,
        1e-8,
        id="ffjord-dopri5",
    ),
]


@pytest.mark.parametrize("name,dim,options,perturb,tol", OPTION_CASES)
def test_non_default_options_have_the_same_numbers_on_the_other_backend(name, dim, options, perturb, tol, tmp_path):
    for source, target in DIRECTIONS:  # one test: see test_saved_flow_has_the_same_numbers_on_the_other_backend
        src, dst = BY_NAME[source], BY_NAME[target]
        flow = src.build(name, dim, "float64", seed=14 if name == "ffjord" else 11, perturb=perturb, **options)
        path = tmp_path / f"{name}-{source}.npz"
        _save(src, flow, path)
        other = _load(dst, path)
        assert other.config == flow.config
        x = np.random.default_rng(12).standard_normal((5, dim)) * 2
        y_src, ladj_src = src.forward(flow, x)
        if name == "ffjord":
            assert np.abs(ladj_src).min() > 0.05  # the solver has work to do
        y_dst, ladj_dst = dst.forward(other, x)
        msg = f"{source} to {target}"
        np.testing.assert_allclose(y_dst, y_src, atol=tol, rtol=tol, err_msg=msg)
        np.testing.assert_allclose(ladj_dst, ladj_src, atol=tol, rtol=tol, err_msg=msg)
        x_src, ildj_src = src.inverse(flow, y_src)
        x_dst, ildj_dst = dst.inverse(other, y_src)
        np.testing.assert_allclose(x_dst, x_src, atol=tol, rtol=tol, err_msg=msg)
        np.testing.assert_allclose(ildj_dst, ildj_src, atol=tol, rtol=tol, err_msg=msg)


def test_adjoint_gradients_on_jax_agree_with_backpropagation_in_torch():
    """adjoint=True on JAX: diffrax.diffeqsolve with the same tableau and steps, so the value
    is torch's to rounding, and BacksolveAdjoint gradients, which match backpropagation
    through torch's solver (itself checked against finite differences in
    tests/families/test_ffjord.py) to the solver's accuracy."""
    torch, jax = BY_NAME["torch"], BY_NAME["jax"]
    options = dict(estimator="exact", num_steps=16)
    layer = torch.make("CNF", 2, (8, 8), seed=0, perturb=0.3, **options)
    adjoint = jax.with_arrays(jax.make("CNF", 2, (8, 8), adjoint=True, **options), torch.params(layer))
    x = np.random.default_rng(13).standard_normal((5, 2))
    weights = np.random.default_rng(14).standard_normal((5, 3))
    value, grads, _ = torch.value_and_grads(layer, "call_and_ladj", x, weights)
    value_jax, grads_jax, _ = jax.value_and_grads(adjoint, "call_and_ladj", x, weights)
    assert value_jax == pytest.approx(value, abs=1e-12)
    assert set(grads_jax) == set(grads)
    for name, g in grads.items():
        np.testing.assert_allclose(grads_jax[name], g, atol=1e-6 * (1 + np.abs(g).max()))
