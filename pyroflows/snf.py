"""Stochastic normalizing flows, the backend-neutral half: the estimators (documented here
once), argument checks, the interpolation schedule, ``AutoSNF``'s defaults and the errors
users see. ``pyroflows.torch.snf`` and ``pyroflows.jax.snf`` hold the array code.

Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

Forward paths. A ``StochasticFlow`` draws ``z0`` from its base ``q0`` and runs its
layers in order. A deterministic layer maps ``y -> f(y)`` and adds ``log|det J_f(y)|``;
a stochastic block runs an MCMC kernel for ``log p_l = (1 - l) log q0 + l log p~`` and
adds ``dS = log B(y' -> y) - log F(y -> y')``, the log-ratio of its backward and forward
transition densities. At the end

    log w = log p~(x) - log q0(z0) + sum_t dS_t,

so ``E[w] = Z`` (the normaliser of ``p~``) and ``E[log w] = log Z - KL(forward path ||
backward path) <= log Z``; self-normalised weights reweight the samples to ``p~``.

The blocks' contributions:

- unadjusted Langevin, ``y' = y + e grad log p_l(y) + sqrt(2e) n``: its backward kernel is
  the same step taken from ``y'``, and ``dS = -(|n~|^2 - |n|^2) / 2`` with
  ``n~ = (y - y' - e grad log p_l(y')) / sqrt(2e)``;
- MALA, random-walk Metropolis and HMC are reversible for ``p_l``, so their backward kernel
  is the forward one and ``dS = log p_l(y) - log p_l(y')`` on acceptance, 0 on rejection.
  Over several such steps at the same ``l`` the ratios telescope: blocks at ``l = 1``
  move samples towards ``p~`` without changing their weights.

Reverse paths. For data ``x`` the layers run backwards (deterministic ones inverted, each
block as its own kernel); with those backward kernels ``B``

    log q(x) >= E_B[ log q0(z0) + sum_t log|det dz/dx|_t + sum_t dS_t ],

the same ``dS`` formulas with input and output swapped (Wu et al. 2020, section 3). A
one-path estimate of the right-hand side is ``log_prob_lower_bound``; maximum likelihood
(``fit_mle``) minimises its negated mean, reverse KL (``fit_reverse_kl``) ``E[-log w]``.
Gradients pass through accepted proposals and ``dS``; the accept decision itself is not
differentiated, as in Wu et al.

Example:
    >>> from pyroflows.snf import interpolation_schedule
    >>> interpolation_schedule("linear", 4)  # the l of each of 4 blocks
    (0.25, 0.5, 0.75, 1.0)
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .validation import boolean, positive_float, positive_int

__all__ = [
    "SCHEDULES",
    "AUTOSNF_DEFAULTS",
    "check_block_options",
    "interpolation_schedule",
    "check_stochastic_flow",
    "snf_fit_target",
    "check_autosnf_blocks",
    "autosnf_blocks",
    "check_target_shape",
    "no_transform_error",
    "unscored_path_error",
]

SCHEDULES: tuple[str, ...] = ("linear", "target")
"""Interpolation schedules: ``linear`` (block i of n targets l = i/n, so the last targets
p~; Wu et al.'s annealing), ``target`` (every block targets p~ itself)."""

AUTOSNF_DEFAULTS: dict[str, Any] = {
    "flow": "realnvp",
    "num_layers": 2,
    "schedule": "linear",
    "blocks": ("MALA", {"step_size": 0.01}, 4),
}
"""``AutoSNF``'s defaults: a RealNVP flow of two couplings (and the guide's affine map) as
the base, then four MALA steps annealed from it to the posterior. ``blocks`` is
``(class name, keyword arguments, count)``."""


def check_block_options(
    caller: str, *, step_size: float, num_steps: int, learnable_step_size: bool, num_leapfrog: int | None = None
) -> dict[str, Any]:
    """Validated block options: ``step_size`` > 0, ``num_steps`` (and ``num_leapfrog``) >= 1.

    Args:
        caller: the block's class name, for the messages.
        step_size: the MCMC step size.
        num_steps: kernel steps per block.
        learnable_step_size: whether the step size is trained.
        num_leapfrog: leapfrog steps per HMC step (HMC only).

    Returns:
        The options as plain Python values; ``num_leapfrog`` only when given.

    Raises:
        ValueError: a value out of range or of the wrong type.

    Example:
        >>> check_block_options("MALA", step_size=0.1, num_steps=2, learnable_step_size=False)
        {'step_size': 0.1, 'num_steps': 2, 'learnable_step_size': False}
        >>> check_block_options("MALA", step_size=0, num_steps=2, learnable_step_size=False)
        Traceback (most recent call last):
        ValueError: MALA: step_size=0 must be a positive number (finite and above 0)
    """
    out = {
        "step_size": positive_float("step_size", step_size, caller=caller),
        "num_steps": positive_int("num_steps", num_steps, caller=caller),
        "learnable_step_size": boolean("learnable_step_size", learnable_step_size, caller=caller),
    }
    if num_leapfrog is not None:
        out["num_leapfrog"] = positive_int("num_leapfrog", num_leapfrog, caller=caller)
    return out


def interpolation_schedule(schedule: str | Sequence[float], num_blocks: int) -> tuple[float, ...]:
    """The ``l`` of each of ``num_blocks`` stochastic blocks.

    Block i samples towards ``log p_l = (1 - l) log q0 + l log p~``.

    Args:
        schedule: ``"linear"`` (``l_i = i / n`` for ``i = 1..n``), ``"target"`` (every
            ``l_i = 1``), or a sequence of ``n`` numbers in ``[0, 1]``.
        num_blocks: the number ``n`` of stochastic blocks.

    Returns:
        One ``l`` per block, as floats.

    Raises:
        ValueError: an unknown name, a sequence of the wrong length, or values outside
            ``[0, 1]``.

    Example:
        >>> interpolation_schedule("target", 2)
        (1.0, 1.0)
        >>> interpolation_schedule([0.5, 1], 2)
        (0.5, 1.0)
        >>> interpolation_schedule([0.5], 2)
        Traceback (most recent call last):
        ValueError: StochasticFlow: the schedule has 1 values but the layers hold 2 stochastic blocks; ...
    """
    if isinstance(schedule, str):
        if schedule == "linear":
            return tuple((i + 1) / num_blocks for i in range(num_blocks))
        if schedule == "target":
            return (1.0,) * num_blocks
        raise ValueError(
            f"StochasticFlow: unknown schedule {schedule!r}; use one of {list(SCHEDULES)} "
            "or a sequence of one number in [0, 1] per stochastic block"
        )
    try:
        items = list(schedule)
        if any(isinstance(v, bool) for v in items):  # True is not the number 1 here
            raise TypeError
        values = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(
            f"StochasticFlow: schedule={schedule!r} must be one of {list(SCHEDULES)} or a sequence of numbers"
        ) from None
    if len(values) != num_blocks:
        raise ValueError(
            f"StochasticFlow: the schedule has {len(values)} values but the layers hold {num_blocks} "
            "stochastic blocks; give one value per block"
        )
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"StochasticFlow: schedule values must lie in [0, 1], got {list(values)}")
    return values


def check_stochastic_flow(kinds: Iterable[str], dim: int, target_log_density: Callable) -> int:
    """Check ``StochasticFlow``'s arguments.

    Args:
        kinds: for each entry of ``layers``, ``"block"`` (a stochastic block), ``"layer"``
            (a flow layer) or the type name of something unsupported.
        dim: the event size.
        target_log_density: the unnormalised target, ``(..., dim) -> (...)``.

    Returns:
        ``dim`` as an int.

    Raises:
        ValueError: a bad ``dim``, a target that is not callable, no layers, or an
            unsupported layer (the message names its position and type).

    Example:
        >>> check_stochastic_flow(["layer", "block"], 2, lambda z: -(z ** 2).sum(-1))
        2
        >>> check_stochastic_flow(["layer", "list"], 2, abs)
        Traceback (most recent call last):
        ValueError: StochasticFlow: layer 1 is a list, which is neither a flow layer nor a stochastic block; ...
    """
    dim = positive_int("dim", dim, caller="StochasticFlow")
    if not callable(target_log_density):
        raise ValueError(
            f"StochasticFlow: target_log_density must be a function mapping (..., {dim}) arrays to (...), "
            f"got {target_log_density!r}"
        )
    kinds = list(kinds)
    if not kinds:
        raise ValueError("StochasticFlow: layers is empty; give flow layers and/or stochastic blocks")
    for i, kind in enumerate(kinds):
        if kind not in ("block", "layer"):
            raise ValueError(
                f"StochasticFlow: layer {i} is a {kind}, which is neither a flow layer nor a stochastic block; "
                "use build_flow flows, pyroflows layers, or the Langevin, MALA, MetropolisHastings and HMC blocks"
            )
    return dim


def snf_fit_target(target_log_density: Callable, log_density: Callable | None, stick_the_landing: bool) -> Callable:
    """The log-density ``fit_reverse_kl`` uses for a stochastic flow: its own target.

    Its blocks already sample towards ``target_log_density``, so a different
    ``log_density`` would make the path weights wrong; and sticking the landing needs the
    density of a sample under fixed weights, which a stochastic flow does not have.

    Args:
        target_log_density: the stochastic flow's own target.
        log_density: what ``fit_reverse_kl`` was given (``None`` or the same function).
        stick_the_landing: what ``fit_reverse_kl`` was given.

    Returns:
        ``target_log_density``.

    Raises:
        ValueError: a different ``log_density``, or ``stick_the_landing=True``.

    Example:
        >>> target = lambda z: -(z ** 2).sum(-1)
        >>> snf_fit_target(target, None, False) is target
        True
    """
    if log_density is not None and log_density is not target_log_density:
        raise ValueError(
            "fit_reverse_kl: this StochasticFlow's blocks sample towards its own target_log_density, so a "
            "different log_density would make its path weights wrong; pass log_density=None, or build the "
            "StochasticFlow with this target"
        )
    if stick_the_landing:
        raise ValueError(
            "fit_reverse_kl: stick_the_landing needs the density of a sample under fixed weights, which a "
            "StochasticFlow does not have (only the weight of its own path); use stick_the_landing=False"
        )
    return target_log_density


def check_autosnf_blocks(kinds: Iterable[str]) -> None:
    """Check ``AutoSNF``'s ``stochastic`` argument.

    Args:
        kinds: for each entry, ``"block"`` or the type name of what was given.

    Raises:
        ValueError: no entries, or an entry that is not a stochastic block.

    Example:
        >>> check_autosnf_blocks(["block", "block"])
        >>> check_autosnf_blocks([])
        Traceback (most recent call last):
        ValueError: AutoSNF: stochastic is empty; give at least one Langevin, MALA, MetropolisHastings or HMC block
    """
    kinds = list(kinds)
    if not kinds:
        raise ValueError(
            "AutoSNF: stochastic is empty; give at least one Langevin, MALA, MetropolisHastings or HMC block"
        )
    for i, kind in enumerate(kinds):
        if kind != "block":
            raise ValueError(
                f"AutoSNF: stochastic[{i}] is a {kind}; give a block (Langevin, MALA, MetropolisHastings, HMC "
                "from the backend's snf module) or a list of them"
            )


def autosnf_blocks(stochastic: Any, backend: types.ModuleType) -> list:
    """``AutoSNF``'s ``stochastic`` as a list of blocks of ``backend``.

    Args:
        stochastic: ``None`` (the defaults, ``AUTOSNF_DEFAULTS["blocks"]``), one block, or a
            list or tuple of blocks.
        backend: the backend's ``snf`` module (``pyroflows.torch.snf`` or
            ``pyroflows.jax.snf``): its ``StochasticBlock`` and block classes.

    Returns:
        The blocks as a list.

    Raises:
        ValueError: as ``check_autosnf_blocks``.

    Example:
        >>> import types
        >>> class StochasticBlock:
        ...     pass
        >>> class MALA(StochasticBlock):
        ...     def __init__(self, step_size):
        ...         self.step_size = step_size
        >>> backend = types.SimpleNamespace(StochasticBlock=StochasticBlock, MALA=MALA)
        >>> blocks = autosnf_blocks(None, backend)
        >>> len(blocks), blocks[0].step_size
        (4, 0.01)
    """
    if stochastic is None:
        name, options, count = AUTOSNF_DEFAULTS["blocks"]
        stochastic = [getattr(backend, name)(**options) for _ in range(count)]
    elif not isinstance(stochastic, (list, tuple)):
        stochastic = [stochastic]
    check_autosnf_blocks(["block" if isinstance(b, backend.StochasticBlock) else type(b).__name__ for b in stochastic])
    return list(stochastic)


def no_transform_error(name: str) -> NotImplementedError:
    """The error of a stochastic guide's ``get_transform`` (what ``NeuTraReparam`` calls).

    Args:
        name: the guide's class name, which starts the message.

    Returns:
        The ``NotImplementedError`` that the guide's ``get_transform`` raises.

    Example:
        >>> raise no_transform_error("AutoSNF")
        Traceback (most recent call last):
        NotImplementedError: AutoSNF samples through MCMC steps, so it has no deterministic transform ...
    """
    return NotImplementedError(
        f"{name} samples through MCMC steps, so it has no deterministic transform for NeuTraReparam; "
        "use AutoFlow there, or take samples from the guide"
    )


def check_target_shape(in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int) -> None:
    """``target_log_density`` must drop the last axis: ``(..., dim) -> (...)``.

    Args:
        in_shape: the shape of the points the target was called on.
        out_shape: the shape it returned.
        dim: the event size.

    Raises:
        ValueError: ``out_shape`` is not ``in_shape`` without its last entry.

    Example:
        >>> check_target_shape((8, 2), (8,), 2)
        >>> check_target_shape((8, 2), (8, 2), 2)
        Traceback (most recent call last):
        ValueError: StochasticFlow: target_log_density must map an array of shape (n, 2) to shape (n,); ...
    """
    if tuple(out_shape) != tuple(in_shape)[:-1]:
        raise ValueError(
            f"StochasticFlow: target_log_density must map an array of shape (n, {dim}) to shape (n,); "
            f"for shape {tuple(in_shape)} it returned shape {tuple(out_shape)}"
        )


def unscored_path_error(name: str) -> ValueError:
    """The error when a value that was not drawn along the guide's own path is scored.

    Args:
        name: the guide's class name, which starts the message.

    Returns:
        The ``ValueError`` that scoring such a value raises.

    Example:
        >>> str(unscored_path_error("AutoSNF")).startswith("AutoSNF: a stochastic flow knows")
        True
    """
    return ValueError(
        f"{name}: a stochastic flow knows the density of a sample only along the path that drew it, and this "
        "value was not drawn by the guide in the same call; score the guide's own samples (SVI, Predictive, "
        "evaluate do), or use log_prob_lower_bound for a bound on the marginal density"
    )
