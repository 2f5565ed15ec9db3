"""FFJORD and residual flows: maximum likelihood on 2-D toys at equal wall-clock, and the
bias and spread of their stochastic log-det estimators.

1. Fit, on 8gaussians and checkerboard (``pyroflows.toys``), each contender for the same
   budget of CPU seconds (``time.process_time``; one thread, so on an idle machine this is
   wall-clock, and on a shared one it still gives each contender the same compute) (Adam,
   lr 1e-3, batch 256, float32):
   pyroflows ``ffjord`` (Hutchinson estimator, rk4), pyroflows ``residual`` (Russian
   roulette estimator), and zuko's CNF (exact trace, adaptive dopri5) as the peer.
   Report the test NLL minus the data entropy (2.8313 and log 32 = 3.4657 nats), i.e. the
   KL from the data to the model, scored with the exact log-det.
2. For each stochastic estimator, on the trained flows: the bias of log q(x) against the
   exact value (mean over 64 draws per point, averaged over 256 test points, with its
   standard error) and the spread (sd over draws).

    python benchmarks/unbiased.py --budget 300
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def _density(flow):
    import pyro.distributions as dist

    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    return lambda x: dist.TransformedDistribution(base, [flow]).log_prob(x)


def pyroflows_contender(name, **options):
    import pyroflows.torch as pf

    def make():
        flow = pf.build_flow(name, 2, **options)

        def exact_log_prob():
            exact = pf.build_flow(name, 2, **{**options, "estimator": "exact"})
            exact.load_state_dict(flow.state_dict())
            return _density(exact)

        return flow, _density(flow), exact_log_prob

    return make


def zuko_cnf():
    import zuko

    flow = zuko.flows.CNF(2, hidden_features=(64, 64))
    log_prob = lambda x: flow().log_prob(x)  # noqa: E731
    return flow, log_prob, lambda: log_prob


CONTENDERS = {
    "pyroflows ffjord (hutchinson, rk4 x8)": pyroflows_contender("ffjord"),
    "pyroflows residual (roulette)": pyroflows_contender("residual"),
    "zuko CNF (exact trace, dopri5)": zuko_cnf,
}
ESTIMATORS = {
    "ffjord hutchinson, gaussian": ("pyroflows ffjord (hutchinson, rk4 x8)", {"noise": "gaussian"}),
    "ffjord hutchinson, rademacher": ("pyroflows ffjord (hutchinson, rk4 x8)", {"noise": "rademacher"}),
    "residual roulette": ("pyroflows residual (roulette)", {"estimator": "roulette"}),
    "residual truncated": ("pyroflows residual (roulette)", {"estimator": "truncated"}),
}


def train(make, data, budget, seed):
    torch.manual_seed(seed)
    flow, log_prob, exact = make()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    steps, start = 0, time.process_time()
    while time.process_time() - start < budget:
        batch = data[rng.integers(0, len(data), 256)]
        loss = -log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return flow, exact, steps


@torch.no_grad()
def test_nll(log_prob, test):
    return float(-torch.cat([log_prob(chunk) for chunk in test.split(1024)]).mean())


@torch.no_grad()
def estimator_stats(flow, name, options, test, draws=64):
    import pyroflows.torch as pf

    config = {k: v for k, v in flow.config.items() if k not in ("name", "dim")}
    exact_flow = pf.build_flow(name, 2, **{**config, "estimator": "exact"})
    exact_flow.load_state_dict(flow.state_dict())
    noisy = pf.build_flow(name, 2, **{**config, **options})
    noisy.load_state_dict(flow.state_dict())
    exact = _density(exact_flow)(test)
    # a fresh tensor per draw: the layers' cache would hand back the previous estimate
    estimates = torch.stack([_density(noisy)(test.clone()) for _ in range(draws)])  # (draws, points)
    per_point_bias = estimates.mean(0) - exact
    return (
        float(per_point_bias.mean()),
        float(per_point_bias.std() / math.sqrt(len(test))),
        float(estimates.std(0).mean()),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="training CPU seconds per contender and data set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "unbiased.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from pyroflows import toys

    lines = [
        "# FFJORD and residual flows: maximum likelihood at equal compute, and estimator bias",
        "",
        f"{platform.machine()} CPU, 1 thread, float32; {args.budget:.0f} CPU seconds (process time) of training per "
        "contender and data set "
        "(Adam 1e-3, batch 256, 20k training points); test NLL on 20k points with the exact log-det, minus the "
        "data entropy (the KL from data to model, nats; lower is better).",
        "",
        "| data | flow | steps in budget | test NLL - entropy |",
        "| --- | --- | ---: | ---: |",
    ]
    trained = {}
    for data_name in ("8gaussians", "checkerboard"):
        data = torch.as_tensor(toys.sample_dataset(data_name, 20_000, seed=args.seed), dtype=torch.float32)
        test = torch.as_tensor(toys.sample_dataset(data_name, 20_000, seed=args.seed + 100), dtype=torch.float32)
        for label, make in CONTENDERS.items():
            try:
                flow, exact, steps = train(make, data, args.budget, args.seed)
                kl = test_nll(exact(), test) - toys.DATA_ENTROPY[data_name]
                trained[(data_name, label)] = (flow, test)
                lines.append(f"| {data_name} | {label} | {steps} | {kl:.3f} |")
            except Exception as e:  # a contender that fails is a result too
                lines.append(f"| {data_name} | {label} | fails: {type(e).__name__}: {str(e)[:80]} | |")
            print(lines[-1], flush=True)
    lines += [
        "",
        "Estimator bias and spread on the trained flows (64 draws at each of 256 test points; bias = mean estimate",
        "minus the exact log q(x), averaged over points, with its standard error; sd = spread over draws):",
        "",
        "| data | estimator | bias (nats) | s.e. | sd per draw |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for data_name in ("8gaussians", "checkerboard"):
        for label, (contender, options) in ESTIMATORS.items():
            if (data_name, contender) not in trained:
                continue
            flow, test = trained[(data_name, contender)]
            name = "ffjord" if "ffjord" in label else "residual"
            try:
                bias, se, sd = estimator_stats(flow, name, options, test[:256])
                lines.append(f"| {data_name} | {label} | {bias:+.4f} | {se:.4f} | {sd:.4f} |")
            except Exception as e:
                lines.append(f"| {data_name} | {label} | fails: {type(e).__name__}: {str(e)[:80]} | | |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
