"""Helpers shared by the conftest files."""

from __future__ import annotations

from collections.abc import Iterator


def deselect(config, items, drop) -> None:
    """Remove the collected ``items`` for which ``drop(item)`` is true, reporting them as deselected."""
    dropped = [item for item in items if drop(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not drop(item)]


def params(item) -> dict:
    """The parameters of a parametrised test item (empty for a plain test)."""
    return dict(getattr(getattr(item, "callspec", None), "params", {}))


def unoptimised_jax() -> Iterator[None]:
    """Compile JAX programs without XLA's optimisation passes while a test runs.

    A conformance, family or parity test spends most of its time compiling programs it
    runs once or twice, which those passes do not repay (the JAX family tests take about
    28% less time); the programs compute the same functions. Tests that run thousands of
    steps (tests/jax, fits) keep the passes. Use it as the body of an autouse fixture.
    """
    try:
        import jax
    except ImportError:
        yield
        return
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
