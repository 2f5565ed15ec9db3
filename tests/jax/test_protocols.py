"""The training helpers and the stochastic flows meet only through
``pyroflows.protocols.TrainableFlow``: neither JAX module imports the other, and both
``Flow`` and ``StochasticFlow`` implement the protocol."""

import ast
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax import snf  # noqa: E402
from pyroflows.jax.density import TransformFlow, as_trainable  # noqa: E402
from pyroflows.jax.transforms.base import ElementwiseAffine, Flow  # noqa: E402
from pyroflows.protocols import TrainableFlow  # noqa: E402

PACKAGE = pathlib.Path(pf.__file__).parent


def imported_modules(path):
    """Every module ``path`` imports (anywhere: top level or inside functions), as the
    dotted name relative to ``pyroflows.jax`` for relative imports (``.snf`` -> ``snf``,
    ``..snf`` -> ``..snf``) or the absolute name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * (node.level - 1) + (node.module or "") if node.level else node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return names


def test_the_train_module_does_not_import_the_snf_module_and_vice_versa():
    train = imported_modules(PACKAGE / "train.py")
    stochastic = imported_modules(PACKAGE / "snf.py")
    assert not {"snf", "pyroflows.jax.snf"} & train
    assert not {name for name in train if name.startswith("snf.")}
    assert not {"train", "pyroflows.jax.train"} & stochastic
    assert not {name for name in stochastic if name.startswith("train.")}
    # both take the map helpers from the low-level module, which imports neither
    assert "density" in train and "density" in stochastic
    assert not {"train", "snf"} & imported_modules(PACKAGE / "density.py")


def test_the_import_reader_catches_function_level_imports(tmp_path):
    # the circle this guards against was made of imports inside functions
    path = tmp_path / "module.py"
    path.write_text("def f():\n    from .snf import StochasticFlow\n    from . import train\n")
    assert {"snf", "snf.StochasticFlow", "train"} <= imported_modules(path)


def double_well(x):
    return -(((x**2).sum(-1) - 1.0) ** 2)


@pytest.fixture(scope="module")
def flows():
    flow = Flow([ElementwiseAffine(2)], 2)
    stochastic = snf.StochasticFlow([ElementwiseAffine(2), snf.MetropolisHastings(0.3)], 2, double_well)
    return flow, stochastic


def test_flow_and_stochastic_flow_are_trainable_flows(flows):
    flow, stochastic = flows
    assert isinstance(flow, TrainableFlow) and isinstance(stochastic, TrainableFlow)
    assert isinstance(pf.build_flow("householder", 2, key=jax.random.key(0)), TrainableFlow)
    assert flow.standardizable is True and stochastic.standardizable is False
    # a lone layer lacks the protocol; the fits wrap it in an adapter that has it
    layer = ElementwiseAffine(2)
    assert not isinstance(layer, TrainableFlow)
    assert isinstance(as_trainable(layer), TransformFlow) and isinstance(as_trainable(layer), TrainableFlow)
    assert as_trainable(flow) is flow and as_trainable(stochastic) is stochastic


def test_the_protocol_methods_agree_with_the_closed_forms(flows):
    flow, stochastic = flows
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 2)))
    expected = -0.5 * (np.asarray(x) ** 2).sum(-1) - np.log(2 * np.pi)
    np.testing.assert_allclose(flow.log_prob(x), expected, rtol=1e-12)
    samples, log_q = flow.sample_and_log_prob(5, jax.random.key(1))
    assert samples.shape == (5, 2) and log_q.shape == (5,)
    np.testing.assert_allclose(log_q, flow.log_prob(samples), rtol=1e-12)
    target = lambda v: -(v**2).sum(-1)  # noqa: E731
    assert flow.fit_target(target, True) is target

    key = jax.random.key(2)
    np.testing.assert_allclose(stochastic.log_prob(x, key=key), stochastic.log_prob_lower_bound(key, x))
    assert stochastic.log_prob(x, key=key).shape == (4, 3)
    paths = stochastic.sample_and_log_prob(5, key)
    for a, b in zip(paths, stochastic.sample_path(key, 5)):
        np.testing.assert_array_equal(a, b)
    assert stochastic.fit_target(None, False) is double_well
    with pytest.raises(ValueError, match="stick_the_landing"):
        stochastic.fit_target(None, True)
