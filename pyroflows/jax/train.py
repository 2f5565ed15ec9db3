"""Training without writing a loop: ``fit_mle`` (forward KL on data), ``fit_reverse_kl``
(reverse KL against an unnormalised log-density) and ``evaluate`` (importance-weight
diagnostics of a fitted guide).

Each fit compiles one program (``eqx.filter_jit``) that runs a chunk of Adam steps
(loss, gradient and update) in a ``lax.scan``: one dispatch and one read-back per chunk
(``eval_every`` steps for ``fit_mle``, 50 for ``fit_reverse_kl``) instead of per step.
The last chunk is padded with masked steps, so every chunk has the same shape and the
program compiles once per flow structure, and a second fit of the same shapes reuses it.
A step whose loss or gradient is NaN or inf is masked the same way (weights and
optimiser state untouched) and counted; ``max_bad_steps`` of them in a row raise
(``pyroflows.fitting.NonFiniteGuard``).

The fits reach a flow only through ``pyroflows.protocols.TrainableFlow`` (``dim``,
``standardizable``, ``log_prob``, ``sample_and_log_prob``, ``fit_target``): ``Flow`` and
``pyroflows.jax.snf.StochasticFlow`` implement it, so this module imports neither
class's module; a lone layer is wrapped by ``pyroflows.jax.density.as_trainable`` for the
fit. A flow whose ``log_prob`` draws noise takes its key from ``numpyro.prng_key()``,
which the fits supply with ``numpyro.handlers.seed`` (``density.keyed_log_prob``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import Trace_ELBO

from .. import fitting
from ..diagnostics import summarize_weights
from .density import as_trainable, keyed_log_prob, log_prob_stop_gradient, result_float_dtype

__all__ = ["fit_mle", "fit_reverse_kl", "evaluate", "flow_log_prob", "log_prob_stop_gradient"]

# One optimiser object for every fit: the learning rate lives in its state, so the
# compiled program is shared between fits with different learning rates.
_ADAM = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
_CHUNK = 50  # fit_reverse_kl: steps per compiled chunk (loss read-back, NaN check, progress bar)


def _init_optimizer(params, lr, dtype):
    state = _ADAM.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, dtype)
    return state


def flow_log_prob(flow: Any, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """``log q(x)`` of a flow: its ``TrainableFlow.log_prob`` (one inverse pass for a ``Flow``).

    For a ``Flow`` (or a lone layer) ``q`` is ``N(0, I)`` pushed forward through it, and
    the value is exact; for a ``pyroflows.jax.snf.StochasticFlow`` it is a one-path
    estimate of a lower bound on ``log q(x)``.

    Args:
        flow: a ``TrainableFlow`` (``Flow``, ``StochasticFlow``, a user's own) or a lone
            ``FlowTransform`` layer (wrapped by ``pyroflows.jax.density.as_trainable``).
        x: points of shape ``(..., dim)``.
        key: feeds layers that draw noise (otherwise they take ``numpyro.prng_key()``).

    Returns:
        ``log q(x)``, shape ``(...)``.

    Example:
        >>> import jax, jax.numpy as jnp, pyroflows.jax as pf
        >>> flow = pf.build_flow("householder", 2, key=jax.random.key(0))
        >>> flow_log_prob(flow, jnp.zeros((3, 2))).shape
        (3,)
    """
    return keyed_log_prob(as_trainable(flow), x, key)


def _nll(params, static, x, key, context=None):
    return -jnp.mean(keyed_log_prob(eqx.combine(params, static), x, key, context))


def _all_finite(loss, grads):
    """Whether ``loss`` and every gradient leaf are finite (a traced boolean)."""
    ok = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        ok = ok & jnp.all(jnp.isfinite(g))
    return ok


def _adam_steps(loss_fn, params, static, opt_state, xs, active):
    """Adam steps on ``loss_fn(params, static, x) -> (loss, aux)`` for each ``x`` in ``xs``.

    A step whose ``active`` flag is False (padding) or whose loss or gradient is NaN or inf
    leaves the weights and the optimiser state untouched (masked with ``jnp.where``, as
    ``optax.apply_if_finite`` does), inside the compiled scan. Returns the final
    ``(params, opt_state)`` and, per step, ``(loss, ok, aux)`` with ``ok`` whether the loss
    and the gradient were finite.
    """

    def body(carry, inputs):
        params, opt_state = carry
        x, on = inputs
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, static, x)
        ok = _all_finite(loss, grads)
        updates, new_state = _ADAM.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        take = on & ok
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(take, new, old))
        return (keep(new_params, params), keep(new_state, opt_state)), (loss, ok, aux)

    return jax.lax.scan(body, (params, opt_state), (xs, active))


def _guard_chunk(guard, start, losses, ok, target_bad=None):
    """Feed one chunk's steps to the guard; the indices of the steps that were taken."""
    taken = []
    for i in range(len(losses)):
        loss_finite = bool(np.isfinite(losses[i]))
        bad = 0 if target_bad is None else int(target_bad[i])
        if guard.update(start + i + 1, loss_finite, bool(ok[i]) or not loss_finite, bad):
            taken.append(i)
    return taken


@eqx.filter_jit
def _mle_chunk(params, static, opt_state, data, context, idx, keys, active):
    def loss(params, static, x):
        rows, key = x
        return _nll(params, static, data[rows], key, None if context is None else context[rows]), None

    (params, opt_state), (losses, ok, _) = _adam_steps(loss, params, static, opt_state, (idx, keys), active)
    return params, opt_state, losses, ok


@eqx.filter_jit
def _mle_eval(params, static, data, context, key):
    return _nll(params, static, data, key, context)


@fitting.checks_fit_options
def fit_mle(
    flow: Any,
    data: Any,
    *,
    context: Any = None,
    num_steps: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    validation_fraction: float = 0.1,
    eval_every: int = 50,
    patience: int | None = fitting.MLE_PATIENCE,
    standardize: bool = True,
    max_bad_steps: int = fitting.MAX_BAD_STEPS,
    seed: int = 0,
    key: jax.Array | None = None,
    progress: bool = True,
) -> tuple[Any, fitting.History]:
    """Fit ``flow`` to ``data`` by maximum likelihood (forward KL) with Adam.

    The loss is the mean of ``-flow.log_prob(x)`` over a minibatch: for a ``Flow`` the
    density of N(0, I) pushed through it, which needs the flow's inverse (one parallel
    pass for ``maf``); for a ``StochasticFlow`` its reverse-path lower bound.
    ``validation_fraction`` of the rows (``pyroflows.fitting.split_indices``, seeded by
    ``seed``) are held out; every ``eval_every`` steps the validation NLL (the mean
    training NLL since the last evaluation when nothing is held out) is recorded;
    ``patience`` evaluations (20 by default) without improvement, or ``num_steps`` (default
    ``None``: up to ``fitting.MLE_MAX_STEPS``), stop the fit, and the best weights are
    restored. Minibatches of ``batch_size`` rows are drawn without replacement by a
    numpy generator seeded by ``seed``; ``key`` (default ``jax.random.key(seed)``) feeds
    layers that draw noise. An evaluation after which every step was skipped (see below)
    is not recorded: the weights did not change.

    With ``standardize=True`` (the default) the flow is trained on the z-scored data
    ``z = (x - mean) / sd`` (per column, mean and sd of the training rows;
    ``pyroflows.fitting.standardization``) and the returned flow ends in the fixed layer
    ``pyroflows.jax.standardize.Standardize(mean, sd)``, so its density is that of the
    original data (``log q(x) = log q_flow(z) - sum(log sd)``). All recorded losses are
    NLLs of the original data. A ``flow`` that already ends in a ``Standardize`` layer
    keeps it and its statistics; a flow whose ``standardizable`` is False (a
    ``StochasticFlow``) is never standardised.

    A step whose loss or gradient is NaN or inf leaves the weights and the optimiser
    state untouched (inside the compiled step) and is counted in
    ``history.skipped_steps``; ``max_bad_steps`` consecutive ones raise a ValueError
    naming the likely cause (``pyroflows.fitting.NonFiniteGuard``).

    Args:
        flow: a ``TrainableFlow``: a ``Flow`` from ``build_flow``, a ``StochasticFlow``,
            a user's own; or a lone ``FlowTransform`` layer.
        data: array of shape ``(n, dim)``, ``n >= 2``, finite real numbers.
        context: for a ``ConditionalFlow``, its context for each data row, shape
            ``(n, context_dim)``; z-scored into the flow's ``context_loc`` and
            ``context_scale`` with ``standardize=True`` (see the torch ``fit_mle``).
        num_steps: the most Adam steps; None: ``fitting.MLE_MAX_STEPS``.
        batch_size: rows per minibatch.
        lr: Adam's learning rate.
        validation_fraction: share of the rows held out, in ``[0, 1)``.
        eval_every: steps between evaluations (and per compiled chunk).
        patience: evaluations without improvement before stopping; None: never stop.
        standardize: fit on z-scored data and fold the z-scoring into the returned flow.
        max_bad_steps: consecutive non-finite steps that raise.
        seed: seeds the split and the minibatches.
        key: feeds layers that draw noise.
        progress: show a progress bar.

    Returns:
        ``(fitted, history)``. Equinox modules are immutable, so ``fitted`` is a new flow
        with the weights of the best evaluation: ``flow``'s structure when nothing is
        standardised (``standardize=False``, ``flow.standardizable`` False, or ``flow``
        already ends in a ``Standardize`` layer), otherwise a ``Flow`` whose parts are ``flow``'s layers
        (fitted to the z-scored data) followed by ``Standardize(mean, sd)``, with
        ``standardize=True`` added to the config. ``history`` is a ``pyroflows.fitting.History``.

    Raises:
        ValueError: bad options or data (``pyroflows.fitting.check_fit_options``,
            ``check_data``), a non-finite validation loss, or ``max_bad_steps``
            consecutive non-finite steps.

    References:
        Papamakarios, Nalisnick, Rezende, Mohamed & Lakshminarayanan 2021,
        "Normalizing flows for probabilistic modeling and inference",
        arXiv:1912.02762, section 2.3.1.

    Example:
        >>> import jax, numpy as np, pyroflows.jax as pf
        >>> flow = pf.build_flow("householder", 2, key=jax.random.key(0))
        >>> data = np.random.default_rng(0).normal(size=(100, 2))
        >>> fitted, history = fit_mle(flow, data, num_steps=10, eval_every=5, validation_fraction=0.0,
        ...                           progress=False)
        >>> history.step, type(fitted.parts[-1]).__name__
        ([5, 10], 'Standardize')
    """
    from .standardize import Standardize, split_standardize, with_standardize
    from .transforms.base import Flow
    from .transforms.glow import initialize_actnorm

    trainable = as_trainable(flow)
    wrapped = trainable is not flow  # a lone layer: trained in its adapter, handed back bare
    flow = trainable
    dtype = result_float_dtype(flow)
    array = fitting.check_data(data, flow.dim)
    contexts = fitting.check_context(context, getattr(flow, "context_dim", 0), array.shape[0])
    train_idx, val_idx = fitting.split_indices(array.shape[0], validation_fraction, seed)
    unscaled = contexts is not None and not (np.any(flow.context_loc) or np.any(flow.context_scale != 1))
    if standardize and unscaled:
        loc, scale = fitting.standardization(contexts[train_idx])
        stats = (jnp.asarray(loc, dtype), jnp.asarray(scale, dtype))
        flow = eqx.tree_at(lambda f: (f.context_loc, f.context_scale), flow, stats)
    inner, layer, offset = flow, None, 0.0
    if standardize and flow.standardizable:
        inner, layer = split_standardize(flow)
        if layer is None:
            loc, scale = fitting.standardization(array[train_idx])
            layer = Standardize(loc, scale, dtype)
        else:
            loc, scale = np.asarray(layer.loc, float), np.asarray(layer.scale, float)
        array = (array - loc) / scale
        offset = float(np.log(scale).sum())  # NLL(x) = NLL(z) + sum(log sd)
    device_data = jnp.asarray(array, dtype)
    validation = device_data[val_idx] if val_idx.size else None
    device_context = None if contexts is None else jnp.asarray(contexts, dtype)
    val_context = None if contexts is None or not val_idx.size else device_context[val_idx]
    rng = np.random.default_rng(seed)
    if isinstance(inner, Flow) and not getattr(inner, "context_dim", 0):
        # Glow's ActNorm starts from the first minibatch, as torch's does on its first
        # training inverse (a fresh generator with the seed draws that same batch).
        first = fitting.batch_indices(train_idx, batch_size, np.random.default_rng(seed))
        inner = initialize_actnorm(inner, device_data[first])
    train_key, val_key = jax.random.split(jax.random.key(seed) if key is None else key)

    params, static = eqx.partition(inner, eqx.is_inexact_array)
    opt_state = _init_optimizer(params, lr, dtype)
    history, stopper = fitting.History(), fitting.EarlyStopping(patience)
    guard = fitting.NonFiniteGuard("fit_mle", lr, history, max_bad_steps)
    best, step = params, 0
    num_steps = fitting.MLE_MAX_STEPS if num_steps is None else num_steps
    chunk = min(eval_every, num_steps)
    rows = min(batch_size, train_idx.size)
    with fitting.progress_bar(num_steps, "fit_mle", progress) as bar:
        while step < num_steps:
            n = min(chunk, num_steps - step)
            idx = np.zeros((chunk, rows), dtype=np.int32)
            for i in range(n):
                idx[i] = fitting.batch_indices(train_idx, batch_size, rng)
            keys = jax.random.split(jax.random.fold_in(train_key, step), chunk)
            params, opt_state, losses, ok = _mle_chunk(
                params, static, opt_state, device_data, device_context, jnp.asarray(idx), keys, jnp.arange(chunk) < n
            )
            losses, ok = np.asarray(losses)[:n], np.asarray(ok)[:n]
            taken = _guard_chunk(guard, step, losses, ok)
            step += n
            bar.update(n)
            if not taken:  # every step of the chunk was skipped: the weights did not change
                continue
            train_loss = float(np.mean(losses[taken])) + offset
            val_loss = None
            if validation is not None:
                val_key_step = jax.random.fold_in(val_key, step)
                val_loss = float(_mle_eval(params, static, validation, val_context, val_key_step)) + offset
                fitting.check_finite_loss(
                    val_loss,
                    step,
                    "fit_mle: the validation loss",
                    f"a held-out row has zero density under the flow although the training steps were finite: "
                    f"the weights diverged (try lr={lr / 10:g}) or the data are badly scaled (standardize=True)",
                )
            history.record(step, train_loss, val_loss)
            bar.set_postfix(loss=train_loss if val_loss is None else val_loss)
            if stopper.update(train_loss if val_loss is None else val_loss, step):
                best = params
            if stopper.should_stop:
                history.stopped_early = True
                break
    history.best_step = stopper.best_step
    fitted = eqx.combine(best, static)
    fitted = fitted.transform if wrapped else fitted
    if layer is None:
        return fitted, history
    return with_standardize(fitted, layer), history


def _reverse_kl(params, static, log_density, context_sampler, key, beta, num_samples, stick_the_landing):
    flow = eqx.combine(params, static)
    context = ()  # a conditional flow: one context per draw, passed to the flow and the target
    if context_sampler is not None:
        c = jnp.asarray(context_sampler(jax.random.fold_in(key, 2), num_samples), result_float_dtype(flow))
        fitting.check_context_shape(jnp.shape(c), num_samples, flow.context_dim)
        context = (jax.lax.stop_gradient(c),)
    # a Flow: N(0, I) draws pushed forward; a StochasticFlow: log q of the whole path
    x, log_q = flow.sample_and_log_prob(num_samples, key, *context)
    if stick_the_landing:  # the draws scored again with the weights held fixed
        log_q = log_prob_stop_gradient(flow, x, jax.random.fold_in(key, 1))
    log_p = log_density(x, *context)
    fitting.check_log_density_shape(jnp.shape(log_p), num_samples, flow.dim)
    bad = jax.lax.stop_gradient(~jnp.isfinite(log_p))
    return jnp.mean(log_q - beta * log_p), (jnp.sum(bad), jnp.any(bad & jnp.isnan(log_p)))


@eqx.filter_jit
def _reverse_kl_chunk(
    params, static, opt_state, log_density, context_sampler, keys, betas, active, num_samples, stick_the_landing
):
    def loss(params, static, x):
        key, beta = x
        return _reverse_kl(params, static, log_density, context_sampler, key, beta, num_samples, stick_the_landing)

    (params, opt_state), (losses, ok, (target_bad, target_nan)) = _adam_steps(
        loss, params, static, opt_state, (keys, betas), active
    )
    return params, opt_state, losses, ok, target_bad, target_nan


@fitting.checks_fit_options
def fit_reverse_kl(
    flow: Any,
    log_density: Callable[[jax.Array], jax.Array] | None = None,
    *,
    num_steps: int = 1000,
    num_samples: int = 256,
    lr: float = 1e-3,
    anneal_steps: int = 0,
    stick_the_landing: bool = False,
    context_sampler: Callable[[jax.Array, int], jax.Array] | None = None,
    max_bad_steps: int = fitting.MAX_BAD_STEPS,
    seed: int = 0,
    key: jax.Array | None = None,
    progress: bool = True,
) -> tuple[Any, fitting.History]:
    """Fit ``flow`` to an unnormalised density by minimising the reverse KL with Adam.

    The loss at step ``t`` is the Monte Carlo estimate over ``num_samples`` draws
    ``(x, log q(x)) = flow.sample_and_log_prob(num_samples, key)`` (for a ``Flow``,
    ``x = flow(u)`` with ``u ~ N(0, I)``) of ``E_q[log q(x) - beta_t log_density(x)]``
    (Rezende & Mohamed 2015): without annealing it is
    ``KL(q || p) - log Z``. ``beta_t = pyroflows.fitting.anneal_factor(t, anneal_steps)``
    ramps linearly from ``1/anneal_steps`` to 1 over the first ``anneal_steps`` steps.
    ``stick_the_landing`` scores the samples again with the weights held fixed (path
    derivative; Roeder et al. 2017), which needs the flow's inverse.
    ``key`` (default ``jax.random.key(seed)``) draws the base samples.

    A NaN or inf from ``log_density`` at the first step (before any update) raises a
    ValueError: the target is broken. Later, a step whose loss or gradient is NaN or inf
    leaves the weights and the optimiser state untouched (inside the compiled step), is
    not recorded, and is counted in ``history.skipped_steps``; ``max_bad_steps``
    consecutive ones raise a ValueError naming the likely cause (the target, or the
    learning rate). Steps run in compiled chunks of 50, so the error comes at the end of
    the chunk in which it arose.

    A ``ConditionalFlow`` is fitted to a family of targets at once (amortised VI): each
    step draws ``c = context_sampler(key, num_samples)``, shape ``(num_samples,
    context_dim)``, one ``x ~ q(. | c_i)`` per context, and minimises the mean of
    ``log q(x | c) - beta_t log_density(x, c)`` (see the torch ``fit_reverse_kl``).

    ``flow.fit_target(log_density, stick_the_landing)`` names the density trained
    against: a ``Flow`` takes ``log_density`` itself, a ``pyroflows.jax.snf.StochasticFlow``
    its own target (``log_density=None``) and trains on ``E[-log w]`` of its whole paths.

    Args:
        flow: a ``TrainableFlow`` (``Flow``, ``StochasticFlow``, a user's own) or a lone
            ``FlowTransform`` layer.
        log_density: maps an ``(n, dim)`` array to shape ``(n,)``; jax-traceable; for a
            ``ConditionalFlow`` a function of ``(x, context)``.
        num_steps: Adam steps.
        num_samples: draws per step.
        lr: Adam's learning rate.
        anneal_steps: steps of the linear ramp of ``beta`` (0: none).
        stick_the_landing: use the path-derivative gradient.
        context_sampler: for a ``ConditionalFlow``, ``(key, num_samples) -> contexts``;
            jax-traceable.
        max_bad_steps: consecutive non-finite steps that raise.
        seed: the default ``key``'s seed.
        key: draws the base samples.
        progress: show a progress bar.

    Returns:
        ``(flow, history)``: a new flow with the final weights and a
        ``pyroflows.fitting.History`` with the loss of every step taken.

    Raises:
        ValueError: bad options, a ``log_density`` that is not callable or returns the
            wrong shape, a non-finite target at the first step, a ``StochasticFlow``
            given another target or ``stick_the_landing``, or ``max_bad_steps``
            consecutive non-finite steps.

    References:
        Rezende & Mohamed 2015, "Variational inference with normalizing flows",
        arXiv:1505.05770.
        Roeder, Wu & Duvenaud 2017, "Sticking the landing: simple, lower-variance
        gradient estimators for variational inference", arXiv:1703.09194.

    Example:
        >>> import jax, pyroflows.jax as pf
        >>> flow = pf.build_flow("householder", 2, key=jax.random.key(0))
        >>> fitted, history = fit_reverse_kl(
        ...     flow, lambda x: -0.5 * (x**2).sum(-1), num_steps=5, num_samples=16, progress=False)
        >>> history.step
        [1, 2, 3, 4, 5]
    """
    trainable = as_trainable(flow)
    wrapped = trainable is not flow  # a lone layer: trained in its adapter, handed back bare
    flow = trainable
    log_density = flow.fit_target(log_density, bool(stick_the_landing))
    fitting.check_log_density(log_density)
    fitting.check_context_sampler(context_sampler, getattr(flow, "context_dim", 0), bool(stick_the_landing))
    dtype = result_float_dtype(flow)
    key = jax.random.key(seed) if key is None else key
    params, static = eqx.partition(flow, eqx.is_inexact_array)
    opt_state = _init_optimizer(params, lr, dtype)
    history = fitting.History()
    guard = fitting.NonFiniteGuard("fit_reverse_kl", lr, history, max_bad_steps)
    chunk, step = min(_CHUNK, num_steps), 0
    with fitting.progress_bar(num_steps, "fit_reverse_kl", progress) as bar:
        while step < num_steps:
            n = min(chunk, num_steps - step)
            betas = [fitting.anneal_factor(step + i, anneal_steps) for i in range(chunk)]
            keys = jax.random.split(jax.random.fold_in(key, step), chunk)
            params, opt_state, losses, ok, target_bad, target_nan = _reverse_kl_chunk(
                params,
                static,
                opt_state,
                log_density,
                context_sampler,
                keys,
                jnp.asarray(betas, dtype),
                jnp.arange(chunk) < n,
                num_samples,
                bool(stick_the_landing),
            )
            losses, ok, target_bad = np.asarray(losses)[:n], np.asarray(ok)[:n], np.asarray(target_bad)[:n]
            if step == 0:
                fitting.check_first_log_density(int(target_bad[0]), num_samples, bool(np.asarray(target_nan)[0]))
            taken = _guard_chunk(guard, step, losses, ok, target_bad)
            for i in taken:
                history.record(step + i + 1, losses[i])
            step += n
            bar.update(n)
            if taken:
                bar.set_postfix(loss=float(losses[taken[-1]]))
    history.best_step = num_steps
    fitted = eqx.combine(params, static)
    return (fitted.transform if wrapped else fitted), history


@fitting.checks_fit_options
def evaluate(
    model: Callable,
    guide: Callable,
    params: dict,
    *args: Any,
    key: jax.Array | None = None,
    num_samples: int = 1000,
    **kwargs: Any,
) -> dict:
    """Importance-weight diagnostics of a fitted guide: ELBO, importance-weighted ELBO, k-hat, ESS.

    Draws ``num_samples`` latents ``z ~ q`` from ``guide`` (with ``params``, e.g.
    ``svi.get_params(state)``), computes ``log w = log p(x, z) - log q(z)`` for each in
    vectorised, jitted passes of at most ``pyroflows.fitting.EVAL_CHUNK`` draws (the same
    draws as one pass), and summarises them with
    ``pyroflows.diagnostics.summarize_weights``.

    Args:
        model: a NumPyro model.
        guide: a NumPyro guide for it (``AutoFlow``, any autoguide).
        params: the guide's parameters.
        *args: the model's and guide's positional arguments (traced, as ``SVI.update``
            traces them).
        key: the draws' key (default ``jax.random.key(0)``).
        num_samples: how many draws.
        **kwargs: the model's and guide's keyword arguments.

    Returns:
        A dict with ``elbo``, ``iwelbo`` (Burda et al. 2016), ``khat`` (PSIS; Vehtari et
        al.), ``ess``, ``ess_fraction`` and ``num_samples``.

    Raises:
        ValueError: ``num_samples`` is not a positive integer.

    References:
        Burda, Grosse & Salakhutdinov 2016, "Importance weighted autoencoders",
        arXiv:1509.00519.
        Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto smoothed importance sampling",
        arXiv:1507.02646.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     numpyro.sample("z", dist.Normal(0.0, 1.0))
        >>> guide = AutoNormal(model)
        >>> params = {"z_auto_loc": 0.0, "z_auto_scale": 1.0}
        >>> out = evaluate(model, guide, params, num_samples=100)
        >>> round(out["elbo"], 6), round(out["ess_fraction"], 6)
        (0.0, 1.0)
    """
    key = jax.random.key(0) if key is None else key
    keys = jax.random.split(key, num_samples)
    starts = np.cumsum([0, *fitting.chunk_sizes(num_samples)])
    log_w = [
        np.asarray(_log_weights(keys[a:b], params, args, kwargs, model=model, guide=guide))
        for a, b in zip(starts[:-1], starts[1:])
    ]
    return summarize_weights(np.concatenate(log_w))


@functools.partial(jax.jit, static_argnames=("model", "guide"))
def _log_weights(keys, params, args, kwargs, *, model, guide):
    # Module level with the model and guide static: evaluating the same guide again
    # (other params, other data of the same shape) reuses the compiled program.
    def one(k):
        return -Trace_ELBO().loss(k, params, model, guide, *args, **kwargs)

    return jax.vmap(one)(keys)
