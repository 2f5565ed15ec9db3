"""Collection helpers shared by the conftest files."""

from __future__ import annotations


def deselect(config, items, drop) -> None:
    """Remove the collected ``items`` for which ``drop(item)`` is true, reporting them as deselected."""
    dropped = [item for item in items if drop(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not drop(item)]


def params(item) -> dict:
    """The parameters of a parametrised test item (empty for a plain test)."""
    return dict(getattr(getattr(item, "callspec", None), "params", {}))
