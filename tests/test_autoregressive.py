"""The autoregressive families (IAF, MAF, NAF, BNAF) on both backends, where the test is the
same: what ``build_flow`` builds for each name and option, and the options it refuses. The references of each layer are
in tests/<backend>/test_autoregressive.py."""

import importlib

import numpy as np
import pytest

from tests.conformance.backends import ADAPTERS


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
@pytest.mark.parametrize(
    "name,options,cls,transformer",
    [
        ("iaf", {}, "MaskedAutoregressive", "Affine"),
        (
            "iaf",
            {"activation": "elu", "permutation": "random", "log_scale_bound": 1.0},
            "MaskedAutoregressive",
            "Affine",
        ),
        ("maf", {"activation": "tanh", "log_scale_bound": 3.0}, "MaskedAutoregressive", "Affine"),
        ("naf", {"hidden_units": 2, "permutation": "random"}, "MaskedAutoregressive", "DeepSigmoid"),
        ("naf", {"activation": "silu"}, "MaskedAutoregressive", "DeepSigmoid"),
        ("bnaf", {"hidden_factors": 3}, "BlockNeuralAutoregressive", None),
        ("bnaf", {"hidden_factors": [2, 3, 2], "permutation": "random"}, "BlockNeuralAutoregressive", None),
    ],
)
def test_builders_and_options(adapter, name, options, cls, transformer):
    transforms = adapter.transforms()
    cls = getattr(transforms, cls)
    transformer = transformer and getattr(transforms, transformer)
    dim, num_layers = 3, 3
    kwargs = {} if name == "bnaf" else {"hidden_dims": (8,)}
    flow = adapter.build_flow(name, dim, num_layers=num_layers, **kwargs, **options)
    layers = [p for p in flow.parts if isinstance(p, cls)]
    perms = [p for p in flow.parts if isinstance(p, transforms.Permute)]
    assert len(layers) == num_layers and len(perms) == num_layers - 1 and len(flow.parts) == 2 * num_layers - 1
    assert all(isinstance(p, cls) for p in flow.parts[::2])
    if options.get("permutation", "reverse") == "reverse":
        assert all(np.array_equal(np.asarray(p.permutation), np.arange(dim)[::-1]) for p in perms)
    uses_activation = importlib.import_module(f"tests.{adapter.name}.helpers").uses_activation
    for layer in layers:
        assert layer.autoregressive and np.array_equal(np.asarray(layer.get_permutation()), np.arange(dim))
        if transformer is not None:
            assert type(layer.transformer) is transformer
        if transformer is transforms.Affine:
            assert layer.reads == {"iaf": "input", "maf": "output"}[name]
            assert layer.transformer.log_scale_bound == options.get("log_scale_bound", 5.0)
        if transformer is transforms.DeepSigmoid:
            assert layer.reads == "input"
            assert layer.transformer.hidden_units == options.get("hidden_units", 16)
        if "activation" in options:
            assert uses_activation(layer, options["activation"])
        if cls is transforms.BlockNeuralAutoregressive:
            hf = options["hidden_factors"]
            assert layer.hidden_factors == ((hf,) if isinstance(hf, int) else tuple(hf))
    if adapter.name == "torch":  # the flow inverts (on JAX the conformance suite checks it: each case compiles)
        x = np.random.default_rng(13).normal(size=(4, dim))
        y, ladj = adapter.forward(flow, x)
        x2, ildj = adapter.inverse(flow, y)
        np.testing.assert_allclose(x2, x, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(ildj, -ladj, rtol=1e-8, atol=1e-8)
    # JAX's constants are integer or boolean, so NumPyro's eqx_module never trains them
    # (torch's masks are float buffers, which no optimiser sees)
    for key, a in adapter.arrays(flow).items() if adapter.name == "jax" else ():
        assert np.issubdtype(a.dtype, np.floating) != key.endswith(("mask", "permutation")), key


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
@pytest.mark.parametrize(
    "name, options",
    [
        ("iaf", {"log_scale_bound": 0.0}),
        ("iaf", {"log_scale_bound": -1.0}),
        ("bnaf", {"hidden_dims": (8,)}),
        ("naf", {"hidden_units": 0}),
        ("maf", {"activation": "sigmoid"}),
    ],
)
def test_bad_options_raise_value_errors(adapter, name, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        adapter.build_flow(name, 3, **options)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
def test_a_made_reads_its_input_or_its_output(adapter):
    with pytest.raises(ValueError, match="reads"):
        adapter.make("MaskedAutoregressive", 3, adapter.transforms().Affine(), (8,), reads="both")
