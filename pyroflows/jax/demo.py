"""The demo job on NumPyro: ``AutoFlow`` against ``AutoNormal`` for Bayesian logistic regression.

``fit_guides`` does the array work; ``pyroflows.demo`` compares the results with NUTS.
"""

from __future__ import annotations

import time

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


def logistic_regression(x, y=None):
    """y ~ Bernoulli(logits = alpha + x @ beta), alpha ~ N(0, 5), beta ~ N(0, 1) per feature."""
    alpha = numpyro.sample("alpha", dist.Normal(jnp.zeros((), x.dtype), 5.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(x.shape[-1], x.dtype), 1.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        logits = alpha + x @ beta
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def fit_guides(flow="iaf", steps=2000, lr=1e-2, particles=8, seed=0, progress=True, num_draws=2000):
    """Fit ``AutoNormal`` and ``AutoFlow(flow)``; per guide its draws (num_draws, 31), diagnostics, time."""
    x, y = (jnp.asarray(a, dtype=jnp.float32) for a in breast_cancer())
    guides = {"AutoNormal": lambda: AutoNormal(logistic_regression),
              f"AutoFlow {flow}": lambda: AutoFlow(logistic_regression, flow=flow)}
    fits = []
    for label, make in guides.items():
        guide = make()
        svi = SVI(logistic_regression, guide, optax.adam(lr), Trace_ELBO(num_particles=particles))
        start = time.perf_counter()
        result = svi.run(jax.random.key(seed), steps, x, y, progress_bar=progress)
        jax.block_until_ready(result.params)
        seconds = time.perf_counter() - start
        predictive = Predictive(logistic_regression, guide=guide, params=result.params, num_samples=num_draws,
                                return_sites=["alpha", "beta"])
        s = predictive(jax.random.key(seed + 1), x)
        draws = np.concatenate([np.asarray(s["alpha"]).reshape(num_draws, 1),
                                np.asarray(s["beta"]).reshape(num_draws, -1)], -1)
        diag = evaluate(logistic_regression, guide, result.params, x, y, key=jax.random.key(seed + 2),
                        num_samples=num_draws)
        fits.append({"guide": label, "draws": draws.astype(np.float64), "diag": diag, "seconds": seconds})
    return fits
