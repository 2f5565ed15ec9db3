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
"""

from __future__ import annotations

from .validation import boolean, positive_float, positive_int

__all__ = [
    "SCHEDULES", "AUTOSNF_DEFAULTS", "check_block_options", "interpolation_schedule",
    "check_stochastic_flow", "snf_fit_target", "check_autosnf_blocks", "autosnf_blocks", "check_target_shape", "no_transform_error", "unscored_path_error",
]

#: Interpolation schedules: ``linear`` (block i of n targets l = i/n, so the last targets
#: p~; Wu et al.'s annealing), ``target`` (every block targets p~ itself).
SCHEDULES = ("linear", "target")

#: ``AutoSNF``'s defaults: a RealNVP flow of two couplings (and the guide's affine map) as
#: the base, then four MALA steps annealed from it to the posterior.
AUTOSNF_DEFAULTS = {
    "flow": "realnvp",
    "num_layers": 2,
    "schedule": "linear",
    "blocks": ("MALA", {"step_size": 0.01}, 4),
}


def check_block_options(caller: str, *, step_size, num_steps, learnable_step_size, num_leapfrog=None) -> dict:
    """Validated block options: ``step_size`` > 0, ``num_steps`` (and ``num_leapfrog``) >= 1."""
    out = {
        "step_size": positive_float("step_size", step_size, caller=caller),
        "num_steps": positive_int("num_steps", num_steps, caller=caller),
        "learnable_step_size": boolean("learnable_step_size", learnable_step_size, caller=caller),
    }
    if num_leapfrog is not None:
        out["num_leapfrog"] = positive_int("num_leapfrog", num_leapfrog, caller=caller)
    return out


def interpolation_schedule(schedule, num_blocks: int) -> tuple[float, ...]:
    """The ``l`` of each of ``num_blocks`` stochastic blocks.

    ``"linear"``: ``l_i = i / n`` for ``i = 1..n``; ``"target"``: every ``l_i = 1``; or a
    sequence of ``n`` numbers in ``[0, 1]``.
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


def check_stochastic_flow(kinds, dim, target_log_density) -> int:
    """Check ``StochasticFlow``'s arguments; ``kinds[i]`` is ``"block"``, ``"layer"`` or the
    type name of an unsupported layer. Returns ``dim`` as an int."""
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


def snf_fit_target(target_log_density, log_density, stick_the_landing):
    """The log-density ``fit_reverse_kl`` uses for a stochastic flow: its own target.

    Its blocks already sample towards ``target_log_density``, so a different
    ``log_density`` would make the path weights wrong; and sticking the landing needs the
    density of a sample under fixed weights, which a stochastic flow does not have.
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


def check_autosnf_blocks(kinds) -> None:
    """``AutoSNF``'s ``stochastic``: ``kinds[i]`` is ``"block"`` or the type name of what was given."""
    kinds = list(kinds)
    if not kinds:
        raise ValueError("AutoSNF: stochastic is empty; give at least one Langevin, MALA, MetropolisHastings or HMC block")
    for i, kind in enumerate(kinds):
        if kind != "block":
            raise ValueError(
                f"AutoSNF: stochastic[{i}] is a {kind}; give a block (Langevin, MALA, MetropolisHastings, HMC "
                "from the backend's snf module) or a list of them"
            )


def autosnf_blocks(stochastic, backend) -> list:
    """``AutoSNF``'s ``stochastic`` as a list of blocks of ``backend`` (a backend's ``snf``
    module); ``AUTOSNF_DEFAULTS["blocks"]`` when ``None``."""
    if stochastic is None:
        name, options, count = AUTOSNF_DEFAULTS["blocks"]
        stochastic = [getattr(backend, name)(**options) for _ in range(count)]
    elif not isinstance(stochastic, (list, tuple)):
        stochastic = [stochastic]
    check_autosnf_blocks(["block" if isinstance(b, backend.StochasticBlock) else type(b).__name__ for b in stochastic])
    return list(stochastic)


def no_transform_error(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{name} samples through MCMC steps, so it has no deterministic transform for NeuTraReparam; "
        "use AutoFlow there, or take samples from the guide"
    )


def check_target_shape(in_shape, out_shape, dim: int) -> None:
    """``target_log_density`` must drop the last axis: ``(..., dim) -> (...)``."""
    if tuple(out_shape) != tuple(in_shape)[:-1]:
        raise ValueError(
            f"StochasticFlow: target_log_density must map an array of shape (n, {dim}) to shape (n,); "
            f"for shape {tuple(in_shape)} it returned shape {tuple(out_shape)}"
        )


def unscored_path_error(name: str) -> ValueError:
    """The error when a value that was not drawn along the guide's own path is scored."""
    return ValueError(
        f"{name}: a stochastic flow knows the density of a sample only along the path that drew it, and this "
        "value was not drawn by the guide in the same call; score the guide's own samples (SVI, Predictive, "
        "evaluate do), or use log_prob_lower_bound for a bound on the marginal density"
    )
