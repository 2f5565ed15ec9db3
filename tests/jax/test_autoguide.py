"""AutoFlow (NumPyro): posteriors against closed forms and NUTS, initialisation, median and
quantiles, Predictive, NeuTraReparam, the sticking-the-landing gradient and errors."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO  # noqa: E402
from numpyro.infer.initialization import init_to_value  # noqa: E402
from numpyro.infer.reparam import NeuTraReparam  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402
from scipy import stats  # noqa: E402

import pyroflows.jax as pf  # noqa: E402
from pyroflows.jax.transforms import ElementwiseAffine, Permute  # noqa: E402
from tests.backend_checks import (  # noqa: E402
    NOISE,
    X,
    Y,
    check_gaussian_draws,
    check_matches_reference,
    regression_posterior,
)
from tests.laplace_reference import location_scale_mode_and_cov  # noqa: E402

# small flows keep compile time down; three IAF layers fit the skewed scale posterior of
# (b) (two leave its sd about 6% short), two suffice for the Gaussian posterior of (a)
SMALL = dict(num_layers=3, hidden_dims=(8,))
TWO_LAYERS = dict(num_layers=2, hidden_dims=(8,))

# (a) Bayesian linear regression with known noise (tests/backend_checks.py): a Gaussian posterior.


def regression(x, y=None):
    b = numpyro.sample("b", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
    numpyro.sample("y", dist.Normal(x @ b, NOISE), obs=y)


# (b) a normal with unknown location and scale: non-conjugate, constrained scale.
DATA = 1.0 + 0.7 * np.random.default_rng(1).normal(size=30)


def location_scale(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def fit(model, guide, *args, steps=1000, lr=2e-2, particles=8, seed=0):
    # svi.run without a progress bar runs the updates in one lax.scan, so the whole SVI
    # update (guide, model, ELBO over 8 vectorised particles, Adam) is traced and
    # compiled. The decaying learning rate lets Adam's jitter fall well below the
    # posterior sd at the end.
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.02))
    svi = SVI(model, guide, optimizer, Trace_ELBO(num_particles=particles))
    result = svi.run(jax.random.key(seed), steps, *args, progress_bar=False)
    return result.params, result.losses


def initial_params(guide, *args):
    trace = handlers.trace(handlers.seed(guide, rng_seed=0)).get_trace(*args)
    return {name: site["value"] for name, site in trace.items() if site["type"] == "param"}


@pytest.fixture(scope="module")
def regression_fit():
    guide = pf.AutoFlow(regression, **TWO_LAYERS)
    params, losses = fit(regression, guide, X, Y)
    return guide, params, losses


@pytest.fixture(scope="module")
def location_scale_fit():
    guide = pf.AutoFlow(location_scale, **SMALL)
    params, _ = fit(location_scale, guide, DATA)
    draws = guide.sample_posterior(jax.random.key(3), params, sample_shape=(4000,))
    return guide, params, draws


def test_conjugate_regression_posterior_matches_the_closed_form(regression_fit):
    guide, params, losses = regression_fit
    mean, cov, log_z = regression_posterior()
    assert np.all(np.isfinite(losses))
    draws = jax.jit(lambda k: guide.sample_posterior(k, params, sample_shape=(4000,)))(jax.random.key(1))["b"]
    check_gaussian_draws(np.asarray(draws), mean, cov)
    # the loss is -ELBO = KL - log Z
    assert np.mean(losses[-100:]) + log_z < 0.05


def test_non_conjugate_posterior_with_a_constrained_site_matches_nuts(location_scale_fit):
    _, _, draws = location_scale_fit
    mcmc = MCMC(NUTS(location_scale), num_warmup=500, num_samples=4000, progress_bar=False)
    mcmc.run(jax.random.key(2), DATA)
    reference = mcmc.get_samples()
    assert float(draws["sigma"].min()) > 0
    check_matches_reference(draws, reference, ("mu", "sigma"))


def test_init_loc_fn_and_init_scale_set_the_starting_guide():
    start = {"mu": 0.4, "sigma": 2.0}
    guide = pf.AutoFlow(location_scale, init_loc_fn=init_to_value(values=start), init_scale=0.3, **SMALL)
    params = initial_params(guide, DATA)
    # the untrained IAF layers are the identity (with permutations between them), so the
    # guide is exactly N(init point, 0.3^2 I) in the unconstrained space: an affine map
    # with offset the init point and Jacobian J with J J^T = 0.09 I
    transform = guide.get_transform(params)
    offset, jac = jax.jit(lambda: (transform(jnp.zeros(2)), jax.jacfwd(transform)(jnp.array([0.7, -1.3]))))()
    np.testing.assert_allclose(offset, [0.4, np.log(2.0)], atol=1e-12)
    np.testing.assert_allclose(jac @ jac.T, 0.09 * np.eye(2), atol=1e-12)
    # a Gaussian's median is its mean, so the starting median is the init point
    # (test_exact_median_... checks median() itself against it)
    assert not guide.has_exact_quantiles


@pytest.fixture
def marginal_affine_flow():
    """A user flow of elementwise layers and a permutation, registered for one test."""
    name = "test_marginal_affine"

    @pf.register_flow(name)
    def builder(dim, num_layers=None, hidden_dims=None, *, key):
        return [ElementwiseAffine(dim), Permute.reverse(dim), ElementwiseAffine(dim)]

    try:
        yield name
    finally:
        pf.REGISTRY._builders.pop(name)


def test_exact_median_and_quantiles_for_an_elementwise_flow_match_the_closed_form(marginal_affine_flow):
    start = init_to_value(values={"mu": 0.5, "sigma": 1.5})
    guide = pf.AutoFlow(location_scale, flow=marginal_affine_flow, init_loc_fn=start, init_scale=0.1)
    params = initial_params(guide, DATA)
    assert guide.has_exact_quantiles
    # at the start, N(0.5, 0.1^2) for mu and LogNormal(log 1.5, 0.1) for sigma
    q = guide.quantiles(params, [0.1, 0.5, 0.9])
    z = stats.norm.ppf([0.1, 0.5, 0.9])
    np.testing.assert_allclose(q["mu"], 0.5 + 0.1 * z, atol=1e-12)
    np.testing.assert_allclose(q["sigma"], 1.5 * np.exp(0.1 * z), rtol=1e-12)
    np.testing.assert_allclose(guide.median(params)["sigma"], 1.5, rtol=1e-12)
    # perturbed weights: coordinate i is a2_i + s2_i * (a1_j + s1_j * z) with j = 1 - i
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda a: a + rng.normal(size=a.shape), params)
    flow, last = guide.get_flow(params)
    first, middle = flow.parts[0], flow.parts[2]
    a1, s1 = np.asarray(first.loc), np.exp(np.asarray(first.log_scale()))
    a2, s2 = np.asarray(middle.loc), np.exp(np.asarray(middle.log_scale()))
    a3, s3 = np.asarray(last.loc), np.exp(np.asarray(last.log_scale()))
    u = a2 + s2 * (a1 + s1 * z[:, None])[:, ::-1]
    # LogTails between the flow and the affine layer: the identity up to 5, logarithmic beyond
    expected = a3 + s3 * np.sign(u) * (np.minimum(np.abs(u), 5) + np.log1p(np.maximum(np.abs(u) - 5, 0)))
    q = guide.quantiles(params, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(q["mu"], expected[:, 0], rtol=1e-10)
    np.testing.assert_allclose(q["sigma"], np.exp(expected[:, 1]), rtol=1e-10)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        guide.quantiles(params, [0.0, 0.5])


def test_quantiles_by_sampling_match_sample_quantiles(location_scale_fit):
    guide, params, draws = location_scale_fit
    q = guide.quantiles(params, [0.1, 0.5, 0.9], num_samples=2000)
    median = guide.median(params, num_samples=2000)
    assert set(q) == {"mu", "sigma"} and q["mu"].shape == (3,)
    for name in ("mu", "sigma"):
        # the reference: 4000 other draws (sample_posterior, another key). The sd of a
        # sample quantile is at most 0.035 sd with 2000 draws and 0.025 sd with 4000
        # (at 0.1 and 0.9), so 0.15 sd is 3.5 combined errors.
        values = np.asarray(draws[name])
        np.testing.assert_allclose(q[name], np.quantile(values, [0.1, 0.5, 0.9]), atol=0.15 * values.std())
        np.testing.assert_allclose(median[name], q[name][1], atol=1e-12)


def test_predictive_and_neutra_reparam_with_a_trained_guide(regression_fit):
    guide, params, _ = regression_fit
    mean, cov, log_z = regression_posterior()
    predictive = Predictive(regression, guide=guide, params=params, num_samples=3000, return_sites=["b", "y"])
    out = predictive(jax.random.key(6), X)
    assert out["b"].shape == (3000, 3) and out["y"].shape == (3000, 20)
    # posterior predictive mean of y is X @ E[b]; its sd per point at least the noise
    np.testing.assert_allclose(out["y"].mean(0), X @ mean, atol=0.1)
    assert np.all(out["y"].std(0) > NOISE * 0.95)

    neutra = NeuTraReparam(guide, params)
    model = neutra.reparam(regression)

    @jax.jit
    @jax.vmap
    def reparam_log_joint_and_b(u):
        log_joint, trace = log_density(model, (X, Y), {}, {"auto_shared_latent": u})
        return log_joint, trace["b"]["value"]

    u = jax.random.normal(jax.random.key(7), (500, 3))
    reparam_log_joint, b = reparam_log_joint_and_b(u)
    # log p(y, T(u)) + log|T'(u)| = log Z + log N(u; 0, I) when q is the posterior: the
    # reparametrised latent is standard normal, and the constant is the evidence.
    gap = np.asarray(reparam_log_joint - stats.norm.logpdf(np.asarray(u)).sum(-1))
    assert np.std(gap) < 0.15
    assert abs(np.mean(gap) - log_z) < 0.05
    # the reparametrised model maps u to b through the guide's transform
    np.testing.assert_allclose(b, guide.get_transform(params)(u), atol=1e-12)


# A model whose posterior the starting guide matches exactly: z ~ N(mu, 0.6^2 I).
MU = jnp.array([0.3, -1.1])


def gaussian():
    numpyro.sample("z", dist.Normal(MU, 0.6).to_event(1))


def test_stick_the_landing_gradient_vanishes_when_the_guide_is_exact():
    guide = pf.AutoFlow(
        gaussian, init_loc_fn=init_to_value(values={"z": MU}), init_scale=0.6, num_layers=1, hidden_dims=(4,)
    )
    params = initial_params(guide)
    keys = jax.random.split(jax.random.key(8), 4)

    def gradients(stl):
        guide.stick_the_landing = stl  # read when the guide is traced
        loss = lambda p, k: Trace_ELBO().loss(k, p, gaussian, guide)  # noqa: E731
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, keys)
        return jnp.concatenate([jnp.abs(g).reshape(4, -1) for g in jax.tree.leaves(grads)], axis=1)

    # both estimators in one compiled program
    standard, stl = jax.jit(lambda: (gradients(False), gradients(True)))()
    # q = p: the path derivative of log q - log p is exactly zero for every draw, while
    # the score term of the standard estimator is not
    assert stl.max() < 1e-10
    assert np.all(standard.max(axis=1) > 1e-2)


def test_errors_name_the_problem():
    # the errors of AutoFlow's arguments, alike on both backends, are in tests/test_autoguide.py
    def discrete():
        numpyro.sample("k", dist.Bernoulli(0.3))
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    def no_latents(y=1.0):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match="site 'k' is discrete"):
        handlers.seed(pf.AutoFlow(discrete), rng_seed=0)()
    with pytest.raises(ValueError, match="no latent sample sites"):
        handlers.seed(pf.AutoFlow(no_latents), rng_seed=0)()


def test_a_model_with_an_improper_prior_gets_a_guide():
    """An ``ImproperUniform`` site cannot sample; the guide's site check must not need it to."""
    from numpyro.distributions import constraints

    y = jnp.array([0.3, -0.2, 0.5])

    def improper():
        mu = numpyro.sample("mu", dist.ImproperUniform(constraints.positive, (), ()))
        with numpyro.plate("n", 3):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = pf.AutoFlow(improper, flow="realnvp", num_layers=2, hidden_dims=(8,))
    svi = SVI(improper, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jax.random.key(0))
    _, loss = svi.update(state)
    draws = guide.sample_posterior(jax.random.key(1), svi.get_params(state), sample_shape=(4,))
    assert np.isfinite(float(loss))
    assert draws["mu"].shape == (4,) and bool(jnp.all(draws["mu"] > 0))


def test_the_guide_flow_saves_and_loads(tmp_path, regression_fit):
    guide, params, _ = regression_fit
    flow, _ = guide.get_flow(params)
    pf.save_flow(flow, tmp_path / "guide.npz")
    loaded = pf.load_flow(tmp_path / "guide.npz")
    u = jnp.array([[0.3, -0.2, 1.0]])
    np.testing.assert_allclose(loaded.to_transform()(u), flow.to_transform()(u), atol=1e-12)


def test_laplace_start_is_the_closed_form_posterior_of_a_gaussian_model():
    guide = pf.AutoFlow(regression, init_scale="laplace", **TWO_LAYERS)
    params = initial_params(guide, X, Y)
    mean, cov, _ = regression_posterior()
    whitening = guide.get_whitening(params)
    np.testing.assert_allclose(whitening.loc, mean, atol=1e-10)
    np.testing.assert_allclose(whitening.scale_tril, np.linalg.cholesky(cov), atol=1e-10)
    # the untrained flow and affine layer are the identity: the guide is N(mean, cov) exactly
    transform = guide.get_transform(params)
    offset, jac = jax.jit(lambda: (transform(jnp.zeros(3)), jax.jacfwd(transform)(jnp.array([0.7, -1.3, 0.2]))))()
    np.testing.assert_allclose(offset, mean, atol=1e-10)
    np.testing.assert_allclose(jac @ jac.T, cov, atol=1e-10)
    assert not guide.has_exact_quantiles


def test_laplace_start_finds_the_mode_of_a_non_conjugate_posterior_and_training_keeps_it_fixed():
    guide = pf.AutoFlow(location_scale, init_scale="laplace", **SMALL)
    mode, cov = location_scale_mode_and_cov(DATA)
    start = initial_params(guide, DATA)
    whitening = guide.get_whitening(start)
    np.testing.assert_allclose(whitening.loc, mode, atol=1e-7)
    np.testing.assert_allclose(whitening.scale_tril @ whitening.scale_tril.T, cov, rtol=1e-5, atol=1e-7)
    params, losses = fit(location_scale, guide, DATA, steps=300)
    assert np.all(np.isfinite(losses))
    # stop_gradient: Adam sees zero gradients and leaves the Laplace map as it was
    for name in ("loc", "scale_tril"):
        np.testing.assert_array_equal(params["auto_laplace$params"][name], start["auto_laplace$params"][name])
    assert not np.allclose(params["auto_affine$params"]["loc"], 0.0)
    # NeuTraReparam maps u through the whole guide, the Laplace map included
    u = jnp.array([[0.3, -0.4], [-1.2, 0.8]])
    z = jax.vmap(guide.get_transform(params))(u)
    sample = NeuTraReparam(guide, params).transform_sample(u)
    np.testing.assert_allclose(sample["mu"], z[:, 0], atol=1e-12)
    np.testing.assert_allclose(sample["sigma"], np.exp(z[:, 1]), rtol=1e-12)
    flow, affine = guide.get_flow(params)
    inner = affine.to_transform()(flow.to_transform()(u))
    np.testing.assert_allclose(z, whitening.loc + inner @ whitening.scale_tril.T, atol=1e-12)


def test_laplace_start_errors_name_the_problem():
    def funnel():  # centred hierarchy without data: the density grows without bound as tau -> 0
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        numpyro.sample("theta", dist.Normal(jnp.zeros(4), tau).to_event(1))

    with pytest.raises(
        ValueError, match="init_scale='laplace'.*(no posterior mode|neck of a funnel).*funnel.*init_scale=0.1"
    ):
        initial_params(pf.AutoFlow(funnel, init_scale="laplace", **SMALL))
    with pytest.raises(ValueError, match="init_scale='lapalce' must be 'auto', 'laplace' or a positive float"):
        pf.AutoFlow(funnel, init_scale="lapalce")
