"""The demo job on NumPyro: a flow posterior for Bayesian logistic regression."""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

__all__ = ["logistic_regression"]


def logistic_regression(x, y=None):
    """y ~ Bernoulli(logits = alpha + x @ beta), alpha ~ N(0, 5), beta ~ N(0, 1) per feature."""
    alpha = numpyro.sample("alpha", dist.Normal(jnp.zeros((), x.dtype), 5.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(x.shape[-1], x.dtype), 1.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        logits = alpha + x @ beta
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)
