"""``fit_posterior`` at its defaults on Neal's funnel in 10 dimensions (v ~ N(0, 3),
x_i | v ~ N(0, e^(v/2)), i = 1..9), both backends: the posterior has no mode, so
``init_scale="auto"`` falls back to its diagonal start. Goal (issue "trust by default"):
the guide's sd of v within 20% of the exact 3. Prints one line per backend.

    python benchmarks/funnel.py --backend jax
"""

from __future__ import annotations

import argparse

import numpy as np

NUM_DRAWS = 20_000


def sd_of_v(backend: str) -> tuple[np.ndarray, dict]:
    if backend == "jax":
        import jax
        import numpyro
        import numpyro.distributions as dist

        import pyroflows.jax as pj

        def model():
            v = numpyro.sample("v", dist.Normal(0.0, 3.0))
            with numpyro.plate("n", 9):
                numpyro.sample("x", dist.Normal(0.0, jax.numpy.exp(v / 2)))

        guide, params, report = pj.fit_posterior(model, progress=False)
        v = guide.sample_posterior(jax.random.key(1), params, sample_shape=(NUM_DRAWS,))["v"]
    else:
        import pyro
        import pyro.distributions as dist
        import torch

        import pyroflows.torch as pf

        torch.set_num_threads(1)

        def model():
            v = pyro.sample("v", dist.Normal(0.0, 3.0))
            with pyro.plate("n", 9):
                pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))

        guide, report = pf.fit_posterior(model, progress=False, seed=0)
        with torch.no_grad():
            v = guide.get_posterior().sample((NUM_DRAWS,))[:, 0]
    return np.asarray(v), report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["torch", "jax"], default="jax")
    args = parser.parse_args()
    v, report = sd_of_v(args.backend)
    print(
        f"| {args.backend} | {v.std():.3f} | {v.mean():.3f} | {report['khat']:.2f} | {report['elbo']:.3f} | "
        f"{report['num_steps']} ({report['stopped']}) | {report['start'].split(';')[0][:60]} |"
    )


if __name__ == "__main__":
    main()
