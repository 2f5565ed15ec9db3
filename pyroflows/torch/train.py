"""Fitting flows without writing a loop, and judging a fitted guide.

- ``fit_mle``: maximum likelihood (forward KL) of ``N(0, I)`` pushed through a flow,
  on data, with minibatches, a validation split, early stopping and (by default) the
  data's z-scoring folded into the returned flow.
- ``fit_reverse_kl``: reverse KL against an unnormalised log-density, with optional
  annealing and the sticking-the-landing gradient (Roeder et al. 2017, arXiv:1703.09194).
- ``evaluate``: ELBO, importance-weighted ELBO, PSIS k-hat and ESS of a guide.

Both fits work through the structural protocol ``pyroflows.protocols.TrainableFlow``
(``log_prob``, ``sample_and_log_prob``, ``fit_target``, ``standardizable``), which ``Flow``
and ``pyroflows.torch.snf.StochasticFlow`` implement; any other Pyro ``Transform`` is
wrapped by ``pyroflows.torch.density.as_trainable``. This module imports no flow class.

Both fits skip a step whose loss or gradient is NaN or inf and raise after
``max_bad_steps`` of them in a row. Options, splits, early stopping, the non-finite
guard and errors come from ``pyroflows.fitting`` and the diagnostics from
``pyroflows.diagnostics``, shared with the JAX backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights

from ..diagnostics import summarize_weights
from ..fitting import (
    MAX_BAD_STEPS,
    MLE_MAX_STEPS,
    MLE_PATIENCE,
    EarlyStopping,
    History,
    NonFiniteGuard,
    anneal_factor,
    batch_indices,
    check_context,
    check_context_sampler,
    check_context_shape,
    check_data,
    check_finite_loss,
    check_first_log_density,
    check_log_density,
    check_log_density_shape,
    checks_fit_options,
    chunk_sizes,
    progress_bar,
    split_indices,
    standardization,
)
from .density import as_trainable, dtype_and_device, log_prob_stop_gradient

__all__ = ["fit_mle", "fit_reverse_kl", "evaluate"]


def flow_log_prob(flow: Any, x: torch.Tensor) -> torch.Tensor:
    """``log q(x)`` of a flow: the protocol's ``log_prob`` (``pyroflows.protocols.TrainableFlow``).

    For a ``Flow`` (or any Pyro ``Transform``, through ``density.TransformFlow``) ``q`` is
    ``N(0, I)`` pushed forward through it, evaluated with one inverse pass; for a
    ``StochasticFlow`` it is a one-path estimate of a lower bound on ``log q(x)``.

    Args:
        flow: a ``TrainableFlow`` or a Pyro ``Transform`` on vectors.
        x: points of shape ``(..., dim)``.

    Returns:
        ``log q(x)``, shape ``(...)``.

    Example:
        >>> import pyroflows.torch as pf
        >>> _ = torch.manual_seed(0)
        >>> flow = pf.build_flow("realnvp", 2)  # starts at the identity: q = N(0, I)
        >>> round(flow_log_prob(flow, torch.zeros(1, 2)).item(), 4)
        -1.8379
    """
    return as_trainable(flow).log_prob(x)


def _log_prob(model, x, context=None):
    return model.log_prob(x) if context is None else model.log_prob(x, context)


@torch.no_grad()
def _mean_nll(model, x, context=None, chunk=8192):
    rows = [slice(i, i + chunk) for i in range(0, len(x), chunk)]
    total = sum(-_log_prob(model, x[r], None if context is None else context[r]).sum().item() for r in rows)
    return total / len(x)


def _grads_finite(params) -> bool:
    """Whether every gradient of ``params`` is finite (one device sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _step(optimizer, params, loss, value, guard, step, target_bad=0):
    """Backward and Adam step unless the loss (``value``) or a gradient is NaN or inf (then skipped).

    Returns the loss value when the step was taken, None when it was skipped.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_finite = math.isfinite(value)
    grads_finite = True
    if loss_finite:
        loss.backward()
        grads_finite = _grads_finite(params)
    if not guard.update(step, loss_finite, grads_finite, target_bad):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return value


@checks_fit_options
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
    patience: int | None = MLE_PATIENCE,
    standardize: bool = True,
    max_bad_steps: int = MAX_BAD_STEPS,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Any, History]:
    """Maximum likelihood of the flow's density ``q`` (``N(0, I)`` pushed through it) on ``data``.

    Adam on minibatches of ``batch_size`` training rows (drawn without replacement)
    minimises the mean of ``-flow.log_prob(x)``; a ``validation_fraction`` of the rows is
    held out, and every ``eval_every`` steps (and at the last) the mean validation NLL is
    recorded. Without a validation split the mean training loss since the last
    evaluation takes its place. The fit stops after ``patience`` evaluations (20 by
    default; ``None``: never) without a better monitored loss, or after ``num_steps``
    (default ``None``: up to ``pyroflows.fitting.MLE_MAX_STEPS`` = 20,000), and the
    weights with the best monitored loss are restored, so by default the validation
    plateau decides how long to train, as in sbi. ``seed`` fixes the split and the
    minibatches. An evaluation after which every step was skipped (see
    below) is not recorded: the weights did not change.

    With ``standardize=True`` (the default) and a flow whose ``standardizable`` is true,
    ``flow`` is trained on the z-scored data ``z = (x - mean) / sd`` (per column, mean and
    sd of the training rows; see ``pyroflows.fitting.standardization``), so data far
    outside a spline's bound or on any scale start near ``N(0, I)``; the fitted model is
    ``flow`` followed by the fixed layer ``pyroflows.torch.standardize.Standardize(mean,
    sd)``, whose density is that of the original data (``log q(x) = log q_flow(z) -
    sum(log sd)``). All recorded losses are NLLs of the original data. A ``flow`` that
    already ends in a ``Standardize`` layer (a fitted one) keeps it and its statistics; a
    ``StochasticFlow`` (``standardizable = False``) is never standardised: its blocks
    sample a target in the data's own coordinates, and its ``log_prob`` is the
    reverse-path lower bound.

    A conditional flow (``build_flow(..., context_dim=k)``) fits ``q(x | c)`` to pairs of
    rows of ``data`` and ``context``; with ``standardize=True`` its ``context_loc`` and
    ``context_scale`` are set to the mean and sd of the training contexts (unless set
    already), so the fitted flow takes contexts on their own scale, as sbi's density
    estimators do.

    A step whose loss or gradient is NaN or inf is skipped (no update;
    ``history.skipped_steps`` counts them); ``max_bad_steps`` consecutive ones raise a
    ValueError naming the likely cause (``pyroflows.fitting.NonFiniteGuard``).

    Density evaluation uses the flow's inverse, so prefer families whose inverse is one
    parallel pass (``maf``, couplings).

    Args:
        flow: a ``pyroflows.protocols.TrainableFlow`` that is a ``torch.nn.Module`` (a
            ``Flow`` from ``build_flow``, a ``StochasticFlow``) or any Pyro
            ``TransformModule`` on vectors (wrapped by ``density.as_trainable``); trained
            in place.
        data: array of shape ``(n, dim)``, ``n >= 2``, finite real numbers.
        context: for a conditional flow, its context for each data row, shape
            ``(n, context_dim)``; ``None`` otherwise.
        num_steps: the most Adam steps; None: ``MLE_MAX_STEPS``.
        batch_size: rows per minibatch.
        lr: Adam's learning rate.
        validation_fraction: share of the rows held out, in ``[0, 1)``.
        eval_every: steps between evaluations.
        patience: evaluations without improvement before stopping; None: never stop.
        standardize: fit on z-scored data and fold the z-scoring into the returned flow.
        max_bad_steps: consecutive non-finite steps that raise.
        seed: seeds the split and the minibatches.
        progress: show a progress bar.

    Returns:
        ``(fitted, history)``. ``fitted`` is ``flow`` itself when nothing is standardised
        (``standardize=False``, a ``StochasticFlow``, or ``flow`` already ends in a
        ``Standardize`` layer); otherwise a new ``Flow`` whose parts are ``flow``'s layers
        (shared, trained in place; ``flow`` itself models the z-scored data) followed by
        ``Standardize(mean, sd)``, with ``standardize=True`` added to the config. ``history``
        is a ``pyroflows.fitting.History`` (``step``, ``loss``: mean minibatch NLL of the steps
        taken since the last evaluation, ``validation_loss``, ``best_step``,
        ``stopped_early``, ``skipped_steps``).

    Raises:
        ValueError: bad options or data (``pyroflows.fitting``), or ``max_bad_steps``
            consecutive non-finite steps.

    Example:
        >>> import numpy as np
        >>> import pyroflows.torch as pf
        >>> _ = torch.manual_seed(0)
        >>> data = np.random.default_rng(0).normal(size=(100, 2))
        >>> flow = pf.build_flow("realnvp", 2, num_layers=1, hidden_dims=(8,))
        >>> fitted, history = fit_mle(flow, data, num_steps=4, eval_every=2, progress=False)
        >>> history.step, type(fitted.parts[-1]).__name__
        ([2, 4], 'Standardize')
    """
    from .standardize import Standardize, split_standardize, with_standardize

    model = as_trainable(flow)
    array = check_data(data, model.dim)
    contexts = check_context(context, getattr(model, "context_dim", 0), len(array))
    train_idx, val_idx = split_indices(len(array), validation_fraction, seed)
    inner, layer, offset = flow, None, 0.0
    dtype, device = dtype_and_device(model)
    c = None if contexts is None else torch.as_tensor(contexts, dtype=dtype, device=device)
    if c is not None and standardize and not (model.context_loc.any() or (model.context_scale != 1).any()):
        loc, scale = standardization(contexts[train_idx])
        model.context_loc.copy_(torch.as_tensor(loc))
        model.context_scale.copy_(torch.as_tensor(scale))
    if standardize and model.standardizable:
        inner, layer = split_standardize(flow)
        if layer is None:
            loc, scale = standardization(array[train_idx])
            layer = Standardize(
                torch.as_tensor(loc, dtype=dtype, device=device), torch.as_tensor(scale, dtype=dtype, device=device)
            )
        else:
            loc = layer.loc.detach().cpu().double().numpy()
            scale = layer.scale.detach().cpu().double().numpy()
        array = (array - loc) / scale
        offset = float(np.log(scale).sum())  # NLL(x) = NLL(z) + sum(log sd)
    trained = model if inner is flow else as_trainable(inner)
    x = torch.as_tensor(array, dtype=dtype, device=device)
    x_val = x[torch.as_tensor(val_idx)]
    c_val = None if c is None else c[torch.as_tensor(val_idx)]
    rng = np.random.default_rng(seed)
    params = list(trained.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    history, stopper, best_state = History(), EarlyStopping(patience), None
    guard = NonFiniteGuard("fit_mle", lr, history, max_bad_steps)
    running, count = 0.0, 0
    num_steps = MLE_MAX_STEPS if num_steps is None else num_steps
    with progress_bar(num_steps, "fit_mle", progress) as bar:
        for step in range(1, num_steps + 1):
            rows = torch.as_tensor(batch_indices(train_idx, batch_size, rng))
            loss = -_log_prob(trained, x[rows], None if c is None else c[rows]).mean()
            value = _step(optimizer, params, loss, loss.item(), guard, step)
            if value is not None:
                running, count = running + value, count + 1
            if step % eval_every and step != num_steps:
                continue
            bar.update(step - bar.n)
            if not count:  # every step since the last evaluation was skipped: the weights did not change
                continue
            train_loss = running / count + offset
            val_loss = None
            if len(val_idx):
                val_loss = _mean_nll(trained, x_val, c_val) + offset
                check_finite_loss(
                    val_loss,
                    step,
                    "fit_mle: the validation loss",
                    f"a held-out row has zero density under the flow although the training steps were finite: "
                    f"the weights diverged (try lr={lr / 10:g}) or the data are badly scaled (standardize=True)",
                )
            history.record(step, train_loss, val_loss)
            running, count = 0.0, 0
            monitored = train_loss if val_loss is None else val_loss
            bar.set_postfix(loss=monitored)
            if stopper.update(monitored, step):
                best_state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
            if stopper.should_stop:
                history.stopped_early = True
                break
    if best_state is not None:
        trained.load_state_dict(best_state)
    history.best_step = stopper.best_step
    if layer is None or inner is not flow:  # not standardised, or flow already ended in its Standardize layer
        return flow, history
    return with_standardize(flow, layer), history


@checks_fit_options
def fit_reverse_kl(
    flow: Any,
    log_density: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    num_steps: int = 1000,
    num_samples: int = 256,
    lr: float = 1e-3,
    anneal_steps: int = 0,
    stick_the_landing: bool = False,
    context_sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    max_bad_steps: int = MAX_BAD_STEPS,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Any, History]:
    """Fit the flow's density ``q`` to ``p ∝ exp(log_density)`` by reverse KL.

    Each Adam step draws ``num_samples`` points and their ``log q`` with the flow's
    ``sample_and_log_prob`` and minimises the Monte Carlo estimate of
    ``E_q[log q(x) - beta_t log p~(x)]``, ``beta_t = anneal_factor(t, anneal_steps)``
    rising linearly from ``1/anneal_steps`` to 1 (1 throughout when ``anneal_steps=0``).
    At ``beta = 1`` the loss is ``KL(q || p) - log Z``. ``p~`` is
    ``flow.fit_target(log_density, stick_the_landing)``: ``log_density`` itself for a
    ``Flow``. For a ``Flow`` the draws use its forward pass (one parallel pass for
    ``iaf``); ``stick_the_landing=True`` scores them with the parameters held fixed
    (``density.log_prob_stop_gradient``), which adds one inverse pass. ``seed`` seeds a
    private generator for the base noise.

    A conditional flow (``build_flow(..., context_dim=k)``) is fitted to a family of
    targets at once (amortised VI): each step draws ``c = context_sampler(num_samples,
    generator)``, shape ``(num_samples, k)``, one ``x ~ q(. | c_i)`` per context, and
    minimises the mean of ``log q(x | c) - beta_t log_density(x, c)``, i.e. the KL
    averaged over the contexts the sampler draws.

    A ``pyroflows.torch.snf.StochasticFlow`` trains on ``E[-log w]`` of its whole paths
    (``log q`` of the path, its blocks' ``dS`` included) against its own target
    (``log_density=None``; another target or ``stick_the_landing=True`` raise).

    A NaN or inf from ``log_density`` at the first step (before any update) raises at
    once: the target is broken. Later, a step whose loss or gradient is NaN or inf is
    skipped (no update, not recorded; ``history.skipped_steps`` counts it), and
    ``max_bad_steps`` consecutive ones raise a ValueError naming the likely cause (the
    target, or the learning rate).

    Args:
        flow: a ``pyroflows.protocols.TrainableFlow`` that is a ``torch.nn.Module`` (a
            ``Flow`` from ``build_flow``, a ``StochasticFlow``) or a Pyro
            ``TransformModule`` with ``dim``; trained in place.
        log_density: maps an ``(n, dim)`` tensor to shape ``(n,)``; ``None`` for a
            ``StochasticFlow`` (its own target); for a conditional flow a function of
            ``(x, context)``.
        num_steps: Adam steps.
        num_samples: draws per step.
        lr: Adam's learning rate.
        anneal_steps: steps of the linear ramp of ``beta`` (0: none).
        stick_the_landing: use the path-derivative gradient.
        context_sampler: for a conditional flow, draws ``num_samples`` contexts from the
            generator it is given (the one that draws the base noise).
        max_bad_steps: consecutive non-finite steps that raise.
        seed: seeds the base noise.
        progress: show a progress bar.

    Returns:
        ``(flow, history)``: the same ``flow``, trained, and a ``History`` with the loss of
        every step taken (skipped steps have no entry).

    Raises:
        ValueError: bad options, a ``log_density`` that is not a function or returns the
            wrong shape or NaN at the first step, a flow without ``dim``, or
            ``max_bad_steps`` consecutive non-finite steps.

    References:
        Roeder, Wu & Duvenaud 2017, "Sticking the landing: simple, lower-variance gradient
        estimators for variational inference", arXiv:1703.09194.

    Example:
        >>> import pyroflows.torch as pf
        >>> _ = torch.manual_seed(0)
        >>> flow = pf.build_flow("realnvp", 2, num_layers=1, hidden_dims=(8,))
        >>> def log_density(x):
        ...     return -0.5 * ((x - 1.0) ** 2).sum(-1)
        >>> flow, history = fit_reverse_kl(flow, log_density, num_steps=3, num_samples=16, progress=False)
        >>> history.step
        [1, 2, 3]
    """
    model = as_trainable(flow)
    log_density = model.fit_target(log_density, stick_the_landing)
    check_log_density(log_density)
    dim = model.dim
    if dim is None:
        raise ValueError("fit_reverse_kl: the flow needs a `dim` attribute; build it with build_flow")
    context_dim = getattr(model, "context_dim", 0)
    check_context_sampler(context_sampler, context_dim, stick_the_landing)
    dtype, device = dtype_and_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    history = History()
    guard = NonFiniteGuard("fit_reverse_kl", lr, history, max_bad_steps)
    last = math.nan
    with progress_bar(num_steps, "fit_reverse_kl", progress) as bar:
        for step in range(1, num_steps + 1):
            beta = anneal_factor(step - 1, anneal_steps)
            context = ()  # a conditional flow: one context per draw, passed to the flow and the target
            if context_sampler is not None:
                c = torch.as_tensor(context_sampler(num_samples, generator), dtype=dtype, device=device)
                check_context_shape(c.shape, num_samples, context_dim)
                context = (c,)
            x, log_q = model.sample_and_log_prob(num_samples, generator, *context)
            if stick_the_landing:
                log_q = log_prob_stop_gradient(model, x)
            log_p = log_density(x, *context)
            check_log_density_shape(log_p.shape, num_samples, dim)
            loss = (log_q - beta * log_p).mean()
            value, target_bad = loss.item(), 0
            if step == 1 or not math.isfinite(value):
                target_bad = int((~torch.isfinite(log_p.detach())).sum())
                if step == 1:
                    check_first_log_density(target_bad, num_samples, bool(torch.isnan(log_p.detach()).any()))
            value = _step(optimizer, params, loss, value, guard, step, target_bad)
            if value is not None:
                history.record(step, value)
                last = value
            if step % 50 == 0 or step == num_steps:
                bar.update(step - bar.n)
                bar.set_postfix(loss=last)
    history.best_step = num_steps
    return flow, history


def _max_plate_nesting(model, guide, args, kwargs):
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        -frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


@torch.no_grad()
@checks_fit_options
def evaluate(model: Callable, guide: Callable, *args: Any, num_samples: int = 1000, **kwargs: Any) -> dict:
    """Importance diagnostics of a fitted guide: ``log w = log p(x, z) - log q(z)``, ``z ~ q``.

    Draws ``num_samples`` from the guide in vectorised passes of at most
    ``pyroflows.fitting.EVAL_CHUNK`` (the model must broadcast over an extra leading batch
    dimension, as for vectorised ELBO particles) and summarises the log-weights with
    ``pyroflows.diagnostics.summarize_weights``. ``log q`` is whatever the guide's sample
    sites report: for ``AutoFlow`` the flow's exact density, for ``AutoSNF`` the
    log-density of the drawn path.

    Args:
        model: a Pyro model.
        guide: a Pyro guide for ``model`` (``AutoFlow``, ``AutoSNF``, any autoguide).
        *args: the model's and guide's positional arguments.
        num_samples: draws of the guide.
        **kwargs: the model's and guide's keyword arguments.

    Returns:
        A dict with ``elbo`` (mean of ``log w``), ``iwelbo`` (log mean exp), ``khat`` (PSIS),
        ``ess``, ``ess_fraction`` and ``num_samples``.

    References:
        Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto smoothed importance sampling",
        arXiv:1507.02646.

    Example:
        >>> import pyro
        >>> import pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal, init_to_mean
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> pyro.set_rng_seed(0)
        >>> guide = AutoNormal(model, init_loc_fn=init_to_mean, init_scale=1.0)  # q = p
        >>> out = evaluate(model, guide, num_samples=200)
        >>> out["num_samples"], round(out["elbo"], 6), round(out["ess_fraction"], 6)
        (200, 0.0, 1.0)
    """
    # One plain run sets up an autoguide's prototype outside the particle plate.
    with poutine.block():
        nesting = _max_plate_nesting(model, guide, args, kwargs)
    parts = []
    for size in chunk_sizes(num_samples):
        log_w, _, _ = vectorized_importance_weights(
            model, guide, *args, num_samples=size, max_plate_nesting=nesting, normalized=False, **kwargs
        )
        parts.append(log_w.detach().to("cpu", torch.float64).reshape(-1).numpy())
    return summarize_weights(np.concatenate(parts))
