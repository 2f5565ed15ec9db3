"""The registry on every backend: names, defaults, option validation and user-registered flows.

The table (``pyroflows.registry.SPECS``) is backend-neutral, so every check here runs on
each installed backend through the adapters of ``tests/conformance``."""

import numpy as np
import pytest

from pyroflows.registry import RESERVED, SPECS, describe
from tests.conformance.backends import ADAPTERS

EXPECTED = {
    "planar",
    "radial",
    "sylvester",
    "householder",
    "nice",
    "realnvp",
    "glow",
    "iaf",
    "maf",
    "naf",
    "bnaf",
    "nsf",
    "gaussianization",
    "gdn",
    "ffjord",
    "residual",
}


@pytest.fixture(params=ADAPTERS, ids=lambda a: a.name)
def backend(request):
    return request.param


def test_every_family_of_the_design_is_registered(backend):
    assert EXPECTED <= set(backend.pf.available_flows())
    assert set(SPECS) == EXPECTED
    for name in SPECS:
        assert name in describe(name) and "Reference" in describe(name)


def test_unknown_name_lists_the_valid_ones(backend):
    with pytest.raises(ValueError, match="unknown flow 'realnpv'.*realnvp"):
        backend.pf.build_flow("realnpv", 2)


def test_reserved_names_say_they_are_not_available_yet(backend):
    for name in RESERVED:
        with pytest.raises(NotImplementedError, match=name):
            backend.pf.build_flow(name, 2)
        with pytest.raises(ValueError, match="reserved"):
            backend.pf.register_flow(name)


def test_unknown_option_names_the_valid_options(backend):
    with pytest.raises(ValueError, match="no option 'bins'.*count_bins"):
        backend.pf.build_flow("nsf", 2, bins=4)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("realnvp", {"activation": "swish"}, "activation='swish' is not one of"),
        ("sylvester", {"variant": "qr"}, "variant='qr'"),
        ("nsf", {"count_bins": 0}, "count_bins=0 must be a positive integer"),
        ("nsf", {"bound": -1.0}, "bound=-1.0 must be a positive number"),
        ("gdn", {"max_exponent": 0.5}, "below 1/2"),
        ("realnvp", {"hidden_dims": []}, "hidden_dims must not be empty"),
        ("maf", {"num_layers": 0}, "num_layers=0 must be a positive integer"),
        ("bnaf", {"hidden_dims": [8]}, "hidden_factors"),
        ("planar", {"hidden_dims": [8]}, "no conditioner network"),
    ],
)
def test_bad_options_raise_value_errors_that_say_what_is_expected(backend, name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        backend.pf.build_flow(name, 3, **kwargs)


@pytest.mark.parametrize("dim", [0, -1, 2.5, "3"])
def test_bad_dim(backend, dim):
    with pytest.raises(ValueError, match="dim"):
        backend.pf.build_flow("realnvp", dim)


def test_wrong_last_dimension_is_a_clear_error(backend):
    flow = backend.build_flow("realnvp", 3)
    with pytest.raises(ValueError, match="last dimension must be 3"):
        backend.call(flow, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="last dimension must be 3"):
        backend.inv(flow, np.zeros((4, 5)))


def test_defaults_are_recorded_in_the_config(backend):
    flow = backend.pf.build_flow("nsf", 4, count_bins=5)
    assert flow.config["name"] == "nsf" and flow.config["dim"] == 4
    assert flow.config["count_bins"] == 5 and flow.config["bound"] == SPECS["nsf"].options["bound"].default
    assert flow.config["num_layers"] == SPECS["nsf"].num_layers
    assert tuple(flow.config["hidden_dims"]) == SPECS["nsf"].hidden_dims


def test_register_flow_adds_a_user_builder(backend):
    name = "test-user-affine"

    @backend.pf.register_flow(name)
    def builder(dim, num_layers=None, hidden_dims=None, scale=1.0, **backend_keywords):  # JAX passes a key
        layer = backend.make("ElementwiseAffine", dim)
        return [backend.with_arrays(layer, {"loc": np.full(dim, scale)})]

    try:
        assert name in backend.pf.available_flows()
        flow = backend.pf.build_flow(name, 2, scale=3.0)
        assert isinstance(flow, backend.transforms().Flow)
        np.testing.assert_allclose(backend.call(flow, np.zeros((1, 2))), np.full((1, 2), 3.0))
        with pytest.raises(ValueError, match="already registered"):
            backend.pf.register_flow(name)(builder)
    finally:
        backend.pf.REGISTRY.unregister(name)
    assert name not in backend.pf.available_flows()
    with pytest.raises(ValueError, match="no flow named 'test-user-affine' is registered"):
        backend.pf.REGISTRY.unregister(name)
    with pytest.raises(ValueError, match="'iaf' is a built-in family and cannot be unregistered"):
        backend.pf.REGISTRY.unregister("iaf")


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("realnvp", {"log_scale_bound": float("inf")}),
        ("iaf", {"log_scale_bound": float("inf")}),
        ("glow", {"log_scale_bound": float("inf")}),
        ("maf", {"log_scale_bound": float("nan")}),
        ("realnvp", {"log_scale_bound": True}),
        ("realnvp", {"log_scale_bound": 1e6}),
        ("nsf", {"bound": float("inf")}),
        ("ffjord", {"time_length": float("inf")}),
        ("ffjord", {"atol": float("nan")}),
        ("residual", {"inverse_tol": float("nan")}),
        ("gdn", {"max_exponent": float("nan")}),
    ],
)
def test_non_finite_and_boolean_options_are_rejected_before_they_become_nan(backend, name, kwargs):
    # Each of these used to build a flow whose every output was NaN (issue 17).
    ((option, value),) = kwargs.items()
    with pytest.raises(ValueError, match=rf"flow {name!r}: option {option}={value!r} must "):
        backend.pf.build_flow(name, 2, **kwargs)


@pytest.mark.parametrize("name", ["realnvp", "iaf", "maf", "glow"])
def test_the_largest_log_scale_bound_still_gives_finite_outputs(backend, name):
    flow = backend.build_flow(name, 2, num_layers=2, hidden_dims=[8], log_scale_bound=50.0, perturb=1.0, seed=4)
    x = np.random.default_rng(0).standard_normal((16, 2)) * 5
    y, ladj = backend.forward(flow, x)
    x2, ildj = backend.inverse(flow, y.copy())
    for a in (y, ladj, x2, ildj):
        assert np.all(np.isfinite(a))
    assert float(np.abs(ladj).max()) > 20  # the scales do go far past the default bound of 5
    if name == "realnvp":
        # Scales up to e^50 are as far as the bound goes; a coupling still inverts. (Sequential
        # inverses amplify rounding by such scales: there only finiteness is promised.)
        np.testing.assert_allclose(x2, x, rtol=1e-6, atol=1e-6)


def test_a_large_finite_spline_bound_stays_finite(backend):
    flow = backend.build_flow("nsf", 2, num_layers=2, hidden_dims=[8], bound=1e6)
    x = np.random.default_rng(0).standard_normal((16, 2)) * 1e5
    y, ladj = backend.forward(flow, x)
    x2, _ = backend.inverse(flow, y.copy())
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(ladj))
    np.testing.assert_allclose(x2, x, rtol=1e-6, atol=1e-3)
