"""The training protocol on Pyro: ``Flow``, ``StochasticFlow`` and the transform adapter
implement ``pyroflows.protocols.TrainableFlow``, and ``pyroflows.torch.train`` and
``pyroflows.torch.snf`` do not import each other (both import ``pyroflows.torch.density``)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyroflows.protocols import TrainableFlow

ROOT = Path(__file__).resolve().parents[1]
TORCH = ROOT / "pyroflows" / "torch"


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            # ``from . import snf`` names a module too
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(
    "source, forbidden",
    [
        ("train.py", {"pyroflows.torch.snf"}),
        ("snf.py", {"pyroflows.torch.train"}),
        ("density.py", {"pyroflows.torch.snf", "pyroflows.torch.train"}),
    ],
)
def test_no_import_statement_closes_a_circle(source, forbidden):
    names = imported_modules(TORCH / source, "pyroflows.torch")
    assert not names & forbidden, sorted(names & forbidden)
    if source != "density.py":
        assert "pyroflows.torch.density" in names


def test_imported_modules_resolves_relative_imports():
    names = imported_modules(TORCH / "train.py", "pyroflows.torch")
    assert {"pyroflows.fitting", "pyroflows.torch.density", "pyroflows.torch.standardize"} <= names


# The package's __init__ imports every module; a bare package object lets one module load
# alone. One fresh interpreter loads train, then (after forgetting pyroflows.torch.*) snf.
_ALONE = """
import importlib, sys, types
loaded = {{}}
for first in ("train", "snf"):
    for name in [m for m in sys.modules if m.startswith("pyroflows.torch")]:
        del sys.modules[name]
    package = types.ModuleType("pyroflows.torch")
    package.__path__ = [{path!r}]
    sys.modules["pyroflows.torch"] = package
    importlib.import_module("pyroflows.torch." + first)
    loaded[first] = sorted(m for m in sys.modules if m.startswith("pyroflows.torch."))
print(loaded)
"""


def test_importing_one_module_alone_does_not_import_the_other():
    code = _ALONE.format(path=str(TORCH))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    for first, other in [("train", "snf"), ("snf", "train")]:
        assert f"pyroflows.torch.{first}" in loaded[first] and "pyroflows.torch.density" in loaded[first]
        assert f"pyroflows.torch.{other}" not in loaded[first], loaded[first]


def test_flow_stochastic_flow_and_the_adapter_are_trainable_flows():
    import pyroflows.torch as pf
    from pyroflows.torch import snf
    from pyroflows.torch.density import TransformFlow, as_trainable
    from pyroflows.torch.transforms import ElementwiseAffine

    torch.manual_seed(0)
    flow = pf.build_flow("realnvp", 2, num_layers=1, hidden_dims=(4,)).double()
    stochastic = snf.StochasticFlow([flow, snf.MALA(0.1)], 2, lambda x: -0.5 * (x * x).sum(-1)).double()
    layer = ElementwiseAffine(2).double()
    assert isinstance(flow, TrainableFlow) and flow.standardizable
    assert isinstance(stochastic, TrainableFlow) and not stochastic.standardizable
    assert not isinstance(layer, TrainableFlow)  # a bare layer is wrapped, not trained as is
    assert as_trainable(flow) is flow and as_trainable(stochastic) is stochastic
    wrapped = as_trainable(layer)
    assert isinstance(wrapped, TransformFlow) and isinstance(wrapped, TrainableFlow)
    assert wrapped.dim == 2 and list(wrapped.parameters()) == list(layer.parameters())

    x = torch.randn(5, 2, dtype=torch.float64)
    # a fresh layer is the identity: q = N(0, I) for the flow and the wrapped layer alike
    expected = -0.5 * (x * x).sum(-1) - torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    for model in (flow, wrapped):
        torch.testing.assert_close(model.log_prob(x), expected)
        draws, log_q = model.sample_and_log_prob(7, torch.Generator().manual_seed(1))
        assert draws.shape == (7, 2) and log_q.shape == (7,)
        torch.testing.assert_close(log_q, model.log_prob(draws))
        target = lambda y: -(y * y).sum(-1)  # noqa: E731
        assert model.fit_target(target, True) is target
    # the stochastic flow: its lower bound, its paths, its own target
    assert stochastic.log_prob(x).shape == (5,)
    draws, log_q = stochastic.sample_and_log_prob(7, torch.Generator().manual_seed(1))
    torch.testing.assert_close((draws, log_q), stochastic.sample_path(7, torch.Generator().manual_seed(1)))
    assert stochastic.fit_target(None, False) is stochastic.target_log_density
    with pytest.raises(ValueError, match="stick_the_landing"):
        stochastic.fit_target(None, True)


def test_a_users_own_flow_with_the_protocol_trains_without_being_a_flow():
    import numpy as np

    import pyroflows.torch as pf

    class Shift(torch.nn.Module):
        """N(loc, I): the protocol's members and nothing else of pyroflows."""

        standardizable = False

        def __init__(self):
            super().__init__()
            self.dim = 2
            self.loc = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def log_prob(self, x):
            d = x - self.loc
            return -0.5 * (d * d).sum(-1) - torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype))

        def sample_and_log_prob(self, num_samples, rng):
            x = self.loc + torch.randn(num_samples, 2, generator=rng, dtype=torch.float64)
            return x, self.log_prob(x)

        def fit_target(self, log_density, stick_the_landing):
            return log_density

    model = Shift()
    assert isinstance(model, TrainableFlow)
    data = np.random.default_rng(0).normal(size=(200, 2)) + [3.0, -1.0]
    fitted, history = pf.fit_mle(model, data, num_steps=200, lr=0.1, validation_fraction=0.0, progress=False)
    assert fitted is model and history.step[-1] == 200
    np.testing.assert_allclose(model.loc.detach().numpy(), data.mean(0), atol=0.05)
