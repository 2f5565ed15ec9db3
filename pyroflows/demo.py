"""The demo job (``pyroflows demo``, what ``make demo`` runs), backend-neutral half.

Bayesian logistic regression on the breast-cancer data (569 x 30 standardised
features; 31 latents). The backend (``pyroflows.torch.demo`` or ``pyroflows.jax.demo``)
fits ``AutoNormal`` and ``AutoFlow`` with SVI and returns draws and importance
diagnostics; this module compares them with a NUTS reference shipped with the package
(``benchmarks/demo_reference.py`` made it), prints the table and draws the figure.

The demo needs only a backend's extra (``pip install "pyroflows[torch]"`` or
``"pyroflows[jax]"``): the data ship with the package, and the figure needs matplotlib
(in ``pyroflows[all]``); without it the demo prints its table and a one-line note.

The data, ``pyroflows/reference/breast_cancer.npz``, are the Breast Cancer Wisconsin
(Diagnostic) data set (WDBC) of W. Wolberg, O. Mangasarian, N. Street and W. Street
(1995), UCI Machine Learning Repository, https://doi.org/10.24432/C5DW2B, licensed
CC BY 4.0, copied unchanged from scikit-learn's ``load_breast_cancer`` (the file's
``source`` entry says so too). ``write_breast_cancer`` rewrites the file from
scikit-learn.

Example:
    >>> from pyroflows.demo import breast_cancer, reference
    >>> x, y = breast_cancer()
    >>> x.shape, reference()["draws"].shape
    ((569, 30), (800, 31))
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["breast_cancer", "reference", "summarize", "format_table", "plot", "run", "write_breast_cancer"]

_DATA = "breast_cancer.npz"
_SOURCE = (
    "Breast Cancer Wisconsin (Diagnostic) data set (WDBC): W. Wolberg, O. Mangasarian, N. Street and "
    "W. Street (1995), UCI Machine Learning Repository, https://doi.org/10.24432/C5DW2B, licensed CC BY 4.0. "
    "Copied unchanged from scikit-learn's sklearn.datasets.load_breast_cancer (569 x 30 features as given; "
    "target 0 = malignant, 1 = benign)."
)


def _load_reference_file(name: str) -> dict:
    with resources.as_file(resources.files("pyroflows") / "reference" / name) as path:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """The demo's data: 569 x 30 standardised features and 0/1 labels (1 = benign), float64.

    Read from the copy shipped with the package (no scikit-learn needed); the same
    numbers as ``sklearn.datasets.load_breast_cancer``, each feature standardised to
    mean 0 and sd 1 (population sd) over the 569 cases.

    Returns:
        ``(x, y)``: features of shape ``(569, 30)`` and labels of shape ``(569,)``.

    Example:
        >>> x, y = breast_cancer()
        >>> x.shape, y.shape, sorted(set(y.tolist()))
        ((569, 30), (569,), [0.0, 1.0])
    """
    raw = _load_reference_file(_DATA)
    x = raw["data"].astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    return x, raw["target"].astype(np.float64)


def write_breast_cancer(path: str | Path) -> Path:
    """Write the demo's data file from scikit-learn (how ``reference/breast_cancer.npz`` was made).

    Args:
        path: where to write the ``.npz``.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = write_breast_cancer(pathlib.Path(tmp) / "bc.npz")
        ...     with np.load(path) as f:
        ...         print(f["data"].shape, f["target"].dtype)
        (569, 30) uint8
    """
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    np.savez_compressed(
        path,
        data=d.data,
        target=d.target.astype(np.uint8),
        feature_names=np.array(d.feature_names),
        target_names=np.array(d.target_names),
        source=np.array(_SOURCE),
    )
    return Path(path)


def reference() -> dict[str, np.ndarray]:
    """The NUTS reference: ``draws`` (800, 31), ``mean``, ``sd``, ``rhat``, ``ess``, ``names``.

    ``benchmarks/demo_reference.py`` made it; it ships with the package.

    Returns:
        The arrays by name; coordinate 0 is the intercept, 1 to 30 the coefficients.

    Example:
        >>> ref = reference()
        >>> ref["mean"].shape, str(ref["names"][0])
        ((31,), 'alpha')
    """
    return _load_reference_file("breast_cancer_nuts.npz")


def summarize(fits: list[dict[str, Any]], ref: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per fitted guide: ELBO, k-hat, and its posterior means against the reference.

    Args:
        fits: what a backend's ``fit_guides`` returns: per guide, its ``guide`` name,
            ``draws`` of shape ``(n, 31)``, ``diag`` (``elbo``, ``iwelbo``, ``khat``) and
            ``seconds``.
        ref: the NUTS reference (``reference()``).

    Returns:
        Per guide: ``guide``, ``elbo``, ``iwelbo``, ``khat``, ``mean_error`` and
        ``max_mean_error`` (``|mean - NUTS mean| / NUTS sd`` over the coordinates),
        ``sd_ratio_min`` and ``sd_ratio_max`` (sd over NUTS sd) and ``seconds``.

    Example:
        >>> ref = reference()
        >>> fit = {"guide": "800 NUTS draws", "draws": ref["draws"], "seconds": 0.0,
        ...        "diag": {"elbo": -80.0, "iwelbo": -79.0, "khat": 0.1}}
        >>> row = summarize([fit], ref)[0]  # the saved draws against the reference's moments
        >>> row["guide"], round(row["max_mean_error"], 2), round(row["sd_ratio_max"], 2)
        ('800 NUTS draws', 0.09, 1.03)
    """
    rows = []
    for fit in fits:
        error = np.abs(fit["draws"].mean(0) - ref["mean"]) / ref["sd"]
        sd_ratio = fit["draws"].std(0) / ref["sd"]
        rows.append(
            {
                "guide": fit["guide"],
                "elbo": fit["diag"]["elbo"],
                "iwelbo": fit["diag"]["iwelbo"],
                "khat": fit["diag"]["khat"],
                "max_mean_error": float(error.max()),
                "mean_error": float(error.mean()),
                "sd_ratio_min": float(sd_ratio.min()),
                "sd_ratio_max": float(sd_ratio.max()),
                "seconds": fit["seconds"],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], backend: str, steps: int) -> str:
    """The Markdown table the demo prints.

    Args:
        rows: ``summarize``'s rows.
        backend: ``"torch"`` or ``"jax"``, for the caption.
        steps: SVI steps per guide, for the caption.

    Returns:
        The caption and the table, one row per guide.

    Example:
        >>> row = {"guide": "AutoFlow iaf", "elbo": -58.2, "iwelbo": -56.8, "khat": 0.55, "mean_error": 0.12,
        ...        "max_mean_error": 0.41, "sd_ratio_min": 0.85, "sd_ratio_max": 1.23, "seconds": 2.0}
        >>> print(format_table([row], "torch", 2000).splitlines()[-1])
        | AutoFlow iaf | -58.20 | -56.80 | 0.55 | 0.120 | 0.410 | 0.85 - 1.23 | 2.0 |
    """
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


def plot(fits: list[dict[str, Any]], ref: dict[str, np.ndarray], path: str | Path) -> Path | None:
    """Each guide's draws of the two most correlated coefficients over the NUTS draws.

    Args:
        fits: as for ``summarize`` (``guide``, ``draws``, ``diag["khat"]`` are used).
        ref: the NUTS reference.
        path: where to write the PNG.

    Returns:
        The PNG's path, or ``None`` (after a one-line note) when matplotlib is not installed.

    Example:
        >>> import tempfile, pathlib
        >>> ref = reference()
        >>> fit = {"guide": "800 NUTS draws", "draws": ref["draws"], "diag": {"khat": 0.1}}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     written = plot([fit], ref, pathlib.Path(tmp) / "demo.png")
        ...     print(written is None or written.stat().st_size > 0)
        True
    """
    try:
        import matplotlib
    except ImportError:
        print(f"skipped the figure {path}: it needs matplotlib (pip install matplotlib, or 'pyroflows[all]')")
        return None

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


def run(
    backend: str = "torch",
    flow: str = "iaf",
    steps: int = 2000,
    progress: bool = True,
    out: str | Path | None = "pyroflows_demo.png",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Fit, compare, print the table, write the figure (unless ``out`` is None); returns the rows.

    What ``pyroflows demo`` (and ``make demo``) runs. The default 2000 steps take about a
    minute per guide on a laptop CPU.

    Args:
        backend: ``"torch"`` (Pyro) or ``"jax"`` (NumPyro).
        flow: the flow of ``AutoFlow``, a registered name.
        steps: SVI steps per guide.
        progress: show progress bars.
        out: where to write the figure, or ``None`` for none.
        seed: the seed of the fits.

    Returns:
        ``summarize``'s rows.

    Raises:
        ValueError: an unknown backend.

    Example:
        >>> rows = run("torch", steps=100, progress=False, out=None)  # doctest: +SKIP
        >>> run(backend="numpy")
        Traceback (most recent call last):
        ValueError: unknown backend 'numpy'; use 'torch' or 'jax'
    """
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
        print()
        written = plot(fits, ref, out)
        if written is not None:
            print(f"wrote {written}")
    return rows
