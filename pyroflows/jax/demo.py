"""The demo job on NumPyro: ``AutoFlow`` against ``AutoNormal`` for Bayesian logistic regression.

``fit_guides`` does the array work; ``pyroflows.demo`` compares the results with NUTS.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from ..demo import breast_cancer
from .autoguide import AutoFlow
from .train import evaluate

__all__ = ["logistic_regression", "fit_guides"]


def logistic_regression(x: jax.Array, y: jax.Array | None = None) -> None:
    """Bayesian logistic regression: ``y ~ Bernoulli(logits = alpha + x @ beta)``.

    Priors ``alpha ~ N(0, 5)`` and ``beta ~ N(0, 1)`` per feature; a NumPyro model.

    Args:
        x: features, shape ``(n, d)``.
        y: 0/1 labels, shape ``(n,)``; None to sample them.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro import handlers
        >>> trace = handlers.trace(handlers.seed(logistic_regression, 0)).get_trace(jnp.zeros((4, 3)))
        >>> trace["beta"]["value"].shape, trace["y"]["value"].shape
        ((3,), (4,))
    """
    alpha = numpyro.sample("alpha", dist.Normal(jnp.zeros((), x.dtype), 5.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(x.shape[-1], x.dtype), 1.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        logits = alpha + x @ beta
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def fit_guides(
    flow: str = "iaf",
    steps: int = 2000,
    lr: float = 1e-2,
    particles: int = 8,
    seed: int = 0,
    progress: bool = True,
    num_draws: int = 2000,
) -> list[dict[str, Any]]:
    """Fit ``AutoNormal`` and ``AutoFlow(flow)`` to ``logistic_regression`` on the breast-cancer data.

    Each guide trains by SVI (Adam, ``Trace_ELBO``) and is then sampled and scored by
    ``evaluate``.

    Args:
        flow: the ``AutoFlow``'s registered flow name.
        steps: SVI steps per guide.
        lr: Adam's learning rate.
        particles: ELBO particles per step.
        seed: seeds SVI, the draws and the evaluation.
        progress: show SVI's progress bar.
        num_draws: posterior draws (and importance weights) per guide.

    Returns:
        One dict per guide: ``guide`` (its label), ``draws`` (``(num_draws, 31)``, alpha
        then beta, float64), ``diag`` (``evaluate``'s dict) and ``seconds`` (SVI's time).

    Example:
        Six compiled programs (two guides, each fitted, sampled and scored) take longer
        than a doctest should, so this one is not run:

        >>> fits = fit_guides(flow="householder", steps=2, particles=1, progress=False,
        ...                   num_draws=30)  # doctest: +SKIP
        >>> [(fit["guide"], fit["draws"].shape) for fit in fits]  # doctest: +SKIP
        [('AutoNormal', (30, 31)), ('AutoFlow householder', (30, 31))]
    """
    x, y = (jnp.asarray(a, dtype=jnp.float32) for a in breast_cancer())
    guides = {
        "AutoNormal": lambda: AutoNormal(logistic_regression),
        f"AutoFlow {flow}": lambda: AutoFlow(logistic_regression, flow=flow),
    }
    fits = []
    for label, make in guides.items():
        guide = make()
        svi = SVI(logistic_regression, guide, optax.adam(lr), Trace_ELBO(num_particles=particles))
        start = time.perf_counter()
        result = svi.run(jax.random.key(seed), steps, x, y, progress_bar=progress)
        jax.block_until_ready(result.params)
        seconds = time.perf_counter() - start
        predictive = Predictive(
            logistic_regression,
            guide=guide,
            params=result.params,
            num_samples=num_draws,
            return_sites=["alpha", "beta"],
        )
        s = predictive(jax.random.key(seed + 1), x)
        draws = np.concatenate(
            [np.asarray(s["alpha"]).reshape(num_draws, 1), np.asarray(s["beta"]).reshape(num_draws, -1)], -1
        )
        diag = evaluate(
            logistic_regression, guide, result.params, x, y, key=jax.random.key(seed + 2), num_samples=num_draws
        )
        fits.append({"guide": label, "draws": draws.astype(np.float64), "diag": diag, "seconds": seconds})
    return fits
