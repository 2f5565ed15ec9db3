"""The ``pyroflows`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args):
    if args.backend != "torch":
        raise SystemExit(f"the demo runs on the torch backend for now (got --backend {args.backend})")
    from .torch import available_flows
    from .torch.demo import format_table, run_demo

    if args.flow not in available_flows():
        raise SystemExit(f"unknown flow {args.flow!r}; available: {', '.join(available_flows())}")
    rows = run_demo(flow=args.flow, steps=args.steps, progress=not args.no_progress)
    print(format_table(rows, args.steps))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pyroflows", description="Normalizing flows for Pyro and NumPyro.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit a flow posterior to a built-in Bayesian model and compare it to mean field")
    demo.add_argument("--backend", default="torch", choices=["torch", "jax"])
    demo.add_argument("--flow", default="iaf", help="a registered flow name (default: iaf)")
    demo.add_argument("--steps", type=int, default=2000)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
