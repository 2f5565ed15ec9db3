"""``fit_mle``, ``fit_reverse_kl`` and ``fit_posterior`` on both backends, where the test
is the same: bad data and bad options are refused with the same message (the checks are
``pyroflows.fitting`` and ``pyroflows.validation``), and the NaN guard skips and reports
non-finite steps. The rest is in tests/<backend>/test_train.py and test_posterior.py."""

import importlib

import numpy as np
import pytest

from pyroflows.fitting import batch_indices, split_indices
from tests.conformance.backends import ADAPTERS

pytestmark = pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)


def small_flow(adapter, name="maf"):
    return adapter.build_flow(name, 2, num_layers=1, hidden_dims=(4,))


def standard_normal(x):
    """An unnormalised N(0, I) log-density, of a torch tensor or a JAX array."""
    return -0.5 * (x**2).sum(-1)


def nan_rows(rows, value=np.nan):
    data = np.random.default_rng(5).normal(size=(10, 2))
    data[rows, 0] = value
    return data


# (data, message): every check of pyroflows.fitting.check_data, reached through fit_mle
BAD_DATA = [
    (nan_rows([3]), r"data contains NaN or inf in 1 row\(s\) \(rows 3\); drop or impute them"),
    (nan_rows([1, 7], np.inf), r"data contains NaN or inf in 2 row\(s\) \(rows 1, 7\)"),
    (np.zeros((0, 2)), "data needs at least 2 rows .*, got 0"),
    (np.ones((1, 2)), "data needs at least 2 rows .*, got 1"),
    (np.zeros((10, 3)), "data has 3 columns but the flow has dim=2; build the flow with dim=3"),
    (np.zeros((10, 2, 2)), r"data must have shape \(num_points, dim\), got shape \(10, 2, 2\)"),
    (
        np.zeros(10),
        r"data must have shape \(num_points, dim\), got shape \(10,\); reshape it \(for "
        r"one-dimensional data pass data\[:, None\]\)",
    ),
    (np.array([["1.0", "a"], ["2.0", "b"]]), "data must be numeric, got an array of dtype <U3 .*parse it"),
    (np.ones((10, 2), dtype=bool), "data is boolean; a flow is a density on real vectors"),
    (np.ones((10, 2), dtype=complex), "data must be real, got complex dtype"),
    ([[1.0, 2.0], [3.0]], "data must be a numeric array of shape"),
]


@pytest.mark.parametrize("data, message", BAD_DATA)
def test_fit_mle_rejects_bad_data(adapter, data, message):
    with pytest.raises(ValueError, match="fit_mle: " + message):
        adapter.pf.fit_mle(small_flow(adapter), data, progress=False)


NOT_POSITIVE = [0, -1, float("nan"), float("inf"), True]


@pytest.mark.parametrize("name", ["num_steps", "batch_size", "eval_every", "lr", "max_bad_steps"])
@pytest.mark.parametrize("value", NOT_POSITIVE)
def test_fit_mle_rejects_options_that_are_not_positive(adapter, name, value):
    kind = "number" if name == "lr" else "integer"
    with pytest.raises(ValueError, match=rf"fit_mle: {name}={value!r} must be a positive {kind}"):
        adapter.pf.fit_mle(small_flow(adapter), np.zeros((10, 2)), progress=False, **{name: value})


@pytest.mark.parametrize("name", ["num_steps", "num_samples", "lr", "max_bad_steps"])
@pytest.mark.parametrize("value", NOT_POSITIVE)
def test_fit_reverse_kl_rejects_options_that_are_not_positive(adapter, name, value):
    kind = "number" if name == "lr" else "integer"
    with pytest.raises(ValueError, match=rf"fit_reverse_kl: {name}={value!r} must be a positive {kind}"):
        adapter.pf.fit_reverse_kl(small_flow(adapter, "iaf"), standard_normal, progress=False, **{name: value})


def test_fit_mle_rejects_a_standardize_that_is_not_a_bool(adapter):
    with pytest.raises(ValueError, match="fit_mle: standardize='yes' must be True or False"):
        adapter.pf.fit_mle(small_flow(adapter), np.zeros((10, 2)), standardize="yes", progress=False)


def test_fit_posterior_options_are_checked(adapter):
    def model(data):  # the options are checked before the model runs
        pass

    data = adapter.tensor(np.zeros(3), "float64")
    with pytest.raises(ValueError, match="no option 'nonsense'"):
        adapter.pf.fit_posterior(model, data, flow="iaf", nonsense=1)
    with pytest.raises(ValueError, match="num_steps=-5"):
        adapter.pf.fit_posterior(model, data, num_steps=-5)


# The NaN guard of fit_mle: steps with a non-finite loss are skipped, and too many in a row
# raise an error that names the likely cause. The layers (RawScale, Sentinel) are array code
# and live in each backend's tests/<backend>/helpers.py.


def helpers(adapter):
    return importlib.import_module(f"tests.{adapter.name}.helpers")


SENTINEL_DATA = np.concatenate([np.random.default_rng(9).normal(size=(40, 2)), [[1000.0, 0.0]]])


def poisoned_steps(num_steps, batch_size):
    """The steps whose minibatch holds the sentinel row (40): fit_mle's split and draws, replayed."""
    train, _ = split_indices(len(SENTINEL_DATA), 0.0, 0)
    rng = np.random.default_rng(0)
    return [t for t in range(1, num_steps + 1) if 40 in batch_indices(train, batch_size, rng)]


def test_fit_mle_skips_a_step_whose_loss_is_nan(adapter):
    sentinel_flow, fit_mle = helpers(adapter).sentinel_flow, adapter.pf.fit_mle
    options = dict(batch_size=8, validation_fraction=0.0, standardize=False, lr=1e-2, progress=False)
    poisoned = poisoned_steps(60, 8)
    assert 1 < len(poisoned) < 30 and poisoned[0] > 1
    k = poisoned[0]  # 4
    fitted, history = fit_mle(sentinel_flow(), SENTINEL_DATA, num_steps=60, eval_every=k, **options)
    assert history.skipped_steps == len(poisoned)  # 14 of 60
    assert np.isfinite(history.loss).all() and history.step == list(range(k, 61, k))
    # the first poisoned step leaves the weights of the step before (on JAX, and Adam's
    # state, inside the compiled scan)
    before, _ = fit_mle(sentinel_flow(), SENTINEL_DATA, num_steps=k - 1, eval_every=k, **options)
    after, history = fit_mle(sentinel_flow(), SENTINEL_DATA, num_steps=k, eval_every=k, **options)
    assert history.skipped_steps == 1
    after, before = adapter.arrays(after), adapter.arrays(before)
    assert list(after) == list(before)
    for name in after:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_fit_mle_raises_when_the_flow_is_not_finite_from_the_start(adapter):
    data = np.random.default_rng(10).normal(size=(20, 2))
    with pytest.raises(
        ValueError,
        match=r"fit_mle: 5 consecutive steps \(steps 1 to 5\) were skipped because the "
        r"loss was NaN or inf at 5 of them, from the first step, before any update: "
        r".*badly scaled .*standardize=True",
    ):
        adapter.pf.fit_mle(helpers(adapter).RawScale(-1.0), data, max_bad_steps=5, progress=False)


def test_fit_mle_raises_naming_a_too_large_learning_rate(adapter):
    # sd 0.1: the NLL pulls the scale down from 1, and Adam's first step of about lr = 5 makes it negative
    data = 0.1 * np.random.default_rng(11).normal(size=(50, 2))
    flow = helpers(adapter).RawScale(1.0)
    with pytest.raises(
        ValueError,
        match=r"fit_mle: 20 consecutive steps \(steps 2 to 21\) were skipped.* after "
        r"training had made progress: the learning rate lr=5 is too large"
        r".*Try lr=0.5",
    ):
        adapter.pf.fit_mle(flow, data, lr=5.0, standardize=False, progress=False)
    if adapter.name == "torch":
        assert (flow.scale < 0).all()  # trained in place: the last update taken
