"""Checks of numeric and boolean arguments, shared by the registry, the fitting functions and
stochastic flows, so that a bad value reads the same wherever it was passed.

Every checker takes ``(name, value)`` plus an optional ``caller`` and returns the value as
a plain Python ``int``/``float``/``bool``, or raises ``ValueError`` naming the argument,
the bad value and what is valid. Without ``caller`` the message says ``option name=...``
(the registry prefixes the flow's name). Booleans are never numbers here (``True`` is not
``1``), and NaN and infinities are never valid: they would only come back later as NaN
outputs.

Example:
    >>> positive_float("lr", float("inf"), caller="fit_mle")
    Traceback (most recent call last):
    ValueError: fit_mle: lr=inf must be a positive number (finite and above 0)
    >>> positive_int("num_layers", True)
    Traceback (most recent call last):
    ValueError: option num_layers=True must be a positive integer
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "positive_int",
    "optional_positive_int",
    "non_negative_int",
    "int_list",
    "positive_float",
    "bounded_positive_float",
    "non_negative_float",
    "open_unit",
    "unit_fraction",
    "boolean",
    "choice",
]


def _label(name: str, caller: str | None) -> str:
    return f"{caller}: {name}" if caller else f"option {name}"


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a finite real number (or a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        out = float(value)
    except (OverflowError, ValueError, TypeError):  # e.g. 10**400
        return None
    return out if math.isfinite(out) else None


def _require(ok: bool, name: str, value: Any, caller: str | None, what: str) -> None:
    """Raise ``ValueError('<label>=<value!r> <what>')`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{_label(name, caller)}={value!r} {what}")


def _real_where(test: Callable[[float], bool], name: str, value: Any, caller: str | None, what: str) -> float:
    """``value`` as a finite float for which ``test`` holds; otherwise ``_require``'s error."""
    out = _real(value)
    _require(out is not None and test(out), name, value, caller, what)
    return out


def positive_int(name: str, value: Any, *, caller: str | None = None) -> int:
    """``value`` as an ``int`` >= 1.

    Args:
        name: the argument's name, for the message.
        value: an integer (a Python or numpy int; not a bool) of at least 1.
        caller: the function or flow that received it (message prefix).

    Returns:
        ``int(value)``.

    Raises:
        ValueError: ``value`` is not an integer (a bool, a float, a string) or is below 1.

    Example:
        >>> import numpy as np
        >>> positive_int("num_steps", np.int64(3))
        3
        >>> positive_int("num_steps", 2.0, caller="fit_mle")
        Traceback (most recent call last):
        ValueError: fit_mle: num_steps=2.0 must be a positive integer
    """
    _require(_integer(value) and value >= 1, name, value, caller, "must be a positive integer")
    return int(value)


def optional_positive_int(name: str, value: Any, *, caller: str | None = None) -> int | None:
    """``None``, or ``value`` as an ``int`` >= 1 (see ``positive_int``).

    Args:
        name: the argument's name, for the message.
        value: ``None``, or an integer of at least 1.
        caller: the function or flow that received it (message prefix).

    Returns:
        ``None`` or ``int(value)``.

    Raises:
        ValueError: ``value`` is neither ``None`` nor a positive integer.

    Example:
        >>> optional_positive_int("patience", None) is None
        True
        >>> optional_positive_int("patience", 5)
        5
    """
    return None if value is None else positive_int(name, value, caller=caller)


def non_negative_int(name: str, value: Any, *, caller: str | None = None) -> int:
    """``value`` as an ``int`` >= 0 (see ``positive_int``).

    Args:
        name: the argument's name, for the message.
        value: an integer (not a bool) of at least 0.
        caller: the function or flow that received it (message prefix).

    Returns:
        ``int(value)``.

    Raises:
        ValueError: ``value`` is not an integer or is negative.

    Example:
        >>> non_negative_int("anneal_steps", 0)
        0
        >>> non_negative_int("anneal_steps", -1)
        Traceback (most recent call last):
        ValueError: option anneal_steps=-1 must be an integer >= 0
    """
    _require(_integer(value) and value >= 0, name, value, caller, "must be an integer >= 0")
    return int(value)


def int_list(name: str, value: Any, *, caller: str | None = None) -> tuple[int, ...]:
    """A non-empty sequence of positive integers (or one integer) as a tuple of ints.

    Args:
        name: the argument's name, for the message.
        value: one integer or an iterable of them (not a string).
        caller: the function or flow that received it (message prefix).

    Returns:
        The integers as a tuple.

    Raises:
        ValueError: ``value`` is empty, a string, or holds anything but positive integers.

    Example:
        >>> int_list("hidden_dims", [64, 64])
        (64, 64)
        >>> int_list("hidden_dims", 32)
        (32,)
        >>> int_list("hidden_dims", [])
        Traceback (most recent call last):
        ValueError: option hidden_dims must not be empty: give a list of positive integers
    """
    if _integer(value):
        value = [value]
    what = "must be a list of positive integers"
    _require(not isinstance(value, (str, bytes)) and isinstance(value, Iterable), name, value, caller, what)
    items = list(value)
    if not items:
        raise ValueError(f"{_label(name, caller)} must not be empty: give a list of positive integers")
    _require(all(_integer(v) and v >= 1 for v in items), name, value, caller, what)
    return tuple(int(v) for v in items)


def positive_float(name: str, value: Any, *, caller: str | None = None) -> float:
    """``value`` as a finite ``float`` > 0.

    Args:
        name: the argument's name, for the message.
        value: a real number (an int, float or numpy scalar; not a bool) above 0.
        caller: the function or flow that received it (message prefix).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``value`` is not a real number, or is NaN, infinite, zero or negative.

    Example:
        >>> positive_float("lr", 1)
        1.0
        >>> positive_float("lr", 0.0)
        Traceback (most recent call last):
        ValueError: option lr=0.0 must be a positive number (finite and above 0)
    """
    return _real_where(lambda v: v > 0, name, value, caller, "must be a positive number (finite and above 0)")


def bounded_positive_float(maximum: float, why: str = "") -> Callable[..., float]:
    """A checker like ``positive_float`` that also requires ``value <= maximum``.

    Args:
        maximum: the largest valid value.
        why: appended to the message (for example why larger values are unsafe).

    Returns:
        ``check(name, value, *, caller=None) -> float``, which raises ``ValueError`` for a
        value outside ``(0, maximum]``.

    Example:
        >>> check = bounded_positive_float(50.0, "scales would overflow")
        >>> check("log_scale_bound", 5)
        5.0
        >>> check("log_scale_bound", 100.0)
        Traceback (most recent call last):
        ValueError: option log_scale_bound=100.0 must be a positive number no larger than 50: scales would overflow
    """
    what = f"must be a positive number no larger than {maximum:g}" + (f": {why}" if why else "")

    def check(name: str, value: Any, *, caller: str | None = None) -> float:
        return _real_where(lambda v: 0 < v <= maximum, name, value, caller, what)

    check.__name__ = f"positive_float_at_most_{maximum:g}"
    return check


def non_negative_float(name: str, value: Any, *, caller: str | None = None) -> float:
    """``value`` as a finite ``float`` >= 0.

    Args:
        name: the argument's name, for the message.
        value: a finite real number of at least 0.
        caller: the function or flow that received it (message prefix).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``value`` is not a real number, or is NaN, infinite or negative.

    Example:
        >>> non_negative_float("kinetic_energy", 0)
        0.0
    """
    return _real_where(lambda v: v >= 0, name, value, caller, "must be a finite number >= 0")


def open_unit(name: str, value: Any, *, caller: str | None = None) -> float:
    """``value`` as a ``float`` strictly between 0 and 1.

    Args:
        name: the argument's name, for the message.
        value: a real number strictly between 0 and 1.
        caller: the function or flow that received it (message prefix).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``value`` is not a real number in the open interval ``(0, 1)``.

    Example:
        >>> open_unit("decay", 0.5)
        0.5
        >>> open_unit("decay", 1)
        Traceback (most recent call last):
        ValueError: option decay=1 must lie strictly between 0 and 1
    """
    return _real_where(lambda v: 0 < v < 1, name, value, caller, "must lie strictly between 0 and 1")


def unit_fraction(name: str, value: Any, *, caller: str | None = None) -> float:
    """``value`` as a ``float`` in ``[0, 1)`` (for example a validation fraction).

    Args:
        name: the argument's name, for the message.
        value: a real number in ``[0, 1)``.
        caller: the function or flow that received it (message prefix).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``value`` is not a real number in ``[0, 1)``.

    Example:
        >>> unit_fraction("validation_fraction", 0)
        0.0
    """
    return _real_where(lambda v: 0 <= v < 1, name, value, caller, "must lie in [0, 1)")


def boolean(name: str, value: Any, *, caller: str | None = None) -> bool:
    """``value`` itself when it is ``True`` or ``False`` (not 0, 1 or a string).

    Args:
        name: the argument's name, for the message.
        value: ``True`` or ``False``.
        caller: the function or flow that received it (message prefix).

    Returns:
        ``value``.

    Raises:
        ValueError: ``value`` is not a ``bool``.

    Example:
        >>> boolean("adjoint", False)
        False
        >>> boolean("adjoint", 1)
        Traceback (most recent call last):
        ValueError: option adjoint=1 must be True or False
    """
    _require(isinstance(value, bool), name, value, caller, "must be True or False")
    return value


def choice(*values: str) -> Callable[..., str]:
    """A checker accepting exactly the strings ``values``.

    Args:
        *values: the valid strings.

    Returns:
        ``check(name, value, *, caller=None) -> str``, which raises ``ValueError`` for
        anything else (the message lists ``values``).

    Example:
        >>> check = choice("reverse", "random")
        >>> check("permutation", "random")
        'random'
        >>> check("permutation", "shuffle")
        Traceback (most recent call last):
        ValueError: option permutation='shuffle' is not one of ['reverse', 'random']
    """

    def check(name: str, value: Any, *, caller: str | None = None) -> str:
        # isinstance first: `in` on an array would compare elementwise.
        _require(isinstance(value, str) and value in values, name, value, caller, f"is not one of {list(values)}")
        return value

    return check
