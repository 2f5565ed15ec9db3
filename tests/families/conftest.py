"""Every test here takes ``backend``: it runs once per installed backend, through the
adapters of ``tests/conformance`` (numpy arrays in, numpy arrays out).

``@pytest.mark.jax_keep(predicate)`` on a parametrised test keeps, on JAX, only the
parameter sets that ``predicate(**params)`` accepts. Every new layer structure (variant,
dim, dtype) is an XLA compilation of each function the test runs, and the suite must fit
20 minutes on 2 cores; the tests that use it say what JAX runs and why that suffices.
"""

import pytest

from tests.collection import deselect, params, unoptimised_jax
from tests.conformance.backends import ADAPTERS


@pytest.fixture(params=ADAPTERS, ids=lambda a: a.name)
def backend(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "jax_keep(predicate): on JAX, run only the parameter sets that predicate(**params) accepts"
    )


def pytest_collection_modifyitems(config, items):
    def drop(item):
        marker = item.get_closest_marker("jax_keep")
        values = params(item)
        backend = values.pop("backend", None)
        return marker is not None and getattr(backend, "name", None) == "jax" and not marker.args[0](**values)

    deselect(config, items, drop)


@pytest.fixture(autouse=True)
def _without_xla_optimisations():
    yield from unoptimised_jax()
