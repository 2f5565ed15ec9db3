"""Density throughput: log_prob + backward of a 5-layer MAF (dim 64, hidden 512x2) against peers.

Peers at the same size, measured side by side in one process, interleaved round by
round so drift hits every contender alike:
- torch: zuko's ``MAF`` (features=64, transforms=5, hidden_features=(512, 512)), and
  Pyro's ``affine_autoregressive`` (hidden_dims=[512, 512]) used in the MAF direction
  (``TransformedDistribution(base, [t.inv ...])``, so log_prob is one parallel pass);
- JAX: flowjax's ``masked_autoregressive_flow`` (flow_layers=5, nn_width=512,
  nn_depth=2, affine transformer), both jitted (value and gradient in one call).

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

# One thread for both backends, so the ratios compare kernels rather than threading.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

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
    from pyro.distributions.torch_transform import ComposeTransformModule
    from pyro.distributions.transforms import Permute, affine_autoregressive

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


def _torch_step(made):
    module, log_prob = made()

    def step(x):
        module.zero_grad(set_to_none=True)
        x = x.clone()  # a fresh tensor: Pyro's cache would hand back last step's freed graph
        start = time.perf_counter()
        (-log_prob(x).mean()).backward()
        return time.perf_counter() - start

    return step


def _jax_step(loss_of_params, params):
    import equinox as eqx
    import jax

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss_of_params))

    def step(x):
        start = time.perf_counter()
        loss, g = grad(params, x)
        jax.block_until_ready((loss, g))
        return time.perf_counter() - start

    return step


def ours_jax():
    import equinox as eqx
    import jax
    import numpyro.distributions as dist

    import pyroflows.jax as pf

    flow = pf.build_flow("maf", DIM, key=jax.random.key(0), num_layers=LAYERS, hidden_dims=HIDDEN)
    params, static = eqx.partition(flow, eqx.is_inexact_array)
    base = dist.Normal(jax.numpy.zeros(DIM), 1.0).to_event(1)

    def loss(p, x):
        return -dist.TransformedDistribution(base, eqx.combine(p, static).to_transform()).log_prob(x).mean()

    return _jax_step(loss, params)


def flowjax_maf():
    import equinox as eqx
    import jax
    from flowjax.distributions import Normal
    from flowjax.flows import masked_autoregressive_flow

    flow = masked_autoregressive_flow(
        jax.random.key(0), base_dist=Normal(jax.numpy.zeros(DIM)), flow_layers=LAYERS, nn_width=HIDDEN[0], nn_depth=2
    )
    params, static = eqx.partition(flow, eqx.is_inexact_array)

    def loss(p, x):
        return -eqx.combine(p, static).log_prob(x).mean()

    return _jax_step(loss, params)


BACKENDS = {
    "torch": {
        "pyroflows maf": lambda: _torch_step(ours),
        "zuko MAF": lambda: _torch_step(zuko_maf),
        "Pyro affine_autoregressive (MAF direction)": lambda: _torch_step(pyro_maf),
    },
    "jax": {"pyroflows.jax maf (jit)": ours_jax, "flowjax masked_autoregressive_flow (jit)": flowjax_maf},
}


def measure(contenders, x, rounds):
    steps = {}
    for name, make in contenders.items():
        try:
            steps[name] = make()
        except ImportError as e:
            print(f"skipping {name}: {e}")
    for step in steps.values():  # warm-up (and compilation)
        step(x)
        step(x)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(step(x))
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096, help="batch size (the GPU setting is 65536)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (JAX follows XLA_FLAGS)")
    parser.add_argument("--backend", choices=["torch", "jax", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_np = np.random.default_rng(0).standard_normal((args.batch, DIM)).astype(np.float32)
    device = "cpu"
    lines = [
        "# Density throughput: log_prob + backward, 5-layer MAF, dim 64, hidden 512x2",
        "",
        f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s), batch {args.batch}, float32, "
        f"median of {args.rounds} rounds after warm-up, contenders interleaved round by round in one process.",
        "Ratio = peer time / pyroflows time, within each backend (above 1: pyroflows is faster).",
        "",
        "| backend | flow | ms / step | samples / s | ratio to pyroflows |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for backend in ["torch", "jax"] if args.backend == "both" else [args.backend]:
        if backend == "torch":
            x = torch.as_tensor(x_np, device=device)
        else:
            import jax.numpy as jnp

            x = jnp.asarray(x_np)
        ms = measure(BACKENDS[backend], x, args.rounds)
        ours_ms = next(iter(ms.values()))
        for name, t in ms.items():
            lines.append(f"| {backend} | {name} | {t:.1f} | {args.batch / t * 1e3:,.0f} | {t / ours_ms:.2f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "density_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
