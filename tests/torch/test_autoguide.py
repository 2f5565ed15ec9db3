"""AutoFlow (Pyro): posteriors against closed forms and NUTS, initialisation, median and
quantiles, JitTrace_ELBO, vectorised particles, Predictive, NeuTraReparam, the
sticking-the-landing gradient and errors. The models and data are those of
tests/jax/test_autoguide.py, so the two backends answer the same questions."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.reparam import NeuTraReparam
from scipy import stats

import pyroflows.torch as pf
from pyroflows.torch.transforms import ElementwiseAffine, Flow, LogTails, Permute
from tests.backend_checks import NOISE, check_gaussian_draws, check_matches_reference, regression_posterior
from tests.backend_checks import X as X_NP
from tests.backend_checks import Y as Y_NP
from tests.laplace_reference import location_scale_mode_and_cov

SMALL = dict(num_layers=2, hidden_dims=(8,))

# (a) Bayesian linear regression with known noise (tests/backend_checks.py): a Gaussian posterior.
X, Y = torch.as_tensor(X_NP), torch.as_tensor(Y_NP)


def regression(x, y=None):
    b = pyro.sample("b", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        # under a particle plate b has shape (P, 1, 3): the product broadcasts to (P, n, 3)
        pyro.sample("y", dist.Normal((b * x).sum(-1), NOISE), obs=y)


# (b) a normal with unknown location and scale: non-conjugate, constrained scale.
DATA_NP = 1.0 + 0.7 * np.random.default_rng(1).normal(size=12)
DATA = torch.as_tensor(DATA_NP)


def location_scale(y=None):
    zero = torch.zeros((), dtype=torch.float64)
    mu = pyro.sample("mu", dist.Normal(zero, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(zero + 1.0))
    with pyro.plate("data", len(DATA_NP)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def elbo(jit=False, particles=8):
    kind = JitTrace_ELBO if jit else Trace_ELBO
    extra = dict(ignore_jit_warnings=True) if jit else {}
    return kind(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1, **extra)


def fit(model, guide, *args, steps=300, lr=0.03, seed=0):
    # JitTrace_ELBO keeps the steps cheap; the learning rate decays to 5% of its start,
    # so Adam's jitter ends well below the posterior sd. The fixtures use the
    # sticking-the-landing estimator, whose noise vanishes as the guide nears the
    # posterior (the standard one needs several times more steps here).
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.05 ** (1 / steps)}), elbo(jit=True))
    return [svi.step(*args) for _ in range(steps)]


@pytest.fixture(scope="module")
def regression_fit():
    pyro.clear_param_store()
    guide = pf.AutoFlow(regression, stick_the_landing=True, **SMALL)
    losses = fit(regression, guide, X, Y)
    return guide, losses


@pytest.fixture(scope="module")
def location_scale_fit():
    pyro.clear_param_store()
    guide = pf.AutoFlow(location_scale, stick_the_landing=True, num_layers=2, hidden_dims=(16,))
    fit(location_scale, guide, DATA, steps=400, lr=0.05)
    return guide


def draws(guide, n, seed, *args):
    """``n`` posterior draws of each latent site, constrained: the guide run under Predictive."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        out = Predictive(guide, num_samples=n, parallel=True)(*args)
    return {k: v.numpy() for k, v in out.items() if not k.startswith("_")}


def test_conjugate_regression_posterior_matches_the_closed_form(regression_fit):
    guide, losses = regression_fit
    mean, cov, log_z = regression_posterior()
    assert np.all(np.isfinite(losses))
    check_gaussian_draws(draws(guide, 4000, 1, X, Y)["b"], mean, cov)
    # the loss is -ELBO = KL - log Z
    assert np.mean(losses[-50:]) + log_z < 0.05


def test_non_conjugate_posterior_with_a_constrained_site_matches_nuts(location_scale_fit):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import MCMC, NUTS

    def reference_model(y):
        mu = numpyro.sample("mu", ndist.Normal(0.0, 2.0))
        sigma = numpyro.sample("sigma", ndist.HalfNormal(1.0))
        numpyro.sample("y", ndist.Normal(mu, sigma), obs=y)

    mcmc = MCMC(NUTS(reference_model), num_warmup=500, num_samples=4000, progress_bar=False)
    mcmc.run(jax.random.key(2), jnp.asarray(DATA_NP))
    reference = {k: np.asarray(v, dtype=float) for k, v in mcmc.get_samples().items()}
    out = draws(location_scale_fit, 4000, 3, DATA)
    assert out["sigma"].min() > 0
    # reverse KL under-disperses: the fitted guide's sds are 3-5% below NUTS's here
    check_matches_reference(out, reference, ("mu", "sigma"))


def test_init_loc_fn_and_init_scale_set_the_starting_guide():
    start = {"mu": torch.tensor(0.4, dtype=torch.float64), "sigma": torch.tensor(2.0, dtype=torch.float64)}
    guide = pf.AutoFlow(location_scale, init_loc_fn=init_to_value(values=start), init_scale=0.3, **SMALL)
    guide(DATA)
    # the untrained IAF is a linear map, the identity up to a reordering of coordinates
    # (one permutation between its two layers), so the guide is exactly N(init point,
    # 0.3^2 I) in the unconstrained space: the base point 0 goes to the init point and
    # the Jacobian J has J J^T = 0.3^2 I
    transform = guide.get_transform()
    with torch.no_grad():
        u = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        z = transform(u).numpy()
    np.testing.assert_allclose(z[0], [0.4, math.log(2.0)], atol=1e-12)
    jac = (z[1:] - z[0]).T
    np.testing.assert_allclose(jac @ jac.T, 0.09 * np.eye(2), atol=1e-12)
    # median by sampling: within 4 Monte Carlo errors (1.25 * 0.3 / sqrt(1000) = 0.012)
    pyro.set_rng_seed(0)
    median = guide.median()
    assert not guide.has_exact_quantiles
    assert abs(float(median["mu"]) - 0.4) < 0.05
    assert abs(float(median["sigma"]) - 2.0) < 0.05 * 2.0


def _marginal_affine(dim, num_layers=None, hidden_dims=None):
    return [ElementwiseAffine(dim), Permute.reverse(dim), ElementwiseAffine(dim)]


def test_exact_median_and_quantiles_for_an_elementwise_flow_match_the_closed_form():
    # registered here, not at import, so the conformance suite's collection never sees it
    pf.register_flow("test_marginal_affine", replace=True)(_marginal_affine)
    start = {"mu": torch.tensor(0.5, dtype=torch.float64), "sigma": torch.tensor(1.5, dtype=torch.float64)}
    guide = pf.AutoFlow(
        location_scale, flow="test_marginal_affine", init_loc_fn=init_to_value(values=start), init_scale=0.1
    )
    guide(DATA)
    assert guide.has_exact_quantiles
    # at the start, N(0.5, 0.1^2) for mu and LogNormal(log 1.5, 0.1) for sigma
    q = guide.quantiles([0.1, 0.5, 0.9])
    z = stats.norm.ppf([0.1, 0.5, 0.9])
    np.testing.assert_allclose(q["mu"], 0.5 + 0.1 * z, atol=1e-12)
    np.testing.assert_allclose(q["sigma"], 1.5 * np.exp(0.1 * z), rtol=1e-12)
    np.testing.assert_allclose(guide.median()["sigma"], 1.5, rtol=1e-12)
    # perturbed weights: coordinate i is a3_i + s3_i * (a2_i + s2_i * (a1_j + s1_j * z)), j = 1 - i
    torch.manual_seed(4)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(torch.randn_like(p))
    first, middle, last = guide.flow.parts[0], guide.flow.parts[2], guide.affine
    a1, s1, a2, s2, a3, s3 = (
        t.detach().numpy() for layer in (first, middle, last) for t in (layer.loc, layer.log_scale().exp())
    )
    inner = a2 + s2 * (a1 + s1 * z[:, None])[:, ::-1]
    # LogTails between the flow and the affine layer: the identity up to 5, logarithmic beyond
    tails = np.sign(inner) * (np.minimum(np.abs(inner), 5) + np.log1p(np.maximum(np.abs(inner) - 5, 0)))
    expected = a3 + s3 * tails
    q = guide.quantiles([0.1, 0.5, 0.9])
    np.testing.assert_allclose(q["mu"], expected[:, 0], rtol=1e-10)
    np.testing.assert_allclose(q["sigma"], np.exp(expected[:, 1]), rtol=1e-10)


def test_quantiles_by_sampling_match_sample_quantiles(location_scale_fit):
    guide = location_scale_fit
    pyro.set_rng_seed(5)
    q = guide.quantiles([0.1, 0.5, 0.9], num_samples=2000)
    median = guide.median(num_samples=2000)
    big = draws(guide, 20000, 6, DATA)
    for name in ("mu", "sigma"):
        assert q[name].shape == (3,)
        expected = np.quantile(big[name], [0.1, 0.5, 0.9])
        sd = big[name].std()
        # the sd of a sample quantile from 2000 draws is at most 0.035 sd (at 0.1 / 0.9)
        np.testing.assert_allclose(q[name], expected, atol=0.15 * sd)
        np.testing.assert_allclose(median[name], expected[1], atol=0.15 * sd)


def test_jit_trace_elbo_and_vectorised_particles_agree_with_trace_elbo():
    pyro.clear_param_store()
    guide = pf.AutoFlow(regression, init_scale=0.1, **SMALL)
    guide(X, Y)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = list(guide.parameters())

    def loss_and_grads(objective, seed):
        pyro.set_rng_seed(seed)
        for p in params:
            p.grad = None
        loss = objective.loss_and_grads(regression, guide, X, Y)
        return loss, [p.grad.clone() for p in params]

    for particles in (1, 8):
        plain, jitted = elbo(particles=particles), elbo(jit=True, particles=particles)
        loss_and_grads(jitted, 0)  # the first call traces
        for seed in (1, 2):
            (a, ga), (b, gb) = loss_and_grads(plain, seed), loss_and_grads(jitted, seed)
            assert a == pytest.approx(b, rel=1e-10)
            for x, y in zip(ga, gb):
                torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)

    # vectorised particles estimate the same ELBO as single ones; with the flow reset to
    # the identity the guide is N(m, diag(s^2)), whose ELBO has a closed form
    guide.flow.load_state_dict(pf.build_flow("iaf", 3, **SMALL).double().state_dict())
    m = guide.affine.loc.detach().numpy()
    s2 = guide.affine.log_scale().detach().exp().numpy() ** 2
    expected_loglik = -0.5 * 20 * math.log(2 * math.pi * NOISE**2) - (
        ((Y_NP - X_NP @ m) ** 2).sum() + (X_NP**2 @ s2).sum()
    ) / (2 * NOISE**2)
    expected_prior = -1.5 * math.log(2 * math.pi) - 0.5 * (m @ m + s2.sum())
    entropy = 1.5 * (1 + math.log(2 * math.pi)) + 0.5 * np.log(s2).sum()
    expected = -(expected_loglik + expected_prior + entropy)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        singles = [elbo(particles=1).loss(regression, guide, X, Y) for _ in range(20)]
        vectorised = elbo(particles=4000).loss(regression, guide, X, Y)
    # single-particle losses scatter with sd ~ std(singles); 4000 particles shrink it 63x
    assert abs(vectorised - expected) < 4 * np.std(singles) / math.sqrt(4000)
    assert abs(np.mean(singles) - expected) < 4 * np.std(singles) / math.sqrt(20)


def test_predictive_and_neutra_reparam_with_a_trained_guide(location_scale_fit, regression_fit):
    guide = location_scale_fit
    pyro.set_rng_seed(6)
    with torch.no_grad():
        out = Predictive(location_scale, guide=guide, num_samples=4000, parallel=True)()
    assert out["y"].shape == (4000, 12) and out["mu"].shape == (4000, 1) and out["sigma"].shape == (4000, 1)
    # y = mu + sigma * noise per draw: mean E[mu], variance Var(mu) + E[sigma^2], each
    # to a few Monte Carlo errors of 4000 draws
    mu, sigma, y = (out[k].numpy() for k in ("mu", "sigma", "y"))
    assert sigma.min() > 0
    np.testing.assert_allclose(y.mean(0), mu.mean(), atol=0.05)
    np.testing.assert_allclose(y.var(0), mu.var() + (sigma**2).mean(), rtol=0.1)
    # the conditioned draws of each data point differ from one another
    assert np.all(np.abs(y - mu).max(0) > 0)

    guide, _ = regression_fit
    mean, cov, log_z = regression_posterior()
    neutra = NeuTraReparam(guide)
    model = poutine.reparam(regression, config=lambda site: neutra if site["name"] == "b" else None)

    def log_joint(u):
        conditioned = poutine.condition(model, data={"b_shared_latent": u})
        trace = poutine.trace(conditioned).get_trace(X, Y)
        return trace.log_prob_sum().item(), trace.nodes["b"]["value"]

    torch.manual_seed(7)
    u = torch.randn(300, 3, dtype=torch.float64)
    with torch.no_grad():
        joint = np.array([log_joint(row)[0] for row in u])
    # log p(y, T(u)) + log|T'(u)| = log Z + log N(u; 0, I) when q is the posterior: the
    # reparametrised latent is standard normal, and the constant is the evidence
    gap = joint - stats.norm.logpdf(u.numpy()).sum(-1)
    assert np.std(gap) < 0.15
    assert abs(np.mean(gap) - log_z) < 0.05
    # the reparametrised model maps u to b through the guide's transform
    with torch.no_grad():
        torch.testing.assert_close(log_joint(u[0])[1], guide.get_transform()(u[0]), atol=1e-12, rtol=0)
        samples = neutra.transform_sample(u)
    assert samples["b"].shape == (300, 3)


# A model whose posterior the guide matches exactly: z drawn from a frozen copy of the
# guide's own (perturbed, non-Gaussian) flow.
TARGET = []


def exact_target():
    base = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1)
    pyro.sample("z", dist.TransformedDistribution(base, TARGET))


def test_stick_the_landing_gradient_vanishes_when_the_guide_is_exact():
    torch.manual_seed(8)
    TARGET[:] = [Flow([pf.build_flow("iaf", 3, **SMALL), LogTails(3), ElementwiseAffine(3)], 3).double()]
    with torch.no_grad():
        for p in TARGET[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
            p.requires_grad_(False)

    def gradients(stl):
        pyro.clear_param_store()
        guide = pf.AutoFlow(exact_target, stick_the_landing=stl, init_scale=0.1, **SMALL)
        guide()
        guide.transform.load_state_dict(TARGET[0].state_dict())
        out = []
        for seed in range(4):
            pyro.set_rng_seed(seed)
            for p in guide.parameters():
                p.grad = None
            Trace_ELBO().loss_and_grads(exact_target, guide)
            out.append(max(p.grad.abs().max().item() for p in guide.parameters() if p.grad is not None))
        return np.array(out)

    standard, stl = gradients(False), gradients(True)
    # q = p: the path derivative of log q - log p is zero for every draw (up to rounding
    # through the target's sequential inverse), while the standard estimator's score
    # term is not
    assert stl.max() < 1e-8
    assert np.all(standard > 1e-2)


def test_errors_name_the_problem():
    # the errors of AutoFlow's arguments, alike on both backends, are in tests/test_autoguide.py
    def discrete():
        pyro.sample("k", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(0.0, 1.0))

    def no_latents(y=torch.tensor(1.0)):  # noqa: B008
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    guide = pf.AutoFlow(discrete)
    with pytest.raises(ValueError, match="site 'k' is discrete"):
        guide()
    assert guide.prototype_trace is None
    with pytest.raises(ValueError, match="no latent sample sites"):
        pf.AutoFlow(no_latents)()
    guide = pf.AutoFlow(location_scale)
    with pytest.raises(ValueError, match="not set up yet"):
        guide.has_exact_quantiles
    guide(DATA)
    with pytest.raises(ValueError, match="quantiles must lie strictly between 0 and 1"):
        guide.quantiles([0.5, 1.0])


def test_a_model_with_an_improper_prior_gets_a_guide():
    """Pyro's init strategies sample every latent site, and ``ImproperUniform`` cannot."""
    y = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)

    def improper():
        mu = pyro.sample("mu", dist.ImproperUniform(dist.constraints.positive, (), ()))
        with pyro.plate("n", 3):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    pyro.clear_param_store()
    guide = pf.AutoFlow(improper, flow="realnvp", num_layers=2, hidden_dims=(8,), init_scale="laplace")
    loss = SVI(improper, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step()
    # the Laplace start solves 3 mu^2 - mu sum(y) - 1 = 0 (the log mu Jacobian included),
    # from the unconstrained point 0 (mu = 1); the site's start is in the default dtype, float32
    s = float(y.sum())
    assert math.isclose(math.exp(guide.whitening.loc.item()), (s + math.sqrt(s**2 + 12)) / 6, rel_tol=1e-6)
    out = draws(guide, 4, 0)
    assert np.isfinite(loss) and out["mu"].shape == (4,) and np.all(out["mu"] > 0)


def test_the_guide_flow_saves_and_loads(tmp_path, regression_fit):
    guide, _ = regression_fit
    pf.save_flow(guide.flow, tmp_path / "guide.npz")
    loaded = pf.load_flow(tmp_path / "guide.npz")
    u = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(u), guide.flow(u), atol=1e-12, rtol=0)


def test_laplace_start_is_the_closed_form_posterior_of_a_gaussian_model():
    guide = pf.AutoFlow(regression, init_scale="laplace", **SMALL)
    guide(X, Y)
    mean, cov, log_z = regression_posterior()
    torch.testing.assert_close(guide.whitening.loc, torch.as_tensor(mean), atol=1e-10, rtol=0)
    torch.testing.assert_close(guide.whitening.scale_tril, torch.as_tensor(np.linalg.cholesky(cov)), atol=1e-10, rtol=0)
    assert not guide.has_exact_quantiles
    # the untrained flow and affine layer are the identity, so the guide is the posterior
    # itself: through NeuTraReparam, log p(y, T(u)) + log|T'(u)| - log N(u; 0, I) is the
    # evidence log Z at every u
    neutra = NeuTraReparam(guide)
    model = poutine.reparam(regression, config=lambda site: neutra if site["name"] == "b" else None)
    torch.manual_seed(9)
    gaps = []
    with torch.no_grad():
        for u in torch.randn(20, 3, dtype=torch.float64):
            trace = poutine.trace(poutine.condition(model, data={"b_shared_latent": u})).get_trace(X, Y)
            gaps.append(trace.log_prob_sum().item() - stats.norm.logpdf(u.numpy()).sum())
    np.testing.assert_allclose(gaps, log_z, atol=1e-9)


def test_laplace_start_finds_the_mode_of_a_non_conjugate_posterior_and_training_keeps_it_fixed():
    pyro.clear_param_store()
    guide = pf.AutoFlow(location_scale, init_scale="laplace", **SMALL)
    guide(DATA)
    mode, cov = location_scale_mode_and_cov(DATA_NP)
    start = {k: v.clone() for k, v in guide.state_dict().items() if k.startswith("transform.3.")}
    assert set(start) == {"transform.3.loc", "transform.3.scale_tril"}
    np.testing.assert_allclose(start["transform.3.loc"].numpy(), mode, atol=1e-7)
    scale_tril = start["transform.3.scale_tril"].numpy()
    np.testing.assert_allclose(scale_tril @ scale_tril.T, cov, rtol=1e-5, atol=1e-7)
    losses = fit(location_scale, guide, DATA, steps=100)
    assert np.all(np.isfinite(losses))
    # buffers, not parameters: the optimiser leaves the Laplace map as it was
    for name, value in start.items():
        torch.testing.assert_close(guide.state_dict()[name], value, atol=0, rtol=0)
    assert guide.affine.loc.abs().max() > 0


def test_laplace_start_errors_name_the_problem():
    def funnel():  # centred hierarchy without data: the density grows without bound as tau -> 0
        tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)))
        pyro.sample("theta", dist.Normal(torch.zeros(4, dtype=torch.float64), tau).to_event(1))

    with pytest.raises(
        ValueError, match="init_scale='laplace'.*(no posterior mode|neck of a funnel).*funnel.*init_scale=0.1"
    ):
        pf.AutoFlow(funnel, init_scale="laplace", **SMALL)()
    with pytest.raises(ValueError, match="init_scale='lapalce' must be 'auto', 'laplace' or a positive float"):
        pf.AutoFlow(funnel, init_scale="lapalce")
