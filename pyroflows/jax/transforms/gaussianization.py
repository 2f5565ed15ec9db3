"""Gaussianization flows: Householder rotations and per-coordinate Gaussianizing CDFs (JAX mirror of torch).

Meng, Song, Song & Ermon 2020, arXiv:2003.01941. A layer rotates its input and then
sends every coordinate through ``Phi^-1 o F``, where ``F`` is the CDF of a mixture of
logistics and ``Phi`` the standard normal CDF. That is the data-to-noise direction, so
here it is ``inverse_and_ladj``; the forward (noise to data) solves it per coordinate.

The numerics live in log space: ``log F`` and ``log(1 - F)`` are log-sum-exps of
log-sigmoids, and ``ndtri_exp`` inverts the normal CDF from a log-probability, so the
layer stays exact and finite when ``F`` is far closer to 0 or 1 than a float can hold.
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp, ndtr, ndtri
from jax.scipy.special import log_ndtr as _jax_log_ndtr

from ..flows import register_flow
from ..nn import host_rng
from .base import FlowTransform, bisect_increasing, implicit_step, soft_clamp

__all__ = ["Gaussianization"]

_LOG_HALF = -math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def log_ndtr(z):
    """``log Phi(z)``, accurate to rounding in both tails.

    ``jax.scipy.special.log_ndtr`` takes ``log(ndtr(z))`` on ``(0, 8]``, which loses
    digits as ``Phi(z)`` nears 1, and its 3-term asymptotic series below ``z = -20``
    leaves relative errors near 2e-11; here ``log1p(-Phi(-z))`` above 0 and 12 series
    terms below the switch make it exact to rounding in float32 and float64.
    """
    positive = z > 0
    upper = jnp.log1p(-ndtr(-jnp.where(positive, z, 0.0)))
    lower = _jax_log_ndtr(jnp.where(positive, 0.0, z), series_order=12)
    return jnp.where(positive, upper, lower)


def _mills(z):
    """``Phi(z) / phi(z)`` in log-space terms, accurate for all ``z`` (``inf`` above ~38).

    Formed as ``exp(log Phi - log phi)`` the two logs cancel to ``log|z|`` and leave an
    error of about ``eps z^2``; below ``-20`` (float64; ``-10`` in float32) the
    asymptotic series ``(1/x) sum_n (-1)^n (2n-1)!! / x^(2n)``, ``x = -z``, is exact to
    rounding instead (12 terms: the first omitted one is below 1e-19 at the switch).
    """
    switch = -20.0 if jnp.finfo(z.dtype).bits == 64 else -10.0
    tail = z < switch
    near = jnp.where(tail, switch, z)
    direct = jnp.exp(log_ndtr(near) - _log_normal_pdf(near))
    x = -jnp.where(tail, z, switch)
    inv2 = 1.0 / (x * x)
    series, term = jnp.ones_like(x), jnp.ones_like(x)
    for n in range(1, 13):
        term = term * (-(2 * n - 1)) * inv2
        series = series + term
    return jnp.where(tail, series / x, direct)


def _log_normal_pdf(z):
    return -0.5 * z * z - _HALF_LOG_2PI


def _ndtri_exp_lower(log_p):
    """``Phi^-1(exp(log_p))`` for ``log_p <= log(1/2)`` (or ``-inf``); the values only."""
    finfo = jnp.finfo(log_p.dtype)
    # Below this exp(log_p) is subnormal or zero and ndtri loses its precision.
    threshold = math.log(float(finfo.tiny)) + 2.0
    direct = ndtri(jnp.exp(jnp.maximum(log_p, threshold)))
    # Deep tail: log Phi(z) ~ -z^2/2 - log|z| - log sqrt(2 pi) gives z^2 ~ a - log a with
    # a = -2 log_p - log 2 pi; Newton on log_ndtr(z) = log_p then converges quadratically
    # (log Phi is concave, so after one step the iterates approach the root from below).
    lp = jnp.clip(log_p, -float(finfo.max) / 8, threshold)
    a = jnp.maximum(-2.0 * lp - math.log(2.0 * math.pi), 1.0)
    z = -jnp.sqrt(a - jnp.log(a))
    for _ in range(4):
        log_cdf = log_ndtr(z)
        step = (log_cdf - lp) * _mills(z)
        z = jnp.where(jnp.isfinite(step), z - step, z)
    z = jnp.where(log_p >= threshold, direct, z)
    return jnp.where(log_p == -jnp.inf, -jnp.inf, z)


def _ndtri_exp_value(log_p):
    upper = log_p > _LOG_HALF
    # Above p = 1/2 use Phi^-1(p) = -Phi^-1(1 - p); expm1 keeps 1 - p exact near p = 1.
    lower_log_p = jnp.where(upper, jnp.log(-jnp.expm1(jnp.maximum(log_p, _LOG_HALF))), log_p)
    z = _ndtri_exp_lower(lower_log_p)
    return jnp.where(upper, -z, z)


@jax.custom_jvp
def ndtri_exp(log_p):
    """Inverse standard normal CDF of ``exp(log_p)``: the ``z`` with ``log Phi(z) = log_p``.

    Accurate over the whole range of ``log_p`` (down to ``-finfo.max / 8``, up to ``-1e-300``): it
    uses ``jax.scipy.special.ndtri`` where ``exp(log_p)`` is a normal float at most 1/2,
    the reflection ``z = -ndtri_exp(log(1 - p))`` above 1/2, and in the far tail an
    asymptotic start refined by Newton steps on ``log_ndtr``. Differentiable (any order)
    through a custom JVP, ``dz/dlog_p = Phi(z)/phi(z)`` (the Mills ratio, formed without
    cancellation, see ``_mills``); the value's own branches and Newton loop are never
    differentiated.
    """
    return _ndtri_exp_value(log_p)


@ndtri_exp.defjvp
def _ndtri_exp_jvp(primals, tangents):
    (log_p,), (dlog_p,) = primals, tangents
    z = ndtri_exp(log_p)  # through the custom rule again, so higher derivatives work too
    # Implicit function: log Phi(z) = log_p, so dz/dlog_p = Phi(z) / phi(z).
    slope = jnp.where(z == -jnp.inf, 0.0, _mills(jnp.where(z == -jnp.inf, 0.0, z)))
    return z, dlog_p * slope


def _normal_icdf_from_logs(log_cdf, log_sf):
    """``Phi^-1(F)`` given both ``log F`` and ``log(1 - F)``: each tail from its own log."""
    lower = ndtri_exp(jnp.minimum(log_cdf, _LOG_HALF))
    upper = -ndtri_exp(jnp.minimum(log_sf, _LOG_HALF))
    return jnp.where(log_cdf < log_sf, lower, upper)


def _initial_mixture(num_components: int):
    """Means on a grid, Gaussian-shaped weights and a common scale so that F ~ Phi."""
    k = num_components
    spread = min(2.0, 0.7 * (k - 1))
    means = np.linspace(-spread, spread, k)
    logits = -0.5 * (means / 0.8) ** 2
    weights = np.exp(logits - np.logaddexp.reduce(logits))
    # Logistic variance s^2 pi^2 / 3 makes up what the spread of the means leaves to 1.
    rest = max(1.0 - float((weights * means**2).sum()), 0.1)
    log_scale = 0.5 * math.log(3.0 * rest) - math.log(math.pi)
    return means, logits, log_scale


class Gaussianization(FlowTransform):
    """One Gaussianization layer (Meng, Song, Song & Ermon 2020, arXiv:2003.01941).

    Data to noise (``inverse_and_ladj``)::

        u = H_m ... H_1 y,          H_j = I - 2 v_j v_j^T / |v_j|^2
        z_i = Phi^-1(F_i(u_i)),     F_i(u) = sum_k w_ik sigmoid((u - mu_ik) / s_ik)

    with ``w_i = softmax(logits_i)`` and ``s_ik = exp(soft_clamp(raw_ik, log_scale_bound))``.
    ``log F`` and ``log(1 - F)`` are log-sum-exps of log-sigmoids, and ``Phi^-1`` is taken
    from whichever tail is smaller (``ndtri_exp``), so extreme inputs stay exact. The
    log-determinant is ``sum_i log f_i(u_i) - log phi(z_i)`` with ``f_i`` the mixture
    density; reflections contribute 0.

    Noise to data (``call_and_ladj``) has no closed form: per coordinate ``u`` solves
    ``F(u) = Phi(z)`` by bisection on ``logit F(u) = logit Phi(z)``, an increasing function
    equivalent to ``Phi^-1(F(u)) = z``, inside the exact bracket
    ``[min_k, max_k] (mu_k + s_k logit Phi(z))``, to ``inverse_tol * (1 + |u|)``
    (``inverse_tol = 1e-10``, or 8 float32 epsilons in single precision); the bisection
    runs in a ``lax.while_loop`` on stopped gradients, and one implicit Newton step on
    ``Phi^-1(F(u)) = z`` then gives exact first derivatives; the reflections are undone
    last. Works under ``jit``, ``vmap`` and reverse-mode ``grad``.

    Args:
        dim: size of the vectors.
        num_components: logistic components per coordinate.
        num_reflections: Householder reflections in the rotation (default ``dim``).
        log_scale_bound: bound on the logistic log-scales.
        key: JAX key for the random reflection vectors.

    >>> layer = Gaussianization(3, num_components=4, key=jax.random.key(0))
    >>> y, ladj = layer.call_and_ladj(jnp.zeros(3))  # doctest: +SKIP
    """

    numerical_inverse: ClassVar[bool] = True
    inverse_tol: ClassVar[float] = 1e-10

    reflections: jax.Array
    logits: jax.Array
    means: jax.Array
    unconstrained_log_scales: jax.Array
    num_components: int = eqx.field(static=True)
    num_reflections: int = eqx.field(static=True)
    log_scale_bound: float = eqx.field(static=True)

    def __init__(self, dim: int, num_components: int = 8, num_reflections: int | None = None,
                 log_scale_bound: float = 5.0, *, key):
        self.dim = int(dim)
        self.num_components = int(num_components)
        self.num_reflections = int(dim if num_reflections is None else num_reflections)
        self.log_scale_bound = float(log_scale_bound)
        means, logits, log_scale = _initial_mixture(self.num_components)
        raw_log_scale = log_scale_bound * math.atanh(log_scale / log_scale_bound)
        k = self.num_components
        self.reflections = jnp.asarray(host_rng(key).standard_normal((self.num_reflections, dim)), dtype=float)
        self.logits = jnp.asarray(np.tile(logits, (dim, 1)), dtype=float)
        self.means = jnp.asarray(np.tile(means, (dim, 1)), dtype=float)
        self.unconstrained_log_scales = jnp.asarray(np.full((dim, k), raw_log_scale), dtype=float)

    # --- pieces ----------------------------------------------------------------------
    def _unit_reflections(self):
        v = self.reflections
        # The floor turns a zero vector into the identity instead of 0/0; taking it on the
        # squared norm keeps the gradient at v = 0 finite (that of |v| is not).
        sq = jnp.sum(v * v, axis=-1, keepdims=True)
        return v / jnp.sqrt(jnp.maximum(sq, float(jnp.finfo(v.dtype).tiny)))

    @staticmethod
    def _reflect(x, units, reverse=False):
        # A scan, so compile time does not grow with the number of reflections.
        def step(x, u):
            return x - 2.0 * jnp.dot(x, u) * u, None

        return jax.lax.scan(step, x, units, reverse=reverse)[0]

    def _mixture_params(self):
        log_w = jax.nn.log_softmax(self.logits, axis=-1)
        log_s = soft_clamp(self.unconstrained_log_scales, self.log_scale_bound)
        return log_w, self.means, log_s

    @staticmethod
    def _mixture(u, params, density=True):
        """``log F(u)``, ``log(1 - F(u))`` and (optionally) ``log f(u)`` per coordinate."""
        log_w, means, log_s = params
        t = (u[:, None] - means) * jnp.exp(-log_s)
        lower, upper = jax.nn.log_sigmoid(t), jax.nn.log_sigmoid(-t)
        log_cdf = logsumexp(log_w + lower, axis=-1)
        log_sf = logsumexp(log_w + upper, axis=-1)
        log_pdf = logsumexp(log_w - log_s + lower + upper, axis=-1) if density else None
        return log_cdf, log_sf, log_pdf

    def _tol(self, dtype):
        return max(self.inverse_tol, 8 * float(jnp.finfo(dtype).eps))

    # --- the two directions ------------------------------------------------------------
    def inverse_and_ladj(self, y):
        u = self._reflect(y, self._unit_reflections())
        log_cdf, log_sf, log_pdf = self._mixture(u, self._mixture_params())
        z = _normal_icdf_from_logs(log_cdf, log_sf)
        return z, (log_pdf - _log_normal_pdf(z)).sum()

    def call_and_ladj(self, z):
        params = self._mixture_params()
        # logit Phi(z), exact in both tails; only ever used as a (detached) target.
        target = jax.lax.stop_gradient(log_ndtr(z) - log_ndtr(-z))
        fixed = jax.lax.stop_gradient(params)
        # Each component reaches probability Phi(z) at mu_k + s_k logit Phi(z); the
        # mixture does so between the smallest and the largest of these points.
        ends = fixed[1] + jnp.exp(fixed[2]) * target[:, None]

        def logit_cdf(fixed, u):
            log_cdf, log_sf, _ = self._mixture(u, fixed, density=False)
            return log_cdf - log_sf

        root = bisect_increasing(logit_cdf, fixed, target, tol=self._tol(z.dtype),
                                 lo=ends.min(-1), hi=ends.max(-1))
        log_cdf, log_sf, log_pdf = self._mixture(root, params)
        value = _normal_icdf_from_logs(log_cdf, log_sf)
        slope = jnp.exp(log_pdf - _log_normal_pdf(z))  # d Phi^-1(F(u)) / du at the root
        u = implicit_step(root, value, slope, z)
        # Density at the differentiable u so the log-det carries its own gradients.
        _, _, log_pdf = self._mixture(u, params)
        y = self._reflect(u, self._unit_reflections(), reverse=True)
        return y, -(log_pdf - _log_normal_pdf(z)).sum()


@register_flow("gaussianization")
def gaussianization(dim, num_layers, num_components, num_reflections, *, key):
    # The reflections inside each layer mix the coordinates: no permutations needed.
    return [Gaussianization(dim, num_components, num_reflections, key=k) for k in jax.random.split(key, num_layers)]
