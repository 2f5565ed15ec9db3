"""``fit_posterior``: a flow posterior for a NumPyro model in one call, with its diagnostics.

The recipe (learning rate, particles, windows, plateau schedule) is backend-neutral and
lives in ``pyroflows.recipe``; this module runs it with NumPyro's SVI, jitted in windows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO

from .. import recipe as _recipe
from ..fitting import History, NonFiniteGuard, progress_bar
from .autoguide import AutoFlow
from .train import _all_finite, evaluate

__all__ = ["fit_posterior"]


def fit_posterior(
    model: Callable,
    *args: Any,
    flow: str = "iaf",
    num_steps: int | None = None,
    progress: bool = True,
    model_kwargs: dict | None = None,
    rng_key: jax.Array | None = None,
    **options: Any,
) -> tuple[AutoFlow, dict, dict]:
    """Fit ``AutoFlow(model, flow=flow)`` by SVI with the benchmark-backed recipe.

    The guide starts at ``init_scale="auto"`` (the Laplace approximation where the model
    has a proper mode, else a diagonal start) and trains on ``Trace_ELBO`` with 16
    particles and Adam from ``lr=2e-3``, jitted in windows of 1000 steps (a ``lax.scan``).
    With ``num_steps=None`` the rate halves each time the ELBO stops improving (three
    windows in a row without beating the best window mean by two standard errors) and the
    fit stops when it would fall below ``lr_final=5e-5``, or after ``max_steps=40000``; a
    number of steps decays the rate exponentially to ``lr_final`` over exactly that many.
    The fit ends on the window-end iterate of the stationary tail with the lowest PSIS
    k-hat (``select=True``; ``Recipe.select``), and the report scores it on fresh draws.
    Steps with a NaN or inf loss or gradient leave the parameters and Adam's state as
    they were; 20 in a row raise a ValueError that names the likely cause.

    Args:
        model: a NumPyro model with continuous latent sites.
        *args: the model's positional arguments (its data).
        flow: a registered flow name.
        num_steps: a fixed number of steps, or None to stop on an ELBO plateau.
        progress: show a tqdm bar.
        model_kwargs: the model's keyword arguments.
        rng_key: the key of SVI's draws (default ``jax.random.key(0)``).
        **options: the recipe's settings (``lr``, ``lr_final``, ``num_particles``, ``window``,
            ``patience``, ``decay``, ``max_steps``, ``num_samples``, ``select``;
            ``pyroflows.recipe.Recipe``)
            and ``AutoFlow``'s keywords (``num_layers``, ``hidden_dims``, ``init_loc_fn``,
            ``init_scale``, ``stick_the_landing``, ``prefix``, ``key``, the flow's options).

    Returns:
        ``(guide, params, report)``: the trained ``AutoFlow``, its parameters (as
        ``svi.get_params`` gives them) and a dict with ``elbo``, ``iwelbo``, ``khat``
        (PSIS; above 0.7 a ``UserWarning`` says what to try), ``ess``, ``ess_fraction``,
        ``seconds``, ``num_steps``, ``lr_final``, ``stopped``, ``start``,
        ``skipped_steps`` and ``tail_khats`` (the k-hat of each candidate of ``select``; empty
        when there was one, or with ``select=False``).

    Raises:
        ValueError: bad recipe options, a model with discrete latent sites, or 20
            consecutive steps with a NaN or inf loss or gradient.

    References:
        Kucukelbir, Tran, Ranganath, Gelman & Blei 2017, "Automatic differentiation
        variational inference", arXiv:1603.00788 (the unconstrained space ``AutoFlow``
        works in).

    Example:
        Even a 5-step fit compiles four programs (the start, SVI's set-up, a window, the
        evaluation), more than a doctest should take, so the call is not run:

        >>> import numpyro, numpyro.distributions as dist
        >>> def model():
        ...     numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        >>> guide, params, report = fit_posterior(
        ...     model, flow="householder", num_steps=5, num_samples=50, progress=False)  # doctest: +SKIP
        >>> report["num_steps"], guide.median(params)["z"].shape  # doctest: +SKIP
        (5, (2,))
    """
    kwargs = dict(model_kwargs or {})
    recipe, guide_options = _recipe.split_options(num_steps, options)
    guide = AutoFlow(model, flow=flow, **guide_options)
    began = time.perf_counter()
    rng_key = jax.random.key(0) if rng_key is None else rng_key
    init_key, rng_key = jax.random.split(rng_key)
    elbo = Trace_ELBO(num_particles=recipe.num_particles)
    # SVI sets the guide up (the start is chosen here) and gives the parameters' initial values
    svi = SVI(model, guide, optax.adam(recipe.lr), elbo)
    params = svi.get_params(svi.init(init_key, *args, **kwargs))
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=recipe.lr)
    opt_state = optimizer.init(params)

    def loss_fn(p, key, args, kwargs):
        return elbo.loss(key, p, model, guide, *args, **kwargs)

    @jax.jit
    def window(params, opt_state, keys, active, args, kwargs):
        def body(carry, inputs):
            params, opt_state = carry
            key, on = inputs
            loss, grads = jax.value_and_grad(loss_fn)(params, key, args, kwargs)
            ok = _all_finite(loss, grads)
            updates, new_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            take = ok & on
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(take, a, b), new, old)  # noqa: E731
            return (keep(new_params, params), keep(new_state, opt_state)), (loss, ok)

        return jax.lax.scan(body, (params, opt_state), (keys, active))

    schedule = _recipe.PlateauSchedule(recipe, num_steps)
    guard = NonFiniteGuard("fit_posterior", recipe.lr, History())
    size = min(recipe.window, schedule.total)
    tail = _recipe.TailIterates(schedule)
    with progress_bar(schedule.total, "fit_posterior", progress) as bar:
        while (length := schedule.next_window()) > 0:
            opt_state.hyperparams["learning_rate"] = jnp.asarray(schedule.lr, dtype=jnp.result_type(float))
            guard.lr = schedule.lr
            rng_key, sub = jax.random.split(rng_key)
            keys = jax.random.split(sub, size)
            # a short last window is padded: one compiled program for every window
            active = jnp.arange(size) < length
            (params, opt_state), (losses, ok) = window(params, opt_state, keys, active, args, kwargs)
            losses, ok = np.asarray(losses)[:length], np.asarray(ok)[:length]
            for i in range(length):
                guard.update(schedule.step + i + 1, bool(np.isfinite(losses[i])), bool(ok[i]))
            schedule.update(losses)
            tail.add(params, length)
            bar.update(length)
            bar.set_postfix(
                elbo=f"{-np.nanmean(np.where(np.isfinite(losses), losses, np.nan)):.4g}", lr=f"{schedule.lr:.2g}"
            )
    khats = []
    if recipe.select and len(tail.iterates) > 1:
        rng_key, *keys = jax.random.split(rng_key, len(tail.iterates) + 1)
        khats = [
            float(evaluate(model, guide, p, *args, key=k, num_samples=recipe.num_samples, **kwargs)["khat"])
            for p, k in zip(tail.iterates, keys)
        ]
        params = tail.iterates[_recipe.best_iterate(khats)]
    rng_key, eval_key = jax.random.split(rng_key)
    diagnostics = evaluate(model, guide, params, *args, key=eval_key, num_samples=recipe.num_samples, **kwargs)
    report = _recipe.make_report(diagnostics, time.perf_counter() - began, schedule, guide.start.message)
    report.update(skipped_steps=guard.history.skipped_steps, tail_khats=khats)
    return guide, params, report
