"""fit_mle, fit_reverse_kl and evaluate (NumPyro backend) against closed forms.

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


def nll(flow, x):
    base = dist.Normal(jnp.zeros(2), 1.0).to_event(1)
    return -float(jnp.mean(dist.TransformedDistribution(base, flow.to_transform()).log_prob(jnp.asarray(x))))


# Every fit_mle call below has the same flow, data shape, batch size and eval_every, so
# they share one compiled program.
FIT = dict(batch_size=256, eval_every=10)


def test_fit_mle_recovers_the_gaussian_maximum_likelihood_estimate():
    flow, history = pf.fit_mle(gaussian_flow(), DATA, num_steps=1500, lr=1e-2, progress=False, **FIT)
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
    assert history.validation_loss[-1] < history.validation_loss[0] - 1


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


def test_fit_mle_checks_data_and_prints_only_when_asked(capfd):
    bad = DATA.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\) \(rows 3\)"):
        pf.fit_mle(gaussian_flow(), bad, progress=False)
    with pytest.raises(ValueError, match="data has 3 columns but the flow has dim=2"):
        pf.fit_mle(gaussian_flow(), np.zeros((10, 3)), progress=False)
    with pytest.raises(ValueError, match="fit_mle: lr=-1"):
        pf.fit_mle(gaussian_flow(), DATA, lr=-1)
    capfd.readouterr()
    pf.fit_mle(gaussian_flow(), DATA, num_steps=10, progress=False, **FIT)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    pf.fit_mle(gaussian_flow(), DATA, num_steps=10, progress=True, **FIT)
    assert "fit_mle" in capfd.readouterr().err


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
        gaussian_flow(), log_target, num_steps=1000, num_samples=512, lr=5e-2, anneal_steps=100,
        stick_the_landing=stick_the_landing, progress=False,
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
    with pytest.raises(ValueError, match="fit_reverse_kl: the target log-density was NaN at step 1;"):
        pf.fit_reverse_kl(gaussian_flow(), nan_target, num_steps=50, num_samples=512, progress=False)
    with pytest.raises(ValueError, match=r"must map an array of shape \(n, 2\) to shape \(n,\)"):
        pf.fit_reverse_kl(gaussian_flow(), lambda x: x, num_steps=5, progress=False)
    with pytest.raises(ValueError, match="anneal_steps=-1"):
        pf.fit_reverse_kl(gaussian_flow(), log_target, anneal_steps=-1)


MU = jnp.array([0.3, -1.1])


def exact_model():
    # normalised densities plus a factor: the evidence is exactly log Z = 1.7
    numpyro.sample("z", dist.Normal(MU, 0.6).to_event(1))
    numpyro.sample("w", dist.LogNormal(0.3, 0.6))
    numpyro.factor("offset", 1.7)


def test_evaluate_on_an_exact_guide_and_a_too_narrow_one():
    guide = pf.AutoFlow(
        exact_model, init_loc_fn=init_to_value(values={"z": MU, "w": np.exp(0.3)}), init_scale=0.6,
        num_layers=1, hidden_dims=(4,),
    )
    trace = handlers.trace(handlers.seed(guide, rng_seed=0)).get_trace()
    params = {name: site["value"] for name, site in trace.items() if site["type"] == "param"}
    # q = p in the unconstrained space, and the Jacobian of exp() is accounted for on
    # both sides, so every log-weight is log Z
    out = pf.evaluate(exact_model, guide, params, num_samples=1000)
    assert out["num_samples"] == 1000
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
