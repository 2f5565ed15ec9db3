"""``fit_mle``, ``fit_reverse_kl`` and ``fit_posterior`` on both backends, where the test
is the same: bad data and bad options are refused with the same message (the checks are
``pyroflows.fitting`` and ``pyroflows.validation``), and the NaN guard skips and reports
non-finite steps. The rest is in tests/<backend>/test_train.py and test_posterior.py."""

import importlib

import numpy as np
import pytest

from pyroflows.fitting import MLE_MAX_STEPS, MLE_PATIENCE, batch_indices, split_indices
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


def test_fit_mle_starts_glow_actnorm_from_the_first_minibatch(adapter):
    # torch's ActNorm initialises itself on its first training inverse; JAX's fit_mle calls
    # initialize_actnorm on the same batch. At lr 1e-9 one step leaves that start in place.
    data = np.random.default_rng(6).normal(size=(40, 2)) * [3.0, 0.5] + [5.0, -2.0]
    flow = small_flow(adapter, "glow")
    fitted, _ = adapter.pf.fit_mle(
        flow, data, num_steps=1, lr=1e-9, validation_fraction=0.0, standardize=False, progress=False
    )
    actnorm = adapter.arrays(fitted)
    last = max(int(k.split(".")[0]) for k in actnorm)  # the layer the data meet first
    assert bool(actnorm[f"{last}.initialized"])
    np.testing.assert_allclose(actnorm[f"{last}.loc"], data.mean(0), atol=1e-6)


def test_fit_mle_stops_on_the_validation_plateau_and_keeps_the_best_weights(adapter):
    # 60 rows: the held-out NLL bottoms out long before MLE_MAX_STEPS, so the defaults
    # (num_steps=None, patience=MLE_PATIENCE) stop there and restore the best weights.
    data = np.random.default_rng(12).normal(size=(60, 2)) * [2.0, 0.5] + [1.0, -1.0]
    fitted, history = adapter.pf.fit_mle(small_flow(adapter), data, lr=1e-2, eval_every=10, progress=False)
    assert history.stopped_early and history.step[-1] < MLE_MAX_STEPS
    assert history.step[-1] - history.best_step == MLE_PATIENCE * 10
    best = min(history.validation_loss)
    assert history.validation_loss[history.step.index(history.best_step)] == best
    assert history.validation_loss[-1] > best  # the last weights are not the ones returned
    _, val = split_indices(len(data), 0.1, 0)
    log_q = adapter.fn(lambda x: fitted.log_prob(x), data[val], dtype=adapter.float_dtype(fitted))
    np.testing.assert_allclose(-np.mean(np.asarray(log_q)), best, rtol=1e-4)


def _conditional_gaussian(n, seed):
    """Pairs ``(x, c)`` with ``c ~ N(50, 10^2)`` (far from a unit scale) and ``x | c`` Gaussian,
    and the exact ``log p(x | c)``."""
    rng = np.random.default_rng(seed)
    c = rng.normal(50.0, 10.0, size=(n, 1))
    mean, sd = np.concatenate([0.1 * c, -0.05 * c], 1), np.array([0.5, 0.3])
    x = mean + sd * rng.normal(size=(n, 2))
    log_p = (-0.5 * ((x - mean) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)).sum(1)
    return x, c, log_p


def test_fit_mle_fits_a_conditional_density_with_contexts_on_their_own_scale(adapter, tmp_path):
    x, c, _ = _conditional_gaussian(1000, 7)
    flow = adapter.build_flow("maf", 2, context_dim=1, num_layers=2, hidden_dims=(16, 16))
    fitted, _ = adapter.pf.fit_mle(flow, x, context=c, num_steps=300, lr=3e-3, validation_fraction=0.0, progress=False)
    arrays = adapter.arrays(fitted)
    np.testing.assert_allclose(arrays["context_loc"], c.mean(0), rtol=1e-6)  # folded into the flow
    np.testing.assert_allclose(arrays["context_scale"], c.std(0), rtol=1e-6)
    x_test, c_test, log_p = _conditional_gaussian(500, 8)
    log_q = np.asarray(
        adapter.fn(lambda a, b: fitted.log_prob(a, b), x_test, c_test, dtype=adapter.float_dtype(fitted))
    )
    assert abs(np.mean(log_p - log_q)) < 0.1  # the exact conditional up to 0.1 nats
    # The fitted flow (its Standardize layer and context scaling) loads on the other backend.
    other = next(a for a in ADAPTERS if a is not adapter)
    adapter.pf.save_flow(fitted, tmp_path / "fit.npz")
    loaded = other.pf.load_flow(tmp_path / "fit.npz")
    log_q2 = np.asarray(other.fn(lambda a, b: loaded.log_prob(a, b), x_test, c_test, dtype=other.float_dtype(loaded)))
    np.testing.assert_allclose(log_q2, log_q, atol=1e-4)


def _context_sampler(adapter):
    """Contexts ``c ~ U(-2, 2)``, drawn from the generator (torch) or key (JAX) fit_reverse_kl passes."""
    if adapter.name == "torch":
        import torch

        return lambda n, generator: 4 * torch.rand(n, 1, generator=generator, dtype=torch.float64) - 2
    import jax

    return lambda key, n: jax.random.uniform(key, (n, 1), minval=-2.0, maxval=2.0)


def _draws_at(adapter, flow, n, c):
    """``n`` draws of a conditional flow at the context ``(c,)`` and their ``log q``, as numpy."""
    if adapter.name == "torch":
        import torch

        with torch.no_grad():
            context = torch.tensor([c], dtype=next(flow.parameters()).dtype)
            x, log_q = flow.sample_and_log_prob(n, torch.Generator().manual_seed(1), context)
    else:
        import jax
        import jax.numpy as jnp

        x, log_q = flow.sample_and_log_prob(n, jax.random.key(1), jnp.array([c]))
    return np.asarray(x, dtype=float), np.asarray(log_q, dtype=float)


def test_fit_reverse_kl_fits_a_family_of_targets_with_a_conditional_flow(adapter):
    # p(x | c) = N((c, -c), 0.5^2 I), unnormalised: log Z(c) = log(2 pi 0.25) for every c
    def log_density(x, c):
        return -2.0 * ((x[:, :1] - c) ** 2 + (x[:, 1:] + c) ** 2).sum(-1)

    log_z = np.log(2 * np.pi * 0.25)
    # one conditional affine MAF layer can be exact here: x1 = m1(c) + s1(c) u1, x2 = m2(x1, c) + s2 u2
    flow = adapter.build_flow("maf", 2, context_dim=1, num_layers=1, hidden_dims=(16,))
    flow, history = adapter.pf.fit_reverse_kl(
        flow, log_density, context_sampler=_context_sampler(adapter), num_steps=800, lr=1e-2, progress=False
    )
    # the loss is the KL averaged over contexts minus log Z: near -log Z once fitted
    assert abs(np.mean(history.loss[-50:]) + log_z) < 0.05
    for c in (-1.5, 0.0, 1.5):  # one flow, three targets: KL(q(. | c) || p(. | c)) from draws at c
        x, log_q = _draws_at(adapter, flow, 4000, c)
        kl = np.mean(log_q - log_density(x, np.full((len(x), 1), c))) + log_z
        assert kl < 0.05, (c, kl)  # from N(0, I), before training: 1.6 + 4 c^2 nats
        np.testing.assert_allclose(x.mean(0), [c, -c], atol=0.15)


def test_fit_reverse_kl_checks_the_context_sampler(adapter):
    conditional = adapter.build_flow("maf", 2, context_dim=1, num_layers=1, hidden_dims=(4,))
    fit = adapter.pf.fit_reverse_kl
    with pytest.raises(ValueError, match=r"conditional \(context_dim=1\): pass context_sampler="):
        fit(conditional, lambda x, c: -(x**2).sum(-1), num_steps=1, progress=False)
    with pytest.raises(ValueError, match="got a context_sampler, but the flow is not conditional"):
        fit(small_flow(adapter), standard_normal, context_sampler=_context_sampler(adapter), progress=False)
    if adapter.name == "torch":
        import torch

        wrong = lambda n, generator: torch.zeros(n)  # noqa: E731
    else:
        import jax.numpy as jnp

        wrong = lambda key, n: jnp.zeros(n)  # noqa: E731
    with pytest.raises(ValueError, match=r"context_sampler returned shape \(16,\), expected \(16, 1\)"):
        fit(conditional, lambda x, c: -(x**2).sum(-1), context_sampler=wrong, num_samples=16, progress=False)


@pytest.mark.parametrize(
    "context, message",
    [
        (None, r"conditional \(context_dim=1\): pass context="),
        (np.zeros((9, 1)), r"context has shape \(9, 1\), expected \(10, 1\)"),
        (np.full((10, 1), np.nan), "context contains NaN or inf in 10 row"),
    ],
)
def test_fit_mle_checks_the_context_of_a_conditional_flow(adapter, context, message):
    flow = adapter.build_flow("maf", 2, context_dim=1, num_layers=1, hidden_dims=(4,))
    with pytest.raises(ValueError, match=message):
        adapter.pf.fit_mle(flow, nan_rows([]), context=context, progress=False)
    with pytest.raises(ValueError, match="the flow is not conditional"):
        adapter.pf.fit_mle(small_flow(adapter), nan_rows([]), context=np.zeros((10, 1)), progress=False)
