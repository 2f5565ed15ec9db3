"""Do long fits stay finite? Every registered family, trained for many steps at a high
learning rate, on both backends (issue 17: no silent NaN).

For each (family, task, backend):

- ``reverse_kl``: ``fit_reverse_kl`` on the 2-D ``banana`` of ``pyroflows.toys``
  (log Z = log 4 pi), 256 draws per step. Reported: the mean loss of the last 100 steps
  taken, and ``KL = loss + log Z`` (the KL from the flow to the banana; 0 is a perfect fit).
- ``mle``: ``fit_mle`` on 10,000 draws of ``8gaussians`` (entropy 2.8313 nats), batch 256,
  10% held out, evaluated every 500 steps (``standardize=True``, the default). Reported:
  the best validation NLL and its gap to the entropy (the KL from the data to the flow,
  up to the validation sample's noise).

and, for both: whether every loss in the history is finite, the steps the non-finite
guard skipped (``history.skipped_steps``), the wall time and the time per 100 steps. A
fit that raises (after ``max_bad_steps`` consecutive non-finite steps) is recorded with
the first line of its error, and the sweep goes on.

Architectures are small, so a CPU sweep is feasible: each family's default number of
layers capped at 4, hidden layers 32x32 where the family has a conditioner network;
float32 (the default dtype of both backends), one torch thread, Adam at ``--lr``
(default 1e-2, high on purpose).

    python benchmarks/nan_sweep.py                       # 10,000 steps, every family, both backends
    python benchmarks/nan_sweep.py --steps 20 --families realnvp --backend both   # smoke test

Writes ``benchmarks/results/nan_sweep.md`` (rewritten after every fit, so an interrupted
sweep keeps what it finished). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np

from pyroflows import toys
from pyroflows.registry import SPECS

RESULTS = Path(__file__).parent / "results"
MAX_LAYERS, HIDDEN = 4, (32, 32)
NUM_SAMPLES, BATCH, NUM_DATA, EVAL_EVERY = 256, 256, 10_000, 500


def architecture(name: str) -> dict:
    """Small defaults: the family's layer count capped at MAX_LAYERS, HIDDEN where it has a network."""
    spec = SPECS[name]
    out = {"num_layers": min(spec.num_layers, MAX_LAYERS)}
    if spec.hidden_dims is not None:
        out["hidden_dims"] = HIDDEN
    return out


def describe(arch: dict) -> str:
    hidden = "x".join(map(str, arch["hidden_dims"])) if "hidden_dims" in arch else "-"
    return f"{arch['num_layers']} / {hidden}"


# --------------------------------------------------------------------------- backends
def build_torch(name, seed):
    import torch

    import pyroflows.torch as pf

    torch.manual_seed(seed)
    return pf, pf.build_flow(name, 2, **architecture(name))


def build_jax(name, seed):
    import jax

    import pyroflows.jax as pf

    return pf, pf.build_flow(name, 2, key=jax.random.key(seed), **architecture(name))


BUILDS = {"torch": build_torch, "jax": build_jax}


def fit(backend, name, task, steps, lr, seed):
    """The history of one fit: reverse KL to the banana, or maximum likelihood on 8 Gaussians."""
    pf, flow = BUILDS[backend](name, seed)
    if task == "reverse_kl":
        return pf.fit_reverse_kl(
            flow,
            toys.log_density("banana", backend),
            num_steps=steps,
            num_samples=NUM_SAMPLES,
            lr=lr,
            seed=seed,
            progress=False,
        )[1]
    data = toys.sample_dataset("8gaussians", NUM_DATA, seed=seed)
    return pf.fit_mle(
        flow,
        data,
        num_steps=steps,
        batch_size=BATCH,
        lr=lr,
        eval_every=min(EVAL_EVERY, steps),
        patience=None,  # every step: the sweep asks whether long runs stay finite
        seed=seed,
        progress=False,
    )[1]


def run_one(backend, name, task, steps, lr, seed) -> dict:
    row = {"backend": backend, "family": name, "task": task, "arch": describe(architecture(name))}
    start = time.perf_counter()
    try:
        history = fit(backend, name, task, steps, lr, seed)
    except Exception as e:  # noqa: BLE001 -- a failed fit is a result; the sweep goes on
        row.update(seconds=time.perf_counter() - start, status=f"{type(e).__name__}: {str(e).splitlines()[0]}")
        return row
    seconds = time.perf_counter() - start
    losses = list(history.loss) + list(history.validation_loss)
    row.update(
        seconds=seconds,
        status="ok",
        finite=bool(np.all(np.isfinite(losses))) if losses else False,
        skipped=history.skipped_steps,
        recorded=len(history.loss),
    )
    if task == "reverse_kl":
        final = float(np.mean(history.loss[-100:])) if history.loss else math.nan
        row.update(final=final, gap=final + toys.BANANA_LOG_Z)
    else:
        val = history.validation_loss or history.loss
        final = float(np.min(val)) if val else math.nan
        row.update(final=final, gap=final - toys.DATA_ENTROPY["8gaussians"])
    return row


# --------------------------------------------------------------------------- report
def fmt(value, spec=".3f"):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def write_report(rows, args, path):
    lines = [
        "# NaN sweep: long fits at a high learning rate",
        "",
        f"`python benchmarks/nan_sweep.py --backend {args.backend} --steps {args.steps} --lr {args.lr:g}"
        f" --seed {args.seed}" + (f" --families {' '.join(args.families)}" if args.families else "") + "`",
        "",
        f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}; float32, one torch "
        "thread; architectures: each family's default layer count capped at "
        f"{MAX_LAYERS}, hidden {'x'.join(map(str, HIDDEN))} where it has a network.",
        "",
        f"- `reverse_kl`: `fit_reverse_kl` on `banana` ({NUM_SAMPLES} draws per step); *final* is the mean loss of "
        f"the last 100 steps taken, *KL / gap* = final + log Z (log Z = log 4 pi = {toys.BANANA_LOG_Z:.4f}).",
        f"- `mle`: `fit_mle` on {NUM_DATA} draws of `8gaussians` (batch {BATCH}, 10% held out, evaluated every "
        f"{EVAL_EVERY} steps, standardised); *final* is the best validation NLL, *KL / gap* = final - entropy "
        f"({toys.DATA_ENTROPY['8gaussians']:.4f}).",
        "- *seconds* include JAX's compilation of each fit (a fixed cost of several seconds), not the imports.",
        "- *all finite*: every loss recorded in the history (training and validation) is finite; *skipped*: steps "
        "whose loss or gradient was NaN or inf (no update); a fit that raised after `max_bad_steps` consecutive "
        "such steps shows its error under *status*.",
        "",
        "| backend | family | task | layers / hidden | all finite | final | KL / gap | skipped | seconds "
        "| s / 100 steps | status |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        per100 = 100 * r["seconds"] / args.steps
        lines.append(
            f"| {r['backend']} | {r['family']} | {r['task']} | {r['arch']} | "
            f"{'yes' if r.get('finite') else ('no' if 'finite' in r else '-')} | {fmt(r.get('final'))} | "
            f"{fmt(r.get('gap'))} | {r.get('skipped', '-')} | {r['seconds']:.1f} | {per100:.2f} | "
            f"{r['status'].replace('|', '/')} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "jax", "both"], default="both")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=None, help="default: every family in available_flows()")
    parser.add_argument("--tasks", nargs="+", choices=["reverse_kl", "mle"], default=["reverse_kl", "mle"])
    parser.add_argument("--out", type=Path, default=RESULTS / "nan_sweep.md")
    args = parser.parse_args(argv)

    backends = ["torch", "jax"] if args.backend == "both" else [args.backend]
    # imported before any timing, so the first fit's seconds do not include them
    if "torch" in backends:
        import torch

        import pyroflows.torch  # noqa: F401

        torch.set_num_threads(1)
    if "jax" in backends:
        import pyroflows.jax  # noqa: F401
    families = args.families
    if families is None:
        if "torch" in backends:
            from pyroflows.torch import available_flows
        else:
            from pyroflows.jax import available_flows
        families = available_flows()
    rows = []
    for backend in backends:
        for name in families:
            for task in args.tasks:
                row = run_one(backend, name, task, args.steps, args.lr, args.seed)
                rows.append(row)
                write_report(rows, args, args.out)
                print(
                    f"{backend:5s} {name:15s} {task:10s} {row['seconds']:8.1f} s  finite={row.get('finite')} "
                    f"skipped={row.get('skipped')} final={fmt(row.get('final'))}  {row['status'][:100]}",
                    flush=True,
                )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
