import pytest

from tests.collection import unoptimised_jax


@pytest.fixture(autouse=True)
def _without_xla_optimisations():
    yield from unoptimised_jax()
