"""``fit_posterior``, the guide's start and its tail map on NumPyro, against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO, init_to_value

import pyroflows.jax as pf
from pyroflows.jax.transforms import LogTails
from tests.backend_checks import TAIL_OPTIONS, chosen_iterate, record_tail_choice, two_sites_model

SMALL = dict(num_layers=2, hidden_dims=(8,))  # fit_posterior calls also shorten the report to 2000 draws


def test_log_tails_log_det_and_inverse_match_autodiff():
    with jax.enable_x64(True):
        layer = LogTails(4, threshold=2.0)
        for x in (jnp.array([-7.0, -1.5, 0.3, 40.0]), jnp.array([2.5, -2.5, 1e6, -1e30])):
            y, ladj = layer.call_and_ladj(x)
            jac = jax.jacobian(lambda v: layer.call_and_ladj(v)[0])(x)
            np.testing.assert_allclose(ladj, np.linalg.slogdet(np.asarray(jac))[1], atol=1e-12)
            back, inv_ladj = layer.inverse_and_ladj(y)
            keep = np.abs(np.asarray(x)) < 1e6
            np.testing.assert_allclose(np.asarray(back)[keep], np.asarray(x)[keep], rtol=1e-12)
            np.testing.assert_allclose(inv_ladj, -ladj, rtol=1e-12)
        assert math.isclose(float(y[3]), -(2 + math.log1p(1e30 - 2)), rel_tol=1e-12)


def normal_mean(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_fit_posterior_matches_the_conjugate_posterior_and_reports():
    y = jnp.linspace(-1.0, 3.0, 20)
    guide, params, report = pf.fit_posterior(normal_mean, y, num_steps=300, progress=False, **SMALL, num_samples=2000)
    precision = 1 / 4 + len(y)
    mean, sd = float(y.sum()) / precision, precision**-0.5
    draws = guide.sample_posterior(jax.random.key(1), params, sample_shape=(4000,))["mu"]
    assert isinstance(guide, pf.AutoFlow) and guide.start.kind == "laplace"
    assert abs(float(draws.mean()) - mean) < 0.1 * sd and abs(float(draws.std()) / sd - 1) < 0.1
    assert set(report) >= {"elbo", "iwelbo", "khat", "ess", "seconds", "num_steps", "stopped", "start"}
    assert report["num_steps"] == 300 and report["stopped"] == "num_steps" and report["khat"] < 0.7
    assert set(params) == {"auto_flow$params", "auto_affine$params", "auto_laplace$params"}


def test_fit_posterior_stops_on_a_plateau_within_max_steps():
    y = jnp.linspace(-1.0, 3.0, 20)
    _, _, report = pf.fit_posterior(normal_mean, y, progress=False, window=20, max_steps=200, **SMALL, num_samples=2000)
    assert report["stopped"] in ("plateau", "max_steps") and report["num_steps"] <= 200


def test_fit_posterior_ends_on_the_tail_iterate_with_the_lowest_khat(monkeypatch):
    tails, scores = record_tail_choice(monkeypatch)
    _, params, report = pf.fit_posterior(normal_mean, jnp.linspace(-1.0, 3.0, 20), **TAIL_OPTIONS, **SMALL)
    jax.tree.map(np.testing.assert_array_equal, params, chosen_iterate(tails, scores))
    assert report["tail_khats"] == scores[0]


def test_fit_posterior_warns_when_khat_says_the_guide_misses_mass():
    def cauchy():
        numpyro.sample("z", dist.StudentT(1.0, 0.0, 1.0))

    # a guide of sd 0.01 against a Cauchy posterior: the importance weights have no variance
    with pytest.warns(UserWarning, match="k-hat .* > 0.7"):
        _, _, report = pf.fit_posterior(cauchy, num_steps=1, progress=False, init_scale=0.01, **SMALL, num_samples=2000)
    assert report["khat"] > 0.7


two_sites = two_sites_model(numpyro)


def test_plain_svi_at_lr_0_1_stays_finite():
    # realnvp with optax.adam(0.1) turned NaN within 23 steps in 7 of 8 seeds before LogTails
    y = jax.random.normal(jax.random.key(0), (50,)) * 2 + 3
    for seed in (1,):
        guide = pf.AutoFlow(two_sites, flow="realnvp", key=jax.random.key(seed))
        result = SVI(two_sites, guide, optax.adam(1e-1), Trace_ELBO(num_particles=8)).run(
            jax.random.key(seed + 1), 60, y, progress_bar=False
        )
        assert np.isfinite(np.asarray(result.losses)).all()
        assert all(np.isfinite(np.asarray(v)).all() for v in guide.median(result.params).values())


def test_a_funnel_falls_back_to_a_diagonal_start_and_trains():
    def funnel():
        v = numpyro.sample("v", dist.Normal(0.0, 3.0))
        with numpyro.plate("n", 9):
            numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))

    guide = pf.AutoFlow(funnel, init_loc_fn=init_to_value(values={"v": 0.0, "x": jnp.zeros(9)}), **SMALL)
    svi = SVI(funnel, guide, optax.adam(1e-2), Trace_ELBO())
    with pytest.warns(UserWarning, match="no Laplace start"):
        state = svi.init(jax.random.key(0))
    assert guide.start.kind == "diagonal"
    params = svi.get_params(state)
    # scales 1/sqrt(H_ii) at (v, x) = 0: H_vv = 1/9, H_xx = e^-v = 1
    np.testing.assert_allclose(
        np.diagonal(guide.get_whitening(params).scale_tril)[:2], [3.0, 1.0], rtol=1e-5
    )  # float32
    for _ in range(20):
        state, loss = svi.update(state)
        assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="init_scale='laplace'"):
        SVI(funnel, pf.AutoFlow(funnel, init_scale="laplace", **SMALL), optax.adam(1e-3), Trace_ELBO()).init(
            jax.random.key(0)
        )


def test_above_the_dense_hessian_limit_the_start_is_isotropic(monkeypatch):
    from pyroflows import laplace

    monkeypatch.setattr(laplace, "MAX_LAPLACE_DIM", 1)
    guide = pf.AutoFlow(two_sites, **SMALL)
    svi = SVI(two_sites, guide, optax.adam(1e-3), Trace_ELBO())
    with pytest.warns(UserWarning, match="2 latent dimensions are more than the 1"):
        params = svi.get_params(svi.init(jax.random.key(0), jnp.ones(10)))
    assert guide.start.kind == "isotropic" and guide.get_whitening(params) is None
    np.testing.assert_allclose(np.exp(np.asarray(guide.get_flow(params)[1].log_scale())), 0.1, rtol=1e-5)
