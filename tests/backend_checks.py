"""Problems and checks that the torch and JAX tests share, in numpy: a regression with a
closed-form posterior, checks of posterior draws, and the checks of a standardized fit."""

import importlib
import math

import numpy as np
import pytest
from scipy import stats

from pyroflows.fitting import split_indices
from tests import snf_reference

# Bayesian linear regression with known noise: a Gaussian posterior in closed form.
_rng = np.random.default_rng(0)
X = _rng.normal(size=(20, 3))
NOISE = 0.5
Y = X @ np.array([1.0, -0.5, 0.3]) + NOISE * _rng.normal(size=20)


def regression_posterior():
    """``(mean, cov, log_z)``: the posterior of ``b ~ N(0, I)``, ``y ~ N(X b, NOISE^2)``, and
    the log evidence."""
    cov = np.linalg.inv(np.eye(3) + X.T @ X / NOISE**2)
    mean = cov @ X.T @ Y / NOISE**2
    log_z = stats.multivariate_normal(np.zeros(20), X @ X.T + NOISE**2 * np.eye(20)).logpdf(Y)
    return mean, cov, log_z


def check_gaussian_draws(draws, mean, cov):
    """Draws ``(n, d)`` of a guide fitted to a Gaussian posterior ``N(mean, cov)``.

    With 4000 draws the Monte Carlo error of the mean is 0.016 sd and of the sd 1.1%; the
    rest is VI error (a Gaussian is in the flow's family, so 0.1 sd and 10% are generous).
    """
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.1 * sd.min())
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.1)
    np.testing.assert_allclose(np.corrcoef(draws.T), cov / np.outer(sd, sd), atol=0.08)


def check_matches_reference(draws, reference, names):
    """Each site's mean within 0.12 reference sd, and its sd within 10%, of NUTS's draws.

    NUTS's 4000 draws give means to about 0.03 sd and sds to about 2-3%, a guide's 4000
    draws 0.016 sd and 1.1%; the rest is VI error (reverse KL under-disperses a little).
    """
    for name in names:
        got, ref = np.asarray(draws[name], dtype=float), np.asarray(reference[name], dtype=float)
        ref_sd = ref.std()
        assert abs(got.mean() - ref.mean()) < 0.12 * ref_sd, name
        assert abs(got.std() / ref_sd - 1) < 0.1, name


def check_standardized_fit(fitted, history, data, sd, log_prob, inner):
    """``fit_mle`` with ``standardize=True`` (validation fraction 0.5) on ``N(5, sd^2 I)`` data.

    Args:
        fitted: the returned flow, ending in its ``Standardize`` layer.
        history: the returned history.
        data: the training data ``(n, 2)``.
        sd: the data's standard deviation.
        log_prob: ``log_prob(flow, x) -> numpy array``, the flow's log-density.
        inner: the fitted flow without its ``Standardize`` layer.

    Returns:
        ``(entropy, m)``: the data's entropy and the training rows' mean.
    """
    train, val = split_indices(len(data), 0.5, 0)
    # the data's NLL: the Gaussian's entropy 0.5 log(2 pi e sd^2) per coordinate (1.4516 nats),
    # and the true density's NLL on the same 2000 validation rows (1.4043: the mean of 2000 has se 0.022)
    entropy = 2 * 0.5 * math.log(2 * math.pi * math.e * sd**2)
    true_nll = -stats.norm(5.0, sd).logpdf(data[val]).sum(1).mean()
    best = history.validation_loss[history.step.index(history.best_step)]
    # measured -0.042 and 0.005 (JAX), -0.041 and 0.006 (torch)
    assert abs(best - entropy) < 0.1 and abs(best - true_nll) < 0.05
    # the returned density is the original data's: the recorded NLL is the fitted flow's, and
    # log q(x) = log q_flow((x - m) / s) - sum(log s) with m, s the training rows' mean and sd
    assert best == pytest.approx(-float(np.mean(log_prob(fitted, data[val]))), abs=1e-10)
    m, s = data[train].mean(0), data[train].std(0)
    np.testing.assert_allclose(
        log_prob(fitted, data[val]), log_prob(inner, (data[val] - m) / s) - np.log(s).sum(), atol=1e-10
    )
    np.testing.assert_allclose(np.asarray(fitted.parts[-1].loc), m, rtol=1e-12)
    return entropy, m


# The Metropolis-type blocks of a stochastic flow, by id: (class name, args, keywords).
METROPOLIS_BLOCKS = {
    "mh": ("MetropolisHastings", (0.8,), {"num_steps": 4}),
    "mala": ("MALA", (0.3,), {"num_steps": 4}),
    "hmc": ("HMC", (0.3, 4), {"num_steps": 3}),
}


def metropolis_blocks(snf):
    """``pytest.mark.parametrize`` over ``METROPOLIS_BLOCKS`` built from a backend's ``snf`` module."""
    blocks = [getattr(snf, cls)(*args, **kwargs) for cls, args, kwargs in METROPOLIS_BLOCKS.values()]
    return pytest.mark.parametrize("block", blocks, ids=list(METROPOLIS_BLOCKS))


def invariance_points(n=20000):
    """``n`` exact draws of the snf reference's Gaussian ``N(MEAN, COV)``."""
    return np.random.default_rng(1).multivariate_normal(snf_reference.MEAN, snf_reference.COV, size=n)


def check_invariant_move(y, y_new, ds, log_p, log_p_new, tol):
    """A Metropolis-type block moved the exact draws ``y`` to ``y_new`` with path term ``ds``.

    The kernel moves most points (so invariance is not trivial), its output is an exact
    sample too, and, the kernels being reversible, ``ds`` telescopes to
    ``log p(y) - log p(y_new)`` over the steps (to ``tol``).
    """
    y, y_new = np.asarray(y), np.asarray(y_new)
    assert np.mean(np.any(y_new != y, -1)) > 0.5
    assert np.corrcoef(y[:, 0], y_new[:, 0])[0, 1] < 0.9
    snf_reference.check_gaussian_moments(y_new)
    np.testing.assert_allclose(ds, np.asarray(log_p) - np.asarray(log_p_new), rtol=tol, atol=tol)


def two_sites_model(ppl):
    """A model with an unconstrained and a positive site, for ``ppl`` (``pyro`` or ``numpyro``,
    whose ``sample``, ``plate`` and distributions read the same)."""
    dist = importlib.import_module(f"{ppl.__name__}.distributions")

    def two_sites(y):
        mu = ppl.sample("mu", dist.Normal(0.0, 10.0))
        sigma = ppl.sample("sigma", dist.HalfNormal(5.0))
        with ppl.plate("data", len(y)):
            ppl.sample("y", dist.Normal(mu, sigma), obs=y)

    return two_sites


def record_tail_choice(monkeypatch):
    """Patch ``fit_posterior``'s choice of its final iterate to record the tail's iterates
    and their k-hats, and to pick the worst (so that the choice differs from the last
    iterate by more than chance). Returns the lists the fit fills: tails, k-hat lists."""
    from pyroflows import recipe

    tails, scores = [], []

    class Recorded(recipe.TailIterates):
        def __init__(self, schedule):
            super().__init__(schedule)
            tails.append(self)

    monkeypatch.setattr(recipe, "TailIterates", Recorded)
    monkeypatch.setattr(recipe, "best_iterate", lambda khats: scores.append(list(khats)) or int(np.argmax(khats)))
    return tails, scores


# the tail is the windows that start in the last min(10 * 2, 40 // 2) steps: those ending at 30 and 40
TAIL_OPTIONS = dict(num_steps=40, window=10, patience=2, progress=False, num_samples=2000)


def chosen_iterate(tails, scores):
    """The iterate the patched choice picked, after checking the tail and the k-hats it saw."""
    (tail,) = tails
    assert len(tail.iterates) == 2 and len(scores) == 1 and all(k < 0.7 for k in scores[0])
    return tail.iterates[int(np.argmax(scores[0]))]
