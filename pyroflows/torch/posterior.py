"""``fit_posterior``: a flow posterior for a Pyro model in one call, with its diagnostics."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer import Trace_ELBO

from .. import recipe as _recipe
from ..fitting import History, NonFiniteGuard, progress_bar
from .autoguide import AutoFlow
from .train import evaluate

__all__ = ["fit_posterior"]


def fit_posterior(
    model: Callable,
    *args: Any,
    flow: str = "iaf",
    num_steps: int | None = None,
    progress: bool = True,
    model_kwargs: dict | None = None,
    seed: int | None = None,
    **options: Any,
) -> tuple[AutoFlow, dict]:
    """Fit ``AutoFlow(model, flow=flow)`` by SVI with the benchmark-backed recipe.

    The guide starts at ``init_scale="auto"`` (the Laplace approximation where the model
    has a proper mode, else a diagonal start) and trains on ``Trace_ELBO`` with 16
    vectorised particles and Adam from ``lr=2e-3``. With ``num_steps=None`` the rate halves
    each time the ELBO stops improving (three windows of 1000 steps without beating the best
    window mean by two standard errors) and the fit stops when it would fall below
    ``lr_final=5e-5``, or after ``max_steps=40000``; a number of steps decays the rate
    exponentially to ``lr_final`` over exactly that many. The fit ends on the window-end
    iterate of the stationary tail with the lowest PSIS k-hat (``select=True``;
    ``Recipe.select``), and the report scores it on fresh draws. Steps with a NaN or inf
    loss or gradient are skipped (the weights stay as they were); 20 in a row raise a
    ValueError that names the likely cause.

    The guide's parameters live in Pyro's param store, as after ``SVI``; an earlier
    guide's parameters under the same name (``AutoFlow.*``) are replaced.

    Args:
        model: a Pyro model with continuous latent sites.
        *args: the model's positional arguments (its data).
        flow: a registered flow name.
        num_steps: a fixed number of steps, or None to stop on an ELBO plateau.
        progress: show a tqdm bar.
        model_kwargs: the model's keyword arguments.
        seed: seeds Pyro's global RNG first (``pyro.set_rng_seed``); None leaves it.
        **options: the recipe's settings (``lr``, ``lr_final``, ``num_particles``, ``window``,
            ``patience``, ``decay``, ``max_steps``, ``num_samples``, ``select``;
            ``pyroflows.recipe.Recipe``)
            and ``AutoFlow``'s keywords (``num_layers``, ``hidden_dims``, ``init_loc_fn``,
            ``init_scale``, ``stick_the_landing``, the flow's options).

    Returns:
        ``(guide, report)``: the trained ``AutoFlow`` and a dict with ``elbo``, ``iwelbo``,
        ``khat`` (PSIS; above 0.7 a ``UserWarning`` says what to try), ``ess``,
        ``ess_fraction``, ``seconds``, ``num_steps``, ``lr_final``, ``stopped``, ``start``,
        ``skipped_steps`` and ``tail_khats`` (the k-hat of each candidate of ``select``; empty
        when there was one, or with ``select=False``).

    Raises:
        ValueError: an unknown option, bad settings, or 20 consecutive non-finite steps.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.ones(4)  # the posterior of mu is N(0.8, 0.2)
        >>> guide, report = fit_posterior(model, y, num_steps=5, num_samples=200, progress=False, seed=0,
        ...                               num_layers=1, hidden_dims=(8,))
        >>> report["num_steps"], round(guide.median(y)["mu"].item(), 1)
        (5, 0.8)
    """
    kwargs = dict(model_kwargs or {})
    recipe, guide_options = _recipe.split_options(num_steps, options)
    guide = AutoFlow(model, flow=flow, **guide_options)
    began = time.perf_counter()
    if seed is not None:
        pyro.set_rng_seed(seed)
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith(f"{guide._pyro_name}.")]:
        del store[name]
    guide(*args, **kwargs)  # sets the guide up: the start (Laplace or diagonal) is chosen here
    elbo = Trace_ELBO(num_particles=recipe.num_particles, vectorize_particles=True)
    params = [p for p in guide.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=recipe.lr)
    schedule = _recipe.PlateauSchedule(recipe, num_steps)
    guard = NonFiniteGuard("fit_posterior", recipe.lr, History())
    loss_fn = _first_loss_fn(elbo, model, guide, args, kwargs, recipe)
    tail = _recipe.TailIterates(schedule)
    with progress_bar(schedule.total, "fit_posterior", progress) as bar:
        while (length := schedule.next_window()) > 0:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr
            guard.lr = schedule.lr
            losses = []
            for i in range(length):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn()
                loss.backward()
                value = loss.item()
                finite = math.isfinite(value)
                grads_ok = finite and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
                if guard.update(schedule.step + i + 1, finite, grads_ok):
                    optimizer.step()
                losses.append(value)
            schedule.update(losses)
            tail.add([p.detach().clone() for p in params], length)
            bar.update(length)
            bar.set_postfix(
                elbo=f"{-sum(v for v in losses if math.isfinite(v)) / max(len(losses), 1):.4g}", lr=f"{schedule.lr:.2g}"
            )
    khats = []
    with torch.no_grad():
        if recipe.select and len(tail.iterates) > 1:
            for iterate in tail.iterates:
                _assign(params, iterate)
                khats.append(float(evaluate(model, guide, *args, num_samples=recipe.num_samples, **kwargs)["khat"]))
            _assign(params, tail.iterates[_recipe.best_iterate(khats)])
        diagnostics = evaluate(model, guide, *args, num_samples=recipe.num_samples, **kwargs)
    report = _recipe.make_report(diagnostics, time.perf_counter() - began, schedule, guide.start.message)
    report.update(skipped_steps=guard.history.skipped_steps, tail_khats=khats)
    return guide, report


def _assign(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def _first_loss_fn(elbo, model, guide, args, kwargs, recipe):
    """The ELBO loss as a function of nothing; vectorised particles unless the model cannot
    broadcast over them, then a loop over particles (with a warning)."""

    def vectorised():
        return elbo.differentiable_loss(model, guide, *args, **kwargs)

    try:
        with torch.no_grad():
            vectorised()
        return vectorised
    except (ValueError, RuntimeError, NotImplementedError) as e:
        warnings.warn(
            f"fit_posterior: the model does not broadcast over vectorised ELBO particles ({str(e).splitlines()[0]}); "
            "using a loop over particles, which is slower",
            UserWarning,
            stacklevel=3,
        )
    looped = Trace_ELBO(num_particles=recipe.num_particles, vectorize_particles=False)
    return lambda: looped.differentiable_loss(model, guide, *args, **kwargs)
