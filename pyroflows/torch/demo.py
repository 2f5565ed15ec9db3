"""The demo job on Pyro: ``AutoFlow`` against ``AutoNormal`` for Bayesian logistic regression.

``fit_guides`` does the array work; ``pyroflows.demo`` compares the results with NUTS.
"""

from __future__ import annotations

import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam
from tqdm.auto import tqdm

from ..demo import breast_cancer
from .autoguide import AutoFlow
from .train import evaluate

__all__ = ["logistic_regression", "fit_guides"]


def logistic_regression(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Bayesian logistic regression: ``y ~ Bernoulli(logits = alpha + x @ beta)``.

    Priors ``alpha ~ N(0, 5)`` and ``beta ~ N(0, 1)`` per feature; the observations sit in
    a plate ``data`` (dim -1).

    Args:
        x: features, shape ``(n, num_features)``.
        y: 0/1 labels, shape ``(n,)``; ``None`` to sample them.

    Example:
        >>> from pyro import poutine
        >>> pyro.set_rng_seed(0)
        >>> trace = poutine.trace(logistic_regression).get_trace(torch.zeros(4, 3))
        >>> trace.nodes["beta"]["value"].shape, trace.nodes["y"]["value"].shape
        (torch.Size([3]), torch.Size([4]))
    """
    alpha = pyro.sample("alpha", dist.Normal(x.new_zeros(()), 5.0))
    beta = pyro.sample("beta", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        # beta's batch shape ends in the data plate's slot (size 1), so broadcast over it.
        logits = alpha + (beta * x).sum(-1)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def fit_guides(
    flow: str = "iaf",
    steps: int = 2000,
    lr: float = 1e-2,
    particles: int = 8,
    seed: int = 0,
    progress: bool = True,
    num_draws: int = 2000,
) -> list[dict]:
    """Fit ``AutoNormal`` and ``AutoFlow(flow)`` to ``logistic_regression`` on the breast-cancer data.

    Each guide trains by SVI (``Trace_ELBO`` with vectorised particles, Adam), then gives
    ``num_draws`` draws of the 31 latents (``alpha``, then ``beta``) and the importance
    diagnostics of ``pyroflows.torch.evaluate``. Sets torch to one thread.

    Args:
        flow: the registered flow name for ``AutoFlow``.
        steps: SVI steps per guide.
        lr: Adam's learning rate.
        particles: ELBO particles per step.
        seed: seeds Pyro's RNG before each guide.
        progress: show a progress bar.
        num_draws: draws per guide, at least 2 (25 for a k-hat).

    Returns:
        One dict per guide: ``guide`` (its label), ``draws`` (a float64 array
        ``(num_draws, 31)``), ``diag`` (``evaluate``'s dict) and ``seconds`` (SVI time).

    Example:
        >>> fits = fit_guides(steps=2, particles=1, progress=False, num_draws=30)
        >>> [fit["guide"] for fit in fits], fits[1]["draws"].shape
        (['AutoNormal', 'AutoFlow iaf'], (30, 31))
    """
    torch.set_num_threads(1)
    x, y = (torch.as_tensor(a, dtype=torch.float32) for a in breast_cancer())
    guides = {
        "AutoNormal": lambda: AutoNormal(logistic_regression),
        f"AutoFlow {flow}": lambda: AutoFlow(logistic_regression, flow=flow),
    }
    fits = []
    for label, make in guides.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = make()
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        svi = SVI(logistic_regression, guide, Adam({"lr": lr}), elbo)
        start = time.perf_counter()
        with tqdm(range(steps), desc=label, disable=not progress, leave=False) as bar:
            for step in bar:
                loss = svi.step(x, y)
                if step % 50 == 0:
                    bar.set_postfix(elbo=f"{-loss:.1f}")
        seconds = time.perf_counter() - start
        with torch.no_grad(), pyro.plate("draws", num_draws, dim=-2):
            # the guide alone, vectorised like ELBO particles (the model's plate is dim -1)
            trace = poutine.trace(guide).get_trace(x, y)
            s = {k: trace.nodes[k]["value"] for k in ("alpha", "beta")}
        draws = torch.cat([s["alpha"].reshape(num_draws, 1), s["beta"].reshape(num_draws, -1)], -1)
        diag = evaluate(logistic_regression, guide, x, y, num_samples=num_draws)
        fits.append({"guide": label, "draws": draws.double().numpy(), "diag": diag, "seconds": seconds})
    return fits
