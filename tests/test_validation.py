"""The shared argument checks (pyroflows.validation) and their use by the registry and the
stochastic-flow options: non-finite numbers, booleans and out-of-range values are rejected
with messages that name the argument, the value and what is valid (issue 17)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from pyroflows import registry, snf, validation
from pyroflows.registry import SPECS

NON_FINITE = [math.inf, -math.inf, math.nan, np.float64("inf"), np.float32("nan"), 10**400]


# --- the checkers ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", [*NON_FINITE, True, False, "1.0", None, [1.0], 0, -2.5, 0.0])
def test_positive_float_rejects_what_is_not_a_finite_positive_number(value):
    with pytest.raises(ValueError) as info:
        validation.positive_float("lr", value, caller="fit_mle")
    assert str(info.value) == f"fit_mle: lr={value!r} must be a positive number (finite and above 0)"


@pytest.mark.parametrize(
    "value,expected",
    [(1, 1.0), (2.5, 2.5), (np.float32(0.5), 0.5), (Fraction(1, 4), 0.25), (1e-300, 1e-300), (1e300, 1e300)],
)
def test_positive_float_returns_plain_floats(value, expected):
    out = validation.positive_float("x", value)
    assert type(out) is float and out == expected


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "3", None, np.float64(3.0), 3.5])
def test_positive_int_rejects_non_integers_booleans_and_values_below_one(value):
    with pytest.raises(ValueError, match=r"option num_steps=.* must be a positive integer"):
        validation.positive_int("num_steps", value)


def test_integers_come_back_as_python_ints():
    assert type(validation.positive_int("n", np.int64(3))) is int
    assert validation.optional_positive_int("n", None) is None
    assert validation.non_negative_int("n", 0) == 0
    with pytest.raises(ValueError, match="anneal_steps=-1 must be an integer >= 0"):
        validation.non_negative_int("anneal_steps", -1)
    assert validation.int_list("hidden_dims", 8) == (8,)
    assert validation.int_list("hidden_dims", np.array([4, 5])) == (4, 5)
    for bad in ("64", [8, True], [8, 2.0], [0], 3.0):
        with pytest.raises(ValueError, match="hidden_dims=.*list of positive integers"):
            validation.int_list("hidden_dims", bad)
    with pytest.raises(ValueError, match="hidden_dims must not be empty"):
        validation.int_list("hidden_dims", [])


@pytest.mark.parametrize(
    "check,good,bad,message",
    [
        (validation.non_negative_float, [0, 0.0, 3.5], [-1e-9, True, *NON_FINITE], "must be a finite number >= 0"),
        (validation.open_unit, [0.5, 1e-12], [0.0, 1.0, True, *NON_FINITE], "must lie strictly between 0 and 1"),
        (validation.unit_fraction, [0.0, 0.99], [1.0, -0.1, False, *NON_FINITE], r"must lie in \[0, 1\)"),
        (validation.boolean, [True, False], [1, 0, "yes", None, np.bool_(True)], "must be True or False"),
        (
            validation.bounded_positive_float(50.0, "why"),
            [50, 1e-3],
            [50.5, 1e6, True, *NON_FINITE],
            "must be a positive number no larger than 50: why",
        ),
        (validation.choice("a", "b"), ["a", "b"], ["c", None, np.array(["a", "b"]), 1], r"is not one of \['a', 'b'\]"),
    ],
)
def test_checkers_accept_their_range_and_name_the_rest(check, good, bad, message):
    for value in good:
        check("opt", value)
    for value in bad:
        with pytest.raises(ValueError, match=f"opt=.*{message}"):
            check("opt", value)


# --- every option of every family -----------------------------------------------------------
OPTIONS = [(name, opt) for name, spec in SPECS.items() for opt in spec.options]


@pytest.mark.parametrize("name,option", OPTIONS, ids=[f"{n}-{o}" for n, o in OPTIONS])
def test_every_option_rejects_non_finite_and_boolean_values(name, option):
    spec = SPECS[name]
    default = spec.options[option].default
    bad = [math.inf, -math.inf, math.nan]
    if not isinstance(default, bool):
        bad.append(True)  # True is no number (nor a string choice)
    for value in bad:
        with pytest.raises(ValueError) as info:
            spec.resolve(2, None, None, {option: value})
        assert str(info.value).startswith(f"flow {name!r}: option {option}={value!r} ")
    spec.resolve(2, None, None, {option: default})  # the default itself is valid


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if "log_scale_bound" in s.options])
def test_log_scale_bound_has_an_upper_limit(name):
    spec = SPECS[name]
    assert spec.resolve(2, None, None, {"log_scale_bound": registry.MAX_LOG_SCALE_BOUND})["log_scale_bound"] == 50.0
    with pytest.raises(
        ValueError,
        match=rf"flow {name!r}: option log_scale_bound=1000000.0 must be a positive "
        r"number no larger than 50: scales are exp\(log-scale\)",
    ):
        spec.resolve(2, None, None, {"log_scale_bound": 1e6})


def test_num_layers_hidden_dims_and_tolerances_name_the_flow():
    with pytest.raises(ValueError, match=r"flow 'realnvp': option num_layers=True must be a positive integer"):
        SPECS["realnvp"].resolve(2, True, None, {})
    with pytest.raises(ValueError, match=r"flow 'realnvp': option hidden_dims='64' must be a list"):
        SPECS["realnvp"].resolve(2, None, "64", {})
    with pytest.raises(ValueError, match=r"flow 'residual': option inverse_tol=1.0 must lie strictly between 0 and 1"):
        SPECS["residual"].resolve(2, None, None, {"inverse_tol": 1.0})


def test_the_registry_uses_the_shared_checkers():
    for name in (
        "positive_int",
        "optional_positive_int",
        "positive_float",
        "non_negative_float",
        "open_unit",
        "boolean",
        "int_list",
    ):
        assert getattr(registry, name) is getattr(validation, name)


# --- stochastic normalizing flows ------------------------------------------------------------
@pytest.mark.parametrize("step_size", [math.inf, math.nan, True, 0.0])
def test_snf_step_size_must_be_a_finite_positive_number(step_size):
    with pytest.raises(ValueError, match=rf"MALA: step_size={step_size!r} must be a positive number"):
        snf.check_block_options("MALA", step_size=step_size, num_steps=1, learnable_step_size=False)


def test_snf_integer_and_boolean_block_options():
    out = snf.check_block_options("HMC", step_size=0.1, num_steps=2, learnable_step_size=True, num_leapfrog=3)
    assert out == {"step_size": 0.1, "num_steps": 2, "learnable_step_size": True, "num_leapfrog": 3}
    with pytest.raises(ValueError, match="HMC: num_leapfrog=True must be a positive integer"):
        snf.check_block_options("HMC", step_size=0.1, num_steps=2, learnable_step_size=True, num_leapfrog=True)
    with pytest.raises(ValueError, match="HMC: learnable_step_size=1 must be True or False"):
        snf.check_block_options("HMC", step_size=0.1, num_steps=2, learnable_step_size=1)
    with pytest.raises(ValueError, match="StochasticFlow: dim=2.0 must be a positive integer"):
        snf.check_stochastic_flow(["layer"], 2.0, lambda x: x)


def test_snf_schedule_rejects_booleans_and_non_finite_values():
    assert snf.interpolation_schedule([0.5, 1], 2) == (0.5, 1.0)
    with pytest.raises(ValueError, match="sequence of numbers"):
        snf.interpolation_schedule([0.5, True], 2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        snf.interpolation_schedule([0.5, math.nan], 2)
