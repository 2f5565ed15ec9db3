"""fit_mle, fit_reverse_kl and evaluate (Pyro backend) against closed forms: a Gaussian's
maximum-likelihood fit, a Gaussian target with known log Z, and a conjugate model whose
evidence and posterior are exact; the data's z-scoring folded into the fitted flow; the
errors for bad input; and the guard that skips steps with a NaN or inf loss or gradient
(NaN injected by the target, by a flow layer, and by a too-large learning rate)."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value
from scipy import stats

import pyroflows.torch as pf
from pyroflows.fitting import split_indices
from pyroflows.torch.standardize import Standardize
from tests.backend_checks import check_standardized_fit
from tests.torch.helpers import RawScale

MEAN = np.array([1.0, -2.0])
COV = np.array([[1.0, 0.6], [0.6, 0.5]])


def flow_log_prob(flow, x):
    """log density of N(0, I) pushed through ``flow``, by Pyro's own TransformedDistribution."""
    base = dist.Normal(torch.zeros(flow.dim, dtype=torch.float64), 1.0).to_event(1)
    with torch.no_grad():
        return dist.TransformedDistribution(base, [flow]).log_prob(torch.as_tensor(x)).numpy()


def flow_samples(flow, n, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return flow(torch.randn(n, flow.dim, dtype=torch.float64)).numpy()


def test_fit_mle_recovers_a_gaussian():
    data = np.random.default_rng(0).multivariate_normal(MEAN, COV, size=2000)
    torch.manual_seed(0)
    flow = pf.build_flow("maf", 2, num_layers=2, hidden_dims=(16,)).double()
    fitted, history = pf.fit_mle(flow, data, num_steps=400, lr=5e-3, batch_size=512, progress=False)
    # flow's layers trained in place, then the fixed z-scoring of the data (standardize=True)
    assert list(fitted.parts[:-1]) == list(flow.parts) and isinstance(fitted.parts[-1], Standardize)
    assert fitted.config == dict(flow.config, standardize=True)
    assert history.step[-1] == 400 and len(history.validation_loss) == len(history.step) == 8
    assert history.skipped_steps == 0
    train, val = split_indices(len(data), 0.1, 0)
    # the maximum-likelihood Gaussian of the training rows, in closed form
    mean, cov = data[train].mean(0), np.cov(data[train].T, bias=True)
    flow = fitted
    x = flow_samples(flow, 20000, seed=1)
    # 20000 draws estimate the mean to 0.007 sd and the covariance to about 0.01
    np.testing.assert_allclose(x.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.05)
    gaussian_nll = -stats.multivariate_normal(mean, cov).logpdf(data[val]).mean()
    # the recorded validation NLL is the flow's, and within 0.03 nats of the Gaussian's
    assert history.validation_loss[history.step.index(history.best_step)] == pytest.approx(
        -flow_log_prob(flow, data[val]).mean(), abs=1e-10
    )
    assert abs(-flow_log_prob(flow, data[val]).mean() - gaussian_nll) < 0.03


def test_fit_mle_early_stopping_stops_and_restores_the_best_weights():
    # 20 training points and a large network: the validation NLL rises after a few evaluations
    data = np.random.default_rng(1).normal(size=(40, 2)) * [2.0, 0.5] + [1.0, -1.0]
    torch.manual_seed(0)
    flow = pf.build_flow("maf", 2, num_layers=2, hidden_dims=(32, 32)).double()
    flow, history = pf.fit_mle(
        flow,
        data,
        num_steps=1000,
        lr=1e-2,
        batch_size=64,
        validation_fraction=0.5,
        eval_every=10,
        patience=3,
        progress=False,
    )
    assert history.stopped_early and history.step[-1] < 1000
    best = int(np.argmin(history.validation_loss))
    assert history.best_step == history.step[best]
    assert len(history.step) == best + 4  # three evaluations without improvement after the best
    _, val = split_indices(len(data), 0.5, 0)
    # the returned weights are those of the best evaluation, not the last
    assert -flow_log_prob(flow, data[val]).mean() == pytest.approx(history.validation_loss[best], abs=1e-10)
    assert history.validation_loss[-1] > history.validation_loss[best]


def test_fit_mle_takes_tensors_and_integers():
    flow = pf.build_flow("maf", 2, num_layers=1, hidden_dims=(4,)).double()
    data = torch.randn(20, 2, dtype=torch.float64, requires_grad=True)  # a graph is detached, not refused
    assert pf.fit_mle(flow, data, num_steps=2, progress=False)[1].step == [2]
    ints = np.random.default_rng(6).integers(0, 5, size=(20, 2))  # integers are cast, not refused
    assert pf.fit_mle(flow, ints, num_steps=2, progress=False)[1].step == [2]


def test_fit_mle_standardizes_data_far_outside_the_spline_bound():
    # N(5, 0.5^2 I): outside nsf's bound of 3, where its splines are the identity
    sd, n = 0.5, 4000
    data = 5.0 + sd * np.random.default_rng(7).standard_normal((n, 2))
    torch.manual_seed(0)
    flow = pf.build_flow("nsf", 2, num_layers=1, hidden_dims=(16, 16)).double()
    assert flow.config["bound"] == 3.0
    options = dict(num_steps=100, lr=5e-3, batch_size=128, validation_fraction=0.5, progress=False)
    fitted, history = pf.fit_mle(flow, data, **options)
    # ``flow`` (trained in place) is the fitted flow without its Standardize layer
    entropy, m = check_standardized_fit(fitted, history, data, sd, flow_log_prob, flow)
    assert not any(p is fitted.parts[-1].loc for p in fitted.parameters())  # buffers, not trained
    # fitting a fitted flow again keeps its Standardize layer and statistics
    again, _ = pf.fit_mle(fitted, data + 1.0, num_steps=1, progress=False)
    assert again is fitted and torch.equal(fitted.parts[-1].loc, torch.as_tensor(m))
    # without it the splines see only their identity tails: the gradient is zero, nothing is learnt
    torch.manual_seed(0)
    raw, history = pf.fit_mle(
        pf.build_flow("nsf", 2, num_layers=1, hidden_dims=(16, 16)).double(), data, standardize=False, **options
    )
    assert raw is not fitted and min(history.validation_loss) > entropy + 20


def test_fit_mle_warns_about_a_constant_column():
    data = np.random.default_rng(8).normal(size=(20, 2))
    data[:, 1] = 3.0
    flow = pf.build_flow("maf", 2, num_layers=1, hidden_dims=(4,)).double()
    with pytest.warns(RuntimeWarning, match=r"column\(s\) \[1\] of the training data are constant"):
        fitted, _ = pf.fit_mle(flow, data, num_steps=1, progress=False)
    np.testing.assert_allclose(fitted.parts[-1].scale[1].item(), 1.0)  # only centred


def test_progress_bar_only_when_asked(capfd):
    data = np.random.default_rng(2).normal(size=(20, 2))
    flow = pf.build_flow("maf", 2, num_layers=1, hidden_dims=(4,)).double()
    pf.fit_mle(flow, data, num_steps=3, eval_every=1, progress=False)
    pf.fit_reverse_kl(flow, lambda x: -0.5 * (x**2).sum(-1), num_steps=3, num_samples=8, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    pf.fit_mle(flow, data, num_steps=3, eval_every=1, progress=True)
    assert "fit_mle" in capfd.readouterr().err


PRECISION = torch.linalg.inv(torch.as_tensor(COV))
LOG_Z = 0.5 * math.log(np.linalg.det(2 * math.pi * COV))


def gaussian_log_density(x):
    """Unnormalised log-density of N(MEAN, COV): log Z = log sqrt(det(2 pi COV))."""
    d = x - torch.as_tensor(MEAN)
    return -0.5 * ((d @ PRECISION) * d).sum(-1)


def kl_to_target(flow, n=20000, seed=3):
    """KL(q || p) from fresh draws: E_q[log q - log p~] + log Z."""
    torch.manual_seed(seed)
    with torch.no_grad():
        u = torch.randn(n, 2, dtype=torch.float64)
        x, ladj = flow.call_and_ladj(u)
        log_q = -0.5 * (u**2).sum(-1) - math.log(2 * math.pi) - ladj
        return (log_q - gaussian_log_density(x)).mean().item() + LOG_Z, x.numpy()


@pytest.mark.parametrize("stick_the_landing", [False, True])
def test_fit_reverse_kl_matches_a_gaussian_target(stick_the_landing):
    torch.manual_seed(0)
    flow = pf.build_flow("iaf", 2, num_layers=2, hidden_dims=(16,)).double()
    steps = 300 if stick_the_landing else 500
    _, history = pf.fit_reverse_kl(
        flow, gaussian_log_density, num_steps=steps, lr=1e-2, stick_the_landing=stick_the_landing, progress=False
    )
    assert len(history.loss) == steps and history.step[-1] == history.best_step == steps
    kl, x = kl_to_target(flow)
    # the loss is KL - log Z; measured here: KL 0.005 (standard), 0.002 (path derivative)
    assert kl < (0.01 if stick_the_landing else 0.02)
    assert abs(np.mean(history.loss[-50:]) + LOG_Z) < 0.03
    np.testing.assert_allclose(x.mean(0), MEAN, atol=0.05)
    np.testing.assert_allclose(np.cov(x.T), COV, atol=0.1)


def test_fit_reverse_kl_anneals_the_target():
    # one step at beta = 1/4 from the untrained flow (q = N(0, I)): the loss estimates
    # E_q[log q - beta log p~] = -(1 + log 2 pi) + beta/2 (tr P + m^T P m)
    flow = pf.build_flow("iaf", 2, num_layers=2, hidden_dims=(16,)).double()
    _, history = pf.fit_reverse_kl(
        flow, gaussian_log_density, num_steps=1, num_samples=4096, anneal_steps=4, progress=False
    )
    p, m = PRECISION.numpy(), MEAN
    cross = np.trace(p) + m @ p @ m
    expected = -(1 + math.log(2 * math.pi)) + 0.25 * 0.5 * cross
    # per-draw sd of log q - beta log p~ under N(0, I), from independent draws
    u = np.random.default_rng(4).normal(size=(100000, 2))
    per_draw = -0.5 * (u**2).sum(-1) + 0.125 * np.einsum("ni,ij,nj->n", u - m, p, u - m)
    assert abs(history.loss[0] - expected) < 4 * per_draw.std() / math.sqrt(4096)
    assert abs(history.loss[0] - (expected + 0.75 * 0.5 * cross)) > 1.0  # not beta = 1
    # a full annealed fit still ends at the target
    torch.manual_seed(0)
    flow = pf.build_flow("iaf", 2, num_layers=2, hidden_dims=(16,)).double()
    pf.fit_reverse_kl(
        flow, gaussian_log_density, num_steps=400, lr=1e-2, anneal_steps=150, stick_the_landing=True, progress=False
    )
    assert kl_to_target(flow)[0] < 0.01


def test_fit_reverse_kl_errors():
    flow = pf.build_flow("iaf", 2, num_layers=1, hidden_dims=(4,)).double()
    with pytest.raises(ValueError, match=r"to shape \(n,\); for n=8 it returned shape \(8, 2\)"):
        pf.fit_reverse_kl(flow, lambda x: x, num_steps=5, num_samples=8, progress=False)
    with pytest.raises(ValueError, match="anneal_steps=-1 must be an integer >= 0"):
        pf.fit_reverse_kl(flow, gaussian_log_density, anneal_steps=-1, progress=False)
    with pytest.raises(ValueError, match="log_density must be a function"):
        pf.fit_reverse_kl(flow, 3.0, progress=False)


class CountingTarget:
    """gaussian_log_density, NaN (at every draw, or at the first only) on the calls in ``nan_calls``."""

    def __init__(self, nan_calls, every_draw=True, value=math.nan):
        self.calls, self.nan_calls, self.every_draw, self.value = 0, nan_calls, every_draw, value

    def __call__(self, x):
        self.calls += 1
        out = gaussian_log_density(x)
        if self.calls in self.nan_calls:
            out = out * self.value if self.every_draw else torch.cat([out[:1] * self.value, out[1:]])
        return out


def fit_reverse_kl_error(target, match, **options):
    """``fit_reverse_kl`` of a small IAF on ``target`` raises a ``ValueError`` matching ``match``."""
    flow = pf.build_flow("iaf", 2, num_layers=1, hidden_dims=(4,)).double()
    with pytest.raises(ValueError, match=match):
        pf.fit_reverse_kl(flow, target, progress=False, **options)


def test_fit_reverse_kl_raises_at_once_on_a_nan_target_at_its_first_evaluation():
    target = CountingTarget(range(1, 10**6))
    message = (
        r"fit_reverse_kl: the target log-density returned NaN at 256 of 256 "
        r"draws at its first evaluation \(step 1, before any update\): the target "
        r"is broken, not the training.*unconstrained space"
    )
    fit_reverse_kl_error(target, message, num_steps=100)
    assert target.calls == 1
    inf_once = CountingTarget([1], every_draw=False, value=math.inf)
    fit_reverse_kl_error(inf_once, "returned inf at 1 of 256 draws at its first evaluation")


def test_fit_reverse_kl_skips_a_step_with_a_nan_target():
    def fit(num_steps, target):
        torch.manual_seed(0)
        flow = pf.build_flow("iaf", 2, num_layers=2, hidden_dims=(8,)).double()
        return pf.fit_reverse_kl(flow, target, num_steps=num_steps, lr=1e-2, progress=False)

    before, _ = fit(4, CountingTarget([]))
    # one draw of step 5 gets a NaN target: the step is skipped, training goes on
    after, history = fit(5, CountingTarget([5], every_draw=False))
    assert history.skipped_steps == 1 and history.step == [1, 2, 3, 4]
    for (name, a), b in zip(after.state_dict().items(), before.state_dict().values()):
        assert torch.equal(a, b), name
    longer, history = fit(8, CountingTarget([5]))
    assert history.step == [1, 2, 3, 4, 6, 7, 8] and np.isfinite(history.loss).all()
    assert history.skipped_steps == 1 and history.best_step == 8
    assert any(not torch.equal(a, b) for a, b in zip(longer.state_dict().values(), before.state_dict().values()))


def test_fit_reverse_kl_raises_naming_the_target_when_it_stays_nan():
    message = (
        r"fit_reverse_kl: 4 consecutive steps \(steps 3 to 6\) were skipped.*the "
        r"target log-density returned NaN or inf at some of the flow's draws in 4 of "
        r"them.*unconstrained space"
    )
    fit_reverse_kl_error(CountingTarget(range(3, 10**6), every_draw=False), message, max_bad_steps=4)


def test_fit_reverse_kl_raises_naming_a_too_large_learning_rate():
    # target N(0, 0.1^2 I): the loss pulls the scale down from 1, and Adam's first step of
    # about lr = 5 makes it negative, where log|det| is NaN at every later step
    flow = RawScale(1.0)
    with pytest.raises(
        ValueError,
        match=r"fit_reverse_kl: 20 consecutive steps \(steps 2 to 21\) were skipped "
        r"because the loss was NaN or inf at 20 of them, after training had made "
        r"progress: the learning rate lr=5 is too large for this flow.*Try lr=0.5",
    ):
        pf.fit_reverse_kl(flow, lambda x: -50 * (x**2).sum(-1), lr=5.0, progress=False)


# A conjugate model: theta ~ N(0, 1), y_i ~ N(theta, 1). Posterior N(sum y / (n + 1), 1 / (n + 1)),
# evidence N(y; 0, I + 1 1^T).
Y = torch.tensor([0.3, 1.2, 0.8, -0.1, 0.9], dtype=torch.float64)
POST_MEAN, POST_SD = Y.sum().item() / 6, 1 / math.sqrt(6)
EVIDENCE = stats.multivariate_normal(np.zeros(5), np.eye(5) + 1.0).logpdf(Y.numpy())


def normal_model(y):
    theta = pyro.sample("theta", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def guide_at(scale_factor):
    """The untrained AutoFlow: exactly N(POST_MEAN, (scale_factor * POST_SD)^2)."""
    start = init_to_value(values={"theta": torch.tensor(POST_MEAN, dtype=torch.float64)})
    guide = pf.AutoFlow(
        normal_model, init_loc_fn=start, init_scale=scale_factor * POST_SD, num_layers=2, hidden_dims=(4,)
    )
    guide(Y)
    return guide


def test_evaluate_on_an_exact_guide_gives_the_evidence():
    pyro.set_rng_seed(0)
    out = pf.evaluate(normal_model, guide_at(1.0), Y, num_samples=4500)
    # q = p: every log-weight equals log Z (4500 draws: passes of 2000, 2000 and 500)
    assert out["num_samples"] == 4500
    assert out["elbo"] == pytest.approx(EVIDENCE, abs=1e-8)
    assert out["iwelbo"] == pytest.approx(EVIDENCE, abs=1e-8)
    assert out["ess_fraction"] == pytest.approx(1.0, abs=1e-8)
    assert out["khat"] < 0.5


@pytest.mark.parametrize("factor", [0.5, 1.5])
def test_evaluate_matches_the_closed_form_elbo_of_a_mismatched_guide(factor):
    pyro.set_rng_seed(1)
    out = pf.evaluate(normal_model, guide_at(factor), Y, num_samples=4000)
    # ELBO = log Z - KL(N(m, c^2 s^2) || N(m, s^2)); log w - log Z = log c + eps^2 (1 - c^2) / 2
    # has sd |1 - c^2| / sqrt(2) per draw
    kl = -math.log(factor) + factor**2 / 2 - 0.5
    assert abs(out["elbo"] - (EVIDENCE - kl)) < 4 * abs(1 - factor**2) / math.sqrt(2) / math.sqrt(4000)
    # the importance-weighted bound lies between the ELBO and log Z (up to its Monte Carlo
    # error); with bounded weights (the wide guide) it is within 0.02 of log Z
    assert out["elbo"] < out["iwelbo"] < EVIDENCE + 0.02
    if factor > 1:
        assert abs(out["iwelbo"] - EVIDENCE) < 0.02
    assert out["ess_fraction"] < 0.95
    # a too-narrow guide has heavy-tailed weights (asymptotic k = 1 - c^2 = 0.75), a
    # too-wide one bounded weights (k < 0)
    assert (out["khat"] > 0.5) if factor < 1 else (out["khat"] < 0.5)
