"""Writes the NUTS reference posterior that ``pyroflows demo`` compares its guides with.

Bayesian logistic regression on the breast-cancer data (``pyroflows.jax.demo``'s model),
NumPyro NUTS, 4 chains of 2,000 draws after 1,000 warm-up steps, float64. Saves every
10th draw of each chain (800 draws) and the means and sds of all 8,000, with the largest
split R-hat and the smallest effective sample size, to
``pyroflows/reference/breast_cancer_nuts.npz``.

    python benchmarks/demo_reference.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "pyroflows" / "reference" / "breast_cancer_nuts.npz"


def main():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS

    from pyroflows.data import breast_cancer
    from pyroflows.jax.demo import logistic_regression

    x, y = breast_cancer()
    mcmc = MCMC(
        NUTS(logistic_regression),
        num_warmup=1000,
        num_samples=2000,
        num_chains=4,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(2026), jnp.asarray(x), jnp.asarray(y))
    s = mcmc.get_samples(group_by_chain=True)
    latent = np.concatenate([np.asarray(s["alpha"])[..., None], np.asarray(s["beta"])], -1)  # (4, 2000, 31)
    rhat = float(np.max(split_gelman_rubin(latent)))
    ess = float(np.min(effective_sample_size(latent)))
    flat = latent.reshape(-1, latent.shape[-1])
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(
        OUT,
        draws=latent[:, ::10].reshape(-1, latent.shape[-1]),
        mean=flat.mean(0),
        sd=flat.std(0),
        rhat=rhat,
        ess=ess,
        names=np.array(["alpha"] + [f"beta[{i}]" for i in range(30)]),
    )
    print(f"wrote {OUT}: max split R-hat {rhat:.4f}, min ESS {ess:.0f}")


if __name__ == "__main__":
    main()
