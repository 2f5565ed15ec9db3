"""``AutoFlow``: a NumPyro autoguide whose posterior is any registered pyroflows flow.

The guide works on the model's unconstrained latent vector ``z`` of size ``D`` (the
sites flattened and mapped through ``biject_to`` as in NumPyro's other
``AutoContinuous`` guides, which is ADVI: Kucukelbir et al. 2017, arXiv:1603.00788):

    u ~ N(0, I_D),    z = S(loc + exp(log_scale) * T(F(u))),

where ``F`` is ``build_flow(flow, D, ...)``, ``T`` the fixed ``LogTails`` map and ``S`` a
fixed start map: the Laplace approximation (``init_scale="auto"`` where the model has a
proper mode, or ``"laplace"``), a diagonal scale at the ``init_loc_fn`` point (the
``"auto"`` fallback), or none (a float ``init_scale``, which then sets the affine layer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import ndtri
from numpyro import handlers
from numpyro.contrib.module import eqx_module
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median, init_to_uniform

from .. import snf as _snf
from ..fitting import AUTOFLOW_LOG_SCALE_BOUND, check_fit_options, check_latent_sites, check_quantiles
from ..laplace import AUTO, Start, check_init_scale, choose_start
from . import snf as _blocks
from .flows import REGISTRY, build_flow
from .io import _replace_arrays, named_arrays
from .transforms.base import CholeskyAffine, ElementwiseAffine, Flow, LogTails, Permute, astype, is_stochastic

__all__ = ["AutoFlow", "AutoSNF"]

# Layers that act on each coordinate by an increasing map, or only reorder coordinates:
# a stack of them sends every output coordinate to an increasing function of ONE base
# coordinate, so the posterior's marginal quantiles are the flow applied to base quantiles.
_MARGINAL_LAYERS = (ElementwiseAffine, Permute, LogTails)


def _is_marginal(layer) -> bool:
    """Whether ``layer`` maps each coordinate increasingly on its own (a diagonal start map too)."""
    if isinstance(layer, CholeskyAffine):
        return not np.any(np.tril(np.asarray(layer.scale_tril), -1))
    return isinstance(layer, _MARGINAL_LAYERS)


def _leaf_layers(module):
    if isinstance(module, Flow):
        return [leaf for part in module.parts for leaf in _leaf_layers(part)]
    return [module]


def _is_discrete(fn) -> bool:
    try:
        return bool(fn.support.is_discrete)
    except NotImplementedError:  # a dependent support: AutoContinuous says what it needs
        return False


def _flow_param(name, flow):
    """``flow`` with its floating-point arrays registered as the NumPyro parameter ``name``.

    The parameter is a flat dict of arrays by torch-style name (``pyroflows.jax.io``),
    not the partitioned module ``eqx_module`` registers: jit flattens and rebuilds the SVI
    state in Python at every step, and nested equinox modules (three copies: weights and
    Adam's two moments) cost as much CPU time as the compiled step of a small model.
    """
    weights = {k: a for k, a in named_arrays(flow).items() if eqx.is_inexact_array(a)}
    return _replace_arrays(flow, numpyro.param(name, weights))


def _unconstrained_log_scale(scale: float, bound: float) -> float:
    """The ``ElementwiseAffine`` parameter whose soft-clamped log-scale is ``log(scale)``."""
    return bound * math.atanh(math.log(scale) / bound)


class _PathDerivativePosterior(dist.TransformedDistribution):
    """Samples as the flow posterior, but scores with the flow's parameters held fixed.

    The gradient of ``log q(z)`` then flows only through the sample ``z``: the
    sticking-the-landing estimator (Roeder, Wu & Duvenaud 2017, arXiv:1703.09194),
    whose variance vanishes when ``q`` equals the posterior. Scoring inverts the flow
    (``D`` sequential passes for ``iaf``).
    """

    def log_prob(self, value, intermediates=None):
        frozen = jax.lax.stop_gradient(self.transforms)
        return dist.TransformedDistribution(self.base_dist, frozen).log_prob(value)


class AutoFlow(AutoContinuous):
    """A normalizing-flow posterior over all continuous latent sites of a NumPyro model.

    The posterior over the unconstrained latent vector ``z`` (size ``D``) is
    ``z = S(loc + exp(log_scale) * T(F(u)))``, ``u ~ N(0, I_D)``: ``F = build_flow(flow, D,
    num_layers=..., hidden_dims=..., **options)`` (any registered flow, a user's own
    included), ``T`` the fixed ``LogTails`` map (the identity on [-5, 5], logarithmic
    beyond, so a large optimiser step cannot send samples to 1e30 and the model to
    ``inf``), a learnable elementwise affine map with its log-scale soft-clamped to
    (-5, 5), and ``S`` a fixed start map. Constrained sites are mapped with ``biject_to``
    as in NumPyro's other continuous guides (ADVI; Kucukelbir et al. 2017,
    arXiv:1603.00788). Works with ``SVI`` (the whole update jits), ``sample_posterior``,
    ``Predictive`` and ``numpyro.infer.reparam.NeuTraReparam``.

    Layers that draw noise (stochastic log-det estimators) take their keys from
    ``numpyro.prng_key()`` inside the guide.

    Args:
        model: a NumPyro model whose latent sample sites are all continuous.
        flow: a registered flow name (``pyroflows.jax.available_flows()``).
        num_layers: layers of the flow (default: the family's).
        hidden_dims: hidden sizes of the flow's networks (default: the family's).
        init_loc_fn: NumPyro init strategy for the start point (default ``init_to_median``).
        init_scale: ``"auto"`` (default): the Laplace approximation ``N(mode, H^-1)`` when
            a Newton search from the ``init_loc_fn`` point (at the first call, with that
            call's model arguments) finds a mode with a positive-definite Hessian and the
            approximation's importance weights do not rule it out
            (``pyroflows.laplace.choose_start``): ``S(w) = mode + L w``, ``L L^T = H^-1``,
            held fixed (``{prefix}_laplace$params`` under ``stop_gradient``;
            ``get_whitening``), so the flow learns in whitened coordinates where Adam's
            steps suit every coordinate. Otherwise (a funnel, an improper posterior,
            ``D > 1000``) ``S(w) = x0 + diag(1/sqrt(H_ii(x0))) w`` at the ``init_loc_fn``
            point, with a ``UserWarning`` that says why; ``guide.start`` records which
            (``kind``, ``message``). ``"laplace"``: the Laplace start or a ``ValueError``.
            A float: no ``S``; the affine layer starts at the ``init_loc_fn`` point with
            this scale, in (exp(-5), exp(5)).
        stick_the_landing: score the guide's own samples with its parameters held fixed
            (path-derivative gradient; Roeder et al. 2017). The score then needs the
            flow's inverse, which is ``D`` sequential passes for ``iaf``.
        prefix: prefix of the parameter names: ``{prefix}_flow$params`` holds the flow's
            weights, ``{prefix}_affine$params`` the final ``loc`` and
            ``unconstrained_log_scale``; each a dict of arrays by torch-style name (as
            ``pyroflows.jax.io.named_arrays`` names them). ``get_flow(params)`` rebuilds
            the modules.
        key: JAX key for the flow's initial weights (default ``jax.random.key(0)``), so a
            guide is reproducible without a seed argument.
        **options: the flow family's options (``pyroflows.registry.describe(flow)``).

    Raises:
        ValueError: an unknown flow name or option, or a bad ``init_scale``, at
            construction; a model with a discrete latent site or without latent sites
            on the first call.

    References:
        Kucukelbir, Tran, Ranganath, Gelman & Blei 2017, "Automatic differentiation
        variational inference", arXiv:1603.00788.
        Roeder, Wu & Duvenaud 2017, "Sticking the landing: simple, lower-variance
        gradient estimators for variational inference", arXiv:1703.09194.

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro import handlers
        >>> def model():
        ...     numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        >>> guide = AutoFlow(model, flow="householder", init_scale=0.5)
        >>> trace = handlers.trace(handlers.seed(guide, 0)).get_trace()
        >>> params = {name: site["value"] for name, site in trace.items() if site["type"] == "param"}
        >>> sorted(params), trace["z"]["value"].shape
        (['auto_affine$params', 'auto_flow$params'], (2,))
        >>> [type(module).__name__ for module in guide.get_flow(params)], guide.get_whitening(params)
        (['Flow', 'ElementwiseAffine'], None)
        >>> guide.has_exact_quantiles  # Householder reflections mix the coordinates
        False
        >>> guide.median(params, num_samples=20)["z"].shape, guide.quantiles(params, [0.1, 0.9])["z"].shape
        ((2,), (2, 2))
        >>> round(float(guide.log_joint(jnp.zeros(2))), 4), guide.get_base_dist().event_shape
        (-1.8379, (2,))
    """

    def __init__(
        self,
        model: Callable,
        *,
        flow: str = "iaf",
        num_layers: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: str | float = AUTO,
        stick_the_landing: bool = False,
        prefix: str = "auto",
        key: jax.Array | None = None,
        **options: Any,
    ):
        init_scale = check_init_scale(init_scale, "AutoFlow", AUTOFLOW_LOG_SCALE_BOUND)
        bound = AUTOFLOW_LOG_SCALE_BOUND
        # the same checks build_flow makes, now rather than at the first SVI step
        REGISTRY.resolve(flow, 2, num_layers, hidden_dims, options)
        self.flow_name = flow
        self._flow_kwargs = dict(num_layers=num_layers, hidden_dims=hidden_dims, **options)
        self._init_scale = init_scale
        self._log_scale_bound = bound
        self.stick_the_landing = bool(stick_the_landing)
        self._key = jax.random.key(0) if key is None else key
        self._samplers = {}  # jitted latent samplers by num_samples, for median/quantiles
        self._whitening = None  # the Laplace map, set up at the first call
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    def __getstate__(self):
        state = super().__getstate__()
        state["_samplers"] = {}
        return state

    def _setup_prototype(self, *args, **kwargs):
        self._check_latent_sites(*args, **kwargs)
        super()._setup_prototype(*args, **kwargs)
        dtype = jnp.result_type(self._init_latent)
        flow = build_flow(self.flow_name, self.latent_dim, key=self._key, **self._flow_kwargs)
        affine = ElementwiseAffine(self.latent_dim, log_scale_bound=self._log_scale_bound)
        self._tails = LogTails(self.latent_dim)
        self.start = self._choose_start(*args, **kwargs)
        if self.start.scale_tril is not None:
            self._whitening = astype(CholeskyAffine(self.start.loc, self.start.scale_tril), dtype)
            loc, log_scale = jnp.zeros(self.latent_dim, dtype), 0.0
        else:
            self._whitening = None
            loc = jnp.asarray(self._init_latent, dtype)
            log_scale = _unconstrained_log_scale(self.start.scale, self._log_scale_bound)
        affine = eqx.tree_at(
            lambda m: (m.loc, m.unconstrained_log_scale), affine, (loc, jnp.full(self.latent_dim, log_scale, dtype))
        )
        self._flow = astype(flow, dtype)
        self._affine = astype(affine, dtype)

    def _choose_start(self, *args, **kwargs) -> Start:
        """Where the guide starts (``pyroflows.laplace.choose_start``): Laplace, diagonal or isotropic."""

        def potential(z):
            return -self.log_joint(z, *args, **kwargs)

        value_and_grad, hessian = jax.jit(jax.value_and_grad(potential)), jax.jit(jax.hessian(potential))
        potentials = jax.jit(jax.vmap(potential))
        dtype = jnp.result_type(self._init_latent)

        def fg(x):
            f, g = value_and_grad(jnp.asarray(x, dtype))
            return float(f), np.asarray(g, dtype=float)

        return choose_start(
            self._init_scale,
            fg,
            lambda x: np.asarray(hessian(jnp.asarray(x, dtype)), dtype=float),
            lambda xs: np.asarray(potentials(jnp.asarray(xs, dtype)), dtype=float),
            np.asarray(self._init_latent, dtype=float),
            eps=float(jnp.finfo(dtype).eps),
            caller=type(self).__name__,
        )

    def log_joint(self, z: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """``log p(x, z)`` at one unconstrained latent vector, with the ``biject_to`` Jacobians.

        The negated ``numpyro.infer.util.potential_energy``; the guide must have been set
        up (called once).

        Args:
            z: the unconstrained latent vector, shape ``(D,)``.
            *args: the model's positional arguments.
            **kwargs: the model's keyword arguments.

        Returns:
            The scalar log joint density.
        """
        with handlers.block():
            return -self._potential_fn_gen(*args, **kwargs)(self._unpack_latent(z))

    def _check_latent_sites(self, *args, **kwargs):
        # init_to_uniform gives improper sites (which cannot sample) a value; discrete
        # sites fall through to their own sampler, so they still show up here
        model = handlers.substitute(handlers.seed(self.model, rng_seed=0), substitute_fn=init_to_uniform)
        with handlers.block():
            trace = handlers.trace(model).get_trace(*args, **kwargs)
        sites = [
            (name, _is_discrete(site["fn"]), type(site["fn"]).__name__)
            for name, site in trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        ]
        check_latent_sites(sites, type(self).__name__)

    def _get_posterior(self):
        flow = _flow_param(f"{self.prefix}_flow$params", self._flow)
        affine = _flow_param(f"{self.prefix}_affine$params", self._affine)
        layers = [flow, self._tails, affine]
        if self._whitening is not None:
            layers.append(jax.lax.stop_gradient(_flow_param(f"{self.prefix}_laplace$params", self._whitening)))
        cls = _PathDerivativePosterior if self.stick_the_landing else dist.TransformedDistribution
        return cls(self.get_base_dist(), [layer.to_transform() for layer in layers])

    def get_base_dist(self) -> dist.Distribution:
        """The base distribution ``N(0, I_D)`` of the flow posterior."""
        dtype = jnp.result_type(self._init_latent)
        return dist.Normal(jnp.zeros(self.latent_dim, dtype), 1.0).to_event(1)

    def get_flow(self, params: dict) -> tuple[Flow, ElementwiseAffine]:
        """The trained modules: the ``build_flow`` flow (``save_flow``-able) and the affine layer.

        Args:
            params: the guide's parameters (``svi.get_params(state)``).

        Returns:
            ``(flow, affine)``.
        """

        return tuple(
            _replace_arrays(module, params[f"{self.prefix}_{name}$params"])
            for name, module in (("flow", self._flow), ("affine", self._affine))
        )

    def get_whitening(self, params: dict) -> CholeskyAffine | None:
        """The fixed ``CholeskyAffine`` Laplace map of a Laplace start (else None).

        Args:
            params: the guide's parameters.

        Returns:
            The map ``S(w) = mode + L w``, or None when the guide has no Laplace start.
        """
        if self._whitening is None:
            return None
        return _replace_arrays(self._whitening, params[f"{self.prefix}_laplace$params"])

    def _layers(self, params):
        whitening = self.get_whitening(params)
        flow, affine = self.get_flow(params)
        return [flow, self._tails, affine] + ([] if whitening is None else [whitening])

    @property
    def has_exact_quantiles(self) -> bool:
        """Whether ``median``/``quantiles`` are exact: every layer is elementwise increasing or a permutation."""
        layers = (
            _leaf_layers(self._flow)
            + [self._tails, self._affine]
            + ([] if self._whitening is None else [self._whitening])
        )
        return all(_is_marginal(layer) and not is_stochastic(layer) for layer in layers)

    def _latent_transform(self, params):
        transforms = [layer.to_transform() for layer in self._layers(params)]
        return functools.reduce(lambda f, t: lambda u: t(f(u)), transforms, lambda u: u)

    def median(self, params: dict, *, num_samples: int = 1000, key: jax.Array | None = None) -> dict:
        """Posterior median of each latent site, in the constrained space.

        Exact when every layer of the flow is elementwise increasing or a permutation
        (``has_exact_quantiles``): the flow applied to the base median 0. Otherwise
        (every built-in family) the median of ``num_samples`` posterior draws per
        unconstrained coordinate, with Monte Carlo error about 1.25 sd / sqrt(num_samples).
        Either way then mapped through ``biject_to``, as NumPyro's ``AutoDiagonalNormal`` does.

        Args:
            params: the guide's parameters.
            num_samples: draws when the median is not exact.
            key: the draws' key (default ``jax.random.key(0)``).

        Returns:
            ``{site: median}``, each of the site's shape.

        Raises:
            ValueError: ``num_samples`` is not a positive integer.
        """
        return self._quantiles(params, jnp.asarray(0.5), num_samples, key)

    def quantiles(
        self,
        params: dict,
        quantiles: Sequence[float] | jax.Array,
        *,
        num_samples: int = 1000,
        key: jax.Array | None = None,
    ) -> dict:
        """Posterior quantiles of each latent site, in the constrained space.

        Exact when every layer is elementwise increasing or a permutation
        (``has_exact_quantiles``): the flow applied to base quantiles ``Phi^-1(q)``.
        Otherwise (every built-in family) the sample quantiles of ``num_samples`` posterior
        draws per unconstrained coordinate. Then ``biject_to``.

        Args:
            params: the guide's parameters.
            quantiles: levels in ``(0, 1)``.
            num_samples: draws when the quantiles are not exact.
            key: the draws' key (default ``jax.random.key(0)``).

        Returns:
            ``{site: array of shape (len(quantiles),) + site shape}``.

        Raises:
            ValueError: levels outside ``(0, 1)`` or a bad ``num_samples``.
        """
        return self._quantiles(params, jnp.asarray(quantiles), num_samples, key)

    def _quantiles(self, params, q, num_samples, key):
        check_fit_options(f"{type(self).__name__}.quantiles", num_samples=num_samples)
        check_quantiles(q, f"{type(self).__name__}.quantiles")
        dtype = jnp.result_type(self._init_latent)
        if self.has_exact_quantiles:
            base = ndtri(q.astype(dtype))[..., None] * jnp.ones(self.latent_dim, dtype)
            latent = self._latent_transform(params)(base)
        else:
            if num_samples not in self._samplers:
                self._samplers[num_samples] = jax.jit(functools.partial(self._draw_latent, num_samples=num_samples))
            draws = self._samplers[num_samples](jax.random.key(0) if key is None else key, params)
            latent = jnp.quantile(draws, q, axis=0)
        return self._unpack_and_constrain(latent, params)

    def _draw_latent(self, key, params, num_samples):
        return handlers.substitute(handlers.seed(self._sample_latent, key), params)(sample_shape=(num_samples,))


# --------------------------------------------------------------------------- AutoSNF


class AutoSNF(AutoFlow):
    """A stochastic-normalizing-flow guide: ``AutoFlow``'s flow, then MCMC blocks on the
    model's own log-density in the unconstrained space (Wu, Köhler & Noé 2020).

    The path starts at ``AutoFlow``'s posterior, ``q0 = loc + exp(log_scale) * F(u)`` with
    ``u ~ N(0, I_D)`` and ``F = build_flow(flow, D, num_layers=..., hidden_dims=...,
    **options)`` (``loc`` at the ``init_loc_fn`` point, scale ``init_scale``), whose density
    is exact. Then the blocks of ``stochastic`` (``pyroflows.jax.snf``; default four
    ``MALA(step_size=0.01)``) run in order; block ``i`` of ``n`` samples
    ``log p_l = (1 - l) log q0 + l log p(x, z)`` with ``l = i/n`` (``schedule="linear"``), so
    the path anneals from the flow to the posterior: annealed importance sampling started
    at a flow. ``log p(x, z)`` is the model's log joint at the unconstrained point
    (``numpyro.infer.util.potential_energy``, ``biject_to`` Jacobians included; ``log_joint``).

    The guide's latent site is a ``Delta`` at the path's end whose ``log_density`` is
    ``log q0(z0) - sum_t dS_t``, so ``Trace_ELBO`` estimates ``E[log w] <= log p(x)``, a
    valid evidence lower bound, and ``pyroflows.jax.evaluate`` the importance weights of
    whole paths. Reversible blocks at ``l = 1`` move the draws towards the posterior but
    leave the weights as they were (the ratios telescope); annealed blocks (``l < 1``) and
    ``Langevin`` change them. The model runs inside the guide (under ``handlers.block``),
    once per density evaluation of a block. Works with ``SVI`` (the update jits),
    ``sample_posterior`` and ``Predictive``.

    Parameters: ``{prefix}_flow$params``, ``{prefix}_affine$params`` (as ``AutoFlow``) and
    ``{prefix}_blocks$params`` (learnable step sizes). ``median``/``quantiles``/
    ``sample_posterior`` take the model's arguments after ``params``. There is no
    deterministic ``get_transform`` (``NeuTraReparam`` needs ``AutoFlow``), and no
    sticking-the-landing estimator.

    Args:
        model: a NumPyro model whose latent sample sites are all continuous.
        flow: the base flow's registered name.
        num_layers: layers of the base flow.
        hidden_dims: hidden sizes of its networks (default: the family's).
        stochastic: a block or a list of blocks (``pyroflows.jax.snf``); None for
            ``pyroflows.snf.AUTOSNF_DEFAULTS``.
        schedule: the blocks' interpolation schedule (``StochasticFlow``).
        init_loc_fn: NumPyro init strategy for the start point.
        init_scale: the base's scale (or ``"auto"`` / ``"laplace"``, as ``AutoFlow``).
        prefix: prefix of the parameter names.
        key: JAX key for the flow's initial weights (default ``jax.random.key(0)``).
        **options: the flow family's options.

    Raises:
        ValueError: an empty or unsupported ``stochastic``, a bad schedule, or what
            ``AutoFlow`` raises.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro import handlers
        >>> from pyroflows.jax.snf import MetropolisHastings
        >>> def model():
        ...     numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        >>> guide = AutoSNF(model, flow="householder", num_layers=1, stochastic=MetropolisHastings(0.1))
        >>> trace = handlers.trace(handlers.seed(guide, 0)).get_trace()
        >>> params = {name: site["value"] for name, site in trace.items() if site["type"] == "param"}
        >>> path = handlers.substitute(handlers.seed(guide.stochastic_flow, 0), params)()
        >>> type(path).__name__, path.dim, guide.has_exact_quantiles
        ('StochasticFlow', 2, False)
        >>> guide.sample_posterior(jax.random.key(1), params, sample_shape=(3,))["z"].shape
        (3, 2)
        >>> guide.quantiles(params, [0.25, 0.75], num_samples=10)["z"].shape, guide.median(params)["z"].shape
        ((2, 2), (2,))
        >>> guide.get_posterior(params)
        Traceback (most recent call last):
        NotImplementedError: AutoSNF samples through MCMC steps, so it has no deterministic transform ...
    """

    def __init__(
        self,
        model: Callable,
        *,
        flow: str = _snf.AUTOSNF_DEFAULTS["flow"],
        num_layers: int | None = _snf.AUTOSNF_DEFAULTS["num_layers"],
        hidden_dims: Sequence[int] | None = None,
        stochastic: Any = None,
        schedule: str | Sequence[float] = _snf.AUTOSNF_DEFAULTS["schedule"],
        init_loc_fn: Callable = init_to_median,
        init_scale: str | float = 0.1,
        prefix: str = "auto",
        key: jax.Array | None = None,
        **options: Any,
    ):
        blocks = _snf.autosnf_blocks(stochastic, _blocks)
        _snf.interpolation_schedule(schedule, len(blocks))
        super().__init__(
            model,
            flow=flow,
            num_layers=num_layers,
            hidden_dims=hidden_dims,
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
            prefix=prefix,
            key=key,
            **options,
        )
        self._blocks = tuple(blocks)
        self.schedule = schedule

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self._blocks = astype(self._blocks, jnp.result_type(self._init_latent))

    def stochastic_flow(self, *args: Any, **kwargs: Any) -> _blocks.StochasticFlow:
        """The guide's path as a ``StochasticFlow``, its weights registered as NumPyro parameters.

        Its base ``q0`` is the flow posterior, its layers the blocks, its target
        ``log_joint`` at these arguments; call it inside the guide (or under
        ``handlers.substitute`` with the parameters).

        Args:
            *args: the model's positional arguments.
            **kwargs: the model's keyword arguments.

        Returns:
            The ``pyroflows.jax.snf.StochasticFlow``.
        """
        base = self._get_posterior()
        blocks = self._blocks
        if jax.tree.leaves(eqx.filter(blocks, eqx.is_inexact_array)):
            blocks = eqx_module(f"{self.prefix}_blocks", blocks)
        return _blocks.StochasticFlow(
            blocks, self.latent_dim, lambda z: self.log_joint(z, *args, **kwargs), base=base, schedule=self.schedule
        )

    def _sample_latent(self, *args, **kwargs):
        sample_shape = tuple(kwargs.pop("sample_shape", ()))
        snf = self.stochastic_flow(*args, **kwargs)
        key = numpyro.prng_key()
        if key is None:
            raise ValueError("AutoSNF draws MCMC noise and got no random key: run it under numpyro.handlers.seed")
        x, log_q = snf.sample_path(key, max(math.prod(sample_shape), 1))
        x, log_q = jnp.reshape(x, sample_shape + (self.latent_dim,)), jnp.reshape(log_q, sample_shape)
        return numpyro.sample(
            f"_{self.prefix}_latent", dist.Delta(x, log_density=log_q, event_dim=1), infer={"is_auxiliary": True}
        )

    def get_transform(self, params: dict) -> NoReturn:
        """Not available: MCMC steps have no deterministic transform.

        Raises:
            NotImplementedError: always (``NeuTraReparam`` needs ``AutoFlow``).
        """
        raise _snf.no_transform_error(type(self).__name__)

    def get_posterior(self, params: dict) -> NoReturn:
        """Not available: the path's marginal has no closed form.

        Raises:
            NotImplementedError: always.
        """
        raise _snf.no_transform_error(type(self).__name__)

    @property
    def has_exact_quantiles(self) -> bool:
        """Never: the MCMC steps mix coordinates, so ``median``/``quantiles`` sample."""
        return False

    def sample_posterior(
        self, rng_key: jax.Array, params: dict, *args: Any, sample_shape: tuple = (), **kwargs: Any
    ) -> dict:
        """Posterior draws in the constrained space; the model's arguments follow ``params``.

        Args:
            rng_key: a JAX PRNG key.
            params: the guide's parameters.
            *args: the model's positional arguments.
            sample_shape: the draws' batch shape.
            **kwargs: the model's keyword arguments.

        Returns:
            ``{site: draws of shape sample_shape + site shape}``.
        """
        latent = handlers.substitute(handlers.seed(self._sample_latent, rng_key), params)(
            *args, sample_shape=sample_shape, **kwargs
        )
        return self._unpack_and_constrain(latent, params)

    def quantiles(
        self,
        params: dict,
        quantiles: Sequence[float] | jax.Array,
        *args: Any,
        num_samples: int = 1000,
        key: jax.Array | None = None,
        **kwargs: Any,
    ) -> dict:
        """Sample quantiles of guide draws per unconstrained coordinate, then ``biject_to``.

        Args:
            params: the guide's parameters.
            quantiles: levels in ``(0, 1)``.
            *args: the model's positional arguments.
            num_samples: how many draws.
            key: the draws' key (default ``jax.random.key(0)``).
            **kwargs: the model's keyword arguments.

        Returns:
            ``{site: array of shape (len(quantiles),) + site shape}``.

        Raises:
            ValueError: levels outside ``(0, 1)`` or a bad ``num_samples``.
        """
        caller = f"{type(self).__name__}.quantiles"
        check_fit_options(caller, num_samples=num_samples)
        q = jnp.asarray(check_quantiles(quantiles, caller))
        key = jax.random.key(0) if key is None else key
        draws = handlers.substitute(handlers.seed(self._sample_latent, key), params)(
            *args, sample_shape=(num_samples,), **kwargs
        )
        return self._unpack_and_constrain(jnp.quantile(draws, q, axis=0), params)

    def median(
        self, params: dict, *args: Any, num_samples: int = 1000, key: jax.Array | None = None, **kwargs: Any
    ) -> dict:
        """Sample median of ``num_samples`` guide draws per unconstrained coordinate, then ``biject_to``.

        Args:
            params: the guide's parameters.
            *args: the model's positional arguments.
            num_samples: how many draws.
            key: the draws' key (default ``jax.random.key(0)``).
            **kwargs: the model's keyword arguments.

        Returns:
            ``{site: median}``, each of the site's shape.
        """
        return self.quantiles(params, 0.5, *args, num_samples=num_samples, key=key, **kwargs)
