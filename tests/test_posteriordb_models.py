"""The posteriordb models behind benchmarks/posteriordb.py: Pyro == NumPyro, and one by hand.

Each model's log joint is evaluated at reference draws (mapped to the model's own sample
sites) by both libraries, eagerly, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("pyro")
jax.config.update("jax_enable_x64", True)

from benchmarks import posteriordb_models as pdb  # noqa: E402

pytestmark = pytest.mark.skipif(
    not pdb.ROOT.exists(), reason=f"no posteriordb clone at {pdb.ROOT} (benchmarks/posteriordb_models.py)"
)


def _site_values(name, i):
    """Draw ``i`` of the reference posterior, written as the model's latent sample sites."""
    ref = {k: v[i] for k, v in pdb.reference(name).items()}
    scalar = {k: v[0] if v.shape == (1,) else v for k, v in ref.items()}
    if name.startswith("eight_schools"):
        mu, tau = scalar["mu"], scalar["tau"]
        return {"mu": mu, "tau": tau, "theta_trans": (ref["theta"] - mu) / tau}
    if name.startswith("garch"):
        out = dict(scalar)
        out["beta1_unit"] = out.pop("beta1") / (1 - out["alpha1"])
        return out
    if name.startswith("gp_pois_regr"):
        x = pdb.data(name)["x"]
        cov = scalar["alpha"] ** 2 * np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * scalar["rho"] ** 2))
        chol = np.linalg.cholesky(cov + 1e-10 * np.eye(len(x)))
        return {"rho": scalar["rho"], "alpha": scalar["alpha"], "f_tilde": np.linalg.solve(chol, ref["f"])}
    return scalar


def _numpyro_log_joint(name, values):
    from numpyro.infer.util import log_density

    model = pdb.model_for(name, "jax")
    # one compiled program per model: cheaper than dispatching each op eagerly
    log_joint = jax.jit(lambda v: log_density(model, (), {}, v)[0])
    return float(log_joint({k: jax.numpy.asarray(v) for k, v in values.items()}))


def _pyro_log_joint(name, values):
    import pyro
    import torch

    values = {k: torch.as_tensor(np.asarray(v, dtype=float)) for k, v in values.items()}
    trace = pyro.poutine.trace(pyro.poutine.condition(pdb.model_for(name, "torch"), values)).get_trace()
    return float(trace.log_prob_sum())


@pytest.mark.parametrize("name", pdb.NAMES)
def test_pyro_and_numpyro_models_have_the_same_log_joint_at_reference_draws(name):
    import torch

    torch.set_default_dtype(torch.float64)
    try:
        for i in (0, 4321):
            values = _site_values(name, i)
            expected = _numpyro_log_joint(name, values)
            assert np.isfinite(expected)
            # the two libraries write some log-densities with different (equivalent) formulas
            np.testing.assert_allclose(_pyro_log_joint(name, values), expected, rtol=1e-9, atol=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


def test_kidiq_log_joint_by_hand_at_a_reference_draw():
    from scipy import stats

    name = "kidiq-kidscore_momiq"
    values, d = _site_values(name, 7), pdb.data(name)
    beta, sigma = values["beta"], values["sigma"]
    expected = (
        stats.halfcauchy.logpdf(sigma, scale=2.5)
        + stats.norm.logpdf(d["kid_score"], beta[0] + beta[1] * d["mom_iq"], sigma).sum()
    )
    np.testing.assert_allclose(_numpyro_log_joint(name, values), expected, rtol=1e-10)


def test_garch_variance_recursion_matches_a_loop():
    from scipy import stats

    name = "garch-garch11"
    values, d = _site_values(name, 3), pdb.data(name)
    mu, a0, a1 = values["mu"], values["alpha0"], values["alpha1"]
    b1 = values["beta1_unit"] * (1 - a1)
    sigma = [d["sigma1"]]
    for t in range(1, len(d["y"])):
        sigma.append(np.sqrt(a0 + a1 * (d["y"][t - 1] - mu) ** 2 + b1 * sigma[-1] ** 2))
    # flat priors contribute 0; log(1 - alpha1) is the Jacobian that makes beta1's density flat
    expected = stats.norm.logpdf(d["y"], mu, np.array(sigma)).sum() + np.log1p(-a1)
    np.testing.assert_allclose(_numpyro_log_joint(name, values), expected, rtol=1e-10)


def test_reference_draws_have_the_metadata_dimensions():
    for name in pdb.NAMES:
        ref = pdb.reference(name)
        assert {k: v.shape[1] for k, v in ref.items()} == pdb.metadata(name)["dimensions"]
        assert all(v.shape[0] == 10_000 for v in ref.values())
