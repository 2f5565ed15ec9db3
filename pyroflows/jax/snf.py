"""Stochastic normalizing flows for NumPyro: MCMC blocks (``Langevin``, ``MALA``,
``MetropolisHastings``, ``HMC``) between flow layers, and ``StochasticFlow``, which carries
the importance weight of the whole path (Wu, Köhler & Noé 2020, arXiv:2002.06707).

``pyroflows.snf`` states the estimators: the path weight ``log w = log p~(x) - log q0(z0)
+ sum_t dS_t``, each block's ``dS``, and the reverse-path lower bound on ``log q(x)``
that maximum likelihood uses.

As every pyroflows layer in JAX, blocks and paths act on ONE vector and the batched
methods ``vmap`` them; ``target_log_density`` is therefore called on single vectors of
shape ``(dim,)`` (any function of ``(..., dim)`` arrays works). Step sizes that are not
learnable are static, so NumPyro's ``eqx_module`` does not train them.

``StochasticFlow`` implements ``pyroflows.protocols.TrainableFlow`` (its ``log_prob`` is
the reverse-path lower bound, its ``sample_and_log_prob`` the path sampler), which is how
``fit_mle`` and ``fit_reverse_kl`` train it without this module and ``pyroflows.jax.train``
importing each other; both take their map helpers from ``pyroflows.jax.density``.

References:
    Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import snf as _shared
from .density import result_float_dtype, std_normal_log_prob
from .transforms.base import FlowTransform, _noise_key, _segments, is_stochastic

__all__ = ["StochasticBlock", "Langevin", "MALA", "MetropolisHastings", "HMC", "StochasticFlow"]


def _value_and_grad(log_prob, y):
    value, grad = jax.value_and_grad(lambda v: jnp.asarray(log_prob(v)).sum())(y)
    return value.astype(y.dtype), grad


def _accept(log_alpha, noise):
    """Metropolis test with ``log u = log Phi(noise)`` for a standard normal ``noise`` (so
    ``u`` is uniform and one normal draw feeds a whole step); NaN is a rejection."""
    return jax.scipy.special.log_ndtr(noise) < log_alpha


class StochasticBlock(eqx.Module):
    """An MCMC kernel that also returns its contribution ``dS`` to a path's log-weight.

    ``block(y, log_prob, key) -> (y_new, dS)`` runs ``num_steps`` steps from one vector
    ``y`` (shape ``(dim,)``) for the density ``exp(log_prob)``; ``dS`` is a scalar (Wu,
    Köhler & Noé 2020). Subclasses define one step; this base class runs them in a
    ``lax.scan`` and sums their ``dS``.

    Args:
        step_size: the kernel's step size, positive.
        num_steps: MCMC steps per call, at least 1.
        learnable_step_size: make the log step size a parameter (an array leaf) instead
            of a static number.

    Raises:
        ValueError: a step size that is not positive, or ``num_steps < 1``.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> block = MetropolisHastings(0.5, num_steps=3)
        >>> y, ds = block(jnp.zeros(2), lambda v: -0.5 * (v**2).sum(-1), jax.random.key(0))
        >>> y.shape, ds.shape, block.noise_size(2)
        ((2,), (), 9)
    """

    log_step_size: Any
    fixed_log_step_size: float = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)
    learnable_step_size: bool = eqx.field(static=True)

    def __init__(self, step_size: float, num_steps: int = 1, learnable_step_size: bool = False):
        opts = _shared.check_block_options(
            type(self).__name__, step_size=step_size, num_steps=num_steps, learnable_step_size=learnable_step_size
        )
        self._set_options(opts)

    def _set_options(self, opts):
        self.num_steps = opts["num_steps"]
        self.learnable_step_size = opts["learnable_step_size"]
        self.fixed_log_step_size = math.log(opts["step_size"])
        self.log_step_size = jnp.asarray(np.log(opts["step_size"]), dtype=float) if self.learnable_step_size else None

    @property
    def step_size(self) -> float | jax.Array:
        """The step size: an array when learnable, else a float.

        Example:
            >>> Langevin(0.25).step_size
            0.25
        """
        if self.learnable_step_size:
            return jnp.exp(self.log_step_size)
        return math.exp(self.fixed_log_step_size)

    def _step_size(self, y):
        if self.learnable_step_size:
            return jnp.exp(self.log_step_size).astype(y.dtype)
        return math.exp(self.fixed_log_step_size)

    # Each kernel keeps (y, log p(y)[, grad log p(y)]) between steps, so a step evaluates
    # the density once, at its proposal.
    def _start(self, y, log_prob):
        return (y, *_value_and_grad(log_prob, y))

    def _step(self, state, log_prob, noise):
        raise NotImplementedError

    #: Extra standard normals a step needs beyond one per coordinate (the Metropolis test).
    _extra_noise = 1

    def noise_size(self, dim: int) -> int:
        """How many standard normals ``apply`` consumes for a vector of size ``dim``.

        Args:
            dim: the vector's size.

        Returns:
            ``num_steps * (dim + 1)`` for a kernel with a Metropolis test, else
            ``num_steps * dim``.

        Example:
            >>> MALA(0.1, num_steps=2).noise_size(3), Langevin(0.1, num_steps=2).noise_size(3)
            (8, 6)
        """
        return self.num_steps * (dim + self._extra_noise)

    def __call__(
        self, y: jax.Array, log_prob: Callable[[jax.Array], jax.Array], key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Run the kernel from ``y``: ``apply`` with the ``noise_size(dim)`` standard normals drawn from ``key``.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> block, key, log_p = HMC(0.1, num_leapfrog=3), jax.random.key(0), lambda v: -(v**2).sum()
            >>> noise = jax.random.normal(key, (block.noise_size(2),))
            >>> bool((block(jnp.zeros(2), log_p, key)[0] == block.apply(jnp.zeros(2), log_p, noise)[0]).all())
            True
        """
        noise = jax.random.normal(key, (self.noise_size(y.shape[-1]),), y.dtype)
        return self.apply(y, log_prob, noise)

    def apply(
        self, y: jax.Array, log_prob: Callable[[jax.Array], jax.Array], noise: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Run the kernel from ``y`` with the given standard normals.

        Args:
            y: one vector, shape ``(dim,)``.
            log_prob: the (unnormalised) log-density the kernel samples.
            noise: ``noise_size(dim)`` standard normals.

        Returns:
            ``(y_new, dS)``: the new vector and the scalar log-weight contribution.

        Example:
            >>> import jax.numpy as jnp
            >>> y, ds = Langevin(0.5).apply(jnp.zeros(2), lambda v: -(v**2).sum(), jnp.ones(2))
            >>> [round(float(v), 4) for v in y], round(float(ds), 4)
            ([1.0, 1.0], 1.0)
        """

        def body(carry, step_noise):
            state, total = carry
            state, ds = self._step(state, log_prob, step_noise)
            return (state, total + ds), None

        start = (self._start(y, log_prob), jnp.zeros((), y.dtype))
        noise = jnp.reshape(noise, (self.num_steps, -1))
        (state, total), _ = jax.lax.scan(body, start, noise)
        return state[0], total


def _langevin_move(y, grad, e, noise, log_prob):
    y_new = y + e * grad + jnp.sqrt(2 * e) * noise
    lp_new, grad_new = _value_and_grad(log_prob, y_new)
    backward_noise = (y - y_new - e * grad_new) / jnp.sqrt(2 * e)
    ds = -0.5 * (jnp.sum(backward_noise**2) - jnp.sum(noise**2))
    return y_new, lp_new, grad_new, ds


class Langevin(StochasticBlock):
    """Unadjusted (overdamped) Langevin steps ``y' = y + e grad log p(y) + sqrt(2e) n``.

    Not reversible, so the backward kernel is the same Langevin step taken from ``y'``:
    ``dS = log N(y; y' + e grad log p(y'), 2e) - log N(y'; y + e grad log p(y), 2e)
    = -(|n~|^2 - |n|^2) / 2`` with ``n~ = (y - y' - e grad log p(y')) / sqrt(2e)``.
    ``step_size`` is ``e``; the arguments are those of ``StochasticBlock``.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> import jax.numpy as jnp
        >>> y, ds = Langevin(0.1).apply(jnp.ones(2), lambda v: -(v**2).sum(), jnp.zeros(2))
        >>> [round(v, 4) for v in y.tolist()]  # no noise: one gradient step
        [0.8, 0.8]
    """

    _extra_noise = 0

    def _step(self, state, log_prob, noise):
        y, _, grad = state
        y_new, lp_new, grad_new, ds = _langevin_move(y, grad, self._step_size(y), noise, log_prob)
        return (y_new, lp_new, grad_new), ds


class MALA(StochasticBlock):
    """Metropolis-adjusted Langevin steps.

    The ``Langevin`` proposal ``y' = y + e grad log p(y) + sqrt(2e) n``, accepted with
    probability ``min(1, p(y') N(y; y' + e grad log p(y'), 2e) / (p(y) N(y'; y + e grad
    log p(y), 2e)))`` (Roberts & Tweedie 1996). Reversible for ``p``: ``dS = log p(y) -
    log p(y')`` on acceptance, 0 on rejection (Wu, Köhler & Noé 2020). ``step_size`` is
    ``e``; the arguments are those of ``StochasticBlock``.

    References:
        Roberts & Tweedie 1996, "Exponential convergence of Langevin distributions and
        their discrete approximations", Bernoulli 2(4).
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> y, ds = MALA(0.1, num_steps=2)(jnp.zeros(2), lambda v: -(v**2).sum(), jax.random.key(0))
        >>> y.shape, ds.shape
        ((2,), ())
    """

    def _step(self, state, log_prob, noise):
        y, lp, grad = state
        y_new, lp_new, grad_new, ds_langevin = _langevin_move(y, grad, self._step_size(y), noise[:-1], log_prob)
        accept = _accept(lp_new - lp + ds_langevin, noise[-1])
        ds = jnp.where(accept, lp - lp_new, 0.0)
        return (jnp.where(accept, y_new, y), jnp.where(accept, lp_new, lp), jnp.where(accept, grad_new, grad)), ds


class MetropolisHastings(StochasticBlock):
    """Random-walk Metropolis steps.

    Propose ``y' = y + s n`` with ``n ~ N(0, I)`` and ``s = step_size``, accept with
    probability ``min(1, p(y') / p(y))`` (Metropolis et al. 1953). Reversible for ``p``:
    ``dS = log p(y) - log p(y')`` on acceptance, 0 on rejection (Wu, Köhler & Noé 2020).
    Needs no gradients of ``log p``. The arguments are those of ``StochasticBlock``.

    References:
        Metropolis, Rosenbluth, Rosenbluth, Teller & Teller 1953, "Equation of state
        calculations by fast computing machines", J. Chem. Phys. 21.
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> import jax.numpy as jnp
        >>> noise = jnp.array([10.0, 10.0, 0.0])  # proposes (5, 5), far out in the tail
        >>> y, ds = MetropolisHastings(0.5).apply(jnp.zeros(2), lambda v: -(v**2).sum(), noise)
        >>> y.tolist(), float(ds)  # rejected
        ([0.0, 0.0], 0.0)
    """

    def _start(self, y, log_prob):
        return y, jnp.asarray(log_prob(y)).astype(y.dtype)

    def _step(self, state, log_prob, noise):
        y, lp = state
        y_new = y + self._step_size(y) * noise[:-1]
        lp_new = jnp.asarray(log_prob(y_new)).astype(y.dtype)
        accept = _accept(lp_new - lp, noise[-1])
        ds = jnp.where(accept, lp - lp_new, 0.0)
        return (jnp.where(accept, y_new, y), jnp.where(accept, lp_new, lp)), ds


class HMC(StochasticBlock):
    """Hamiltonian Monte Carlo steps.

    A fresh momentum ``m ~ N(0, I)``, ``num_leapfrog`` leapfrog steps of size
    ``step_size`` on ``H(y, m) = -log p(y) + |m|^2 / 2``, accepted with probability
    ``min(1, exp(H - H'))`` (Duane et al. 1987; Neal 2011). Reversible for ``p`` (the
    momentum is resampled): ``dS = log p(y) - log p(y')`` on acceptance, 0 on rejection
    (Wu, Köhler & Noé 2020).

    Args:
        step_size: the leapfrog step size, positive.
        num_leapfrog: leapfrog steps per MCMC step, at least 1.
        num_steps: MCMC steps per call, at least 1.
        learnable_step_size: make the log step size a parameter.

    Raises:
        ValueError: a step size that is not positive, or a count below 1.

    References:
        Duane, Kennedy, Pendleton & Roweth 1987, "Hybrid Monte Carlo", Phys. Lett. B 195.
        Neal 2011, "MCMC using Hamiltonian dynamics", arXiv:1206.1901.
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> HMC(0.1, num_leapfrog=4, num_steps=2).noise_size(3)  # per step: a momentum, a Metropolis test
        8
    """

    num_leapfrog: int = eqx.field(static=True)

    def __init__(self, step_size: float, num_leapfrog: int, num_steps: int = 1, learnable_step_size: bool = False):
        opts = _shared.check_block_options(
            type(self).__name__,
            step_size=step_size,
            num_steps=num_steps,
            learnable_step_size=learnable_step_size,
            num_leapfrog=num_leapfrog,
        )
        self._set_options(opts)
        self.num_leapfrog = opts["num_leapfrog"]

    def _step(self, state, log_prob, noise):
        y, lp, grad = state
        e = self._step_size(y)
        m0 = noise[:-1]

        def leapfrog(carry, last):
            q, m, _, _ = carry
            q = q + e * m
            lp_q, grad_q = _value_and_grad(log_prob, q)
            m = m + jnp.where(last, 0.5 * e, e) * grad_q
            return (q, m, lp_q, grad_q), None

        last = jnp.arange(self.num_leapfrog) == self.num_leapfrog - 1
        (q, m, lp_q, grad_q), _ = jax.lax.scan(leapfrog, (y, m0 + 0.5 * e * grad, lp, grad), last)
        log_alpha = (lp_q - 0.5 * jnp.sum(m**2)) - (lp - 0.5 * jnp.sum(m0**2))
        accept = _accept(log_alpha, noise[-1])
        ds = jnp.where(accept, lp - lp_q, 0.0)
        return (jnp.where(accept, q, y), jnp.where(accept, lp_q, lp), jnp.where(accept, grad_q, grad)), ds


def _kind(layer):
    if isinstance(layer, StochasticBlock):
        return "block"
    if isinstance(layer, FlowTransform):
        return "layer"
    return type(layer).__name__


class _Opaque:
    """Holds a static object (the target, the base) by identity: equinox never looks
    inside it for arrays, and ``jit`` caches on the object itself."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Opaque) and other.value is self.value

    def __hash__(self):
        return id(self.value)

    def __repr__(self):
        return repr(self.value)


def _noise_size(layer, dim):
    return layer.noise_size(dim) if isinstance(layer, StochasticBlock) else 0


def _call_layer(layer, y, inverse, key):
    fn = layer.inverse_and_ladj if inverse else layer.call_and_ladj
    return fn(y, key=key) if is_stochastic(layer) else fn(y)


class StochasticFlow(eqx.Module):
    """A stochastic normalizing flow: flow layers and MCMC blocks between a base ``q0`` and
    an unnormalised target ``p~`` (Wu, Köhler & Noé 2020).

    Stochastic block ``i`` of ``n`` samples ``log p_l = (1 - l) log q0 + l log p~`` with
    ``l`` the ``i``-th value of ``schedule``.

    - ``sample_and_log_weight(key, n)``: ``n`` samples and the log-weights of their
      paths, ``log w = log p~(x) - log q0(z0) + sum_t dS_t`` (``E[w] = Z``);
    - ``log_prob_lower_bound(key, x)``: the reverse path ``x -> z0`` (layers inverted,
      blocks run as their own kernels, in reverse order) gives
      ``log q0(z0) + sum_t (log|det dz/dx|_t + dS_t)``, whose expectation is a lower
      bound on the flow's marginal ``log q(x)``;
    - ``fit_reverse_kl(snf)`` minimises ``E[-log w]``, ``fit_mle(snf, data)`` the mean of
      ``-log_prob_lower_bound`` (both in ``pyroflows.jax``).

    It implements ``pyroflows.protocols.TrainableFlow``: ``log_prob`` is the lower bound,
    ``sample_and_log_prob`` the path sampler, ``fit_target`` insists on its own target,
    and ``standardizable`` is False (the blocks are tied to the target's coordinates).

    The target, the base and the schedule are static fields: only the layers' weights
    (and learnable step sizes) are arrays, which is what ``eqx_module`` and the fits train.

    Args:
        layers: ``build_flow`` flows, pyroflows layers (``FlowTransform``) and the blocks
            ``Langevin``, ``MALA``, ``MetropolisHastings``, ``HMC``, in sampling order.
        dim: the event size.
        target_log_density: ``p~``, mapping ``(..., dim)`` to ``(...)`` (it is called on
            single vectors).
        base: a NumPyro distribution with event shape ``(dim,)``; ``N(0, I_dim)`` when None.
        schedule: ``"linear"`` (``l = i/n``, the last block targets ``p~``), ``"target"``
            (every block targets ``p~``) or ``n`` numbers in ``[0, 1]``.

    Raises:
        ValueError: an empty or unsupported layer list, a bad ``dim``, a target that is
            not callable, or a bad schedule.

    References:
        Wu, Köhler & Noé 2020, "Stochastic normalizing flows", arXiv:2002.06707.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> target = lambda x: -(x**2).sum(-1)
        >>> snf = StochasticFlow([ElementwiseAffine(2), MALA(0.1)], 2, target)
        >>> key, points = jax.random.key(0), jnp.zeros((5, 2))
        >>> x, log_w = snf.sample_and_log_weight(key, 4)
        >>> x.shape, log_w.shape, snf.schedule
        ((4, 2), (4,), (1.0,))
        >>> snf.target_log_density is target, snf.base is None, round(float(snf.base_log_prob(jnp.zeros(2))), 4)
        (True, True, -1.8379)
        >>> x, log_q = snf.sample_path(key, 4)  # sample_and_log_prob(4, key) too
        >>> snf.log_prob_lower_bound(key, points).shape, snf.log_prob(points, key=key).shape
        ((5,), (5,))
        >>> snf.reverse_kl_loss(key, 4).shape, snf.nll(key, points).shape, snf.fit_target(None, False) is target
        ((), (), True)
        >>> z, delta = snf.reverse_transport(jnp.ones(2), key)  # and back: transport(z, key)
        >>> z.shape, delta.shape
        ((2,), ())
    """

    layers: tuple
    dim: int = eqx.field(static=True)
    _target_log_density: _Opaque = eqx.field(static=True)
    _base: _Opaque = eqx.field(static=True)
    schedule: tuple = eqx.field(static=True)
    levels: tuple = eqx.field(static=True)
    segments: tuple = eqx.field(static=True)
    noise_sizes: tuple = eqx.field(static=True)
    needs_keys: bool = eqx.field(static=True)

    def __init__(
        self,
        layers: Sequence[Any],
        dim: int,
        target_log_density: Callable[[jax.Array], jax.Array],
        base: Any = None,
        schedule: str | Sequence[float] = "linear",
    ):
        layers = tuple(layers)
        self.dim = _shared.check_stochastic_flow([_kind(layer) for layer in layers], dim, target_log_density)
        self.layers = layers
        self._target_log_density = _Opaque(target_log_density)
        self._base = _Opaque(base)
        num_blocks = sum(isinstance(layer, StochasticBlock) for layer in layers)
        self.schedule = _shared.interpolation_schedule(schedule, num_blocks)
        levels = iter(self.schedule)
        self.levels = tuple(next(levels) if isinstance(layer, StochasticBlock) else None for layer in layers)
        # Runs of identical layers (e.g. [flow, block] repeated) are scanned, so they compile
        # once; a path draws all the blocks' noise in one call, because every random call
        # site (threefry) costs seconds of XLA compile time.
        self.segments = _segments(layers)
        self.noise_sizes = tuple(
            layer.noise_size(self.dim) if isinstance(layer, StochasticBlock) else 0 for layer in layers
        )
        self.needs_keys = any(not isinstance(layer, StochasticBlock) and is_stochastic(layer) for layer in layers)

    @property
    def target_log_density(self) -> Callable[[jax.Array], jax.Array]:
        """The unnormalised target ``log p~`` the flow was built with."""
        return self._target_log_density.value

    @property
    def base(self) -> Any:
        """The base distribution ``q0``, or None for ``N(0, I_dim)``."""
        return self._base.value

    # --- densities (one vector) -------------------------------------------------------
    def base_log_prob(self, z: jax.Array) -> jax.Array:
        """``log q0(z)``.

        Args:
            z: points of shape ``(..., dim)``.

        Returns:
            The base log-density, shape ``(...)``.
        """
        return std_normal_log_prob(z) if self.base is None else self.base.log_prob(z)

    def _interpolated(self, level):
        if isinstance(level, float) and level == 1.0:
            return self._target  # checks the shape of what the target returns
        if isinstance(level, float) and level == 0.0:
            return self.base_log_prob
        return lambda y: (1.0 - level) * self.base_log_prob(y) + level * self._target(y)

    # --- paths (one vector) -----------------------------------------------------------
    def _draw(self, key, dtype, num_paths=None, extra=0):
        """``(noise, keys)`` for one path (``num_paths=None``) or a batch of paths: every
        block's standard normals (plus ``extra`` in front) in one draw, and one key per
        layer only when a layer draws its own noise (a stochastic log-det estimator)."""
        batch = () if num_paths is None else (num_paths,)
        keys = None
        if self.needs_keys:
            key, layer_key = jax.random.split(key)
            keys = jax.random.split(layer_key, batch + (len(self.layers),))
        return jax.random.normal(key, batch + (extra + sum(self.noise_sizes),), dtype), keys

    def _run(self, chunk, levels, noise, keys, y, inverse):
        total = jnp.zeros((), y.dtype)
        offsets = np.cumsum([0] + [_noise_size(layer, self.dim) for layer in chunk])
        for i in reversed(range(len(chunk))) if inverse else range(len(chunk)):
            if isinstance(chunk[i], StochasticBlock):
                log_p = self._interpolated(levels[i])
                y, delta = chunk[i].apply(y, log_p, noise[offsets[i] : offsets[i + 1]])
            else:
                y, delta = _call_layer(chunk[i], y, inverse, None if keys is None else keys[i])
            total = total + delta
        return y, total

    def _travel(self, y, noise, keys, inverse):
        total = jnp.zeros((), y.dtype)
        offsets = np.cumsum((0,) + self.noise_sizes)
        for start, period, repeats in reversed(self.segments) if inverse else self.segments:
            stop = start + period * repeats
            seg_noise = noise[offsets[start] : offsets[stop]]
            seg_keys = None if keys is None else keys[start:stop]
            if repeats == 1:
                y, delta = self._run(self.layers[start:stop], self.levels[start:stop], seg_noise, seg_keys, y, inverse)
            else:
                chunks = [self.layers[start + k * period : start + (k + 1) * period] for k in range(repeats)]
                dynamic, static = eqx.partition(chunks, eqx.is_array)
                stacked = jax.tree.map(lambda *a: jnp.stack(a), *dynamic)
                levels = np.array([v or 0.0 for v in self.levels[start:stop]]).reshape(repeats, period)
                if seg_keys is not None:
                    seg_keys = seg_keys.reshape((repeats, period) + seg_keys.shape[1:])

                def body(carry, xs, static=static[0]):
                    weights, lv, nz, kk = xs
                    out, delta = self._run(eqx.combine(weights, static), lv, nz, kk, carry[0], inverse)
                    return (out, carry[1] + delta), None

                xs = (stacked, jnp.asarray(levels, y.dtype), seg_noise.reshape(repeats, -1), seg_keys)
                (y, delta), _ = jax.lax.scan(body, (y, jnp.zeros((), y.dtype)), xs, reverse=inverse)
            total = total + delta
        return y, total

    def transport(self, z: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Run the layers forward from one vector ``z``.

        Args:
            z: one base point, shape ``(dim,)``.
            key: a JAX PRNG key for the blocks' noise.

        Returns:
            ``(x, sum_t (log|det J|_t + dS_t))``.
        """
        noise, keys = self._draw(key, z.dtype)
        return self._travel(z, noise, keys, inverse=False)

    def reverse_transport(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Run the reverse path from one vector ``x``: layers inverted, blocks as their own kernels.

        Args:
            x: one sample-space point, shape ``(dim,)``.
            key: a JAX PRNG key for the blocks' noise.

        Returns:
            ``(z0, sum_t (log|det dz/dx|_t + dS_t))``.
        """
        noise, keys = self._draw(key, x.dtype)
        return self._travel(x, noise, keys, inverse=True)

    def _sample_path(self, z, noise, keys):
        """One path from ``z0 = z``: ``(x, log q0(z0) - sum_t dS_t)``."""
        x, delta = self._travel(z, noise, keys, inverse=False)
        return x, self.base_log_prob(z) - delta

    def _target(self, x):
        log_p = jnp.asarray(self.target_log_density(x))
        _shared.check_target_shape(jnp.shape(x), jnp.shape(log_p), self.dim)
        return log_p

    # --- batches ------------------------------------------------------------------------
    def sample_path(self, key: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
        """Samples and the log-density of the paths that drew them.

        Args:
            key: a JAX PRNG key.
            num_samples: how many paths.

        Returns:
            ``(x, log_q)``: ``num_samples`` samples ``(num_samples, dim)`` and
            ``log q0(z0) - sum_t dS_t`` of their paths (``dS`` including the log-dets),
            so that ``log w = log p~(x) - log_q``.
        """
        x, log_q, _ = _paths(self, key, num_samples)
        return x, log_q

    def sample_and_log_weight(self, key: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
        """Samples and their path log-weights ``log w = log p~(x) - log q0(z0) + sum_t dS_t``.

        ``E[w] = Z``, the normaliser of ``p~``; self-normalised weights reweight the samples
        to ``p~``.

        Args:
            key: a JAX PRNG key.
            num_samples: how many paths.

        Returns:
            ``(x, log_w)`` with shapes ``(num_samples, dim)`` and ``(num_samples,)``.
        """
        x, log_q, log_p = _paths(self, key, num_samples)
        return x, log_p - log_q

    def log_prob_lower_bound(self, key: jax.Array, x: jax.Array) -> jax.Array:
        """One reverse-path estimate per row of ``x`` whose expectation is a lower bound on ``log q(x)``.

        Args:
            key: a JAX PRNG key for the reverse paths' noise.
            x: points of shape ``(..., dim)``.

        Returns:
            ``log q0(z0) + sum_t (log|det dz/dx|_t + dS_t)`` per point, shape ``(...)``.
        """
        shape = jnp.shape(x)
        out = _reverse_paths(self, jnp.reshape(x, (-1, self.dim)), key)
        return jnp.reshape(out, shape[:-1])

    def reverse_kl_loss(self, key: jax.Array, num_samples: int, beta: float = 1.0) -> jax.Array:
        """``mean(log q0(z0) - sum dS - beta log p~(x))`` over ``num_samples`` paths.

        Args:
            key: a JAX PRNG key.
            num_samples: how many paths.
            beta: the target's annealing factor.

        Returns:
            The scalar loss: ``E[-log w]`` at ``beta = 1``.
        """
        _, log_q, log_p = _paths(self, key, num_samples)
        return jnp.mean(log_q - beta * log_p)

    def nll(self, key: jax.Array, x: jax.Array) -> jax.Array:
        """Mean over the rows of ``x`` of ``-log_prob_lower_bound``: an upper bound on the NLL.

        Args:
            key: a JAX PRNG key for the reverse paths' noise.
            x: points of shape ``(..., dim)``.

        Returns:
            The scalar estimate.
        """
        return -jnp.mean(self.log_prob_lower_bound(key, x))

    # --- TrainableFlow (pyroflows.protocols): what fit_mle and fit_reverse_kl use -------
    standardizable: ClassVar[bool] = False

    def log_prob(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """``log_prob_lower_bound``: a one-path estimate of a lower bound on ``log q(x)``.

        Args:
            x: points of shape ``(..., dim)``.
            key: a JAX PRNG key; without it ``numpyro.prng_key()`` (inside
                ``numpyro.handlers.seed``, as the fits call it).

        Returns:
            The estimate, shape ``(...)``.

        Raises:
            ValueError: no key and no seed handler.
        """
        return self.log_prob_lower_bound(_noise_key(self, key), x)

    def sample_and_log_prob(self, num_samples: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``sample_path`` with the arguments in the order of ``TrainableFlow.sample_and_log_prob``."""
        return self.sample_path(key, num_samples)

    def fit_target(
        self, log_density: Callable[[jax.Array], jax.Array] | None, stick_the_landing: bool
    ) -> Callable[[jax.Array], jax.Array]:
        """The flow's own target: the blocks sample towards it, so no other will do.

        Args:
            log_density: None, or the flow's own ``target_log_density``.
            stick_the_landing: must be False: a path has no density under fixed weights.

        Returns:
            ``target_log_density``.

        Raises:
            ValueError: another ``log_density``, or ``stick_the_landing`` set.
        """
        return _shared.snf_fit_target(self.target_log_density, log_density, stick_the_landing)


@eqx.filter_jit
def _paths(snf, key, num_samples):
    # Compiled once per flow structure and number of paths; inlined inside an outer jit.
    dtype = result_float_dtype(snf)
    if snf.base is None:  # the base draws come with the blocks' noise
        noise, keys = snf._draw(key, dtype, num_samples, extra=snf.dim)
        z, noise = noise[:, : snf.dim], noise[:, snf.dim :]
    else:
        key, base_key = jax.random.split(key)
        noise, keys = snf._draw(key, dtype, num_samples)
        z = jnp.asarray(snf.base.sample(base_key, (num_samples,)), dtype)

    def one(z, noise, keys):
        x, log_q = snf._sample_path(z, noise, keys)
        return x, log_q, snf._target(x)

    return jax.vmap(one)(z, noise, keys)


@eqx.filter_jit
def _reverse_paths(snf, x, key):
    noise, keys = snf._draw(key, x.dtype, x.shape[0])

    def one(v, noise, keys):
        z, delta = snf._travel(v, noise, keys, inverse=True)
        return snf.base_log_prob(z) + delta

    return jax.vmap(one)(x, noise, keys)
