"""Flow guides against posteriordb's reference posteriors (where: ``posteriordb_models.ROOT``).

For each of the ten posteriors (models in ``posteriordb_models.py``, one code for Pyro
and NumPyro) and each guide, fit SVI, draw from the guide, and compare with the
reference draws (long Stan NUTS runs) in the constrained space:

- mean error: max over coordinates of |mean_q - mean_ref| / sd_ref;
- sd ratio: the coordinate whose sd_q / sd_ref is furthest from 1 (on the log scale);
- k-hat: PSIS k-hat of log p(x, z) - log q(z) over the guide's draws.

A guide passes on a model when mean error < 0.1, every sd ratio is within 10% and
k-hat < 0.7. Guides: AutoNormal, the frameworks' own flow guides (Pyro's AutoIAFNormal;
NumPyro's AutoIAFNormal and AutoBNAFNormal) and pyroflows' AutoFlow with iaf, realnvp,
nsf and bnaf (Laplace start), all at one recipe (``RECIPE``) per kind of guide, and
"AutoFlow (recipe)", the recipe of the first release, and "fit_posterior (defaults)",
``fit_posterior(model)`` with every default (what a user gets). Writes ``results/posteriordb.md``
(``--backend torch``: ``results/posteriordb_torch.md``).

    python benchmarks/posteriordb.py --backend jax
    python benchmarks/posteriordb.py --backend torch --guides "AutoFlow (recipe)" --posteriors kidiq-kidscore_momiq
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import posteriordb_models as pdb  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# One recipe per kind of guide. The flow guides share theirs (``init_scale`` applies to
# AutoFlow only); "AutoFlow (recipe)" is the default recipe under test: iaf, the Laplace
# start, and twice the steps. ``lr_final``: the learning rate decays exponentially from
# ``lr`` to it over the run.
RECIPE = {
    "gaussian": {"num_steps": 20_000, "lr": 1e-2, "lr_final": 1e-4, "num_particles": 8},
    "flow": {
        "num_steps": 20_000,
        "lr": 2e-3,
        "lr_final": 1e-4,
        "num_particles": 8,
        "hidden": (64, 64),
        "layers": 3,
        "init_scale": "laplace",
    },
}
RECIPE["recipe"] = {**RECIPE["flow"], "num_steps": 40_000, "flow": "iaf"}
NUM_DRAWS = 4000
DEFAULTS = "fit_posterior (defaults)"
FLOWS = ("iaf", "realnvp", "nsf", "bnaf")


def guide_makers(backend, recipe):
    r = recipe["flow"]
    flows = {f"AutoFlow {f}": ("flow", lambda m, f=f: _autoflow(backend, m, f, r)) for f in FLOWS}
    flows["AutoFlow (recipe)"] = ("recipe", lambda m: _autoflow(backend, m, recipe["recipe"]["flow"], recipe["recipe"]))
    # what a user gets: fit_posterior(model) with every default (no maker: it builds its own guide)
    flows[DEFAULTS] = ("defaults", None)
    if backend == "torch":
        from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

        return {
            "AutoNormal": ("gaussian", AutoNormal),
            "Pyro AutoIAFNormal": (
                "flow",
                lambda m: AutoIAFNormal(m, hidden_dim=list(r["hidden"]), num_transforms=r["layers"]),
            ),
            **flows,
        }
    from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal, AutoNormal

    return {
        "AutoNormal": ("gaussian", AutoNormal),
        "NumPyro AutoIAFNormal": (
            "flow",
            lambda m: AutoIAFNormal(m, num_flows=r["layers"], hidden_dims=list(r["hidden"])),
        ),
        "NumPyro AutoBNAFNormal": ("flow", lambda m: AutoBNAFNormal(m, num_flows=r["layers"], hidden_factors=[8, 8])),
        **flows,
    }


def _autoflow(backend, model, flow, r):
    if backend == "torch":
        import pyroflows.torch as pf
    else:
        import pyroflows.jax as pf
    hidden = None if flow == "bnaf" else r["hidden"]
    return pf.AutoFlow(
        model,
        flow=flow,
        num_layers=r["layers"],
        hidden_dims=hidden,
        init_scale=r.get("init_scale", 0.1),
        stick_the_landing=r.get("stick_the_landing", False),
    )


def fit_torch(model, guide, settings, seed, progress, sites):
    import pyro
    import torch
    from pyro.infer import SVI, Predictive, Trace_ELBO
    from pyro.infer.autoguide import AutoContinuous
    from tqdm.auto import tqdm

    import pyroflows.torch as pf

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    decay = (settings.get("lr_final", settings["lr"]) / settings["lr"]) ** (1 / settings["num_steps"])
    svi = SVI(
        model,
        guide,
        pyro.optim.ClippedAdam({"lr": settings["lr"], "lrd": decay, "clip_norm": 1e6}),
        Trace_ELBO(num_particles=settings["num_particles"], vectorize_particles=True),
    )
    for _ in tqdm(range(settings["num_steps"]), disable=not progress, leave=False):
        svi.step()
    with torch.no_grad():
        if isinstance(guide, AutoContinuous):
            draws = _continuous_guide_draws(model, guide, sites)
        else:
            draws = Predictive(model, guide=guide, num_samples=NUM_DRAWS, return_sites=sites, parallel=True)()
    diag = pf.evaluate(model, guide, num_samples=NUM_DRAWS)
    return {k: v.detach().double().numpy() for k, v in draws.items()}, diag


def _continuous_guide_draws(model, guide, sites):
    """The guide's draws of ``sites`` (deterministic ones included), from one vectorised run of
    the model conditioned on them. Pyro's ``Predictive`` first samples the prior to guess the
    plate nesting, which ``ImproperUniform`` (the posteriordb models' flat priors) cannot."""
    import pyro
    from pyro import poutine
    from torch.distributions import biject_to

    def constrained(latent):
        return {site["name"]: biject_to(site["fn"].support)(u) for site, u in guide._unpack_latent(latent)}

    latent = guide.get_posterior().sample((NUM_DRAWS,))
    single = poutine.trace(poutine.condition(model, constrained(latent[0]))).get_trace()
    nesting = max(
        [-f.dim for s in single.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized],
        default=0,
    )
    latent = latent.reshape((NUM_DRAWS,) + (1,) * nesting + latent.shape[-1:])
    with pyro.plate("_draws", NUM_DRAWS, dim=-(nesting + 1)):
        trace = poutine.trace(poutine.condition(model, constrained(latent))).get_trace()
    return {name: trace.nodes[name]["value"].reshape(NUM_DRAWS, -1) for name in sites}


def fit_jax(model, guide, settings, seed, progress, sites):
    import jax
    import optax
    from numpyro.infer import SVI, Predictive, Trace_ELBO

    import pyroflows.jax as pf

    lr = optax.exponential_decay(
        settings["lr"], settings["num_steps"], settings.get("lr_final", settings["lr"]) / settings["lr"]
    )
    svi = SVI(model, guide, optax.adam(lr), Trace_ELBO(num_particles=settings["num_particles"]))
    result = svi.run(jax.random.key(seed), settings["num_steps"], progress_bar=progress)
    draws = Predictive(model, guide=guide, params=result.params, num_samples=NUM_DRAWS, return_sites=sites)(
        jax.random.key(seed + 1)
    )
    diag = pf.evaluate(model, guide, result.params, key=jax.random.key(seed + 2), num_samples=NUM_DRAWS)
    return {k: np.asarray(v, dtype=float) for k, v in draws.items()}, diag


def fit_defaults(backend, model, seed, progress, sites, max_steps=None, overrides=None):
    """``fit_posterior(model)`` at its defaults (``max_steps`` only where a budget is set, and
    ``overrides`` only in trials of a new default), then the same draws as the other guides;
    the diagnostics are the report's own (k-hat from its default 20,000 draws)."""
    options = dict(overrides or {})
    if max_steps is not None:
        options["max_steps"] = max_steps
    if backend == "torch":
        import torch

        import pyroflows.torch as pf

        guide, report = pf.fit_posterior(model, progress=progress, seed=seed, **options)
        with torch.no_grad():
            draws = _continuous_guide_draws(model, guide, sites)
        draws = {k: v.detach().double().numpy() for k, v in draws.items()}
    else:
        import jax
        from numpyro.infer import Predictive

        import pyroflows.jax as pf

        guide, params, report = pf.fit_posterior(model, progress=progress, rng_key=jax.random.key(seed), **options)
        draws = Predictive(model, guide=guide, params=params, num_samples=NUM_DRAWS, return_sites=sites)(
            jax.random.key(seed + 1)
        )
        draws = {k: np.asarray(v, dtype=float) for k, v in draws.items()}
    print(
        f"  fit_posterior: {report['num_steps']} steps, stopped: {report['stopped']}, {report['start'][:100]}",
        flush=True,
    )
    return draws, report


def compare(name, draws, diag):
    ref = pdb.reference(name)
    errors, log_ratios = [], []
    for param, r in ref.items():
        q = draws[param].reshape(draws[param].shape[0], -1)
        errors.append(np.abs(q.mean(0) - r.mean(0)) / r.std(0))
        log_ratios.append(np.log(q.std(0) / r.std(0)))
    errors, log_ratios = np.concatenate(errors), np.concatenate(log_ratios)
    worst = log_ratios[np.argmax(np.abs(log_ratios))]
    out = {
        "mean_error": float(errors.max()),
        "sd_ratio": float(np.exp(worst)),
        "khat": diag["khat"],
        "elbo": diag["elbo"],
    }
    out["pass"] = out["mean_error"] < 0.1 and abs(out["sd_ratio"] - 1) <= 0.1 and out["khat"] < 0.7
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["torch", "jax"], default="jax")
    parser.add_argument("--posteriors", nargs="*", default=pdb.NAMES)
    parser.add_argument("--guides", nargs="*", default=None, help="guide names (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipes' step counts")
    parser.add_argument(
        "--flow-lr",
        type=float,
        nargs="+",
        default=None,
        metavar=("LR", "LR_FINAL"),
        help="override the flow recipe's learning rate (and its final value, decaying exponentially)",
    )
    parser.add_argument(
        "--init-scale", default=None, help="override the flow recipe's init_scale (a float or 'laplace')"
    )
    parser.add_argument(
        "--stl", choices=["yes", "no"], default=None, help="override the flow recipe's sticking-the-landing estimator"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a fit_posterior option for the defaults guide (a trial of a new default)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="fit_posterior's step budget (default: its own, 40,000)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--out", default=None, help="output markdown (default results/posteriordb.md, torch: posteriordb_torch.md)"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the rows of an existing output and replace only the (posterior, guide) pairs run now",
    )
    args = parser.parse_args()

    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={args.threads}"
    )
    recipe = {k: dict(v) for k, v in RECIPE.items()}
    if args.steps:
        for v in recipe.values():
            v["num_steps"] = args.steps
    if args.flow_lr:
        recipe["flow"]["lr"] = args.flow_lr[0]
        recipe["flow"]["lr_final"] = args.flow_lr[-1]
    if args.init_scale:
        recipe["flow"]["init_scale"] = args.init_scale if args.init_scale == "laplace" else float(args.init_scale)
    if args.stl:
        recipe["flow"]["stick_the_landing"] = args.stl == "yes"
    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
        torch.set_default_dtype(torch.float64)
        fit = fit_torch
    else:
        import jax

        jax.config.update("jax_enable_x64", True)
        fit = fit_jax
    makers = guide_makers(args.backend, recipe)
    chosen = args.guides or list(makers)
    rows = []
    for name in args.posteriors:
        model = pdb.model_for(name, args.backend)
        for guide_name in chosen:
            kind, make = makers[guide_name]
            start = time.perf_counter()
            try:
                sites = list(pdb.metadata(name)["dimensions"])
                if kind == "defaults":
                    draws, diag = fit_defaults(
                        args.backend,
                        model,
                        args.seed,
                        not args.no_progress,
                        sites,
                        args.max_steps,
                        dict(_parse_option(o) for o in args.option),
                    )
                else:
                    draws, diag = fit(model, make(model), recipe[kind], args.seed, not args.no_progress, sites)
                row = compare(name, draws, diag)
            except Exception as e:  # a guide that crashes is a result too
                traceback.print_exc()
                row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
            row.update(posterior=name, guide=guide_name, seconds=time.perf_counter() - start)
            rows.append(row)
            print(_format_row(row), flush=True)
    if args.update:
        rows = merge_rows(read_rows(output_path(args)), rows)
    write_table(rows, args, recipe)


def _parse_option(text):
    name, _, value = text.partition("=")
    try:
        return name, int(value)
    except ValueError:
        return name, float(value)


def output_path(args):
    return (
        Path(args.out)
        if args.out
        else RESULTS / ("posteriordb.md" if args.backend == "jax" else "posteriordb_torch.md")
    )


def read_rows(path):
    """The result rows of an earlier ``write_table`` output (empty if there is none)."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] in ("posterior", "---"):
            continue
        row = {"posterior": cells[0], "guide": cells[1]}
        if cells[2].startswith("error: "):
            row["error"] = cells[2][len("error: ") :]
        else:
            row.update(
                mean_error=float(cells[2]), sd_ratio=float(cells[3]), khat=float(cells[4]), seconds=float(cells[6])
            )
            row["pass"] = cells[5] == "yes"
        rows.append(row)
    return rows


def merge_rows(old, new):
    """``old`` with every (posterior, guide) pair that ``new`` also has replaced, in place."""
    fresh = {(r["posterior"], r["guide"]): r for r in new}
    merged = [fresh.pop((r["posterior"], r["guide"]), r) for r in old]
    return merged + list(fresh.values())


def _format_row(r):
    if "error" in r:
        return f"| {r['posterior']} | {r['guide']} | error: {r['error']} | | | | |"
    return (
        f"| {r['posterior']} | {r['guide']} | {r['mean_error']:.3f} | {r['sd_ratio']:.3f} | "
        f"{r['khat']:.2f} | {'yes' if r['pass'] else 'no'} | {r['seconds']:.0f} |"
    )


def write_table(rows, args, recipe):
    RESULTS.mkdir(exist_ok=True)
    out = output_path(args)
    lines = [
        f"# Flow guides on posteriordb reference posteriors ({args.backend})",
        "",
        f"Recipes: {recipe}; {NUM_DRAWS} guide draws per fit; seed {args.seed}; {args.threads} thread(s).",
        "Mean error: max over coordinates of |mean_q - mean_ref| / sd_ref. sd ratio: the coordinate",
        "furthest from 1. Pass: mean error < 0.1, sd ratio within 10%, k-hat < 0.7. The AutoFlow guides",
        "start at the Laplace approximation (init_scale='laplace'); the frameworks' guides have no such",
        "option. 'fit_posterior (defaults)' is fit_posterior(model) with no option (init_scale='auto',",
        "the plateau-stopped schedule); its k-hat is its report's, from the default 20,000 draws. Seconds:",
        "wall-clock per fit (SVI, draws, diagnostics) on a shared 2-core machine.",
        "",
        "| posterior | guide | mean error (sd) | sd ratio | k-hat | pass | seconds |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
        *[_format_row(r) for r in rows],
    ]
    passes = {}
    for r in rows:
        passes.setdefault(r["guide"], []).append(bool(r.get("pass")))
    lines += ["", "| guide | models passed |", "| --- | ---: |"]
    lines += [f"| {g} | {sum(p)} / {len(p)} |" for g, p in passes.items()]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
