"""The backend-neutral half of ``fit_posterior``: the training recipe, its learning-rate
schedule with the ELBO-plateau stop, the choice of the final iterate, argument checks and
the report.

The recipe is the one the posteriordb benchmark supports (``benchmarks/posteriordb.py``):
``AutoFlow``'s defaults (``iaf``, 3 layers of 64x64, ``init_scale="auto"``), 16 particles,
Adam from ``lr=2e-3`` down to ``5e-5``. With ``num_steps=None`` the rate drops by
``decay`` each time the ELBO stops improving, and the fit stops when it would fall below
``lr_final`` (or at ``max_steps``); with a number of steps it decays exponentially over
them, as in the benchmark. The fit ends on the iterate of its stationary tail with the
lowest PSIS k-hat (``TailIterates``, ``best_iterate``).

Example:
    >>> from pyroflows.recipe import RECIPE
    >>> RECIPE.lr, RECIPE.lr_final, RECIPE.num_particles
    (0.002, 5e-05, 16)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import validation
from .fitting import check_fit_options

__all__ = [
    "RECIPE",
    "Recipe",
    "PlateauSchedule",
    "TailIterates",
    "best_iterate",
    "check_posterior_options",
    "split_options",
    "make_report",
    "KHAT_WARN",
]

KHAT_WARN: float = 0.7
"""``make_report`` warns when PSIS k-hat exceeds this (Vehtari et al.'s threshold)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The settings of ``fit_posterior`` (each one is also a keyword of it).

    Attributes:
        lr: Adam's initial learning rate.
        lr_final: the learning rate at which the fit ends. 5e-5 (one more halving than the
            first release's 1e-4) passed posteriordb 20 / 20 with ``select``; 1e-4 passed 19 / 20.
        num_particles: ELBO particles per step (vectorised).
        window: steps per ELBO window; the plateau test compares window means.
        patience: windows without improvement before the rate drops.
        decay: factor of each drop.
        max_steps: the most steps when ``num_steps`` is None.
        select: end on the iterate of the fit's stationary tail whose importance weights
            are best behaved. The candidates are the iterates at the end of each window
            since the last improvement at the final rate (with ``num_steps``: of the windows that
            start in the last ``min(window * patience, num_steps // 2)`` steps); each is scored by
            PSIS k-hat on its own ``num_samples`` draws, the lowest wins, and the report
            scores the winner on fresh draws. At the final rate the ELBO no longer tells the
            iterates apart, but their tails differ: on posteriordb's arK (seed 1) the last
            six window-end iterates scored k-hat 0.30-0.96, the last one 0.86-0.96.
            Averaging the same iterates (Polyak-Ruppert) was tried and is worse: on kidiq
            it gave k-hat 1.75 where every iterate scored 0.24-0.95.
        num_samples: guide draws for the report's diagnostics (``evaluate``, in passes of
            2000). PSIS k-hat from a few thousand draws scatters widely: on one
            posteriordb fit six sets of 4000 draws gave 0.61-0.96 where 40,000 gave 0.42,
            enough to trip the 0.7 warning for nothing; sets of 20,000 scatter less
            (0.64-0.72 over four sets on another fit) and cost little next to the fit.

    Example:
        >>> import dataclasses
        >>> dataclasses.replace(Recipe(), lr=1e-2).lr
        0.01
    """

    lr: float = 2e-3
    lr_final: float = 5e-5
    num_particles: int = 16
    window: int = 1000
    patience: int = 3
    decay: float = 0.5
    max_steps: int = 40_000
    num_samples: int = 20_000
    select: bool = True


RECIPE = Recipe()
"""The defaults of ``fit_posterior``."""


def split_options(
    num_steps: int | None, options: dict[str, Any], caller: str = "fit_posterior"
) -> tuple[Recipe, dict[str, Any]]:
    """``fit_posterior``'s keywords split into the checked recipe and the guide's keywords.

    Args:
        num_steps: a fixed number of steps, or None.
        options: every keyword ``fit_posterior`` got beyond its named ones.
        caller: the name in messages.

    Returns:
        ``(recipe, guide_options)``; the guide (``AutoFlow``) checks the latter itself.

    Raises:
        ValueError: a recipe setting with a bad value.

    Example:
        >>> recipe, guide_options = split_options(None, {"lr": 1e-2, "flow": "nsf"})
        >>> recipe.lr, guide_options
        (0.01, {'flow': 'nsf'})
    """
    fields = {f.name for f in dataclasses.fields(Recipe)}
    recipe = check_posterior_options(num_steps, {k: v for k, v in options.items() if k in fields}, caller)
    return recipe, {k: v for k, v in options.items() if k not in fields}


def check_posterior_options(num_steps: int | None, options: dict[str, Any], caller: str = "fit_posterior") -> Recipe:
    """The recipe with the user's overrides, each checked; unknown names raise ``ValueError``.

    Args:
        num_steps: a fixed number of steps, or None.
        options: recipe settings by name (the fields of ``Recipe``).
        caller: the name in messages.

    Returns:
        ``RECIPE`` with the overrides.

    Raises:
        ValueError: an unknown name, a bad value, or ``lr_final > lr``.

    Example:
        >>> check_posterior_options(None, {"window": 500}).window
        500
        >>> check_posterior_options(None, {"lr": 1e-5})
        Traceback (most recent call last):
        ValueError: fit_posterior: lr_final=5e-05 must not exceed lr=1e-05
    """
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"{caller}: unknown option(s) {unknown}; the recipe's options are {sorted(fields)}")
    recipe = dataclasses.replace(RECIPE, **options)
    if num_steps is not None:
        check_fit_options(caller, num_steps=num_steps)
    check_fit_options(
        caller,
        lr=recipe.lr,
        num_particles=recipe.num_particles,
        num_samples=recipe.num_samples,
        eval_every=recipe.window,
        patience=recipe.patience,
        num_steps=recipe.max_steps,
    )
    check_fit_options(caller, lr=recipe.lr_final)
    if not recipe.lr_final <= recipe.lr:
        raise ValueError(f"{caller}: lr_final={recipe.lr_final!r} must not exceed lr={recipe.lr!r}")
    validation.open_unit("decay", recipe.decay, caller=caller)
    validation.boolean("select", recipe.select, caller=caller)
    return recipe


class PlateauSchedule:
    """The learning rate of each window of steps, and when to stop.

    With ``num_steps``: ``lr * (lr_final / lr) ** (t / num_steps)`` at the start of each
    window, for exactly ``num_steps`` steps. Without: the rate stays until the mean loss
    of a window has not beaten the best window mean by two standard errors (the spread of
    the per-step losses in that window over ``sqrt(window)``) for ``patience`` windows in
    a row; then it is multiplied by ``decay``. The fit stops when the rate would fall
    below ``lr_final``, or at ``max_steps``.

    Args:
        recipe: the settings.
        num_steps: a fixed number of steps, or None for the plateau rule.

    Example:
        >>> recipe = Recipe(window=4, patience=1, lr=1e-3, lr_final=5e-4)
        >>> schedule = PlateauSchedule(recipe, None)
        >>> schedule.next_window()
        4
        >>> schedule.update([5.0, 4.0, 3.0, 2.0])  # a first window: the best so far
        >>> schedule.update([4.0, 3.0, 4.0, 3.0])  # not better by two standard errors: halve
        >>> schedule.lr, schedule.reason
        (0.0005, None)
        >>> schedule.update([4.0, 3.0, 4.0, 3.0])  # again: the rate would fall below lr_final
        >>> schedule.reason, schedule.next_window()
        ('plateau', 0)
    """

    def __init__(self, recipe: Recipe, num_steps: int | None):
        self.recipe, self.num_steps = recipe, num_steps
        self.total = recipe.max_steps if num_steps is None else int(num_steps)
        self.step, self.lr = 0, float(recipe.lr)
        self.best, self._since, self.reason = math.inf, 0, None
        # the first step of the stationary tail (``Recipe.select``); the plateau rule moves it
        tail = max(1, min(recipe.window * recipe.patience, self.total // 2))
        self.tail_start = 0 if num_steps is None else self.total - tail

    def next_window(self) -> int:
        """The length of the next window of steps (0 when the fit is over).

        Example:
            >>> PlateauSchedule(Recipe(window=1000), num_steps=2500).next_window()
            1000
        """
        if self.reason is not None:
            return 0
        return min(self.recipe.window, self.total - self.step)

    def update(self, losses: Sequence[float]) -> None:
        """Record one window's per-step losses (non-finite ones, the skipped steps, ignored).

        Updates ``step``, ``lr`` and, when the fit is over, ``reason`` (``"plateau"``,
        ``"max_steps"`` or ``"num_steps"``).

        Args:
            losses: the loss of each step of the window.

        Example:
            >>> schedule = PlateauSchedule(Recipe(lr=1e-3, lr_final=1e-4), num_steps=20)
            >>> schedule.update([1.0] * 10)  # half way: the rate is down by sqrt(10)
            >>> round(schedule.lr, 7), schedule.step
            (0.0003162, 10)
        """
        losses = np.asarray(losses, dtype=float)
        start = self.step
        self.step += losses.size
        r = self.recipe
        if self.num_steps is not None:
            self.lr = r.lr * (r.lr_final / r.lr) ** (self.step / self.num_steps)
            if self.step >= self.total:
                self.reason = "num_steps"
            return
        if self.step >= self.total:
            self.reason = "max_steps"
            return
        finite = losses[np.isfinite(losses)]
        if finite.size < 2:
            return
        mean, se = finite.mean(), finite.std() / math.sqrt(finite.size)
        if mean < self.best - 2 * se:
            self.best, self._since, self.tail_start = mean, 0, start
            return
        self.best = min(self.best, mean)
        self._since += 1
        if self._since >= r.patience:
            self._since = 0
            if self.lr * r.decay < r.lr_final * (1 - 1e-9):
                self.reason = "plateau"
            else:
                self.lr *= r.decay
                self.tail_start = self.step


class TailIterates:
    """The window-end iterates of a schedule's stationary tail: the candidates of ``Recipe.select``.

    A backend hands over a copy of its parameters after each window, once
    ``schedule.update`` has seen the window; iterates of windows that started before the
    schedule's ``tail_start`` are dropped (it only moves forward), so at most the tail's
    windows are held.

    Args:
        schedule: the fit's schedule.

    Example:
        >>> schedule = PlateauSchedule(Recipe(window=2, patience=1), num_steps=6)
        >>> tail = TailIterates(schedule)
        >>> for params in ("a", "b", "c"):
        ...     schedule.update([1.0, 1.0])
        ...     tail.add(params, 2)
        >>> tail.iterates  # the tail is the last min(window * patience, 6 // 2) = 2 steps
        ['c']
    """

    def __init__(self, schedule: PlateauSchedule):
        self.schedule = schedule
        self._kept: list[tuple[int, Any]] = []

    def add(self, params: Any, length: int) -> None:
        """Record ``params``, the iterate at the end of the window of ``length`` steps just recorded."""
        self._kept.append((self.schedule.step - length, params))
        self._kept = [(start, p) for start, p in self._kept if start >= self.schedule.tail_start]

    @property
    def iterates(self) -> list[Any]:
        """The tail's iterates, oldest first (the last window's is always among them)."""
        return [p for _, p in self._kept]


def best_iterate(khats: Sequence[float]) -> int:
    """The index of the lowest k-hat; a NaN scores as the worst.

    Example:
        >>> best_iterate([0.9, float("nan"), 0.3, 0.5])
        2
    """
    scores = [k if math.isfinite(k) or k == math.inf else math.inf for k in khats]
    return int(np.argmin(scores))


def make_report(
    diagnostics: dict[str, Any], seconds: float, schedule: PlateauSchedule, start: str, caller: str = "fit_posterior"
) -> dict[str, Any]:
    """The report of a fit, and a ``UserWarning`` when PSIS k-hat exceeds 0.7.

    Args:
        diagnostics: ``evaluate``'s dict (``elbo``, ``iwelbo``, ``khat``, ``ess``, ...).
        seconds: wall-clock time of the fit.
        schedule: the fit's schedule (steps taken, final rate, why it stopped).
        start: the guide's one-line start message.
        caller: the name the warning starts with.

    Returns:
        ``elbo``, ``iwelbo``, ``khat``, ``ess``, ``ess_fraction``, ``seconds``, ``num_steps``,
        ``lr_final`` (the last rate used), ``stopped`` (``"plateau"``, ``"max_steps"`` or
        ``"num_steps"``) and ``start``.

    Example:
        >>> schedule = PlateauSchedule(RECIPE, num_steps=1000)
        >>> schedule.update([1.0] * 1000)
        >>> report = make_report({"elbo": -10.0, "khat": 0.2}, 1.5, schedule, "Laplace start")
        >>> report["num_steps"], report["stopped"], report["khat"]
        (1000, 'num_steps', 0.2)
    """
    report = {k: float(diagnostics[k]) for k in ("elbo", "iwelbo", "khat", "ess", "ess_fraction") if k in diagnostics}
    report.update(
        seconds=float(seconds),
        num_steps=int(schedule.step),
        lr_final=float(schedule.lr),
        stopped=schedule.reason,
        start=start,
    )
    khat = report.get("khat", math.nan)
    if not khat <= KHAT_WARN:
        warnings.warn(
            f"{caller}: PSIS k-hat {khat:.2f} > {KHAT_WARN}: the flow posterior misses part of the posterior's "
            "mass, so its draws and expectations are not trustworthy. Try more steps (num_steps=, or a larger "
            "max_steps=), a more flexible flow (flow='nsf', num_layers=), or reparametrise the model (a "
            "non-centred hierarchy for a funnel); report['khat'] measures the result",
            UserWarning,
            stacklevel=3,
        )
    return report
