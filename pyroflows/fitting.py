"""The backend-neutral half of training and guides: argument checks, data splits,
early stopping, the loss history, progress bars and the errors users see.

Both ``pyroflows.torch.train`` / ``autoguide`` and their JAX twins call these, so an
option means the same thing and a mistake reads the same on either backend.

Example:
    >>> from pyroflows.fitting import check_fit_options
    >>> check_fit_options("fit_mle", lr=-1.0)
    Traceback (most recent call last):
    ValueError: fit_mle: lr=-1.0 must be a positive number (finite and above 0)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from . import validation

__all__ = [
    "check_data",
    "split_indices",
    "batch_indices",
    "EarlyStopping",
    "History",
    "progress_bar",
    "check_fit_options",
    "check_context_sampler",
    "check_context_shape",
    "anneal_factor",
    "check_finite_loss",
    "check_latent_sites",
    "check_log_density",
    "check_log_density_shape",
    "check_quantiles",
    "AUTOFLOW_LOG_SCALE_BOUND",
    "MAX_BAD_STEPS",
    "MLE_MAX_STEPS",
    "EVAL_CHUNK",
    "chunk_sizes",
    "MLE_PATIENCE",
    "NonFiniteGuard",
    "check_first_log_density",
    "standardization",
    "SD_FLOOR",
]

MAX_BAD_STEPS: int = 20
"""A fit raises after this many consecutive steps whose loss or gradient was NaN or inf
(each of them skipped: no update); the ``max_bad_steps`` option of the fits overrides it."""

MLE_MAX_STEPS: int = 20_000
"""``fit_mle(num_steps=None)``, the default, takes at most this many steps (it usually stops
earlier, on the validation plateau of ``MLE_PATIENCE``)."""

MLE_PATIENCE: int = 20
"""``fit_mle``'s default ``patience``: evaluations without a better validation loss before it
stops and restores the best weights (as sbi's density estimators train by default)."""

EVAL_CHUNK: int = 2000
"""``evaluate`` draws the guide in vectorised passes of at most this many samples, so
memory stays bounded however many draws the diagnostics ask for."""

SD_FLOOR: float = 1e-8
"""``standardization``: a column whose sd is below ``SD_FLOOR * max(1, |mean|)`` counts as constant."""


def check_data(data: Any, dim: int | None = None, caller: str = "fit_mle") -> np.ndarray:
    """``data`` as a float64 array of shape ``(n, dim)``, ``n >= 2``, every entry finite.

    Accepts numpy, torch (detached and moved to the CPU here) and JAX arrays and nested
    lists of integers or floats. Boolean, complex, string and other non-numeric data are
    refused: a flow is a density on real vectors, and casting them silently would fit
    something else than the user meant.

    Args:
        data: the data, one row per point.
        dim: the flow's event size; ``None`` accepts any number of columns. With
            ``dim=1`` a one-dimensional array is taken as one column.
        caller: the name the messages start with.

    Returns:
        The data as a float64 array of shape ``(n, dim)``.

    Raises:
        ValueError: the data are not numeric, not real, of the wrong shape, fewer than two
            rows, or hold NaN or inf (the message names the problem and the fix).

    Example:
        >>> check_data([[1, 2], [3, 4]]).dtype.name
        'float64'
        >>> check_data([1.0, 2.0, 3.0], dim=1).shape
        (3, 1)
        >>> check_data([[1.0, float("nan")], [0.0, 1.0]])
        Traceback (most recent call last):
        ValueError: fit_mle: data contains NaN or inf in 1 row(s) (rows 0); drop or impute them before fitting
    """
    if hasattr(data, "detach"):  # a torch tensor, possibly on a GPU or with a graph
        data = data.detach().cpu()
    try:
        raw = np.asarray(data)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{caller}: data must be a numeric array of shape (num_points, dim): {e}") from None
    kind = raw.dtype.kind
    if kind == "b":
        raise ValueError(
            f"{caller}: data is boolean; a flow is a density on real vectors, and 0/1 data have none (the NLL "
            "falls without bound). Model it with a discrete distribution, or, to treat it as real values, cast it "
            "yourself (data.astype(float)) and add uniform dequantization noise"
        )
    if kind in "USV":
        raise ValueError(
            f"{caller}: data must be numeric, got an array of dtype {raw.dtype} (strings or bytes); parse it into "
            "numbers first (for example np.asarray(data, dtype=float), or pandas.to_numeric per column)"
        )
    if kind == "c":
        raise ValueError(
            f"{caller}: data must be real, got complex dtype {raw.dtype}; "
            "put the real and imaginary parts in separate columns"
        )
    if kind not in "iufO":
        raise ValueError(f"{caller}: data must be a numeric array of shape (num_points, dim), got dtype {raw.dtype}")
    try:
        array = raw.astype(float)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{caller}: data must be a numeric array of shape (num_points, dim); converting it to floats failed: {e}"
        ) from None
    if array.ndim == 1 and dim == 1:
        array = array[:, None]
    if array.ndim != 2:
        hint = "for one-dimensional data pass data[:, None]" if array.ndim == 1 else "one row per data point"
        raise ValueError(
            f"{caller}: data must have shape (num_points, dim), got shape {array.shape}; reshape it ({hint})"
        )
    if array.shape[1] == 0:
        raise ValueError(f"{caller}: data has shape {array.shape}: no columns")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(
            f"{caller}: data has {array.shape[1]} columns but the flow has dim={dim}; "
            f"build the flow with dim={array.shape[1]}, or pass the {dim} columns it models"
        )
    if array.shape[0] < 2:
        raise ValueError(
            f"{caller}: data needs at least 2 rows (one data point per row), got {array.shape[0]}; "
            "a density cannot be fitted to fewer points"
        )
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(map(str, rows[:5])) + (", ..." if rows.size > 5 else "")
        raise ValueError(
            f"{caller}: data contains NaN or inf in {rows.size} row(s) (rows {shown}); "
            "drop or impute them before fitting"
        )
    return array


def standardization(train: Any, caller: str = "fit_mle") -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (``ddof=0``) of the training rows, for the fixed
    affine layer of ``fit_mle(standardize=True)``: ``z = (x - loc) / scale``.

    A column whose sd is below ``SD_FLOOR * max(1, |mean|)`` (constant up to rounding) keeps
    ``scale = 1`` (it is only centred), with a warning: a density on a constant column is
    degenerate, and maximum likelihood drives its NLL down without bound.

    Args:
        train: the training rows, shape ``(n, dim)``, finite.
        caller: the name the warning and the error start with.

    Returns:
        ``(loc, scale)``, float64 arrays of shape ``(dim,)``, ``scale > 0``.

    Raises:
        ValueError: the mean or sd overflows float64.

    Example:
        >>> loc, scale = standardization([[0.0, 1.0], [2.0, 5.0]])
        >>> loc.tolist(), scale.tolist()
        ([1.0, 3.0], [1.0, 2.0])
    """
    train = np.asarray(train, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        loc, scale = train.mean(0), train.std(0)
    if not (np.isfinite(loc).all() and np.isfinite(scale).all()):
        raise ValueError(
            f"{caller}: the data are too large to standardise (their mean or sd overflows float64); "
            "rescale them (for example divide by a power of ten) before fitting"
        )
    flat = ~(scale > SD_FLOOR * np.maximum(1.0, np.abs(loc)))
    if flat.any():
        cols = np.flatnonzero(flat).tolist()
        warnings.warn(
            f"{caller}: column(s) {cols} of the training data are constant (sd {scale[flat].tolist()}); a density "
            "on them is degenerate and maximum likelihood drives it to a point mass. Drop these columns or add "
            "noise to them; standardize=True only centres them (scale 1)",
            RuntimeWarning,
            stacklevel=3,
        )
        scale = np.where(flat, 1.0, scale)
    return loc, scale


def split_indices(n: int, validation_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random ``(train, validation)`` split of ``range(n)``; validation is empty for 0.

    A positive fraction keeps at least one row on each side.

    Args:
        n: the number of rows.
        validation_fraction: the share of rows held out, in ``[0, 1)``.
        seed: the seed of the shuffle.

    Returns:
        ``(train, validation)``: sorted integer index arrays that partition ``range(n)``.

    Example:
        >>> train, val = split_indices(10, 0.2, seed=0)
        >>> len(train), len(val), sorted(train.tolist() + val.tolist()) == list(range(10))
        (8, 2, True)
    """
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(validation_fraction * n))
    if validation_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def batch_indices(train_idx: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """One minibatch of row indices, without replacement (the whole set when it is smaller).

    Args:
        train_idx: the training rows.
        batch_size: the minibatch size.
        rng: the numpy generator that draws it.

    Returns:
        ``batch_size`` distinct entries of ``train_idx``, or ``train_idx`` itself.

    Example:
        >>> batch = batch_indices(np.arange(100), 8, np.random.default_rng(0))
        >>> len(set(batch.tolist()))
        8
    """
    if batch_size >= train_idx.size:
        return train_idx
    return rng.choice(train_idx, size=batch_size, replace=False)


class EarlyStopping:
    """Tracks the best validation loss; ``should_stop`` after ``patience`` evaluations without
    an improvement larger than ``min_delta`` (never when ``patience`` is None).

    Args:
        patience: evaluations without improvement before stopping; ``None`` never stops.
        min_delta: how much a loss must beat the best one to count as an improvement.

    Example:
        >>> stop = EarlyStopping(patience=2)
        >>> [stop.update(v, step) for step, v in enumerate([3.0, 2.0, 2.5, 2.1])]
        [True, True, False, False]
        >>> stop.should_stop, stop.best, stop.best_step
        (True, 2.0, 1)
    """

    def __init__(self, patience: int | None = None, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, float(min_delta)
        self.best, self.best_step, self._since = math.inf, None, 0

    def update(self, value: float, step: int | None = None) -> bool:
        """Record one evaluation; True when it is a new best.

        Args:
            value: the validation loss.
            step: the step it was computed at (kept as ``best_step`` for a new best).

        Returns:
            Whether ``value`` beat the best loss by more than ``min_delta``.

        Example:
            >>> EarlyStopping().update(1.0)
            True
        """
        if value < self.best - self.min_delta:
            self.best, self.best_step, self._since = float(value), step, 0
            return True
        self._since += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` evaluations in a row brought no improvement."""
        return self.patience is not None and self._since >= self.patience


@dataclasses.dataclass
class History:
    """What a fit returns: the training loss at each evaluation, the validation loss where
    there is one, the step of the weights that were kept, whether it stopped early, and how
    many steps were skipped because their loss or gradient was not finite.

    Attributes:
        step: the step of each evaluation.
        loss: the training loss at each evaluation.
        validation_loss: the validation loss at each evaluation (empty without a
            validation split).
        best_step: the step whose weights the fit returned.
        stopped_early: whether early stopping ended the fit.
        skipped_steps: steps whose loss or gradient was NaN or inf: no update, and no
            entry in ``loss``.

    Example:
        >>> history = History()
        >>> history.record(100, 1.5, validation_loss=1.7)
        >>> history.as_dict()["loss"], history.validation_loss
        ([1.5], [1.7])
    """

    step: list = dataclasses.field(default_factory=list)
    loss: list = dataclasses.field(default_factory=list)
    validation_loss: list = dataclasses.field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    #: steps whose loss or gradient was NaN or inf: no update, and no entry in ``loss``
    skipped_steps: int = 0

    def record(self, step: int, loss: float, validation_loss: float | None = None) -> None:
        """Append one evaluation.

        Args:
            step: the step number.
            loss: the training loss.
            validation_loss: the validation loss, if there is a validation split.

        Example:
            >>> h = History()
            >>> h.record(1, 2.0)
            >>> h.step, h.loss
            ([1], [2.0])
        """
        self.step.append(int(step))
        self.loss.append(float(loss))
        if validation_loss is not None:
            self.validation_loss.append(float(validation_loss))

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (lists copied).

        Example:
            >>> sorted(History().as_dict())
            ['best_step', 'loss', 'skipped_steps', 'step', 'stopped_early', 'validation_loss']
        """
        return dataclasses.asdict(self)


def progress_bar(total: int, desc: str, progress: bool = True) -> Any:
    """A tqdm bar over ``total`` steps; silent when ``progress`` is False.

    Args:
        total: the number of steps.
        desc: the bar's label.
        progress: show the bar.

    Returns:
        A ``tqdm.auto.tqdm`` bar (close it, or use it as a context manager).

    Example:
        >>> with progress_bar(10, "fit_mle", progress=False) as bar:
        ...     for _ in range(10):
        ...         _ = bar.update(1)
        >>> bar.total, bar.disable
        (10, True)
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def check_fit_options(caller: str = "fit", **options: Any) -> None:
    """Validate the keyword arguments shared by the fitting functions and guides, by name.

    The checkers are those of ``pyroflows.validation``, so a bad value reads the same
    everywhere: ``num_steps``, ``batch_size``, ``num_samples``, ``eval_every``,
    ``num_particles`` and ``max_bad_steps`` are positive integers; ``lr`` and
    ``init_scale`` positive numbers; ``validation_fraction`` in ``[0, 1)``; ``patience`` a
    positive integer or ``None``; ``standardize`` a bool; ``anneal_steps`` an integer >= 0.

    Args:
        caller: the name the messages start with.
        **options: the options to check, by name.

    Raises:
        ValueError: a bad value, or a name this function does not know.

    Example:
        >>> check_fit_options("fit_mle", num_steps=100, lr=1e-3, patience=None)
        >>> check_fit_options("fit_mle", batch_size=0)
        Traceback (most recent call last):
        ValueError: fit_mle: batch_size=0 must be a positive integer
    """
    for name, value in options.items():
        if name in ("num_steps", "batch_size", "num_samples", "eval_every", "num_particles", "max_bad_steps"):
            validation.positive_int(name, value, caller=caller)
        elif name in ("lr", "init_scale"):
            validation.positive_float(name, value, caller=caller)
        elif name == "validation_fraction":
            validation.unit_fraction(name, value, caller=caller)
        elif name == "patience":
            validation.optional_positive_int(name, value, caller=caller)
        elif name == "standardize":
            validation.boolean(name, value, caller=caller)
        elif name == "anneal_steps":
            validation.non_negative_int(name, value, caller=caller)
        else:
            raise ValueError(f"check_fit_options: unknown option {name!r}")


def check_context_sampler(
    sampler: Callable | None, context_dim: int, stick_the_landing: bool = False, caller: str = "fit_reverse_kl"
) -> None:
    """A conditional flow trained by reverse KL needs a sampler of contexts; any other flow none.

    Args:
        sampler: ``context_sampler`` as passed, or ``None``.
        context_dim: the flow's context size (0 for a flow that is not conditional).
        stick_the_landing: whether the path-derivative estimator was asked for (not yet
            available for a conditional flow).
        caller: the name the messages start with.

    Raises:
        ValueError: a sampler for a flow that is not conditional, none (or not a function)
            for one that is, or ``stick_the_landing`` with a conditional flow.

    Example:
        >>> check_context_sampler(None, 2)
        Traceback (most recent call last):
        ValueError: fit_reverse_kl: the flow is conditional (context_dim=2): pass context_sampler=, ...
    """
    if not context_dim:
        if sampler is not None:
            raise ValueError(
                f"{caller}: got a context_sampler, but the flow is not conditional; build it with "
                "build_flow(name, dim, context_dim=...)"
            )
        return
    if sampler is None or not callable(sampler):
        raise ValueError(
            f"{caller}: the flow is conditional (context_dim={context_dim}): pass context_sampler=, a function "
            f"that draws num_samples contexts of shape (num_samples, {context_dim}), and a log_density of "
            "(x, context)"
        )
    if stick_the_landing:
        raise ValueError(f"{caller}: stick_the_landing=True is not available for a conditional flow yet")


def check_context_shape(
    shape: Sequence[int], num_samples: int, context_dim: int, caller: str = "fit_reverse_kl"
) -> None:
    """``context_sampler``'s draws must have shape ``(num_samples, context_dim)``.

    Args:
        shape: the shape the sampler returned.
        num_samples: the draws per step.
        context_dim: the flow's context size.
        caller: the name the messages start with.

    Raises:
        ValueError: another shape.

    Example:
        >>> check_context_shape((8,), 8, 1)
        Traceback (most recent call last):
        ValueError: fit_reverse_kl: context_sampler returned shape (8,), expected (8, 1): ...
    """
    if tuple(shape) != (num_samples, context_dim):
        raise ValueError(
            f"{caller}: context_sampler returned shape {tuple(shape)}, expected ({num_samples}, {context_dim}): "
            "one context of size context_dim per draw"
        )


def check_context(context: Any, context_dim: int, rows: int, caller: str = "fit_mle") -> np.ndarray | None:
    """The contexts of a conditional fit: one finite row of size ``context_dim`` per data row.

    Args:
        context: what was passed as ``context`` (numpy, torch or JAX), or ``None``.
        context_dim: the flow's context size (0 for a flow that is not conditional).
        rows: the number of data rows.
        caller: the name the messages start with.

    Returns:
        ``None`` for a flow that is not conditional, else a float64 array ``(rows, context_dim)``.

    Raises:
        ValueError: a context for a flow that is not conditional, none for one that is, the
            wrong shape, or NaN or inf (the message says which rows).

    Example:
        >>> check_context([[0.0], [1.0]], 1, 2).shape
        (2, 1)
        >>> check_context(None, 3, 2)
        Traceback (most recent call last):
        ValueError: fit_mle: the flow is conditional (context_dim=3): pass context=, one row per data row
    """
    if not context_dim:
        if context is not None:
            raise ValueError(
                f"{caller}: got a context, but the flow is not conditional; build it with "
                "build_flow(name, dim, context_dim=...)"
            )
        return None
    if context is None:
        raise ValueError(
            f"{caller}: the flow is conditional (context_dim={context_dim}): pass context=, one row per data row"
        )
    if hasattr(context, "detach"):
        context = context.detach().cpu()
    try:
        array = np.asarray(context, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{caller}: context must be a numeric array of shape (num_points, context_dim): {e}") from None
    if array.ndim == 1 and context_dim == 1:
        array = array[:, None]
    if array.shape != (rows, context_dim):
        raise ValueError(
            f"{caller}: context has shape {array.shape}, expected ({rows}, {context_dim}): one row of size "
            "context_dim per data row"
        )
    bad = np.flatnonzero(~np.isfinite(array).all(1))
    if bad.size:
        raise ValueError(
            f"{caller}: context contains NaN or inf in {bad.size} row(s) (rows {', '.join(map(str, bad[:5]))}); "
            "drop those rows, and their data, before fitting"
        )
    return array


_FIT_OPTIONS = (
    "num_steps batch_size num_samples eval_every num_particles max_bad_steps lr init_scale "
    "validation_fraction patience standardize anneal_steps"
).split()


def checks_fit_options(func: Callable) -> Callable:
    """Decorator: ``check_fit_options`` on the fitting options among ``func``'s arguments,
    by name, before ``func`` runs.

    Both backends' ``fit_mle``, ``fit_reverse_kl`` and ``evaluate`` use it, so their
    options are checked the same way from their signatures. An option whose default is
    ``None`` may be ``None`` (``fit_mle(num_steps=None)``).

    Example:
        >>> @checks_fit_options
        ... def fit(data, *, num_steps=10, lr=1e-3):
        ...     return num_steps
        >>> fit(None, num_steps=0)
        Traceback (most recent call last):
        ValueError: fit: num_steps=0 must be a positive integer
    """
    signature = inspect.signature(func)
    names = [name for name in signature.parameters if name in _FIT_OPTIONS]
    defaults = {name: signature.parameters[name].default for name in names}

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        options = {n: given[n] for n in names if given[n] is not None or defaults[n] is not None}
        check_fit_options(func.__name__, **options)
        return func(*args, **kwargs)

    return checked


def chunk_sizes(total: int, chunk: int = EVAL_CHUNK) -> list[int]:
    """``total`` split into passes of ``chunk`` (the last one shorter).

    Args:
        total: how many draws in all.
        chunk: the most per pass.

    Returns:
        The size of each pass; they sum to ``total``.

    Example:
        >>> chunk_sizes(4500), chunk_sizes(10)
        ([2000, 2000, 500], [10])
    """
    return [min(chunk, total - start) for start in range(0, total, chunk)]


def anneal_factor(step: int, anneal_steps: int) -> float:
    """Inverse temperature at ``step``: a linear ramp from ``1/anneal_steps`` to 1, then 1.

    Args:
        step: the step, from 0.
        anneal_steps: the length of the ramp; 0 means no annealing.

    Returns:
        The factor of the target log-density at this step, in ``(0, 1]``.

    Example:
        >>> [anneal_factor(step, 4) for step in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / anneal_steps)


def check_finite_loss(value: float, step: int, what: str, fix: str | None = None) -> None:
    """Raise a ValueError naming the step when a loss (or a log-density) is NaN or inf.

    Args:
        value: the loss (anything ``float`` accepts).
        step: the step, for the message.
        what: what the value is, for the message.
        fix: advice that replaces the default one after the semicolon.

    Raises:
        ValueError: ``value`` is NaN or inf.

    Example:
        >>> check_finite_loss(1.0, 3, "the loss")
        >>> check_finite_loss(float("nan"), 3, "the loss", fix="lower the learning rate")
        Traceback (most recent call last):
        ValueError: the loss was NaN at step 3; lower the learning rate
    """
    v = float(value)
    if math.isfinite(v):
        return
    kind = "NaN" if math.isnan(v) else "inf"
    fix = fix or (
        "check that the log-density is finite everywhere the flow can put mass (write it on the "
        "unconstrained space), or lower the learning rate"
    )
    raise ValueError(f"{what} was {kind} at step {step}; {fix}")


def check_first_log_density(num_bad: int, num_draws: int, has_nan: bool, caller: str = "fit_reverse_kl") -> None:
    """Raise at once when the target log-density is not finite at its first evaluation.

    Before any update the flow is as built, so a NaN or inf there is the target's fault,
    not the training's: no number of skipped steps would help.

    Args:
        num_bad: how many of the first step's draws got a NaN or inf log-density.
        num_draws: how many draws the first step scored.
        has_nan: whether any of them was NaN (else they were inf).
        caller: the name the message starts with.

    Raises:
        ValueError: ``num_bad > 0``.

    Example:
        >>> check_first_log_density(0, 64, False)
        >>> check_first_log_density(3, 64, True)
        Traceback (most recent call last):
        ValueError: fit_reverse_kl: the target log-density returned NaN at 3 of 64 draws at its first evaluation ...
    """
    if not num_bad:
        return
    kind = "NaN" if has_nan else "inf"
    raise ValueError(
        f"{caller}: the target log-density returned {kind} at {int(num_bad)} of {int(num_draws)} draws at its first "
        "evaluation (step 1, before any update): the target is broken, not the training. It must be finite at "
        "every point of R^dim the flow can reach (the untrained flow draws roughly N(0, I)): write it on the "
        "unconstrained space (transform bounded variables, e.g. the log of a positive one), check its support, "
        "and check the constants it closes over"
    )


class NonFiniteGuard:
    """Skip steps whose loss or gradient is NaN or inf; raise after ``max_bad_steps`` in a row.

    A fit computes the loss and the gradient, calls ``update`` and applies the optimiser
    update only when it returns True: a bad step leaves the weights and the optimiser
    state as they were. ``history.skipped_steps`` counts the skipped steps. When
    ``max_bad_steps`` consecutive steps were bad the error names the likely cause: the
    target log-density (when it was not finite in that run of steps), the flow at its
    initial weights or the data (when no update has succeeded yet), otherwise the
    learning rate, with a 10x smaller value to try.

    Args:
        caller: ``"fit_mle"`` or ``"fit_reverse_kl"``; the messages start with it.
        lr: the learning rate, named in the error.
        history: the fit's ``History``.
        max_bad_steps: how many consecutive bad steps raise.

    Example:
        >>> guard = NonFiniteGuard("fit_mle", lr=0.1, history=History(), max_bad_steps=2)
        >>> guard.update(1, loss_finite=True), guard.update(2, loss_finite=True, grads_finite=False)
        (True, False)
        >>> guard.update(3, loss_finite=False)
        Traceback (most recent call last):
        ValueError: fit_mle: 2 consecutive steps (steps 2 to 3) were skipped because ... Try lr=0.01
    """

    def __init__(self, caller: str, lr: float, history: History, max_bad_steps: int = MAX_BAD_STEPS):
        self.caller, self.lr, self.history, self.max_bad_steps = caller, float(lr), history, int(max_bad_steps)
        self.any_good = False
        self._reset()

    def _reset(self):
        self.consecutive, self.first_bad, self.bad_loss, self.bad_target = 0, None, 0, 0

    def update(self, step: int, loss_finite: bool, grads_finite: bool = True, target_bad: int = 0) -> bool:
        """Record one step; True when its update should be applied.

        Args:
            step: the step number (from 1).
            loss_finite: whether the loss was finite.
            grads_finite: whether every gradient was finite (ignored when the loss was not).
            target_bad: how many draws got a NaN or inf target log-density (reverse KL).

        Returns:
            Whether to apply this step's update.

        Raises:
            ValueError: this is the ``max_bad_steps``-th bad step in a row; the message
                (``message``) names the likely cause.

        Example:
            >>> guard = NonFiniteGuard("fit_mle", lr=0.1, history=History())
            >>> guard.update(1, loss_finite=False), guard.history.skipped_steps
            (False, 1)
        """
        if loss_finite and grads_finite:
            self.any_good = True
            self._reset()
            return True
        self.history.skipped_steps += 1
        if not self.consecutive:
            self.first_bad = int(step)
        self.consecutive += 1
        self.bad_loss += not loss_finite
        self.bad_target += bool(target_bad)
        if self.consecutive >= self.max_bad_steps:
            raise ValueError(self.message(step))
        return False

    def message(self, step: int) -> str:
        """The error for the run of bad steps that ends at ``step``, naming the likely cause.

        Args:
            step: the last bad step.

        Returns:
            The message.

        Example:
            >>> guard = NonFiniteGuard("fit_mle", lr=0.1, history=History())
            >>> _ = guard.update(1, loss_finite=False)
            >>> print(guard.message(1))
            fit_mle: 1 consecutive steps (steps 1 to 1) were skipped ... before any update: ...
        """
        n, where = self.consecutive, f"steps {self.first_bad} to {int(step)}"
        what = f"the loss was NaN or inf at {self.bad_loss} of them" + (
            f", only the gradient at {n - self.bad_loss}" if n > self.bad_loss else ""
        )
        head = f"{self.caller}: {n} consecutive steps ({where}) were skipped because {what}"
        if self.bad_target:
            return (
                f"{head}; the target log-density returned NaN or inf at some of the flow's draws in "
                f"{self.bad_target} of them. The flow puts mass where the target is not finite: make the "
                "log-density finite on all of R^dim (write it on the unconstrained space, transforming bounded "
                "variables) or check its support"
            )
        if not self.any_good:
            if self.caller == "fit_mle":
                return (
                    f"{head}, from the first step, before any update: the flow's log-density is not finite on the "
                    "data at its initial weights. The data may be badly scaled for this flow (keep "
                    "standardize=True, or rescale them), or the flow is broken (check how it was built and its dtype)"
                )
            return (
                f"{head}, from the first step, before any update, while the target log-density was finite: the "
                "flow's log-density of its own samples is not finite at its initial weights; check how the flow "
                "was built and its dtype"
            )
        return (
            f"{head}, after training had made progress: the learning rate lr={self.lr:g} is too large for this "
            f"flow (an update took the weights where the flow is not finite). Try lr={self.lr / 10:g}"
        )


def check_latent_sites(sites: Iterable[tuple[str, bool, str]], guide_name: str = "AutoFlow") -> None:
    """Check that a model has latent sites and that all of them are continuous.

    Args:
        sites: ``(name, is_discrete, distribution_repr)`` for each latent sample site.
        guide_name: the guide's name, for the messages.

    Raises:
        ValueError: no latent sites, or a discrete one (the message says how to
            marginalise it).

    Example:
        >>> check_latent_sites([("mu", False, "Normal()")])
        >>> check_latent_sites([])
        Traceback (most recent call last):
        ValueError: the model has no latent sample sites: there is nothing for AutoFlow to fit
    """
    sites = list(sites)
    if not sites:
        raise ValueError(f"the model has no latent sample sites: there is nothing for {guide_name} to fit")
    for name, is_discrete, dist_repr in sites:
        if is_discrete:
            raise ValueError(
                f"{guide_name} handles continuous latent sites only; site {name!r} is discrete ({dist_repr}): "
                "marginalise it (config_enumerate with TraceEnum_ELBO in Pyro, enumeration in NumPyro) "
                "or give it a separate guide"
            )


AUTOFLOW_LOG_SCALE_BOUND: float = 5.0
"""The guides' final affine layer soft-clamps its log-scale to ``(-bound, bound)``."""


def check_log_density(fn: Any, caller: str = "fit_reverse_kl") -> None:
    """Check that ``fn`` is callable (a log-density of an ``(n, dim)`` array).

    Args:
        fn: what was passed as ``log_density``.
        caller: the name the message starts with.

    Raises:
        ValueError: ``fn`` is not callable.

    Example:
        >>> check_log_density(lambda z: -(z ** 2).sum(-1))
        >>> check_log_density(3.0)
        Traceback (most recent call last):
        ValueError: fit_reverse_kl: log_density must be a function of an (n, dim) array, got 3.0
    """
    if not callable(fn):
        raise ValueError(f"{caller}: log_density must be a function of an (n, dim) array, got {fn!r}")


def check_log_density_shape(shape: tuple[int, ...], n: int, dim: int, caller: str = "fit_reverse_kl") -> None:
    """Check that a log-density returned one value per point, shape ``(n,)``.

    Args:
        shape: the shape it returned.
        n: the number of points it was called on.
        dim: the event size, for the message.
        caller: the name the message starts with.

    Raises:
        ValueError: ``shape`` is not ``(n,)``.

    Example:
        >>> check_log_density_shape((8,), 8, 2)
        >>> check_log_density_shape((8, 2), 8, 2)
        Traceback (most recent call last):
        ValueError: fit_reverse_kl: log_density must map an array of shape (n, 2) to shape (n,); ...
    """
    if tuple(shape) != (n,):
        raise ValueError(
            f"{caller}: log_density must map an array of shape (n, {dim}) to shape (n,); "
            f"for n={n} it returned shape {tuple(shape)}"
        )


def check_quantiles(q: Any, caller: str = "quantiles") -> np.ndarray:
    """Quantile levels as a float array, each strictly between 0 and 1.

    Args:
        q: one level or an array of them.
        caller: the name the message starts with.

    Returns:
        ``q`` as a float array.

    Raises:
        ValueError: a level outside ``(0, 1)``.

    Example:
        >>> check_quantiles([0.05, 0.5, 0.95]).tolist()
        [0.05, 0.5, 0.95]
        >>> check_quantiles([0.0, 0.5])
        Traceback (most recent call last):
        ValueError: quantiles: quantiles must lie strictly between 0 and 1, got [0.0, 0.5]
    """
    q = np.asarray(q, dtype=float)
    if not np.all((q > 0) & (q < 1)):
        raise ValueError(f"{caller}: quantiles must lie strictly between 0 and 1, got {q.reshape(-1).tolist()}")
    return q
