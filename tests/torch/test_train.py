"""fit_mle, fit_reverse_kl and evaluate (Pyro backend) against closed forms: a Gaussian's
maximum-likelihood fit, a Gaussian target with known log Z, and a conjugate model whose
evidence and posterior are exact."""

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
    assert fitted is flow  # trained in place
    assert history.step[-1] == 400 and len(history.validation_loss) == len(history.step) == 8
    train, val = split_indices(len(data), 0.1, 0)
    # the maximum-likelihood Gaussian of the training rows, in closed form
    mean, cov = data[train].mean(0), np.cov(data[train].T, bias=True)
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
    _, history = pf.fit_mle(
        flow, data, num_steps=1000, lr=1e-2, batch_size=64, validation_fraction=0.5, eval_every=10, patience=3,
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


def test_fit_mle_rejects_bad_data_and_options():
    flow = pf.build_flow("maf", 2, num_layers=1, hidden_dims=(4,)).double()
    data = np.zeros((10, 2))
    data[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\) \(rows 3\)"):
        pf.fit_mle(flow, data, progress=False)
    with pytest.raises(ValueError, match="3 columns but the flow has dim=2"):
        pf.fit_mle(flow, np.zeros((10, 3)), progress=False)
    with pytest.raises(ValueError, match="fit_mle: lr=-1 must be a positive number"):
        pf.fit_mle(flow, np.zeros((10, 2)), lr=-1, progress=False)


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
    with pytest.raises(ValueError, match="the target log-density was NaN at step 1"):
        pf.fit_reverse_kl(flow, lambda x: x.sum(-1) * float("nan"), num_steps=5, progress=False)
    with pytest.raises(ValueError, match=r"to shape \(n,\); for n=8 it returned shape \(8, 2\)"):
        pf.fit_reverse_kl(flow, lambda x: x, num_steps=5, num_samples=8, progress=False)
    with pytest.raises(ValueError, match="anneal_steps=-1 must be an integer >= 0"):
        pf.fit_reverse_kl(flow, gaussian_log_density, anneal_steps=-1, progress=False)
    with pytest.raises(ValueError, match="log_density must be a function"):
        pf.fit_reverse_kl(flow, 3.0, progress=False)


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
    guide = pf.AutoFlow(normal_model, init_loc_fn=start, init_scale=scale_factor * POST_SD, num_layers=2,
                        hidden_dims=(4,))
    guide(Y)
    return guide


def test_evaluate_on_an_exact_guide_gives_the_evidence():
    pyro.set_rng_seed(0)
    out = pf.evaluate(normal_model, guide_at(1.0), Y, num_samples=1000)
    # q = p: every log-weight equals log Z
    assert out["num_samples"] == 1000
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
