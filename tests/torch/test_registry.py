"""The torch registry: names, defaults, option validation and user-registered flows."""

import pytest
import torch

import pyroflows.torch as pf
from pyroflows.registry import RESERVED, SPECS, describe

EXPECTED = {"planar", "radial", "sylvester", "householder", "nice", "realnvp", "glow",
            "iaf", "maf", "naf", "bnaf", "nsf", "gaussianization", "gdn",
            "ffjord", "residual"}


def test_every_family_of_the_design_is_registered():
    assert EXPECTED <= set(pf.available_flows())
    assert set(SPECS) == EXPECTED
    for name in SPECS:
        assert name in describe(name) and "Reference" in describe(name)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown flow 'realnpv'.*realnvp"):
        pf.build_flow("realnpv", 2)


def test_reserved_names_say_they_are_not_available_yet():
    for name in RESERVED:
        with pytest.raises(NotImplementedError, match=name):
            pf.build_flow(name, 2)
        with pytest.raises(ValueError, match="reserved"):
            pf.register_flow(name)


def test_unknown_option_names_the_valid_options():
    with pytest.raises(ValueError, match="no option 'bins'.*count_bins"):
        pf.build_flow("nsf", 2, bins=4)


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
def test_bad_options_raise_value_errors_that_say_what_is_expected(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pf.build_flow(name, 3, **kwargs)


@pytest.mark.parametrize("dim", [0, -1, 2.5, "3"])
def test_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        pf.build_flow("realnvp", dim)


def test_wrong_last_dimension_is_a_clear_error():
    flow = pf.build_flow("realnvp", 3)
    with pytest.raises(ValueError, match="last dimension must be 3"):
        flow(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="last dimension must be 3"):
        flow.inv(torch.zeros(4, 5))


def test_defaults_are_recorded_in_the_config():
    flow = pf.build_flow("nsf", 4, count_bins=5)
    assert flow.config["name"] == "nsf" and flow.config["dim"] == 4
    assert flow.config["count_bins"] == 5 and flow.config["bound"] == SPECS["nsf"].options["bound"].default
    assert flow.config["num_layers"] == SPECS["nsf"].num_layers
    assert flow.config["hidden_dims"] == SPECS["nsf"].hidden_dims


def test_register_flow_adds_a_user_builder():
    name = "test-user-affine"

    @pf.register_flow(name)
    def builder(dim, num_layers=None, hidden_dims=None, scale=1.0):
        layer = pf.transforms.ElementwiseAffine(dim)
        with torch.no_grad():
            layer.loc.fill_(scale)
        return [layer]

    try:
        assert name in pf.available_flows()
        flow = pf.build_flow(name, 2, scale=3.0)
        assert isinstance(flow, pf.transforms.Flow)
        assert torch.allclose(flow(torch.zeros(2)), torch.full((2,), 3.0))
        with pytest.raises(ValueError, match="already registered"):
            pf.register_flow(name)(builder)
    finally:
        pf.REGISTRY._builders.pop(name)
