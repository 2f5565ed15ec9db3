"""The ``pyroflows`` command: ``pyroflows demo`` (what ``make demo`` runs) and ``pyroflows flows``.

Example:
    >>> from pyroflows.cli import main
    >>> main(["flows", "--backend", "torch"])  # every family, one paragraph each
    bnaf (autoregressive): masked block-triangular monotone networks with a gated residual. ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _backend_module(backend):
    try:
        if backend == "torch":
            import pyroflows.torch as pf
        else:
            import pyroflows.jax as pf
    except ImportError as e:
        raise SystemExit(f"the {backend} backend is not installed ({e}); pip install 'pyroflows[{backend}]'") from None
    return pf


def _demo(args):
    pf = _backend_module(args.backend)
    if args.flow not in pf.available_flows():
        raise SystemExit(f"unknown flow {args.flow!r}; available: {', '.join(pf.available_flows())}")
    from .demo import run

    run(
        backend=args.backend,
        flow=args.flow,
        steps=args.steps,
        progress=not args.no_progress,
        out=None if args.no_plot else args.out,
    )


def _flows(args):
    from .registry import SPECS, describe

    pf = _backend_module(args.backend)
    for name in pf.available_flows():
        print(describe(name) if name in SPECS else f"{name}: registered by the user")
        print()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``pyroflows`` command line.

    ``pyroflows demo [--backend torch|jax] [--flow NAME] [--steps N] [--out PNG]
    [--no-plot] [--no-progress]`` fits ``AutoFlow`` and ``AutoNormal`` to Bayesian
    logistic regression and compares them with NUTS (``pyroflows.demo.run``);
    ``pyroflows flows [--backend torch|jax]`` describes every registered flow.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.

    Raises:
        SystemExit: bad arguments, an unknown flow, or a backend that is not installed
            (the message says what to install).

    Example:
        >>> main(["demo", "--flow", "no-such-flow"])
        Traceback (most recent call last):
        SystemExit: unknown flow 'no-such-flow'; available: ...
    """
    parser = argparse.ArgumentParser(prog="pyroflows", description="Normalizing flows for Pyro and NumPyro.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="fit AutoFlow and AutoNormal to Bayesian logistic regression; compare with NUTS",
        description="Fits AutoNormal and AutoFlow(FLOW) with SVI to Bayesian logistic regression on the "
        "breast-cancer data (shipped with the package), prints ELBO, k-hat and posterior-mean errors "
        "against a NUTS reference, and writes a PNG of the posterior (needs matplotlib; without it the "
        "demo says so and skips the figure).",
    )
    demo.add_argument("--backend", default="torch", choices=["torch", "jax"], help="Pyro (torch) or NumPyro (jax)")
    demo.add_argument("--flow", default="iaf", help="a registered flow name (default: iaf)")
    demo.add_argument("--steps", type=int, default=2000, help="SVI steps per guide (default: 2000)")
    demo.add_argument("--out", default="pyroflows_demo.png", help="where to write the figure")
    demo.add_argument("--no-plot", action="store_true", help="do not write the figure")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(func=_demo)
    flows = sub.add_parser("flows", help="list the registered flows with their papers and options")
    flows.add_argument("--backend", default="torch", choices=["torch", "jax"])
    flows.set_defaults(func=_flows)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
