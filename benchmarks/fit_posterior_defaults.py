"""``fit_posterior`` at its defaults on Bayesian logistic regression (breast-cancer data, 31
latents), both backends, against the NUTS reference that ``pyroflows demo`` ships.

Goal (issue "trust by default"): mean error < 0.1 NUTS sd, median sd ratio within 10%,
k-hat < 0.7, on both backends. Writes ``results/fit_posterior_defaults.md``.

    python benchmarks/fit_posterior_defaults.py --backend both
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from pyroflows.demo import breast_cancer, reference

RESULTS = Path(__file__).parent / "results"
NUM_DRAWS = 4000


def draws_torch(seed):
    import pyro
    import torch
    from pyro import poutine

    import pyroflows.torch as pf
    from pyroflows.torch.demo import logistic_regression

    torch.set_num_threads(1)
    x, y = (torch.as_tensor(a, dtype=torch.float32) for a in breast_cancer())
    guide, report = pf.fit_posterior(logistic_regression, x, y, seed=seed, progress=False)
    with torch.no_grad(), pyro.plate("draws", NUM_DRAWS, dim=-2):
        trace = poutine.trace(guide).get_trace(x, y)
    s = {k: trace.nodes[k]["value"] for k in ("alpha", "beta")}
    return np.concatenate(
        [s["alpha"].reshape(NUM_DRAWS, 1).numpy(), s["beta"].reshape(NUM_DRAWS, -1).numpy()], -1
    ), report


def draws_jax(seed):
    import jax
    import jax.numpy as jnp

    import pyroflows.jax as pj
    from pyroflows.jax.demo import logistic_regression

    x, y = (jnp.asarray(a, dtype=jnp.float32) for a in breast_cancer())
    guide, params, report = pj.fit_posterior(logistic_regression, x, y, rng_key=jax.random.key(seed), progress=False)
    s = guide.sample_posterior(jax.random.key(seed + 1), params, sample_shape=(NUM_DRAWS,))
    return np.concatenate([np.asarray(s["alpha"]).reshape(NUM_DRAWS, 1), np.asarray(s["beta"])], -1), report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["torch", "jax", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    ref = reference()
    rows = []
    for backend in ["torch", "jax"] if args.backend == "both" else [args.backend]:
        draws, report = (draws_torch if backend == "torch" else draws_jax)(args.seed)
        error = np.abs(draws.mean(0) - ref["mean"]) / ref["sd"]
        ratio = draws.std(0) / ref["sd"]
        row = (
            f"| {backend} | {error.mean():.3f} | {error.max():.3f} | {np.median(ratio):.3f} | "
            f"{ratio.min():.2f} - {ratio.max():.2f} | {report['khat']:.2f} | {report['elbo']:.2f} | "
            f"{report['num_steps']} ({report['stopped']}) | {report['seconds']:.0f} |"
        )
        print(row, flush=True)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "fit_posterior_defaults.md"
    out.write_text(
        "\n".join(
            [
                "# fit_posterior at its defaults: Bayesian logistic regression, breast cancer (31 latents)",
                "",
                f"`fit_posterior(logistic_regression, x, y)` with no options (float32, seed {args.seed}); {NUM_DRAWS} guide",
                "draws against the NUTS reference. Errors: |mean_q - mean_NUTS| / sd_NUTS over the 31 coordinates.",
                "Goal: mean error < 0.1, median sd ratio within 10%, k-hat < 0.7. Seconds: wall clock on a shared",
                "2-core machine (not comparable across rows).",
                "",
                "| backend | mean error | max error | median sd ratio | sd ratio range | k-hat | ELBO | steps | seconds |",
                "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: |",
                *rows,
            ]
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
