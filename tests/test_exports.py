"""Both backends offer the same library: the same public names, the same registered flows,
and for each flow the same options (the registry's SPECS) and the same arrays."""

import json

import pytest

from tests.conformance.backends import ADAPTERS

BY_NAME = {a.name: a for a in ADAPTERS}
pytestmark = pytest.mark.skipif("jax" not in BY_NAME, reason="the JAX backend is not installed")

#: Public names that only one backend has, and why. Everything else must be on both.
BACKEND_SPECIFIC = {
    "jax": {
        # The NumPyro Transform around an equinox flow (torch's flows are Pyro transforms
        # themselves): what flow.to_transform() returns.
        "EqxTransform",
        # ActNorm's data-dependent start as a function returning a new flow: equinox modules
        # are immutable, where torch's ActNorm initialises itself on its first inverse call.
        "initialize_actnorm",
    },
    "torch": set(),
}


def _packages():
    import pyroflows.jax as pj
    import pyroflows.torch as pt

    return pt, pj


def test_the_backends_export_the_same_names():
    pt, pj = _packages()
    for package in (pt, pj, pt.transforms, pj.transforms):
        assert len(package.__all__) == len(set(package.__all__)), package.__name__
        assert all(hasattr(package, name) for name in package.__all__), package.__name__
    assert set(pt.__all__) == set(pj.__all__)
    torch_names, jax_names = set(pt.transforms.__all__), set(pj.transforms.__all__)
    assert torch_names - jax_names == BACKEND_SPECIFIC["torch"]
    assert jax_names - torch_names == BACKEND_SPECIFIC["jax"]


def test_the_backends_register_the_same_flows():
    from pyroflows.registry import SPECS

    pt, pj = _packages()
    # Every family of SPECS on both; a name a doctest registered (register_flow's example)
    # may be on one backend only, in a worker that ran that doctest.
    assert set(SPECS) <= set(pt.available_flows()) and set(SPECS) <= set(pj.available_flows())
    assert [n for n in pt.available_flows() if n in SPECS] == [n for n in pj.available_flows() if n in SPECS]


def _normalised(config):
    """A config as the checkpoint writes it (JSON: tuples become lists)."""
    return json.loads(json.dumps(config))


def _shapes(adapter, flow):
    return {name: a.shape for name, a in adapter.arrays(flow).items()}


NAMES = ADAPTERS[0].names()
# Non-default options whose layers hold other arrays than the defaults'.
OPTIONS = [
    ("gaussianization", {"num_components": 1}),
    ("gaussianization", {"num_components": 3, "num_reflections": 1}),
    ("gdn", {"variant": "dense"}),
    ("gdn", {"max_exponent": 0.1}),
    ("sylvester", {"variant": "householder"}),
    ("sylvester", {"variant": "triangular"}),
    ("sylvester", {"num_vectors": 2}),
    ("householder", {"num_reflections": 5}),
    ("ffjord", {"estimator": "hollow"}),
    ("nsf", {"conditioner": "autoregressive"}),
    ("residual", {"estimator": "exact"}),
]


@pytest.mark.parametrize(
    "name,options", [pytest.param(n, {}, id=n) for n in NAMES] + [pytest.param(n, o, id=f"{n}-{o}") for n, o in OPTIONS]
)
def test_each_flow_records_the_same_config_and_arrays_on_both_backends(name, options):
    """Building a family with its defaults (and with some options) records the same config
    on both backends (the registry's SPECS drive both), and the flows hold arrays of the
    same names and shapes (what lets a flow saved by one backend load in the other)."""
    torch, jax = BY_NAME["torch"], BY_NAME["jax"]
    flows = [adapter.pf.build_flow(name, 3, **options) for adapter in (torch, jax)]
    assert _normalised(flows[0].config) == _normalised(flows[1].config)
    assert flows[0].config["name"] == name and flows[0].config["dim"] == 3
    torch_shapes, jax_shapes = _shapes(torch, flows[0]), _shapes(jax, flows[1])
    assert torch_shapes == jax_shapes
