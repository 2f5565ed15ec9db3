"""The demo job (``pyroflows demo``, what ``make demo`` runs), backend-neutral half.

Bayesian logistic regression on sklearn's breast-cancer data (569 x 30 standardised
features; 31 latents). The backend (``pyroflows.torch.demo`` or ``pyroflows.jax.demo``)
fits ``AutoNormal`` and ``AutoFlow`` with SVI and returns draws and importance
diagnostics; this module compares them with a NUTS reference shipped with the package
(``benchmarks/demo_reference.py`` made it), prints the table and draws the figure.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["reference", "summarize", "format_table", "plot", "run"]


def reference() -> dict:
    """The NUTS reference: ``draws`` (800, 31), ``mean``, ``sd``, ``rhat``, ``ess``, ``names``."""
    with resources.as_file(resources.files("pyroflows") / "reference" / "breast_cancer_nuts.npz") as path:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}


def summarize(fits, ref) -> list[dict]:
    """One row per fitted guide: ELBO, k-hat, and its posterior means against the reference."""
    rows = []
    for fit in fits:
        error = np.abs(fit["draws"].mean(0) - ref["mean"]) / ref["sd"]
        sd_ratio = fit["draws"].std(0) / ref["sd"]
        rows.append({
            "guide": fit["guide"], "elbo": fit["diag"]["elbo"], "iwelbo": fit["diag"]["iwelbo"],
            "khat": fit["diag"]["khat"], "max_mean_error": float(error.max()),
            "mean_error": float(error.mean()), "sd_ratio_min": float(sd_ratio.min()),
            "sd_ratio_max": float(sd_ratio.max()), "seconds": fit["seconds"],
        })
    return rows


def format_table(rows, backend: str, steps: int) -> str:
    out = [
        f"Bayesian logistic regression, breast-cancer data (569 x 30, 31 latents), {backend}, {steps} SVI steps.",
        "Errors are |posterior mean - NUTS mean| / NUTS sd over the 31 coordinates.",
        "",
        "| guide | ELBO | IW-ELBO | k-hat | mean error | max error | sd ratio range | fit (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['guide']} | {r['elbo']:.2f} | {r['iwelbo']:.2f} | {r['khat']:.2f} | {r['mean_error']:.3f} | "
            f"{r['max_mean_error']:.3f} | {r['sd_ratio_min']:.2f} - {r['sd_ratio_max']:.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(out)


def plot(fits, ref, path: Path) -> Path:
    """Each guide's draws of the two most correlated coefficients over the NUTS draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = np.corrcoef(ref["draws"].T)
    np.fill_diagonal(corr, 0)
    i, j = np.unravel_index(np.argmax(np.abs(corr)), corr.shape)
    names = [str(n) for n in ref["names"]]
    fig, axes = plt.subplots(1, len(fits), figsize=(4.2 * len(fits), 4), sharex=True, sharey=True)
    for ax, fit in zip(np.atleast_1d(axes), fits):
        ax.scatter(ref["draws"][:, i], ref["draws"][:, j], s=3, alpha=0.4, color="0.5", label="NUTS")
        d = fit["draws"][:800]
        ax.scatter(d[:, i], d[:, j], s=3, alpha=0.4, color="C1", label=fit["guide"])
        ax.set_title(f"{fit['guide']} (k-hat {fit['diag']['khat']:.2f})", fontsize=10)
        ax.set_xlabel(names[i])
        ax.legend(loc="upper right", fontsize=8, markerscale=3)
    np.atleast_1d(axes)[0].set_ylabel(names[j])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(backend="torch", flow="iaf", steps=2000, progress=True, out="pyroflows_demo.png", seed=0):
    """Fit, compare, print the table, write the figure; returns the rows."""
    if backend == "torch":
        from .torch.demo import fit_guides
    elif backend == "jax":
        from .jax.demo import fit_guides
    else:
        raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'jax'")
    fits = fit_guides(flow=flow, steps=steps, seed=seed, progress=progress)
    ref = reference()
    rows = summarize(fits, ref)
    print(format_table(rows, backend, steps))
    if out:
        print(f"\nwrote {plot(fits, ref, out)}")
    return rows
