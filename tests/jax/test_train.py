"""fit_mle, fit_reverse_kl and evaluate (NumPyro backend) against closed forms; the
data's z-scoring folded into the fitted flow; the errors for bad input; and the guard
that skips steps with a NaN or inf loss or gradient (NaN injected by the target, by a
flow layer, and by a too-large learning rate). Mirrors tests/torch/test_train.py.

The flow in most tests is ``householder``: y = Q (a + s * u) with Q a product of
Householder reflections, so the fitted density is exactly a Gaussian whose mean Q a and
covariance (Q diag(s)) (Q diag(s))^T we read off the flow, with no sampling error.
"""

import jax

jax.config.update("jax_enable_x64", True)


import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer.initialization import init_to_value  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.fitting import split_indices  # noqa: E402
from pyroflows.jax.standardize import Standardize  # noqa: E402
from pyroflows.jax.transforms.base import Flow  # noqa: E402
from tests.backend_checks import check_standardized_fit  # noqa: E402
from tests.jax.helpers import RawScale  # noqa: E402

MEAN = np.array([1.0, -2.0])
COV = np.array([[1.0, 0.6], [0.6, 0.5]])
DATA = np.random.default_rng(0).multivariate_normal(MEAN, COV, size=1000)


def gaussian_flow():
    return pf.build_flow("householder", 2, key=jax.random.key(0))


def flow_gaussian(flow):
    """Mean and covariance of N(0, I) pushed through an affine flow."""
    fn = lambda u: flow.call_and_ladj(u)[0]  # noqa: E731
    jac = jax.jacfwd(fn)(jnp.zeros(2))
    return np.asarray(fn(jnp.zeros(2))), np.asarray(jac @ jac.T)


def log_prob(flow, x):
    """log density of N(0, I) pushed through ``flow``, by NumPyro's own TransformedDistribution."""
    base = dist.Normal(jnp.zeros(2), 1.0).to_event(1)
    return np.asarray(dist.TransformedDistribution(base, flow.to_transform()).log_prob(jnp.asarray(x)))


def nll(flow, x):
    return -float(np.mean(log_prob(flow, x)))


# Every fit_mle call below has the same flow, data shape, batch size and eval_every, so
# they share one compiled program.
FIT = dict(batch_size=256, eval_every=10)


def test_fit_mle_recovers_the_gaussian_maximum_likelihood_estimate():
    flow, history = pf.fit_mle(gaussian_flow(), DATA, num_steps=1500, lr=1e-2, patience=None, progress=False, **FIT)
    # the householder layers, then the fixed z-scoring of the data (standardize=True)
    assert len(flow.parts) == len(gaussian_flow().parts) + 1 and isinstance(flow.parts[-1], Standardize)
    assert dict(flow.config) == dict(gaussian_flow().config, standardize=True) and history.skipped_steps == 0
    train, _ = split_indices(len(DATA), 0.1, 0)
    # the Gaussian MLE on the training rows: sample mean and the 1/n covariance
    x = DATA[train]
    mean, cov = flow_gaussian(flow)
    # Adam on minibatches of 256 keeps the weights moving, and the weights kept are the
    # best of 150 noisy validation scores on 100 rows: measured errors 0.02-0.03 here,
    # 0.005-0.06 over other seeds and learning rates
    np.testing.assert_allclose(mean, x.mean(0), atol=0.06)
    np.testing.assert_allclose(cov, np.cov(x.T, bias=True), atol=0.06)
    assert history.step == list(range(10, 1501, 10)) and len(history.validation_loss) == 150
    # on z-scored data the first evaluation is already close (measured 2.40 -> 1.85)
    assert history.validation_loss[-1] < history.validation_loss[0] - 0.3


def test_fit_mle_early_stopping_keeps_the_best_weights():
    # a large learning rate makes the validation loss noisy once fitted, so it stops
    flow, history = pf.fit_mle(gaussian_flow(), DATA, num_steps=3000, lr=0.3, patience=3, progress=False, **FIT)
    assert history.stopped_early and history.step[-1] < 3000
    best = int(np.argmin(history.validation_loss))
    assert history.best_step == history.step[best]
    assert history.step[-1] == history.best_step + 3 * 10
    _, val = split_indices(len(DATA), 0.1, 0)
    # the returned weights are those of the best evaluation, scored independently
    np.testing.assert_allclose(nll(flow, DATA[val]), history.validation_loss[best], rtol=1e-10)


def test_fit_mle_prints_only_when_asked(capfd):
    capfd.readouterr()
    pf.fit_mle(gaussian_flow(), DATA, num_steps=10, progress=False, **FIT)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    pf.fit_mle(gaussian_flow(), DATA, num_steps=10, progress=True, **FIT)
    assert "fit_mle" in capfd.readouterr().err


def test_fit_mle_standardizes_data_far_outside_the_spline_bound():
    # N(5, 0.5^2 I): outside nsf's bound of 3, where its splines are the identity
    sd, n = 0.5, 4000
    data = 5.0 + sd * np.random.default_rng(7).standard_normal((n, 2))
    flow = pf.build_flow("nsf", 2, num_layers=1, hidden_dims=(16, 16), key=jax.random.key(0))
    assert flow.config["bound"] == 3.0
    options = dict(num_steps=100, lr=5e-3, batch_size=128, validation_fraction=0.5, progress=False)
    fitted, history = pf.fit_mle(flow, data, **options)
    entropy, m = check_standardized_fit(fitted, history, data, sd, log_prob, Flow(fitted.parts[:-1], 2))
    # fixed: no gradient reaches the Standardize layer
    layer = fitted.parts[-1]
    grads = jax.grad(lambda t: jnp.sum(jax.vmap(t.inverse_and_ladj)(jnp.asarray(data[:5]))[0] ** 2))(layer)
    assert not np.any(np.asarray(grads.loc)) and not np.any(np.asarray(grads.scale))
    # fitting a fitted flow again keeps its Standardize layer and statistics (the same shapes:
    # the compiled program is reused)
    again, _ = pf.fit_mle(fitted, data + 1.0, **dict(options, num_steps=50))
    assert len(again.parts) == len(fitted.parts) and dict(again.config) == dict(fitted.config)
    np.testing.assert_array_equal(np.asarray(again.parts[-1].loc), m)
    # without it the splines see only their identity tails: the gradient is zero, nothing is learnt
    raw, history = pf.fit_mle(flow, data, standardize=False, **options)
    assert len(raw.parts) == len(flow.parts) and min(history.validation_loss) > entropy + 20


def test_fit_mle_warns_about_a_constant_column():
    data = DATA.copy()  # DATA's shape and FIT: the compiled program of the tests above
    data[:, 1] = 3.0
    with pytest.warns(RuntimeWarning, match=r"column\(s\) \[1\] of the training data are constant"):
        fitted, _ = pf.fit_mle(gaussian_flow(), data, num_steps=10, progress=False, **FIT)
    assert float(fitted.parts[-1].scale[1]) == 1.0  # only centred


# An unnormalised Gaussian target: log p~(x) = log N(x; MEAN, COV) + 2, so log Z = 2.
PRECISION = np.linalg.inv(COV)
LOG_Z = 2.0


class GaussianTarget(eqx.Module):
    """A log-density with its constants as arrays: targets that differ only in them share
    one compiled fit_reverse_kl program."""

    mean: jax.Array
    precision: jax.Array
    offset: jax.Array

    def __call__(self, x):
        d = x - self.mean
        return -0.5 * jnp.einsum("ni,ij,nj->n", d, self.precision, d) + self.offset


log_target = GaussianTarget(
    jnp.asarray(MEAN), jnp.asarray(PRECISION), jnp.asarray(LOG_Z - 0.5 * np.log(np.linalg.det(2 * np.pi * COV)))
)


def gaussian_kl(mean, cov):
    """KL(N(mean, cov) || N(MEAN, COV)) in closed form."""
    d = MEAN - mean
    return 0.5 * (np.trace(PRECISION @ cov) + d @ PRECISION @ d - 2 + np.log(np.linalg.det(COV) / np.linalg.det(cov)))


@pytest.mark.parametrize("stick_the_landing", [False, True])
def test_fit_reverse_kl_reaches_the_gaussian_target(stick_the_landing):
    # annealing over the first 100 steps (beta from 0.01 to 1), then the plain loss
    flow, history = pf.fit_reverse_kl(
        gaussian_flow(),
        log_target,
        num_steps=1000,
        num_samples=512,
        lr=5e-2,
        anneal_steps=100,
        stick_the_landing=stick_the_landing,
        progress=False,
    )
    mean, cov = flow_gaussian(flow)
    kl = gaussian_kl(mean, cov)
    assert len(history.loss) == 1000 and history.step[-1] == 1000
    if stick_the_landing:
        # the target is in the flow's family, and at the optimum the path-derivative
        # gradient is zero for every draw, so Adam settles on it exactly
        assert kl < 1e-8
        np.testing.assert_allclose(mean, MEAN, atol=1e-4)
        np.testing.assert_allclose(cov, COV, atol=1e-4)
    else:
        # the score term keeps the weights moving by about lr: measured KL 0.002-0.006
        assert kl < 0.02
        np.testing.assert_allclose(mean, MEAN, atol=0.06)
        np.testing.assert_allclose(cov, COV, atol=0.1)
    # after annealing the loss estimates KL - log Z (512 draws x 50 steps: error < 0.01)
    assert abs(np.mean(history.loss[-50:]) + LOG_Z - kl) < 0.02


def test_fit_reverse_kl_reports_a_bad_log_density():
    nan_target = eqx.tree_at(lambda t: t.offset, log_target, jnp.full_like(log_target.offset, np.nan))
    with pytest.raises(
        ValueError,
        match=r"fit_reverse_kl: the target log-density returned NaN at 512 of 512 draws "
        r"at its first evaluation \(step 1, before any update\): the target is "
        r"broken, not the training.*unconstrained space",
    ):
        pf.fit_reverse_kl(gaussian_flow(), nan_target, num_steps=50, num_samples=512, progress=False)
    with pytest.raises(ValueError, match=r"must map an array of shape \(n, 2\) to shape \(n,\)"):
        pf.fit_reverse_kl(gaussian_flow(), lambda x: x, num_steps=5, progress=False)
    with pytest.raises(ValueError, match="anneal_steps=-1"):
        pf.fit_reverse_kl(gaussian_flow(), log_target, anneal_steps=-1)


class CountingTarget:
    """log_target, plus NaN (at every draw, or at the first only) on the calls in ``nan_calls``.

    The count is kept on the host by ``jax.pure_callback``, which runs once per step of the
    compiled scan (padding steps included, which come after the active ones). One instance
    serves every test below, so they share one compiled program; ``reset`` sets it up.
    """

    def reset(self, nan_calls, every_draw=True, value=np.nan):
        self.calls, self.nan_calls, self.every_draw, self.value = 0, set(nan_calls), every_draw, value
        return self

    def _poison(self, x):
        self.calls += 1
        out = np.zeros(x.shape[0])
        if self.calls in self.nan_calls:
            out[slice(None) if self.every_draw else slice(0, 1)] = self.value
        return out

    def __call__(self, x):
        x = jax.lax.stop_gradient(x)
        return log_target(x) + jax.pure_callback(self._poison, jax.ShapeDtypeStruct(x.shape[:1], x.dtype), x)


TARGET = CountingTarget()
KL_FIT = dict(num_samples=64, lr=5e-2, progress=False)


def test_fit_reverse_kl_raises_at_once_on_a_nan_target_at_its_first_evaluation():
    with pytest.raises(ValueError, match="target log-density returned inf at 1 of 64 draws at its first evaluation"):
        pf.fit_reverse_kl(gaussian_flow(), TARGET.reset([1], every_draw=False, value=np.inf), **KL_FIT)


def test_fit_reverse_kl_skips_a_step_with_a_nan_target():
    # 54 and 55 steps run in the same two chunks of 50 (the same draws); step 55 is skipped
    before, _ = pf.fit_reverse_kl(gaussian_flow(), TARGET.reset([]), num_steps=54, **KL_FIT)
    after, history = pf.fit_reverse_kl(gaussian_flow(), TARGET.reset([55], every_draw=False), num_steps=55, **KL_FIT)
    assert history.skipped_steps == 1 and history.step == list(range(1, 55))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # training goes on after it
    longer, history = pf.fit_reverse_kl(gaussian_flow(), TARGET.reset([55]), num_steps=60, **KL_FIT)
    assert history.step == list(range(1, 55)) + list(range(56, 61)) and np.isfinite(history.loss).all()
    assert history.skipped_steps == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(longer), jax.tree.leaves(before)))


def test_fit_reverse_kl_raises_naming_the_target_when_it_stays_nan():
    with pytest.raises(
        ValueError,
        match=r"fit_reverse_kl: 4 consecutive steps \(steps 3 to 6\) were skipped.*the "
        r"target log-density returned NaN or inf at some of the flow's draws in 4 of "
        r"them.*unconstrained space",
    ):
        pf.fit_reverse_kl(
            gaussian_flow(), TARGET.reset(range(3, 10**6), every_draw=False), max_bad_steps=4, num_steps=50, **KL_FIT
        )


def test_fit_reverse_kl_raises_naming_a_too_large_learning_rate():
    # target N(0, 0.1^2 I): the loss pulls the scale down from 1, and Adam's first step of
    # about lr = 5 makes it negative, where log|det| is NaN at every later step
    with pytest.raises(
        ValueError,
        match=r"fit_reverse_kl: 20 consecutive steps \(steps 2 to 21\) were skipped "
        r"because the loss was NaN or inf at 20 of them, after training had made "
        r"progress: the learning rate lr=5 is too large for this flow.*Try lr=0.5",
    ):
        pf.fit_reverse_kl(RawScale(1.0), lambda x: -50 * jnp.sum(x**2, -1), lr=5.0, progress=False)


MU = jnp.array([0.3, -1.1])


def exact_model():
    # normalised densities plus a factor: the evidence is exactly log Z = 1.7
    numpyro.sample("z", dist.Normal(MU, 0.6).to_event(1))
    numpyro.sample("w", dist.LogNormal(0.3, 0.6))
    numpyro.factor("offset", 1.7)


def test_evaluate_on_an_exact_guide_and_a_too_narrow_one():
    guide = pf.AutoFlow(
        exact_model,
        init_loc_fn=init_to_value(values={"z": MU, "w": np.exp(0.3)}),
        init_scale=0.6,
        num_layers=1,
        hidden_dims=(4,),
    )
    trace = handlers.trace(handlers.seed(guide, rng_seed=0)).get_trace()
    params = {name: site["value"] for name, site in trace.items() if site["type"] == "param"}
    # q = p in the unconstrained space, and the Jacobian of exp() is accounted for on
    # both sides, so every log-weight is log Z (4500 draws: passes of 2000, 2000 and 500)
    out = pf.evaluate(exact_model, guide, params, num_samples=4500)
    assert out["num_samples"] == 4500
    np.testing.assert_allclose([out["elbo"], out["iwelbo"]], 1.7, atol=1e-10)
    np.testing.assert_allclose(out["ess_fraction"], 1.0, atol=1e-10)
    assert out["khat"] < 0.5
    # q with a third of the posterior scale in each of the 3 unconstrained coordinates:
    # ELBO = log Z - KL = 1.7 - 3 (log 3 + 1/18 - 1/2); log w has sd 1.09, so the mean of
    # 1000 draws is within 0.15 of it (4 sd). The weights' tail is heavy (asymptotic
    # k = 1 - 1/9 per coordinate; PSIS on 1000 draws measured 0.56-1.0 over five keys)
    log_scale = jnp.full(3, 5 * np.arctanh(np.log(0.2) / 5))  # ElementwiseAffine's soft clamp, inverted
    affine = dict(params["auto_affine$params"], unconstrained_log_scale=log_scale)
    out = pf.evaluate(exact_model, guide, dict(params, **{"auto_affine$params": affine}), num_samples=1000)
    assert abs(out["elbo"] - (1.7 - 3 * (np.log(3) + 1 / 18 - 0.5))) < 0.15
    assert out["elbo"] < out["iwelbo"]
    assert out["khat"] > 0.5 and out["ess_fraction"] < 0.2
