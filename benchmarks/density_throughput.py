"""Density throughput: log_prob + backward of a 5-layer MAF (dim 64, hidden 512x2) against peers.

Peers at the same size, measured side by side in one process, interleaved round by
round so drift hits every contender alike:
- zuko's ``MAF`` (features=64, transforms=5, hidden_features=(512, 512));
- Pyro's ``affine_autoregressive`` (hidden_dims=[512, 512]) used in the MAF direction
  (``TransformedDistribution(base, [t.inv ...])``, so log_prob is one parallel pass).

Writes benchmarks/results/density_throughput.md. Ratios are peer time / our time
(above 1: we are faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

DIM, LAYERS, HIDDEN = 64, 5, (512, 512)
RESULTS = Path(__file__).parent / "results"


def ours():
    import pyro.distributions as dist

    import pyroflows.torch as pf

    flow = pf.build_flow("maf", DIM, num_layers=LAYERS, hidden_dims=HIDDEN)
    base = dist.Normal(torch.zeros(DIM), torch.ones(DIM)).to_event(1)
    return flow, dist.TransformedDistribution(base, [flow]).log_prob


def pyro_maf():
    import pyro.distributions as dist
    from pyro.distributions.transforms import Permute, affine_autoregressive
    from pyro.distributions.torch_transform import ComposeTransformModule

    parts = []
    for i in range(LAYERS):
        if i:
            parts.append(Permute(torch.arange(DIM - 1, -1, -1)))
        parts.append(affine_autoregressive(DIM, hidden_dims=list(HIDDEN)))
    module = ComposeTransformModule(parts)
    base = dist.Normal(torch.zeros(DIM), torch.ones(DIM)).to_event(1)
    # Pyro's layer is IAF-oriented; its inverse is the MAF direction (parallel density).
    inverse = [p.inv for p in reversed(parts)]
    return module, dist.TransformedDistribution(base, inverse).log_prob


def zuko_maf():
    import zuko

    flow = zuko.flows.MAF(DIM, transforms=LAYERS, hidden_features=HIDDEN)
    return flow, lambda x: flow().log_prob(x)


CONTENDERS = {"pyroflows maf": ours, "zuko MAF": zuko_maf, "Pyro affine_autoregressive (MAF direction)": pyro_maf}


def step_time(module, log_prob, x):
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = -log_prob(x).mean()
    loss.backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096, help="batch size (the GPU setting is 65536)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, DIM)
    built = {}
    for name, make in CONTENDERS.items():
        try:
            built[name] = make()
        except ImportError as e:
            print(f"skipping {name}: {e}")
    times = {name: [] for name in built}
    for name, (module, log_prob) in built.items():  # warm-up
        step_time(module, log_prob, x)
    for _ in range(args.rounds):
        for name, (module, log_prob) in built.items():
            times[name].append(step_time(module, log_prob, x))
    ours_ms = statistics.median(times["pyroflows maf"]) * 1e3
    lines = [
        "# Density throughput: log_prob + backward, 5-layer MAF, dim 64, hidden 512x2",
        "",
        f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}), "
        f"batch {args.batch}, median of {args.rounds} interleaved rounds after a warm-up.",
        "Ratio = peer time / pyroflows time (above 1: pyroflows is faster).",
        "",
        "| flow | ms / step | samples / s | ratio to pyroflows |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        lines.append(f"| {name} | {ms:.1f} | {args.batch / ms * 1e3:,.0f} | {ms / ours_ms:.2f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "density_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
