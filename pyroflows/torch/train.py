"""Fitting flows without writing a loop, and judging a fitted guide.

- ``fit_mle``: maximum likelihood (forward KL) of ``N(0, I)`` pushed through a flow,
  on data, with minibatches, a validation split, early stopping and (by default) the
  data's z-scoring folded into the returned flow.
- ``fit_reverse_kl``: reverse KL against an unnormalised log-density, with optional
  annealing and the sticking-the-landing gradient (Roeder et al. 2017, arXiv:1703.09194).
- ``evaluate``: ELBO, importance-weighted ELBO, PSIS k-hat and ESS of a guide.

Both fits skip a step whose loss or gradient is NaN or inf and raise after
``max_bad_steps`` of them in a row. Options, splits, early stopping, the non-finite
guard and errors come from ``pyroflows.fitting`` and the diagnostics from
``pyroflows.diagnostics``, shared with the JAX backend.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights

from ..diagnostics import summarize_weights
from ..fitting import (
    MAX_BAD_STEPS, EarlyStopping, History, NonFiniteGuard, anneal_factor, batch_indices, check_data,
    check_finite_loss, check_first_log_density, check_fit_options, check_log_density, check_log_density_shape,
    progress_bar, split_indices, standardization,
)

__all__ = ["fit_mle", "fit_reverse_kl", "evaluate"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _std_normal_log_prob(u):
    return -0.5 * (u * u).sum(-1) - u.shape[-1] * _HALF_LOG_2PI


def _forward_and_ladj(flow, u):
    if hasattr(flow, "call_and_ladj"):
        return flow.call_and_ladj(u)
    x = flow(u)
    return x, flow.log_abs_det_jacobian(u, x)


def _inverse_and_ladj(flow, x):
    if hasattr(flow, "inverse_and_ladj"):
        return flow.inverse_and_ladj(x)
    u = flow.inv(x)
    return u, -flow.log_abs_det_jacobian(u, x)


def flow_log_prob(flow, x):
    """``log q(x)`` for ``q`` = ``N(0, I)`` pushed forward through ``flow`` (one inverse pass)."""
    from .snf import StochasticFlow

    if isinstance(flow, StochasticFlow):  # issue 6: a reverse-path lower bound (pyroflows.torch.snf)
        return flow.log_prob_lower_bound(x)
    u, ildj = _inverse_and_ladj(flow, x)
    return _std_normal_log_prob(u) + ildj


@contextlib.contextmanager
def _detached_parameters(module):
    """Inside the block every parameter of ``module`` reads as its detached value.

    Plain attribute swapping, not ``torch.func.functional_call``, which refuses to run
    under ``torch.jit.trace`` (``JitTrace_ELBO``).
    """
    saved = [(m, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None]
    try:
        for m, name, p in saved:
            m._parameters[name] = p.detach()
        yield
    finally:
        for m, name, p in saved:
            m._parameters[name] = p


def log_prob_stop_gradient(flow, x):
    """``log q(x)`` with the flow's parameters held fixed: gradients reach ``x`` only.

    The path-derivative estimator of Roeder, Wu & Duvenaud 2017 (arXiv:1703.09194)
    scores a reparametrised sample this way. ``x`` enters as a fresh view, so no layer
    cache hands back the forward pass (whose graph holds the live parameters).
    """
    with _detached_parameters(flow):
        return flow_log_prob(flow, x.view_as(x))


def _like(flow):
    p = next(iter(flow.parameters()), None)
    if p is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return p.dtype, p.device


@torch.no_grad()
def _mean_nll(flow, x, chunk=8192):
    total = sum(-flow_log_prob(flow, x[i : i + chunk]).sum().item() for i in range(0, len(x), chunk))
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


def fit_mle(
    flow,
    data,
    *,
    num_steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    validation_fraction: float = 0.1,
    eval_every: int = 50,
    patience: int | None = None,
    standardize: bool = True,
    max_bad_steps: int = MAX_BAD_STEPS,
    seed: int = 0,
    progress: bool = True,
):
    """Maximum likelihood of the density ``N(0, I)`` pushed through ``flow`` on ``data``.

    Adam on minibatches of ``batch_size`` training rows (drawn without replacement);
    a ``validation_fraction`` of the rows is held out, and every ``eval_every`` steps
    (and at the last) the mean validation NLL is recorded. Without a validation split
    the mean training loss since the last evaluation takes its place. ``patience``
    (in evaluations, ``None``: never) stops early; the weights with the best monitored
    loss are restored. ``seed`` fixes the split and the minibatches. An evaluation after
    which every step was skipped (see below) is not recorded: the weights did not change.

    With ``standardize=True`` (the default) ``flow`` is trained on the z-scored data
    ``z = (x - mean) / sd`` (per column, mean and sd of the training rows; see
    ``pyroflows.fitting.standardization``), so data far outside a spline's bound or on any
    scale start near ``N(0, I)``; the fitted model is ``flow`` followed by the fixed layer
    ``pyroflows.torch.standardize.Standardize(mean, sd)``, whose density is that of the
    original data (``log q(x) = log q_flow(z) - sum(log sd)``). All recorded losses are
    NLLs of the original data. A ``flow`` that already ends in a ``Standardize`` layer
    (a fitted one) keeps it and its statistics; a ``StochasticFlow`` is never standardised
    (its blocks sample a target in the data's own coordinates).

    A step whose loss or gradient is NaN or inf is skipped (no update;
    ``history.skipped_steps`` counts them); ``max_bad_steps`` consecutive ones raise a
    ValueError naming the likely cause (``pyroflows.fitting.NonFiniteGuard``).

    Density evaluation uses the flow's inverse, so prefer families whose inverse is one
    parallel pass (``maf``, couplings).

    Args:
        flow: a ``Flow`` from ``build_flow`` (or any flow with ``dim``); trained in place.
        data: array of shape ``(n, dim)``, ``n >= 2``, finite real numbers.
        num_steps: Adam steps.
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
    """
    check_fit_options(
        "fit_mle", num_steps=num_steps, batch_size=batch_size, lr=lr, validation_fraction=validation_fraction,
        eval_every=eval_every, patience=patience, standardize=standardize, max_bad_steps=max_bad_steps,
    )
    from .snf import StochasticFlow
    from .standardize import Standardize, split_standardize, with_standardize

    array = check_data(data, getattr(flow, "dim", None))
    train_idx, val_idx = split_indices(len(array), validation_fraction, seed)
    inner, layer, offset = flow, None, 0.0
    dtype, device = _like(flow)
    if standardize and not isinstance(flow, StochasticFlow):
        inner, layer = split_standardize(flow)
        if layer is None:
            loc, scale = standardization(array[train_idx])
            layer = Standardize(torch.as_tensor(loc, dtype=dtype, device=device),
                                torch.as_tensor(scale, dtype=dtype, device=device))
        else:
            loc = layer.loc.detach().cpu().double().numpy()
            scale = layer.scale.detach().cpu().double().numpy()
        array = (array - loc) / scale
        offset = float(np.log(scale).sum())  # NLL(x) = NLL(z) + sum(log sd)
    x = torch.as_tensor(array, dtype=dtype, device=device)
    x_val = x[torch.as_tensor(val_idx)]
    rng = np.random.default_rng(seed)
    params = list(inner.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    history, stopper, best_state = History(), EarlyStopping(patience), None
    guard = NonFiniteGuard("fit_mle", lr, history, max_bad_steps)
    running, count = 0.0, 0
    with progress_bar(num_steps, "fit_mle", progress) as bar:
        for step in range(1, num_steps + 1):
            batch = x[torch.as_tensor(batch_indices(train_idx, batch_size, rng))]
            loss = -flow_log_prob(inner, batch).mean()
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
                val_loss = _mean_nll(inner, x_val) + offset
                check_finite_loss(
                    val_loss, step, "fit_mle: the validation loss",
                    f"a held-out row has zero density under the flow although the training steps were finite: "
                    f"the weights diverged (try lr={lr / 10:g}) or the data are badly scaled (standardize=True)",
                )
            history.record(step, train_loss, val_loss)
            running, count = 0.0, 0
            monitored = train_loss if val_loss is None else val_loss
            bar.set_postfix(loss=monitored)
            if stopper.update(monitored, step):
                best_state = {k: v.detach().clone() for k, v in inner.state_dict().items()}
            if stopper.should_stop:
                history.stopped_early = True
                break
    if best_state is not None:
        inner.load_state_dict(best_state)
    history.best_step = stopper.best_step
    if layer is None or inner is not flow:  # not standardised, or flow already ended in its Standardize layer
        return flow, history
    return with_standardize(flow, layer), history


def fit_reverse_kl(
    flow,
    log_density=None,
    *,
    num_steps: int = 1000,
    num_samples: int = 256,
    lr: float = 1e-3,
    anneal_steps: int = 0,
    stick_the_landing: bool = False,
    max_bad_steps: int = MAX_BAD_STEPS,
    seed: int = 0,
    progress: bool = True,
):
    """Fit ``q`` = ``N(0, I)`` pushed through ``flow`` to ``p ∝ exp(log_density)`` by reverse KL.

    Each Adam step minimises the Monte Carlo estimate over ``num_samples`` draws of
    ``E_q[log q(x) - beta_t log_density(x)]``, ``beta_t = anneal_factor(t, anneal_steps)``
    rising linearly from ``1/anneal_steps`` to 1 (1 throughout when ``anneal_steps=0``).
    At ``beta = 1`` the loss is ``KL(q || p) - log Z``. Draws use the flow's forward pass
    (one parallel pass for ``iaf``); ``stick_the_landing=True`` scores them with the
    parameters held fixed (Roeder et al. 2017, arXiv:1703.09194), which adds one inverse
    pass. ``seed`` seeds a private generator for the base noise.

    A NaN or inf from ``log_density`` at the first step (before any update) raises at
    once: the target is broken. Later, a step whose loss or gradient is NaN or inf is
    skipped (no update, not recorded; ``history.skipped_steps`` counts it), and
    ``max_bad_steps`` consecutive ones raise a ValueError naming the likely cause (the
    target, or the learning rate).

    A ``pyroflows.torch.snf.StochasticFlow`` trains on ``E[-log w]`` of its whole paths
    against its own target (``log_density=None``).

    Args:
        flow: a flow with ``dim`` (from ``build_flow``) or a ``StochasticFlow``; trained in place.
        log_density: maps an ``(n, dim)`` tensor to shape ``(n,)``.
        num_steps: Adam steps.
        num_samples: draws per step.
        lr: Adam's learning rate.
        anneal_steps: steps of the linear ramp of ``beta`` (0: none).
        stick_the_landing: use the path-derivative gradient.
        max_bad_steps: consecutive non-finite steps that raise.
        seed: seeds the base noise.
        progress: show a progress bar.

    Returns:
        ``(flow, history)``: the same ``flow``, trained, and a ``History`` with the loss of
        every step taken (skipped steps have no entry).
    """
    check_fit_options(
        "fit_reverse_kl", num_steps=num_steps, num_samples=num_samples, lr=lr, anneal_steps=anneal_steps,
        max_bad_steps=max_bad_steps,
    )
    from ..snf import snf_fit_target
    from .snf import StochasticFlow

    snf = isinstance(flow, StochasticFlow)  # issue 6: stochastic normalizing flows
    if snf:
        log_density = snf_fit_target(flow.target_log_density, log_density, stick_the_landing)
    check_log_density(log_density)
    dim = getattr(flow, "dim", None)
    if dim is None:
        raise ValueError("fit_reverse_kl: the flow needs a `dim` attribute; build it with build_flow")
    dtype, device = _like(flow)
    generator = torch.Generator(device=device).manual_seed(seed)
    params = list(flow.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    history = History()
    guard = NonFiniteGuard("fit_reverse_kl", lr, history, max_bad_steps)
    last = math.nan
    with progress_bar(num_steps, "fit_reverse_kl", progress) as bar:
        for step in range(1, num_steps + 1):
            beta = anneal_factor(step - 1, anneal_steps)
            if snf:  # issue 6: log q of the whole path, dS of its blocks included
                x, log_q = flow.sample_path(num_samples, generator)
            else:
                u = torch.randn(num_samples, dim, generator=generator, dtype=dtype, device=device)
                x, ladj = _forward_and_ladj(flow, u)
                log_q = log_prob_stop_gradient(flow, x) if stick_the_landing else _std_normal_log_prob(u) - ladj
            log_p = log_density(x)
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
def evaluate(model, guide, *args, num_samples=1000, **kwargs):
    """Importance diagnostics of a fitted guide: ``log w = log p(x, z) - log q(z)``, ``z ~ q``.

    Draws ``num_samples`` from the guide in one vectorised pass (the model must
    broadcast over an extra leading batch dimension, as for vectorised ELBO
    particles) and returns ``pyroflows.diagnostics.summarize_weights``: ``elbo`` (mean
    of log w), ``iwelbo`` (log mean exp), ``khat`` (PSIS, Vehtari et al.,
    arXiv:1507.02646), ``ess``, ``ess_fraction`` and ``num_samples``.
    """
    check_fit_options("evaluate", num_samples=num_samples)
    # One plain run sets up an autoguide's prototype outside the particle plate.
    with poutine.block():
        nesting = _max_plate_nesting(model, guide, args, kwargs)
    log_w, _, _ = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=nesting, normalized=False, **kwargs
    )
    log_w = log_w.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return summarize_weights(log_w)

