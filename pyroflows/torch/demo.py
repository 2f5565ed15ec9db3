"""The demo job: a flow posterior for Bayesian logistic regression with Pyro SVI, against mean field."""

from __future__ import annotations

import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow
from pyro.optim import Adam
from tqdm.auto import tqdm

from ..data import breast_cancer
from .flows import build_flow

__all__ = ["logistic_regression", "run_demo"]


def logistic_regression(x, y=None):
    """y ~ Bernoulli(logits = alpha + x @ beta), alpha ~ N(0, 5), beta ~ N(0, 1) per feature."""
    alpha = pyro.sample("alpha", dist.Normal(x.new_zeros(()), 5.0))
    beta = pyro.sample("beta", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        # beta's batch shape ends in the data plate's slot (size 1), so broadcast over it.
        logits = alpha + (beta * x).sum(-1)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def _fit(guide, x, y, steps, lr, particles, progress, label):
    svi = SVI(logistic_regression, guide, Adam({"lr": lr}), Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1))
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=label, disable=not progress, leave=False)
    for step in bar:
        loss = svi.step(x, y)
        if step % 50 == 0:
            bar.set_postfix(elbo=f"{-loss:.1f}")
    return time.perf_counter() - start


def _elbo(guide, x, y, particles=1000, seed=1):
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        elbos = [-Trace_ELBO(num_particles=particles // 10, vectorize_particles=True, max_plate_nesting=1).loss(logistic_regression, guide, x, y)
                 for _ in range(10)]
    return float(np.mean(elbos)), float(np.std(elbos) / np.sqrt(len(elbos)))


def run_demo(flow="iaf", steps=2000, lr=1e-2, particles=8, seed=0, progress=True):
    """Fit a mean-field and a flow guide; return rows of (guide, ELBO, its standard error, seconds)."""
    torch.set_num_threads(1)
    x_np, y_np = breast_cancer()
    x, y = torch.as_tensor(x_np, dtype=torch.float32), torch.as_tensor(y_np, dtype=torch.float32)
    guides = {
        "AutoNormal (mean field)": lambda: AutoNormal(logistic_regression),
        f"pyroflows {flow!r}": lambda: AutoNormalizingFlow(logistic_regression, lambda dim: build_flow(flow, dim)),
    }
    rows = []
    for label, make in guides.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = make()
        seconds = _fit(guide, x, y, steps, lr, particles, progress, label)
        elbo, se = _elbo(guide, x, y)
        rows.append((label, elbo, se, seconds))
    return rows


def format_table(rows, steps):
    out = [f"Bayesian logistic regression, breast-cancer data (569 x 30), {steps} SVI steps", "",
           "| guide | ELBO | s.e. | fit time (s) |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {g} | {e:.2f} | {s:.2f} | {t:.1f} |" for g, e, s, t in rows]
    return "\n".join(out)
