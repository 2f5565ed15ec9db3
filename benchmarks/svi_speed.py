"""SVI step time of flow guides against the frameworks' own, side by side in one process.

Bayesian logistic regression on sklearn's breast-cancer data (569 x 30, so 31 latent
dimensions), 8 particles, IAF with 2 layers of a MADE with hidden 64x64 (BNAF: 2
layers, hidden factors 8x8), float32, one thread. Contenders run in interleaved rounds
of ``--steps`` SVI steps after a warm-up; the table gives the median CPU time per step
(``time.process_time``) and the ratio to the framework's guide.

- torch: Pyro's AutoIAFNormal (Trace_ELBO; under JitTrace_ELBO it crashes, which the
  table records), AutoNormal for scale, pyroflows AutoFlow("iaf") with Trace_ELBO and
  JitTrace_ELBO. Goal: AutoFlow + JitTrace_ELBO at most 0.5x Pyro's AutoIAFNormal. Each
  runs under ``SVI`` with ``pyro.optim.Adam`` (one optimizer per parameter tensor), and the
  two IAF guides also in Pyro's torch-optimizer loop (``elbo(model, guide)`` and one
  ``torch.optim.Adam``), each loop row against Pyro's loop row.
- JAX: NumPyro's AutoIAFNormal and AutoBNAFNormal against AutoFlow("iaf") and
  AutoFlow("bnaf"), each ``svi.update`` jitted. Goal: no slower than NumPyro's.

    python benchmarks/svi_speed.py --backend both
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

from timing import median_times  # benchmarks/timing.py

RESULTS = Path(__file__).parent / "results"
HIDDEN, LAYERS, PARTICLES, BNAF_FACTORS = (64, 64), 2, 8, (8, 8)
LOOP = "torch.optim loop"


def torch_contenders(x_np, y_np):
    import pyro
    import torch
    from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
    from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

    import pyroflows.torch as pf
    from pyroflows.torch.demo import logistic_regression

    x, y = torch.as_tensor(x_np, dtype=torch.float32), torch.as_tensor(y_np, dtype=torch.float32)

    def make(guide_fn, elbo_cls, loop=False):
        """``loop``: Pyro's torch-optimizer pattern (``loss_fn = elbo(model, guide)``, one
        ``torch.optim.Adam`` over ``loss_fn.parameters()``) instead of ``SVI`` with
        ``pyro.optim.Adam``, which steps one optimizer per parameter tensor."""

        def build():
            pyro.set_rng_seed(0)
            guide = guide_fn()
            # contenders live side by side in one param store: a name of their own each
            guide._pyro_name = f"guide{next(ids)}"
            elbo = elbo_cls(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1)
            if not loop:
                svi = SVI(logistic_regression, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
                return lambda: svi.step(x, y)
            loss_fn = elbo(logistic_regression, guide)
            loss_fn(x, y)  # sets the guide up, so that its parameters exist
            optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)

            def step():
                optimizer.zero_grad()
                loss = loss_fn(x, y)
                loss.backward()
                optimizer.step()
                return loss.item()

            return step

        return build

    ids = itertools.count()

    iaf = lambda: AutoIAFNormal(logistic_regression, hidden_dim=list(HIDDEN), num_transforms=LAYERS)  # noqa: E731
    ours = lambda: pf.AutoFlow(logistic_regression, flow="iaf", num_layers=LAYERS, hidden_dims=HIDDEN)  # noqa: E731
    return {
        "Pyro AutoIAFNormal, Trace_ELBO": make(iaf, Trace_ELBO),
        "Pyro AutoIAFNormal, JitTrace_ELBO": make(iaf, JitTrace_ELBO),
        "Pyro AutoNormal, Trace_ELBO": make(lambda: AutoNormal(logistic_regression), Trace_ELBO),
        "pyroflows AutoFlow iaf, Trace_ELBO": make(ours, Trace_ELBO),
        "pyroflows AutoFlow iaf, JitTrace_ELBO": make(ours, JitTrace_ELBO),
        f"Pyro AutoIAFNormal, Trace_ELBO, {LOOP}": make(iaf, Trace_ELBO, loop=True),
        f"pyroflows AutoFlow iaf, JitTrace_ELBO, {LOOP}": make(ours, JitTrace_ELBO, loop=True),
    }


def jax_contenders(x_np, y_np):
    import jax
    import jax.numpy as jnp
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal

    import pyroflows.jax as pf
    from pyroflows.jax.demo import logistic_regression

    x, y = jnp.asarray(x_np, dtype=jnp.float32), jnp.asarray(y_np, dtype=jnp.float32)
    m = logistic_regression

    def make(guide_fn):
        def build():
            svi = SVI(m, guide_fn(), optax.adam(1e-3), Trace_ELBO(num_particles=PARTICLES))
            state = svi.init(jax.random.key(0), x, y)
            update = jax.jit(svi.update)
            holder = [state]

            def step():
                holder[0], loss = update(holder[0], x, y)
                return jax.block_until_ready(loss)

            return step

        return build

    return {
        "NumPyro AutoIAFNormal": make(lambda: AutoIAFNormal(m, num_flows=LAYERS, hidden_dims=list(HIDDEN))),
        "NumPyro AutoBNAFNormal": make(lambda: AutoBNAFNormal(m, num_flows=LAYERS, hidden_factors=list(BNAF_FACTORS))),
        "pyroflows AutoFlow iaf": make(lambda: pf.AutoFlow(m, flow="iaf", num_layers=LAYERS, hidden_dims=HIDDEN)),
        "pyroflows AutoFlow bnaf": make(
            lambda: pf.AutoFlow(m, flow="bnaf", num_layers=LAYERS, hidden_factors=BNAF_FACTORS)
        ),
    }


def measure(contenders, steps, rounds, warmup=20):
    steppers, times = {}, {}
    for name, build in contenders.items():
        try:
            step = build()
            for _ in range(warmup):
                step()
            steppers[name], times[name] = step, None
        except Exception as e:  # a contender that cannot run is a result too
            times[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:90]}"
    # CPU time of this one-thread process: on a shared machine wall-clock would charge each
    # contender for the other jobs' time slices
    times.update(median_times(steppers, rounds, inner=steps, clock=time.process_time))
    return times


def table(backend, results, peers):
    rows = []
    for name, t in results.items():
        if isinstance(t, str):
            rows.append(f"| {backend} | {name} | fails: {t} | |")
            continue
        ratio = " / ".join(f"{t / results[p]:.2f}" for p in peers if not isinstance(results.get(p), str))
        rows.append(f"| {backend} | {name} | {t * 1e3:.2f} | {ratio} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["torch", "jax", "both"], default="both")
    parser.add_argument("--steps", type=int, default=100, help="SVI steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "svi_speed.md"))
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    from pyroflows.data import breast_cancer

    x_np, y_np = breast_cancer()
    lines = [
        "# SVI step time: flow guides on Bayesian logistic regression (breast cancer, 31 latents)",
        "",
        f"{platform.machine()} CPU, 1 thread, float32, {PARTICLES} particles, IAF {LAYERS} layers hidden "
        f"{HIDDEN[0]}x{HIDDEN[1]}, BNAF {LAYERS} layers factors {BNAF_FACTORS[0]}x{BNAF_FACTORS[1]}; median CPU time over "
        f"{args.rounds} interleaved rounds of {args.steps} steps, in one process.",
        "",
        "| backend | guide | CPU ms / step | ratio to the framework's guide |",
        "| --- | --- | ---: | ---: |",
    ]
    if args.backend in ("torch", "both"):
        import torch

        torch.set_num_threads(1)
        contenders = torch_contenders(x_np, y_np)
        results = measure(contenders, args.steps, args.rounds)
        svi = table("torch", {k: v for k, v in results.items() if LOOP not in k}, ["Pyro AutoIAFNormal, Trace_ELBO"])
        loop = table(
            "torch", {k: v for k, v in results.items() if LOOP in k}, [f"Pyro AutoIAFNormal, Trace_ELBO, {LOOP}"]
        )
        lines += svi + loop
    if args.backend in ("jax", "both"):
        contenders = jax_contenders(x_np, y_np)
        results = measure(contenders, args.steps, args.rounds)
        iaf = table("jax", {k: v for k, v in results.items() if "bnaf" not in k.lower()}, ["NumPyro AutoIAFNormal"])
        bnaf = table("jax", {k: v for k, v in results.items() if "bnaf" in k.lower()}, ["NumPyro AutoBNAFNormal"])
        lines += iaf + bnaf
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
