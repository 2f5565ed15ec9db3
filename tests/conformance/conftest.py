"""JAX runs the conformance grid at dims 1 and 5, torch at 1, 2 and 5.

Every JAX case is an XLA compilation and the whole suite must fit 20 minutes on 2 cores.
Dim 2 adds no code path that dims 1 (the degenerate case) and 5 (the general one) do
not exercise; it stays in the torch grid, and tests/parity checks torch == JAX at dim 2.
"""

from __future__ import annotations

JAX_DIMS = {1, 5}


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        adapter = params.get("adapter")
        if getattr(adapter, "name", None) == "jax" and params.get("dim") not in (None, *JAX_DIMS):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
