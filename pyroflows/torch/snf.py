"""Stochastic normalizing flows for Pyro: MCMC blocks (``Langevin``, ``MALA``,
``MetropolisHastings``, ``HMC``) between flow layers, and ``StochasticFlow``, which carries
the importance weight of the whole path.

``pyroflows.snf`` states the estimators: the path weight ``log w = log p~(x) - log q0(z0)
+ sum_t dS_t``, each block's ``dS``, and the reverse-path lower bound on ``log q(x)``
that maximum likelihood uses. The map helpers come from ``pyroflows.torch.density``;
``StochasticFlow`` implements ``pyroflows.protocols.TrainableFlow``, so
``pyroflows.torch.train`` fits it without importing this module.

References:
    Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from pyro.distributions.torch_transform import TransformModule

from .. import snf as _shared
from .density import forward_and_ladj, inverse_and_ladj, std_normal_log_prob

__all__ = ["StochasticBlock", "Langevin", "MALA", "MetropolisHastings", "HMC", "StochasticFlow"]


def _randn(like, generator, shape=None):
    shape = like.shape if shape is None else shape
    return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)


def _log_uniform(like, generator):
    u = torch.rand(like.shape[:-1], dtype=like.dtype, device=like.device, generator=generator)
    return torch.log(u)


def _value_and_grad(log_prob, y):
    """``log_prob(y)`` and its gradient in ``y``; differentiable (``create_graph``) when
    gradients are on, so parameters upstream of ``y`` see the drift's dependence on them."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        x = y if y.requires_grad else y.detach().requires_grad_(True)
        value = log_prob(x)
        (grad,) = torch.autograd.grad(value.sum(), x, create_graph=outer, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(y)
    return (value if outer else value.detach()), grad


def _sum_squares(v):
    return (v * v).sum(-1)


class StochasticBlock(torch.nn.Module):
    """An MCMC kernel that also returns its contribution ``dS`` to a path's log-weight.

    ``block(y, log_prob, generator=None) -> (y_new, dS)`` runs ``num_steps`` steps from
    ``y`` (shape ``(..., dim)``) for the density ``exp(log_prob)`` (``log_prob`` maps
    ``(..., dim)`` to ``(...)``); ``dS`` has shape ``(...)``. ``generator`` (a
    ``torch.Generator``) draws the noise; without it the global RNG does. Subclasses
    implement one step (``_step``).

    Args:
        step_size: the kernel's step size, positive.
        num_steps: steps per call, at least 1.
        learnable_step_size: make the log step size a parameter (``log_step_size``);
            otherwise it is a fixed number.
        **extra: a subclass's own options (``num_leapfrog`` for ``HMC``).

    Raises:
        ValueError: a step size or count that is not positive.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> block = MetropolisHastings(0.5, num_steps=2)
        >>> y, ds = block(torch.zeros(3, 2), lambda y: -0.5 * (y * y).sum(-1), torch.Generator().manual_seed(0))
        >>> tuple(y.shape), tuple(ds.shape), block.step_size
        ((3, 2), (3,), 0.5)
    """

    def __init__(self, step_size: float, num_steps: int = 1, learnable_step_size: bool = False, **extra: int):
        super().__init__()
        opts = _shared.check_block_options(
            type(self).__name__,
            step_size=step_size,
            num_steps=num_steps,
            learnable_step_size=learnable_step_size,
            **extra,
        )
        self.num_steps = opts["num_steps"]
        self.learnable_step_size = opts["learnable_step_size"]
        # A fixed step size is a number, not a buffer, so it keeps full precision in any dtype.
        self.fixed_log_step_size = math.log(opts["step_size"])
        self.log_step_size = None
        if self.learnable_step_size:
            self.log_step_size = torch.nn.Parameter(torch.tensor(self.fixed_log_step_size))
        self._options = opts

    @property
    def step_size(self) -> float | torch.Tensor:
        """The step size: a number, or ``exp(log_step_size)`` (a tensor) when learnable."""
        if self.learnable_step_size:
            return self.log_step_size.exp()
        return math.exp(self.fixed_log_step_size)

    def _step_size(self, y):
        if self.learnable_step_size:
            return self.log_step_size.to(y.dtype).exp()
        return torch.tensor(math.exp(self.fixed_log_step_size), dtype=y.dtype, device=y.device)

    # Each kernel keeps (y, log p(y)[, grad log p(y)]) between steps, so a step evaluates
    # the density once, at its proposal.
    def _start(self, y, log_prob):
        return (y, *_value_and_grad(log_prob, y))

    def _step(self, state, log_prob, generator):
        raise NotImplementedError

    def forward(
        self,
        y: torch.Tensor,
        log_prob: Callable[[torch.Tensor], torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``num_steps`` steps from ``y`` for ``exp(log_prob)``.

        Args:
            y: start points, shape ``(..., dim)``.
            log_prob: the log-density the kernel samples, ``(..., dim) -> (...)``.
            generator: draws the noise; the global RNG when ``None``.

        Returns:
            ``(y_new, dS)``: the end points and the summed log-weight contributions, shape ``(...)``.
        """
        state = self._start(y, log_prob)
        total = y.new_zeros(y.shape[:-1])
        for _ in range(self.num_steps):
            state, ds = self._step(state, log_prob, generator)
            total = total + ds
        return state[0], total

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self._options.items() if k != "learnable_step_size")
        return f"{opts}, learnable_step_size={self.learnable_step_size}"


def _accept(log_alpha, generator):
    """Metropolis test; NaN (an invalid proposal) is a rejection."""
    return _log_uniform(log_alpha.unsqueeze(-1), generator) < log_alpha


def _where(accept, new, old):
    return torch.where(accept.unsqueeze(-1) if new.dim() > accept.dim() else accept, new, old)


def _langevin_move(y, grad, e, generator, log_prob):
    noise = _randn(y, generator)
    y_new = y + e * grad + torch.sqrt(2 * e) * noise
    lp_new, grad_new = _value_and_grad(log_prob, y_new)
    backward_noise = (y - y_new - e * grad_new) / torch.sqrt(2 * e)
    ds = -0.5 * (_sum_squares(backward_noise) - _sum_squares(noise))
    return y_new, lp_new, grad_new, ds


class Langevin(StochasticBlock):
    """Unadjusted (overdamped) Langevin steps ``y' = y + e grad log p(y) + sqrt(2e) n``.

    Not reversible, so the backward kernel is the same Langevin step taken from ``y'``:
    ``dS = log N(y; y' + e grad log p(y'), 2e) - log N(y'; y + e grad log p(y), 2e)
    = -(|n~|^2 - |n|^2) / 2`` with ``n~ = (y - y' - e grad log p(y')) / sqrt(2e)``.

    Args:
        step_size: ``e``, positive.
        num_steps: steps per call.
        learnable_step_size: make ``log e`` a parameter.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> block = Langevin(0.1)
        >>> y, ds = block(torch.zeros(4, 2), lambda y: -0.5 * (y * y).sum(-1), torch.Generator().manual_seed(0))
        >>> tuple(y.shape), tuple(ds.shape)
        ((4, 2), (4,))
    """

    def _step(self, state, log_prob, generator):
        y, _, grad = state
        y_new, lp_new, grad_new, ds = _langevin_move(y, grad, self._step_size(y), generator, log_prob)
        return (y_new, lp_new, grad_new), ds


class MALA(StochasticBlock):
    """Metropolis-adjusted Langevin: the ``Langevin`` proposal ``y' = y + e grad log p(y) +
    sqrt(2e) n``, accepted with probability
    ``min(1, p(y') N(y; y' + e grad log p(y'), 2e) / (p(y) N(y'; y + e grad log p(y), 2e)))``.

    Reversible for ``p``: ``dS = log p(y) - log p(y')`` on acceptance, 0 on rejection.

    Args:
        step_size: ``e``, positive.
        num_steps: steps per call.
        learnable_step_size: make ``log e`` a parameter.

    References:
        Roberts & Tweedie 1996, "Exponential convergence of Langevin distributions and
        their discrete approximations", Bernoulli 2(4).
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> block = MALA(0.1, num_steps=3)
        >>> y, ds = block(torch.zeros(4, 2), lambda y: -0.5 * (y * y).sum(-1), torch.Generator().manual_seed(0))
        >>> tuple(y.shape), tuple(ds.shape)
        ((4, 2), (4,))
    """

    def _step(self, state, log_prob, generator):
        y, lp, grad = state
        y_new, lp_new, grad_new, ds_langevin = _langevin_move(y, grad, self._step_size(y), generator, log_prob)
        accept = _accept(lp_new - lp + ds_langevin, generator)
        ds = torch.where(accept, lp - lp_new, torch.zeros_like(lp))
        return (_where(accept, y_new, y), torch.where(accept, lp_new, lp), _where(accept, grad_new, grad)), ds


class MetropolisHastings(StochasticBlock):
    """Random-walk Metropolis: propose ``y' = y + s n`` with ``n ~ N(0, I)`` and
    ``s = step_size``, accept with probability ``min(1, p(y') / p(y))``.

    Reversible for ``p``: ``dS = log p(y) - log p(y')`` on acceptance, 0 on rejection.
    Needs no gradients of ``log p``.

    Args:
        step_size: ``s``, positive.
        num_steps: steps per call.
        learnable_step_size: make ``log s`` a parameter.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> block = MetropolisHastings(0.5, num_steps=5)
        >>> log_p = lambda y: -0.5 * (y * y).sum(-1)
        >>> y, ds = block(torch.zeros(3, 2), log_p, torch.Generator().manual_seed(0))
        >>> bool(torch.allclose(ds, log_p(torch.zeros(3, 2)) - log_p(y)))  # reversible: the ratios telescope
        True
    """

    def _start(self, y, log_prob):
        return y, log_prob(y)

    def _step(self, state, log_prob, generator):
        y, lp = state
        y_new = y + self._step_size(y) * _randn(y, generator)
        lp_new = log_prob(y_new)
        accept = _accept(lp_new - lp, generator)
        ds = torch.where(accept, lp - lp_new, torch.zeros_like(lp))
        return (_where(accept, y_new, y), torch.where(accept, lp_new, lp)), ds


class HMC(StochasticBlock):
    """Hamiltonian Monte Carlo: a fresh momentum ``m ~ N(0, I)``, ``num_leapfrog`` leapfrog
    steps of size ``step_size`` on ``H(y, m) = -log p(y) + |m|^2 / 2``, accepted with
    probability ``min(1, exp(H - H'))``.

    Reversible for ``p`` (the momentum is resampled): ``dS = log p(y) - log p(y')`` on
    acceptance, 0 on rejection.

    Args:
        step_size: the leapfrog step size, positive.
        num_leapfrog: leapfrog steps per proposal, at least 1.
        num_steps: proposals per call.
        learnable_step_size: make the log step size a parameter.

    References:
        Duane, Kennedy, Pendleton & Roweth 1987, "Hybrid Monte Carlo", Physics Letters B 195(2).
        Neal 2011, "MCMC using Hamiltonian dynamics", arXiv:1206.1901.
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> block = HMC(0.2, num_leapfrog=3)
        >>> y, ds = block(torch.zeros(4, 2), lambda y: -0.5 * (y * y).sum(-1), torch.Generator().manual_seed(0))
        >>> tuple(y.shape), tuple(ds.shape), block.num_leapfrog
        ((4, 2), (4,), 3)
    """

    def __init__(self, step_size: float, num_leapfrog: int, num_steps: int = 1, learnable_step_size: bool = False):
        super().__init__(step_size, num_steps, learnable_step_size, num_leapfrog=num_leapfrog)
        self.num_leapfrog = self._options["num_leapfrog"]

    def _step(self, state, log_prob, generator):
        y, lp, grad = state
        e = self._step_size(y)
        m0 = _randn(y, generator)
        m = m0 + 0.5 * e * grad
        q = y
        for i in range(self.num_leapfrog):
            q = q + e * m
            lp_q, grad_q = _value_and_grad(log_prob, q)
            m = m + (e if i + 1 < self.num_leapfrog else 0.5 * e) * grad_q
        log_alpha = (lp_q - 0.5 * _sum_squares(m)) - (lp - 0.5 * _sum_squares(m0))
        accept = _accept(log_alpha, generator)
        ds = torch.where(accept, lp - lp_q, torch.zeros_like(lp))
        return (_where(accept, q, y), torch.where(accept, lp_q, lp), _where(accept, grad_q, grad)), ds


def _kind(layer):
    if isinstance(layer, StochasticBlock):
        return "block"
    if isinstance(layer, TransformModule) or (isinstance(layer, torch.nn.Module) and hasattr(layer, "call_and_ladj")):
        return "layer"
    return type(layer).__name__


class StochasticFlow(torch.nn.Module):
    """A stochastic normalizing flow: flow layers and MCMC blocks between a base ``q0`` and
    an unnormalised target ``p~``.

    Stochastic block ``i`` of ``n`` samples ``log p_l = (1 - l) log q0 + l log p~`` with
    ``l`` the ``i``-th value of ``schedule``.

    - ``sample_and_log_weight(n)``: ``n`` samples and the log-weights of their paths,
      ``log w = log p~(x) - log q0(z0) + sum_t dS_t`` (``E[w] = Z``);
    - ``log_prob_lower_bound(x)``: the reverse path ``x -> z0`` (layers inverted, blocks
      run as their own kernels, in reverse order) gives
      ``log q0(z0) + sum_t (log|det dz/dx|_t + dS_t)``, whose expectation is a lower
      bound on the flow's marginal ``log q(x)``;
    - ``fit_reverse_kl(snf)`` minimises ``E[-log w]``, ``fit_mle(snf, data)`` the mean of
      ``-log_prob_lower_bound`` (both in ``pyroflows.torch``), through the
      ``pyroflows.protocols.TrainableFlow`` methods ``log_prob`` (the lower bound),
      ``sample_and_log_prob`` (``sample_path``) and ``fit_target`` (its own target;
      ``standardizable`` is ``False``).

    Methods taking ``generator`` draw all their noise from it (a ``torch.Generator``).

    Args:
        layers: ``build_flow`` flows, pyroflows layers (or any Pyro ``TransformModule``) and
            the blocks ``Langevin``, ``MALA``, ``MetropolisHastings``, ``HMC``, in the order
            a forward path runs them.
        dim: the event size.
        target_log_density: ``log p~``, mapping ``(..., dim)`` to ``(...)``.
        base: a Pyro distribution with event shape ``(dim,)``; ``N(0, I_dim)`` when ``None``.
        schedule: ``"linear"`` (``l = i/n``, the last block targets ``p~``), ``"target"``
            (every block targets ``p~``) or ``n`` numbers in ``[0, 1]``.

    Raises:
        ValueError: an empty ``layers``, a layer that is neither a flow layer nor a block,
            a ``target_log_density`` that is not callable, or a bad ``schedule``.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> import pyroflows.torch as pf
        >>> _ = torch.manual_seed(0)
        >>> layers = [pf.build_flow("realnvp", 2, num_layers=1, hidden_dims=(8,)), MALA(0.1)]
        >>> flow = StochasticFlow(layers, 2, lambda x: -0.5 * (x * x).sum(-1))
        >>> x, log_w = flow.sample_and_log_weight(5, torch.Generator().manual_seed(0))
        >>> tuple(x.shape), tuple(log_w.shape), flow.schedule
        ((5, 2), (5,), (1.0,))
        >>> flow.log_prob_lower_bound(torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    def __init__(
        self,
        layers: Iterable[torch.nn.Module],
        dim: int,
        target_log_density: Callable[[torch.Tensor], torch.Tensor],
        base: Any = None,
        schedule: str | Sequence[float] = "linear",
    ):
        super().__init__()
        layers = list(layers)
        self.dim = _shared.check_stochastic_flow([_kind(layer) for layer in layers], dim, target_log_density)
        self.layers = torch.nn.ModuleList(layers)
        self.target_log_density = target_log_density
        self.base = base
        num_blocks = sum(isinstance(layer, StochasticBlock) for layer in layers)
        self.schedule = _shared.interpolation_schedule(schedule, num_blocks)

    # --- densities ----------------------------------------------------------------------
    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log q0(z)`` for ``z`` of shape ``(..., dim)``, shape ``(...)``."""
        return std_normal_log_prob(z) if self.base is None else self.base.log_prob(z)

    def _like(self):
        for t in self.parameters():
            return t
        for t in self.buffers():
            return t
        return torch.zeros((), dtype=torch.get_default_dtype())

    def sample_base(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_samples`` draws of ``q0``, shape ``(num_samples, dim)``; reparametrised when the
        base has ``rsample`` (a flow's distribution, say), so gradients reach its parameters.
        ``generator`` feeds the default base only; a given base draws from the global RNG."""
        ref = self._like()
        if self.base is None:
            return _randn(ref, generator, (num_samples, self.dim))
        if getattr(self.base, "has_rsample", False):
            return self.base.rsample((num_samples,))
        return self.base.sample((num_samples,))

    def _interpolated(self, level):
        if level == 1.0:
            return self._target  # checks the shape of what the target returns
        if level == 0.0:
            return self.base_log_prob
        return lambda y: (1.0 - level) * self.base_log_prob(y) + level * self._target(y)

    def _blocks_and_levels(self):
        levels = iter(self.schedule)
        return [(layer, next(levels) if isinstance(layer, StochasticBlock) else None) for layer in self.layers]

    # --- paths --------------------------------------------------------------------------
    def _travel(self, y, inverse, generator):
        total = y.new_zeros(y.shape[:-1])
        steps = self._blocks_and_levels()
        for layer, level in reversed(steps) if inverse else steps:
            if level is not None:
                y, delta = layer(y, self._interpolated(level), generator)
            else:
                y, delta = (inverse_and_ladj if inverse else forward_and_ladj)(layer, y)
            total = total + delta
        return y, total

    def transport(self, z: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layers forward from ``z`` (``(..., dim)``): ``(x, sum_t (log|det J|_t + dS_t))``."""
        return self._travel(z, False, generator)

    def reverse_transport(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the reverse path from ``x``: ``(z0, sum_t (log|det dz/dx|_t + dS_t))``."""
        return self._travel(x, True, generator)

    def _target(self, x):
        log_p = self.target_log_density(x)
        _shared.check_target_shape(x.shape, log_p.shape, self.dim)
        return log_p

    def sample_path(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log_q)``: ``num_samples`` samples and ``log q0(z0) - sum_t dS_t`` of their
        paths (``dS`` including the log-dets), so that ``log w = log p~(x) - log_q``."""
        z = self.sample_base(num_samples, generator)
        x, delta = self.transport(z, generator)
        return x, self.base_log_prob(z) - delta

    def sample_and_log_weight(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_samples`` samples ``(num_samples, dim)`` and their path log-weights ``(num_samples,)``."""
        x, log_q = self.sample_path(num_samples, generator)
        return x, self._target(x) - log_q

    def log_prob_lower_bound(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reverse-path estimate whose expectation is a lower bound on ``log q(x)``, shape ``(...)``."""
        z, delta = self.reverse_transport(x, generator)
        return self.base_log_prob(z) + delta

    def reverse_kl_loss(
        self, num_samples: int, beta: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``mean(log q0(z0) - sum dS - beta log p~(x))`` over ``num_samples`` paths: ``E[-log w]`` at ``beta = 1``."""
        x, log_q = self.sample_path(num_samples, generator)
        return (log_q - beta * self._target(x)).mean()

    def nll(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean over the rows of ``x`` of ``-log_prob_lower_bound``: an upper bound on the NLL."""
        return -self.log_prob_lower_bound(x, generator).mean()

    # --- pyroflows.protocols.TrainableFlow (what fit_mle and fit_reverse_kl call) ------
    #: Never standardised: the blocks sample a target in the data's own coordinates.
    standardizable = False

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log_prob_lower_bound(x)`` with the global RNG: what ``fit_mle`` maximises."""
        return self.log_prob_lower_bound(x)

    def sample_and_log_prob(self, num_samples: int, rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``sample_path(num_samples, rng)``: samples and ``log q`` of their whole paths."""
        return self.sample_path(num_samples, rng)

    def fit_target(self, log_density: Callable | None, stick_the_landing: bool) -> Callable:
        """The flow's own ``target_log_density`` (``pyroflows.snf.snf_fit_target``).

        Raises:
            ValueError: ``log_density`` is another function, or ``stick_the_landing`` is set.
        """
        return _shared.snf_fit_target(self.target_log_density, log_density, stick_the_landing)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, schedule={self.schedule}"
