"""The backend-neutral half of training and guides: argument checks, data splits,
early stopping, the loss history, progress bars and the errors users see.

Both ``pyroflows.torch.train`` / ``autoguide`` and their JAX twins call these, so an
option means the same thing and a mistake reads the same on either backend.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

__all__ = [
    "check_data", "split_indices", "batch_indices", "EarlyStopping", "History", "progress_bar",
    "check_fit_options", "anneal_factor", "check_finite_loss", "check_latent_sites", "check_init_scale",
    "check_log_density", "check_log_density_shape", "check_quantiles", "AUTOFLOW_LOG_SCALE_BOUND",
]


def check_data(data, dim: int | None = None) -> np.ndarray:
    """``data`` as a float array of shape ``(n, dim)``; a ValueError names what is wrong."""
    try:
        array = np.asarray(data, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"data must be a numeric array of shape (num_points, dim): {e}") from None
    if array.ndim == 1 and dim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(
            f"data must have shape (num_points, dim), got shape {array.shape}; "
            "reshape it (one row per data point)"
        )
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"data has {array.shape[1]} columns but the flow has dim={dim}")
    if array.shape[0] < 2:
        raise ValueError(f"data needs at least 2 rows, got {array.shape[0]}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(map(str, rows[:5])) + (", ..." if rows.size > 5 else "")
        raise ValueError(
            f"data contains NaN or inf in {rows.size} row(s) (rows {shown}); drop or impute them before fitting"
        )
    return array


def split_indices(n: int, validation_fraction: float, seed: int = 0):
    """A random ``(train, validation)`` split of ``range(n)``; validation is empty for 0."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(validation_fraction * n))
    if validation_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def batch_indices(train_idx: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """One minibatch of row indices, without replacement (the whole set when it is smaller)."""
    if batch_size >= train_idx.size:
        return train_idx
    return rng.choice(train_idx, size=batch_size, replace=False)


class EarlyStopping:
    """Tracks the best validation loss; ``should_stop`` after ``patience`` evaluations without
    an improvement larger than ``min_delta`` (never when ``patience`` is None)."""

    def __init__(self, patience: int | None = None, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, float(min_delta)
        self.best, self.best_step, self._since = math.inf, None, 0

    def update(self, value: float, step: int | None = None) -> bool:
        """Record one evaluation; True when it is a new best."""
        if value < self.best - self.min_delta:
            self.best, self.best_step, self._since = float(value), step, 0
            return True
        self._since += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self._since >= self.patience


@dataclasses.dataclass
class History:
    """What a fit returns: the training loss at each evaluation, the validation loss where
    there is one, the step of the weights that were kept, and whether it stopped early."""

    step: list = dataclasses.field(default_factory=list)
    loss: list = dataclasses.field(default_factory=list)
    validation_loss: list = dataclasses.field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False

    def record(self, step: int, loss: float, validation_loss: float | None = None) -> None:
        self.step.append(int(step))
        self.loss.append(float(loss))
        if validation_loss is not None:
            self.validation_loss.append(float(validation_loss))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def progress_bar(total: int, desc: str, progress: bool = True):
    """A tqdm bar over ``total`` steps; silent when ``progress`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def _positive_int(caller, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{caller}: {name}={value!r} must be a positive integer")


def _positive_float(caller, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{caller}: {name}={value!r} must be a positive number")


def check_fit_options(caller: str = "fit", **options) -> None:
    """Validate the keyword arguments shared by the fitting functions and guides, by name."""
    for name, value in options.items():
        if name in ("num_steps", "batch_size", "num_samples", "eval_every", "num_particles"):
            _positive_int(caller, name, value)
        elif name in ("lr", "init_scale"):
            _positive_float(caller, name, value)
        elif name == "validation_fraction":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"{caller}: validation_fraction={value!r} must lie in [0, 1)")
        elif name == "patience":
            if value is not None:
                _positive_int(caller, name, value)
        elif name == "anneal_steps":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{caller}: anneal_steps={value!r} must be an integer >= 0")
        else:
            raise ValueError(f"check_fit_options: unknown option {name!r}")


def anneal_factor(step: int, anneal_steps: int) -> float:
    """Inverse temperature at ``step``: a linear ramp from ``1/anneal_steps`` to 1, then 1."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / anneal_steps)


def check_finite_loss(value, step: int, what: str) -> None:
    """Raise a ValueError naming the step when a loss (or a log-density) is NaN or inf."""
    v = float(value)
    if math.isfinite(v):
        return
    kind = "NaN" if math.isnan(v) else "inf"
    raise ValueError(
        f"{what} was {kind} at step {step}; check that the log-density is finite everywhere the "
        "flow can put mass (write it on the unconstrained space), or lower the learning rate"
    )


def check_latent_sites(sites, guide_name: str = "AutoFlow") -> None:
    """``sites``: ``(name, is_discrete, distribution_repr)`` for each latent sample site."""
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


# The guides' final affine layer soft-clamps its log-scale to (-bound, bound).
AUTOFLOW_LOG_SCALE_BOUND = 5.0


def check_init_scale(init_scale, caller: str = "AutoFlow", bound: float = AUTOFLOW_LOG_SCALE_BOUND):
    """``init_scale`` as a float (or the string ``"laplace"``), or a ValueError when the guide's
    bounded log-scale cannot reach it."""
    if isinstance(init_scale, str):
        if init_scale != "laplace":
            raise ValueError(f"{caller}: init_scale={init_scale!r} must be a positive float or 'laplace'")
        return init_scale
    check_fit_options(caller, init_scale=init_scale)
    if not abs(math.log(init_scale)) < bound:
        raise ValueError(
            f"{caller}: init_scale={init_scale!r} must lie in ({math.exp(-bound):.4g}, {math.exp(bound):.4g}): "
            f"the final affine layer's log-scale is bounded by {bound:g}"
        )
    return float(init_scale)


def check_log_density(fn, caller: str = "fit_reverse_kl") -> None:
    if not callable(fn):
        raise ValueError(f"{caller}: log_density must be a function of an (n, dim) array, got {fn!r}")


def check_log_density_shape(shape, n: int, dim: int, caller: str = "fit_reverse_kl") -> None:
    if tuple(shape) != (n,):
        raise ValueError(
            f"{caller}: log_density must map an array of shape (n, {dim}) to shape (n,); "
            f"for n={n} it returned shape {tuple(shape)}"
        )


def check_quantiles(q, caller: str = "quantiles") -> np.ndarray:
    """Quantile levels as a float array, each strictly between 0 and 1."""
    q = np.asarray(q, dtype=float)
    if not np.all((q > 0) & (q < 1)):
        raise ValueError(f"{caller}: quantiles must lie strictly between 0 and 1, got {q.reshape(-1).tolist()}")
    return q
