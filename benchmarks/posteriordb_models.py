"""Ten posteriordb models (stan-dev/posteriordb), written once for Pyro and NumPyro.

The data and reference draws are not in this repository. ``ROOT`` (the environment
variable ``PYROFLOWS_POSTERIORDB``, default ``data/posteriordb`` in the repository, which
git ignores) holds, for each name in ``NAMES``, files copied from a posteriordb clone:
``posteriors/NAME.json`` (the metadata), ``data/DATA.json.zip`` (the data set named in the
metadata) and ``reference_draws/NAME.json.zip`` (the reference draws). Without them the
benchmark cannot run and ``tests/test_posteriordb_models.py`` is skipped.

Each model is a function ``model(B, data)`` of a small backend namespace ``B`` (its
``sample``, ``deterministic``, ``factor``, ``dist``, ``constraints`` and a handful of
array functions), so the Pyro and the NumPyro versions are the same code and
``tests/test_posteriordb_models.py`` can check that they give the same log joint.
``model_for(name, backend)`` returns a closure of no arguments for SVI.

Flat priors are ``ImproperUniform`` on the parameter's support, as Stan's default.
The reference draws name the quantities listed under ``dimensions`` in the metadata;
where those are transformed quantities (eight_schools' theta, gp_pois_regr's f,
garch's beta1) the model records them as deterministic sites.
"""

from __future__ import annotations

import io
import json
import os
import types
import zipfile
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("PYROFLOWS_POSTERIORDB", Path(__file__).resolve().parents[1] / "data" / "posteriordb"))
NAMES = [
    "eight_schools-eight_schools_noncentered",
    "arK-arK",
    "garch-garch11",
    "kidiq-kidscore_momiq",
    "sblrc-blr",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "mesquite-logmesquite",
    "earnings-logearn_interaction",
    "nes1972-nes",
    "gp_pois_regr-gp_pois_regr",
]


def _read_zip_json(path: Path):
    with zipfile.ZipFile(path) as z:
        return json.load(io.TextIOWrapper(z.open(z.namelist()[0]), encoding="utf-8"))


@cache
def metadata(name: str) -> dict:
    return json.loads((ROOT / "posteriors" / f"{name}.json").read_text())


@cache
def data(name: str) -> dict:
    """The data set as numpy arrays (float64; integers where the model needs counts)."""
    raw = _read_zip_json(ROOT / "data" / f"{metadata(name)['data_name']}.json.zip")
    return {k: np.asarray(v, dtype=float) for k, v in raw.items()}


@cache
def reference(name: str) -> dict:
    """Reference draws per parameter (as named in the metadata): arrays ``(draws, size)``."""
    chains = _read_zip_json(ROOT / "reference_draws" / f"{name}.json.zip")
    out = {}
    for param, size in metadata(name)["dimensions"].items():
        keys = [param] if size == 1 else [f"{param}[{i + 1}]" for i in range(size)]
        out[param] = np.stack([np.concatenate([np.asarray(c[k], dtype=float) for c in chains]) for k in keys], -1)
    return out


# --------------------------------------------------------------------------- models
def eight_schools(B, d):
    theta_trans = B.sample("theta_trans", B.dist.Normal(B.zeros(8), 1.0).to_event(1))
    mu = B.sample("mu", B.dist.Normal(0.0, 5.0))
    tau = B.sample("tau", B.dist.HalfCauchy(5.0))
    theta = B.deterministic("theta", mu[..., None] + tau[..., None] * theta_trans)
    B.sample("y", B.dist.Normal(theta, B.array(d["sigma"])).to_event(1), obs=B.array(d["y"]))


def ark(B, d):
    K = int(d["K"])
    y = d["y"]
    lags = B.array(np.stack([y[K - k - 1 : len(y) - k - 1] for k in range(K)], -1))  # (T-K, K): y[t-1..t-K]
    alpha = B.sample("alpha", B.dist.Normal(0.0, 10.0))
    beta = B.sample("beta", B.dist.Normal(B.zeros(K), 10.0).to_event(1))
    sigma = B.sample("sigma", B.dist.HalfCauchy(2.5))
    mu = alpha[..., None] + B.matvec(lags, beta)
    B.sample("y", B.dist.Normal(mu, sigma[..., None]).to_event(1), obs=B.array(y[K:]))


def garch(B, d):
    y = B.array(d["y"])
    T = len(d["y"])
    mu = B.sample("mu", B.improper(B.constraints.real))
    alpha0 = B.sample("alpha0", B.improper(B.constraints.positive))
    alpha1 = B.sample("alpha1", B.improper(B.constraints.unit_interval))
    # beta1 in (0, 1 - alpha1) with a flat density: beta1 = (1 - alpha1) u, u flat on (0, 1),
    # plus log(1 - alpha1), the Jacobian that makes the density of beta1 itself flat.
    u = B.sample("beta1_unit", B.improper(B.constraints.unit_interval))
    beta1 = B.deterministic("beta1", (1 - alpha1) * u)
    B.factor("beta1_jacobian", B.log1p(-alpha1))
    # sigma_t^2 = alpha0 + alpha1 e_{t-1}^2 + beta1 sigma_{t-1}^2 (sigma_1 given) is linear in
    # the past, so all T variances come from one triangular matrix of powers of beta1.
    e2 = (y[:-1] - mu[..., None]) ** 2
    drive = alpha0[..., None] + alpha1[..., None] * e2  # (..., T-1)
    t = np.arange(T)
    lag = t[:, None] - 1 - t[None, :-1]  # power of beta1 applied to drive[s] in sigma_t^2
    mask = B.array((lag >= 0).astype(float))
    powers = B.exp(B.array(np.maximum(lag, 0).astype(float)) * B.log(beta1)[..., None, None]) * mask
    var = B.matvec(powers, drive) + beta1[..., None] ** B.array(t.astype(float)) * float(d["sigma1"]) ** 2
    B.sample("y", B.dist.Normal(mu[..., None], B.sqrt(var)).to_event(1), obs=y)


def kidiq(B, d):
    beta = B.sample("beta", B.improper(B.constraints.real, (2,)))
    sigma = B.sample("sigma", B.dist.HalfCauchy(2.5))
    mu = beta[..., :1] + beta[..., 1:] * B.array(d["mom_iq"])
    B.sample("y", B.dist.Normal(mu, sigma[..., None]).to_event(1), obs=B.array(d["kid_score"]))


def sblrc(B, d):
    X = B.array(d["X"])
    beta = B.sample("beta", B.dist.Normal(B.zeros(int(d["D"])), 10.0).to_event(1))
    sigma = B.sample("sigma", B.dist.HalfNormal(10.0))
    B.sample("y", B.dist.Normal(B.matvec(X, beta), sigma[..., None]).to_event(1), obs=B.array(d["y"]))


def low_dim_gauss_mix(B, d):
    y = B.array(d["y"])
    mu = B.sample("mu", B.improper(B.constraints.ordered_vector, (2,)))
    B.factor("mu_prior", B.dist.Normal(0.0, 2.0).log_prob(mu).sum(-1))
    sigma = B.sample("sigma", B.dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = B.sample("theta", B.dist.Beta(5.0, 5.0))
    comp = B.dist.Normal(mu[..., None, :], sigma[..., None, :]).log_prob(y[:, None])  # (..., N, 2)
    log_mix = B.stack([B.log(theta), B.log1p(-theta)], -1)[..., None, :]
    B.factor("y", B.logsumexp(comp + log_mix, -1).sum(-1))


def _linear_regression(B, response, columns):
    X = B.array(np.stack(columns, -1))
    beta = B.sample("beta", B.improper(B.constraints.real, (X.shape[-1],)))
    sigma = B.sample("sigma", B.improper(B.constraints.positive))
    B.sample("y", B.dist.Normal(B.matvec(X, beta), sigma[..., None]).to_event(1), obs=B.array(response))


def mesquite(B, d):
    one = np.ones_like(d["weight"])
    cols = [one] + [np.log(d[k]) for k in ("diam1", "diam2", "canopy_height", "total_height", "density")]
    _linear_regression(B, np.log(d["weight"]), cols + [d["group"]])


def earnings(B, d):
    h, m = d["height"], d["male"]
    _linear_regression(B, np.log(d["earn"]), [np.ones_like(h), h, m, h * m])


def nes(B, d):
    age = d["age_discrete"]
    cols = [
        np.ones_like(age),
        d["real_ideo"],
        d["race_adj"],
        (age == 2) * 1.0,
        (age == 3) * 1.0,
        (age == 4) * 1.0,
        d["educ1"],
        d["gender"],
        d["income"],
    ]
    _linear_regression(B, d["partyid7"], cols)


def gp_pois_regr(B, d):
    x = d["x"]
    sq = B.array((x[:, None] - x[None, :]) ** 2)
    n = len(x)
    rho = B.sample("rho", B.dist.Gamma(25.0, 4.0))
    alpha = B.sample("alpha", B.dist.HalfNormal(2.0))
    f_tilde = B.sample("f_tilde", B.dist.Normal(B.zeros(n), 1.0).to_event(1))
    cov = alpha[..., None, None] ** 2 * B.exp(-sq / (2 * rho[..., None, None] ** 2)) + 1e-10 * B.eye(n)
    f = B.deterministic("f", B.matvec(B.cholesky(cov), f_tilde))
    B.sample("k", B.dist.Poisson(B.exp(f)).to_event(1), obs=B.array(d["k"]))


MODELS = {
    "eight_schools-eight_schools_noncentered": eight_schools,
    "arK-arK": ark,
    "garch-garch11": garch,
    "kidiq-kidscore_momiq": kidiq,
    "sblrc-blr": sblrc,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
    "mesquite-logmesquite": mesquite,
    "earnings-logearn_interaction": earnings,
    "nes1972-nes": nes,
    "gp_pois_regr-gp_pois_regr": gp_pois_regr,
}


# --------------------------------------------------------------------------- backends
def _namespace(ppl, dist, constraints, xp, **specific) -> types.SimpleNamespace:
    """The PPL's primitives and distributions, and the array functions that ``xp`` (``torch`` or
    ``jax.numpy``) names the same, plus the ``specific`` ones."""
    return types.SimpleNamespace(
        **{n: getattr(ppl, n) for n in ("sample", "deterministic", "factor")},
        dist=dist,
        constraints=constraints,
        zeros=lambda n: xp.zeros(n),
        eye=lambda n: xp.eye(n),
        **{n: getattr(xp, n) for n in ("exp", "log", "log1p", "sqrt", "stack")},
        cholesky=xp.linalg.cholesky,
        improper=lambda support, shape=(): dist.ImproperUniform(support, (), tuple(shape)),
        **specific,
    )


@cache
def backend(name: str) -> types.SimpleNamespace:
    """The namespace the models are written against, for ``"torch"`` (Pyro) or ``"jax"`` (NumPyro)."""
    if name == "torch":
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        def array(a):
            return torch.as_tensor(np.asarray(a), dtype=torch.get_default_dtype())

        return _namespace(
            pyro,
            dist,
            constraints,
            torch,
            array=array,
            logsumexp=torch.logsumexp,
            matvec=lambda m, v: (m @ v.unsqueeze(-1)).squeeze(-1),
        )
    if name == "jax":
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from jax.scipy.special import logsumexp
        from numpyro.distributions import constraints

        return _namespace(
            numpyro,
            dist,
            constraints,
            jnp,
            array=lambda a: jnp.asarray(np.asarray(a), dtype=float),
            logsumexp=lambda a, axis: logsumexp(a, axis=axis),
            matvec=lambda m, v: (m @ v[..., None])[..., 0],
        )
    raise ValueError(f"unknown backend {name!r}; use 'torch' or 'jax'")


def model_for(name: str, backend_name: str):
    """The model of posterior ``name`` on a backend, as a function of no arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown posterior {name!r}; choose one of {NAMES}")
    B, d = backend(backend_name), data(name)

    def model():
        MODELS[name](B, d)

    model.__name__ = name
    return model
