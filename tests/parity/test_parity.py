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


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("source,target", [("torch", "jax"), ("jax", "torch")])
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_saved_flow_has_the_same_numbers_on_the_other_backend(name, source, target, dim, tmp_path):
    src, dst = BY_NAME[source], BY_NAME[target]
    flow = src.build(name, dim, "float64", seed=11, perturb=0.2)
    path = tmp_path / f"{name}.npz"
    _save(src, flow, path)
    other = _load(dst, path)
    x = np.random.default_rng(12).standard_normal((6, dim))
    y_src, ladj_src = src.forward(flow, x)
    y_dst, ladj_dst = dst.forward(other, x)
    np.testing.assert_allclose(y_dst, y_src, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ladj_dst, ladj_src, atol=1e-6, rtol=1e-6)
    x_src, ildj_src = src.inverse(flow, y_src)
    x_dst, ildj_dst = dst.inverse(other, y_src)
    np.testing.assert_allclose(x_dst, x_src, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ildj_dst, ildj_src, atol=1e-6, rtol=1e-6)


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
