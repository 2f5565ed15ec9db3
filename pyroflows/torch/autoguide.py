"""``AutoFlow``: a normalizing-flow posterior for any Pyro model with continuous latent sites."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.runtime import _DIM_ALLOCATOR
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints

from .. import snf as _snf
from ..fitting import AUTOFLOW_LOG_SCALE_BOUND, check_fit_options, check_latent_sites, check_quantiles
from ..laplace import AUTO, Start, check_init_scale, choose_start
from . import snf as _blocks
from .density import log_prob_stop_gradient
from .flows import REGISTRY, build_flow
from .transforms.base import CholeskyAffine, ElementwiseAffine, Flow, LogTails, Permute

__all__ = ["AutoFlow", "AutoSNF"]

# Layers that act on each coordinate by an increasing map, or only reorder coordinates:
# through a stack of them every output coordinate is an increasing function of ONE
# base coordinate, so marginal quantiles are the flow applied to base quantiles.
_MARGINAL_LAYERS = (ElementwiseAffine, Permute, LogTails)
# The final affine layer's log-scale bound (ElementwiseAffine's default; the JAX guide's too).
_LOG_SCALE_BOUND = AUTOFLOW_LOG_SCALE_BOUND


def _is_marginal(layer) -> bool:
    """Whether ``layer`` maps each coordinate increasingly on its own (a diagonal start map too)."""
    if isinstance(layer, CholeskyAffine):
        return bool(torch.count_nonzero(torch.tril(layer.scale_tril, -1)) == 0)
    return isinstance(layer, _MARGINAL_LAYERS)


def _leaves(transform):
    """The layers of a (nested) composition, in order."""
    parts = getattr(transform, "parts", None)
    if parts is None:
        return [transform]
    return [leaf for part in parts for leaf in _leaves(part)]


class _GuideFlow(Flow):
    """The guide's map: its domain and codomain are stated, not derived from the parts on
    every access (torch recomputes them recursively, a large share of a small SVI step)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector


class _FlowPosterior(dist.TransformedDistribution):
    """The guide's distribution; with ``stop_gradient`` its ``log_prob`` holds the flow fixed.

    That is the path-derivative ("sticking the landing") estimator: the ELBO gradient
    then flows only through the sample, and its score-function term, zero in
    expectation but not per sample, is dropped.
    """

    def __init__(self, base, transform, stop_gradient=False, validate_args=None):
        super().__init__(base, transform, validate_args=validate_args)
        self.stop_gradient = stop_gradient

    def expand(self, batch_shape, _instance=None):
        new = self.__new__(type(self)) if _instance is None else _instance
        new = super().expand(batch_shape, _instance=new)
        new.stop_gradient = self.stop_gradient
        return new

    def log_prob(self, value):
        if not self.stop_gradient:
            return super().log_prob(value)
        return log_prob_stop_gradient(self.transforms[0], value)


def _start_improper_sites(init_loc_fn):
    """``init_loc_fn`` that also starts sites which cannot sample (``ImproperUniform``, whose
    ``sample`` raises ``NotImplementedError`` in every Pyro init strategy) at the point 0 of
    their unconstrained space, as NumPyro's strategies manage such sites."""

    def init(site):
        try:
            return init_loc_fn(site)
        except NotImplementedError:
            fn = site["fn"]
            return biject_to(fn.support)(torch.zeros(fn.shape(), dtype=torch.get_default_dtype()))

    return init


def _potential_or_inf(potential, z) -> float:
    try:
        return float(potential(z))
    except (ValueError, RuntimeError):  # a distribution that rejects its parameters there
        return math.inf


def _per_path(log_prob, n, nesting):
    """Sum a site's log-density over every dimension right of the path plate (``n`` paths)."""
    log_prob = log_prob.reshape((1,) * max(0, nesting + 1 - log_prob.dim()) + log_prob.shape)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(n)


class AutoFlow(AutoContinuous):
    """A flow posterior over the model's unconstrained latent vector ``z`` (size ``D``).

    ``z = S(loc + exp(log_scale) * T(f(u)))`` with ``u ~ N(0, I_D)``, ``f = build_flow(flow, D,
    num_layers=..., hidden_dims=..., **options)`` (any registered flow, the user's own
    included), ``T`` the fixed ``LogTails`` map (the identity on [-5, 5], logarithmic
    beyond: a large optimiser step then cannot send samples to 1e30 and the model to
    ``inf``) and ``S`` a fixed start map. The log-scale is soft-clamped to (-5, 5).
    Constrained sites are mapped through ``biject_to`` as in Pyro's other continuous
    guides (ADVI; Kucukelbir et al. 2017, arXiv:1603.00788). The built-in flows start at
    (or near) a map that leaves ``N(0, I)`` unchanged, so the guide starts at ``S(N(0, I))``:

    - ``init_scale="auto"`` (default): the Laplace approximation ``N(mode, H^-1)`` when a
      Newton search from the ``init_loc_fn`` point (at the first call, with that call's
      model arguments) finds a mode with a positive-definite Hessian and the
      approximation's importance weights do not rule it out (``pyroflows.laplace.choose_start``):
      ``S(w) = mode + L w`` with ``L L^T = H^-1``, so the flow learns in whitened
      coordinates, where Adam's steps suit every coordinate however differently scaled or
      correlated the posterior is (``D`` backward passes for ``H``). Otherwise (a funnel,
      an improper posterior, ``D > 1000``) ``S(w) = x0 + diag(1/sqrt(H_ii(x0))) w`` at the
      ``init_loc_fn`` point ``x0``, with a ``UserWarning`` that says why;
      ``guide.start`` records which (``kind``, ``message``).
    - ``"laplace"``: the Laplace start or a ``ValueError`` that names the problem.
    - a float: no ``S``; ``loc`` starts at the ``init_loc_fn`` point (sites that cannot
      sample, such as ``ImproperUniform``, at 0 of their unconstrained space) and the
      scale at ``init_scale``, which must lie in (exp(-5), exp(5)).

    Attributes after the first call: ``guide.flow`` (the ``build_flow`` part, which
    ``save_flow`` writes), ``guide.affine`` (the final ``ElementwiseAffine``),
    ``guide.whitening`` (the start map ``S``, a ``CholeskyAffine`` of buffers, or None),
    ``guide.transform`` (all of them, the map ``get_transform()`` returns).

    ``median()`` and ``quantiles()``: exact when every layer of the flow keeps the
    coordinates independent and increasing (``ElementwiseAffine``, ``ActNorm``,
    ``Permute``): quantiles of ``N(0, 1)`` then map through the layers. Otherwise
    (every built-in family) they are the sample median / quantiles of ``num_samples``
    guide draws (keyword, default 1000, drawn from Pyro's global RNG), per coordinate.

    ``stick_the_landing=True`` scores the guide's own sample with its parameters held
    fixed (``pyroflows.torch.density.log_prob_stop_gradient``): the path-derivative
    gradient estimator, zero-variance when the guide equals the posterior. It costs one
    inverse pass of the flow (``D`` sequential passes for ``iaf``).

    Works with ``Trace_ELBO`` (vectorised particles too), ``JitTrace_ELBO``,
    ``Predictive`` and ``pyro.infer.reparam.NeuTraReparam`` (``get_transform()``
    needs no model arguments).

    Args:
        model: a Pyro model with continuous latent sites.
        flow: a registered flow name (``pyroflows.torch.available_flows()``).
        num_layers: the flow's layers; the family's default when ``None``.
        hidden_dims: the flow's hidden widths; the family's default when ``None``.
        init_loc_fn: where the start search begins (a Pyro init strategy).
        init_scale: ``"auto"``, ``"laplace"`` or a float in ``(exp(-5), exp(5))`` (above).
        stick_the_landing: score the guide's own draws with the parameters held fixed.
        **options: the flow family's keyword options.

    Raises:
        ValueError: an unknown flow or option, a bad ``init_scale``; at the first call,
            discrete latent sites or none, or (``init_scale="laplace"``) no usable mode.

    References:
        Kucukelbir, Tran, Ranganath, Gelman & Blei 2017, "Automatic differentiation
        variational inference", arXiv:1603.00788.
        Roeder, Wu & Duvenaud 2017, "Sticking the landing: simple, lower-variance gradient
        estimators for variational inference", arXiv:1703.09194.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.ones(4)  # the posterior of mu is N(0.8, 0.2)
        >>> pyro.set_rng_seed(0)
        >>> pyro.clear_param_store()
        >>> guide = AutoFlow(model, flow="realnvp", num_layers=1, hidden_dims=(8,))
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        >>> losses = [svi.step(y) for _ in range(3)]
        >>> guide.start.kind, round(guide.median(y)["mu"].item(), 1)
        ('laplace', 0.8)
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
        **options: Any,
    ):
        init_scale = check_init_scale(init_scale, "AutoFlow", _LOG_SCALE_BOUND)
        # Unknown names and options fail here, not at the first SVI step.
        REGISTRY.resolve(flow, 1, num_layers, hidden_dims, options)
        self._flow_args = dict(name=flow, num_layers=num_layers, hidden_dims=hidden_dims, options=options)
        self.init_scale = init_scale
        self.stick_the_landing = bool(stick_the_landing)
        super().__init__(model, init_loc_fn=_start_improper_sites(init_loc_fn))

    # --- set-up ----------------------------------------------------------------------
    @staticmethod
    def _latent_sites(trace):
        return [
            (name, bool(site["fn"].support.is_discrete), type(site["fn"]).__name__)
            for name, site in trace.iter_stochastic_nodes()
        ]

    def _setup_prototype(self, *args, **kwargs):
        try:
            super()._setup_prototype(*args, **kwargs)
        except (NotImplementedError, RuntimeError, ValueError):
            # biject_to fails on a discrete support, AutoContinuous on no latent sites:
            # say which, and leave the guide unset so a fixed model can retry.
            trace, self.prototype_trace = self.prototype_trace, None
            if trace is not None:
                check_latent_sites(self._latent_sites(trace), type(self).__name__)
            raise
        check_latent_sites(self._latent_sites(self.prototype_trace), type(self).__name__)
        self._nesting = None  # log_joint's path plate, found when first needed
        loc = self._init_loc()
        spec = self._flow_args
        body = build_flow(
            spec["name"],
            self.latent_dim,
            num_layers=spec["num_layers"],
            hidden_dims=spec["hidden_dims"],
            **spec["options"],
        ).to(device=loc.device, dtype=loc.dtype)
        bound = _LOG_SCALE_BOUND
        affine = ElementwiseAffine(self.latent_dim, log_scale_bound=bound).to(loc)
        layers = [body, LogTails(self.latent_dim), affine]
        self.start = self._choose_start(loc, *args, **kwargs)
        if self.start.scale_tril is not None:
            layers.append(CholeskyAffine(loc.new_tensor(self.start.loc), loc.new_tensor(self.start.scale_tril)))
        else:
            with torch.no_grad():
                affine.loc.copy_(loc)
                affine.unconstrained_log_scale.fill_(bound * math.atanh(math.log(self.start.scale) / bound))
        self.transform = _GuideFlow(layers, self.latent_dim)

    def _choose_start(self, start, *args, **kwargs) -> Start:
        """Where the guide starts (``pyroflows.laplace.choose_start``): Laplace, diagonal or isotropic."""

        def potential(z):
            return -self.log_joint(z, *args, **kwargs)

        def as_tensor(x):
            return torch.as_tensor(x, dtype=start.dtype, device=start.device)

        def potential_and_grad(x):
            z = as_tensor(x).requires_grad_()
            f = potential(z)
            (g,) = torch.autograd.grad(f, z)
            return f.item(), g.detach().cpu().double().numpy()

        def hessian(x):
            return torch.autograd.functional.hessian(potential, as_tensor(x)).detach().cpu().double().numpy()

        @torch.no_grad()
        def potentials(xs):
            try:  # one vectorised run of the model under a plate of points
                return potential(as_tensor(xs)).cpu().double().numpy()
            except (ValueError, RuntimeError, NotImplementedError):  # a model that does not broadcast
                return np.array([_potential_or_inf(potential, as_tensor(x)) for x in xs])

        with torch.enable_grad():
            return choose_start(
                self.init_scale,
                potential_and_grad,
                hessian,
                potentials,
                start.detach().cpu().double().numpy(),
                eps=torch.finfo(start.dtype).eps,
                caller=type(self).__name__,
            )

    def _find_nesting(self, *args, **kwargs):
        # the path plate sits left of every plate of the model, observed sites' included
        # (the prototype trace hides those); self.model runs under init_loc_fn
        with poutine.block():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        self._nesting = max(
            [
                -f.dim
                for s in trace.nodes.values()
                if s["type"] == "sample"
                for f in s["cond_indep_stack"]
                if f.vectorized
            ],
            default=0,
        )

    def log_joint(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``log p(x, z)`` at unconstrained latent vectors ``z`` of shape ``(..., D)``, with the
        ``biject_to`` Jacobians (the density ``AutoSNF``'s blocks sample). A batch of ``z``
        runs the model once under a plate of paths, so it needs a model that broadcasts; a
        single ``z`` (shape ``(D,)``) runs it as it is."""
        if z.dim() == 1:
            values, total = {}, z.new_zeros(())
            for site, unconstrained in self._unpack_latent(z):
                transform = biject_to(site["fn"].support)
                values[site["name"]] = value = transform(unconstrained)
                total = total + transform.log_abs_det_jacobian(unconstrained, value).sum()
            with poutine.block():
                trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(*args, **kwargs)
            return total + trace.log_prob_sum(lambda name, site: not site_is_subsample(site))
        shape, n = z.shape[:-1], max(z.shape[:-1].numel(), 1)
        if self._nesting is None:
            self._find_nesting(*args, **kwargs)
        # the path plate: left of the model's plates, and of any plate the guide runs in
        # (vectorised particles), whose messages poutine.block keeps from the model
        dim, used = -(self._nesting + 1), {-1 - i for i, name in enumerate(_DIM_ALLOCATOR._stack) if name is not None}
        while dim in used:
            dim -= 1
        nesting = -dim - 1
        flat = z.reshape((n,) + (1,) * nesting + (self.latent_dim,))
        values, total = {}, z.new_zeros(n)
        for site, unconstrained in self._unpack_latent(flat):
            transform = biject_to(site["fn"].support)
            values[site["name"]] = value = transform(unconstrained)
            total = total + _per_path(transform.log_abs_det_jacobian(unconstrained, value), n, nesting)
        with poutine.block(), pyro.plate("_autosnf_paths", n, dim=dim):
            trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(*args, **kwargs)
        trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                total = total + _per_path(site["log_prob"], n, nesting)
        return total.reshape(shape)

    @property
    def flow(self) -> Flow:
        """The ``build_flow`` part of the guide (``save_flow``-able)."""
        return self.transform.parts[0]

    @property
    def affine(self) -> ElementwiseAffine:
        """The ``ElementwiseAffine`` layer after the flow: ``loc`` and the bounded log-scale."""
        return self.transform.parts[2]

    @property
    def whitening(self) -> CholeskyAffine | None:
        """The fixed ``CholeskyAffine`` start map (Laplace or diagonal; None for a float ``init_scale``)."""
        parts = self.transform.parts
        return parts[3] if len(parts) > 3 else None

    # --- the AutoContinuous contract ---------------------------------------------------
    def _reference(self):
        if self.prototype_trace is None:
            raise ValueError(
                f"{type(self).__name__} is not set up yet: call it (or run SVI) with the model's arguments"
            )
        # _modules, not the attribute: PyroModule would register the weights again
        return self._modules["transform"].parts[2].loc

    def get_base_dist(self) -> dist.Distribution:
        """``N(0, I_D)``, the base of the guide's flow."""
        ref = self._reference()
        zeros = torch.zeros(self.latent_dim, dtype=ref.dtype, device=ref.device)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> Flow:
        """The guide's whole map from base noise to the unconstrained latent vector."""
        return self.transform

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        """The guide's distribution over the unconstrained latent vector."""
        return _FlowPosterior(self.get_base_dist(), self.transform, self.stick_the_landing)

    # --- point summaries -------------------------------------------------------------
    @property
    def has_exact_quantiles(self) -> bool:
        """Whether ``median``/``quantiles`` are exact: every layer is elementwise increasing or a permutation."""
        self._reference()
        return all(_is_marginal(layer) for layer in _leaves(self._modules["transform"]))

    @torch.no_grad()
    def _latent_quantiles(self, probs, num_samples):
        caller = f"{type(self).__name__}.quantiles"
        check_fit_options(caller, num_samples=num_samples)
        ref = self._reference()
        probs = torch.as_tensor(check_quantiles(probs, caller), dtype=ref.dtype, device=ref.device).reshape(-1)
        if self.has_exact_quantiles:
            u = dist.Normal(0.0, 1.0).icdf(probs)[:, None].expand(-1, self.latent_dim)
            return self.transform(u)
        z = self.get_posterior().sample((num_samples,))
        return torch.quantile(z, probs, dim=0)

    def _constrained(self, latent):
        return {site["name"]: biject_to(site["fn"].support)(value) for site, value in self._unpack_latent(latent)}

    @torch.no_grad()
    def median(self, *args: Any, num_samples: int = 1000, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Posterior median of each latent site, in the constrained space.

        Exact when every flow layer is elementwise increasing or a permutation,
        otherwise the coordinatewise sample median of ``num_samples`` guide draws.

        Args:
            *args: the model's arguments (used only to set the guide up).
            num_samples: draws for the sample median.
            **kwargs: the model's keyword arguments.

        Returns:
            ``{name: tensor}`` with each site's shape.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self._constrained(self._latent_quantiles([0.5], num_samples)[0])

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float], *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Posterior quantiles of each latent site, in the constrained space.

        Exact when every flow layer is elementwise increasing or a permutation,
        otherwise coordinatewise sample quantiles of ``num_samples`` guide draws.

        Args:
            quantiles: probabilities in ``(0, 1)``.
            *args: the model's arguments (used only to set the guide up).
            num_samples: draws for sample quantiles.
            **kwargs: the model's keyword arguments.

        Returns:
            ``{name: tensor of shape (len(quantiles),) + site shape}``.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latents = self._latent_quantiles(quantiles, num_samples)
        out = {}
        for latent in latents:
            for name, value in self._constrained(latent).items():
                out.setdefault(name, []).append(value)
        return {name: torch.stack(values) for name, values in out.items()}


# --------------------------------------------------------------------------- AutoSNF (issue 6)


class _PathPosterior(dist.TorchDistribution):
    """The distribution of an ``AutoSNF`` sample: draws run the guide's stochastic flow, and
    ``log_prob`` of the guide's own draw is ``log q0(z0) - sum_t dS_t`` of its path.

    ``Trace_ELBO`` then sees ``log p(x, z) - log q(path)``, the log path weight, whose
    expectation is a lower bound on the evidence (Wu, Köhler & Noé 2020,
    arXiv:2002.06707). Plates (vectorised particles, ``Predictive``) expand it, and an
    expanded draw runs one path per batch element.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, snf, batch_shape=torch.Size(), validate_args=None):
        self.snf = snf
        self._last = None
        super().__init__(torch.Size(batch_shape), torch.Size([snf.dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _PathPosterior(self.snf, batch_shape)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        x, log_q = self.snf.sample_path(max(shape.numel(), 1))
        x, log_q = x.reshape(shape + (self.snf.dim,)), log_q.reshape(shape)
        self._last = (x, log_q)
        return x

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        if self._last is not None and value is self._last[0]:
            return self._last[1]
        raise _snf.unscored_path_error("AutoSNF")


class AutoSNF(AutoFlow):
    """A stochastic-normalizing-flow guide: ``AutoFlow``'s flow, then MCMC blocks on the
    model's own log-density in the unconstrained space (Wu, Köhler & Noé 2020,
    arXiv:2002.06707).

    The path starts at ``AutoFlow``'s posterior, ``q0 = loc + exp(log_scale) * F(u)`` with
    ``u ~ N(0, I_D)`` and ``F = build_flow(flow, D, num_layers=..., hidden_dims=...,
    **options)`` (``loc`` at the ``init_loc_fn`` point, scale ``init_scale``), whose density
    is exact. Then the blocks of ``stochastic`` (``pyroflows.torch.snf``; default four
    ``MALA(step_size=0.01)``) run in order; block ``i`` of ``n`` samples
    ``log p_l = (1 - l) log q0 + l log p(x, z)`` with ``l = i/n`` (``schedule="linear"``), so
    the path anneals from the flow to the posterior: annealed importance sampling started
    at a flow. ``log p(x, z)`` is the model's log joint at the unconstrained point, with
    the ``biject_to`` Jacobians (``log_joint``).

    The guide's latent site reports ``log q0(z0) - sum_t dS_t`` of the drawn path, so
    ``Trace_ELBO`` estimates ``E[log w] <= log p(x)``, a valid evidence lower bound, and
    ``pyroflows.torch.evaluate`` the importance weights of whole paths. Reversible blocks
    at ``l = 1`` move the draws towards the posterior but leave the weights as they were
    (the ratios telescope); annealed blocks (``l < 1``) and ``Langevin`` change them. The
    model runs inside the guide, once per density evaluation of a block, under a plate of
    paths left of its own plates (vectorised particles need a model that broadcasts, as
    for ``vectorize_particles``); models that subsample see a fresh subsample each time.

    ``median``/``quantiles`` are sample quantiles of guide draws and take the model's
    arguments. There is no deterministic ``get_transform`` (``NeuTraReparam`` needs
    ``AutoFlow``), and no sticking-the-landing estimator.

    Args:
        model: a Pyro model with continuous latent sites.
        flow: a registered flow name for the base.
        num_layers: the base flow's layers.
        hidden_dims: the base flow's hidden widths; the family's default when ``None``.
        stochastic: a block or a list of blocks from ``pyroflows.torch.snf``; ``None``:
            four ``MALA(step_size=0.01)``.
        schedule: ``"linear"``, ``"target"`` or one number in ``[0, 1]`` per block.
        init_loc_fn: where the base starts (a Pyro init strategy).
        init_scale: the base's initial scale, or ``"auto"``/``"laplace"`` as for ``AutoFlow``.
        **options: the flow family's keyword options.

    Raises:
        ValueError: an empty or bad ``stochastic``, a bad ``schedule``, or any of ``AutoFlow``'s errors.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> from pyroflows.torch.snf import MALA
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.ones(4)
        >>> pyro.set_rng_seed(0)
        >>> pyro.clear_param_store()
        >>> guide = AutoSNF(model, hidden_dims=(8,), stochastic=[MALA(0.05, num_steps=2)])
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        >>> losses = [svi.step(y) for _ in range(2)]
        >>> guide.median(y, num_samples=50)["mu"].shape
        torch.Size([])
    """

    def __init__(
        self,
        model: Callable,
        *,
        flow: str = _snf.AUTOSNF_DEFAULTS["flow"],
        num_layers: int = _snf.AUTOSNF_DEFAULTS["num_layers"],
        hidden_dims: Sequence[int] | None = None,
        stochastic: Any = None,
        schedule: str | Sequence[float] = _snf.AUTOSNF_DEFAULTS["schedule"],
        init_loc_fn: Callable = init_to_median,
        init_scale: str | float = 0.1,
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
            **options,
        )
        self.blocks = torch.nn.ModuleList(blocks)
        self.schedule = schedule

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        ref = self._reference()
        self.blocks.to(device=ref.device, dtype=ref.dtype)
        self._find_nesting(*args, **kwargs)

    def stochastic_flow(self, *args: Any, **kwargs: Any) -> _blocks.StochasticFlow:
        """The guide's path as a ``StochasticFlow``: base ``q0`` the flow posterior, layers the
        blocks, target ``log_joint`` at these arguments."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        base = dist.TransformedDistribution(self.get_base_dist(), self.transform)
        return _blocks.StochasticFlow(
            list(self.blocks),
            self.latent_dim,
            lambda z: self.log_joint(z, *args, **kwargs),
            base=base,
            schedule=self.schedule,
        )

    def get_transform(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Raises ``NotImplementedError``: a stochastic path has no deterministic transform."""
        raise _snf.no_transform_error(type(self).__name__)

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TorchDistribution:
        """The distribution of a guide draw: one path of ``stochastic_flow`` per draw."""
        return _PathPosterior(self.stochastic_flow(*args, **kwargs))

    @property
    def has_exact_quantiles(self) -> bool:
        """Never: the MCMC steps mix coordinates, so ``median``/``quantiles`` sample."""
        return False

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float], *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Sample quantiles of ``num_samples`` guide draws per unconstrained coordinate, then ``biject_to``.

        Args:
            quantiles: probabilities in ``(0, 1)``.
            *args: the model's arguments (the blocks run the model).
            num_samples: guide draws.
            **kwargs: the model's keyword arguments.

        Returns:
            ``{name: tensor of shape (len(quantiles),) + site shape}``.
        """
        caller = f"{type(self).__name__}.quantiles"
        check_fit_options(caller, num_samples=num_samples)
        z = self.get_posterior(*args, **kwargs).sample((num_samples,))
        probs = torch.as_tensor(check_quantiles(quantiles, caller), dtype=z.dtype, device=z.device).reshape(-1)
        out = {}
        for latent in torch.quantile(z, probs, dim=0):
            for name, value in self._constrained(latent).items():
                out.setdefault(name, []).append(value)
        return {name: torch.stack(values) for name, values in out.items()}

    @torch.no_grad()
    def median(self, *args: Any, num_samples: int = 1000, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Sample median of ``num_samples`` guide draws per unconstrained coordinate, then ``biject_to``.

        Args:
            *args: the model's arguments (the blocks run the model).
            num_samples: guide draws.
            **kwargs: the model's keyword arguments.

        Returns:
            ``{name: tensor}`` with each site's shape.
        """
        return {
            name: value[0] for name, value in self.quantiles([0.5], *args, num_samples=num_samples, **kwargs).items()
        }
