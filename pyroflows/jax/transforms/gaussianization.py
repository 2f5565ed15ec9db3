"""JAX mirror of ``pyroflows.torch.transforms.gaussianization``: the Gaussianization layer.

The same rotations, mixtures of logistics and log-space numerics as torch (whose module
docstring explains why the log-determinant is a difference of hazards). JAX adds its own
``log_ndtr`` and ``ndtri_exp``, exact in both tails and differentiable to any order through
custom JVPs, and stacks the log-sum-exps, which the solver loops trace many times.

References:
    Meng, Song, Song & Ermon 2020, "Gaussianization flows", arXiv:2003.01941.
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr as _jax_log_ndtr
from jax.scipy.special import ndtr, ndtri

from ..flows import register_flow
from ..nn import host_rng
from .base import FlowTransform, bisect_increasing, implicit_step, soft_clamp

__all__ = ["Gaussianization"]

_LOG_2 = math.log(2.0)
_LOG_HALF = -_LOG_2
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def log_ndtr(z: jax.Array) -> jax.Array:
    """``log Phi(z)``, accurate to rounding in both tails.

    ``jax.scipy.special.log_ndtr`` takes ``log(ndtr(z))`` up to ``z = 8``, which loses
    digits as ``Phi(z)`` nears 1, and its 3-term asymptotic series below ``z = -20``
    leaves relative errors near 2e-11; here ``log1p(-Phi(-z))`` above 1 and 12 series
    terms below the switch make it exact to rounding in float32 and float64.

    Args:
        z: any array.

    Returns:
        ``log Phi(z)`` elementwise.

    Example:
        >>> import jax.numpy as jnp
        >>> [round(float(v), 2) for v in log_ndtr(jnp.array([-40.0, 0.0, 40.0]))]
        [-804.61, -0.69, -0.0]
    """
    upper = z > 1.0
    right = jnp.log1p(-ndtr(-jnp.where(upper, z, 1.0)))
    rest = _jax_log_ndtr(jnp.where(upper, 1.0, z), series_order=12)
    return jnp.where(upper, right, rest)


def _log_normal_pdf(z):
    # (z / 2) z, not z^2 / 2: the same value (halving is exact), and finite for every z
    # whose log-density is (z up to sqrt(2 max) rather than sqrt(max)).
    return -(0.5 * z) * z - _HALF_LOG_2PI


def _mills_series(x, terms=12):
    """``sum_n (-1)^n (2n-1)!! / x^(2n)``: ``x Phi(-x) / phi(x)`` for large ``x`` (asymptotic).

    With 12 terms the first omitted one is below 1e-19 at ``x = 20`` and 1e-12 at
    ``x = 10``: exact to rounding from there on in float64 (resp. float32).
    """
    inv2 = 1.0 / (x * x)
    series, term = jnp.ones_like(x), jnp.ones_like(x)
    for n in range(1, terms + 1):
        term = term * (-(2 * n - 1)) * inv2
        series = series + term
    return series


def _tail_switch(dtype):
    return 20.0 if jnp.finfo(dtype).bits == 64 else 10.0


@jax.custom_jvp
def _log_normal_hazard(x, log_tail):
    """``log(phi(x) / Phi(-x))`` for ``x >= 0`` given ``log_tail = log Phi(-x)``, without cancellation.

    Both logs are about ``-x^2/2``: their difference ``log phi(x) - log_tail`` is formed only
    up to ``x = 20`` (float64; 10 in float32), where it is exact to about ``eps x^2``;
    beyond, ``log x - log S(x)`` with the asymptotic series ``S = x Phi(-x) / phi(x)``, and
    ``log_tail`` is not used. Callers pass the log tail they already hold (the mixture's,
    equal to ``log Phi(-x)`` by construction), so no normal CDF is evaluated here. The
    derivative is a custom rule (see ``_log_normal_hazard_jvp``), so the series is never
    differentiated: that keeps the compiled gradient small.
    """
    switch = _tail_switch(x.dtype)
    tail = x > switch
    far = jnp.where(tail, x, switch)
    direct = _log_normal_pdf(jnp.where(tail, 0.0, x)) - jnp.where(tail, 0.0, log_tail)
    return jnp.where(tail, jnp.log(far) - jnp.log(_mills_series(far)), direct)


@_log_normal_hazard.defjvp
def _log_normal_hazard_jvp(primals, tangents):
    (x, log_tail), (dx, dlog_tail) = primals, tangents
    h = _log_normal_hazard(x, log_tail)
    # Direct form: d(log phi(x) - log_tail) = -x dx - dlog_tail. Series form, a function of
    # x alone: dh/dx = phi(x) / Phi(-x) - x = exp(h) - x. Along log_tail = log Phi(-x) the two
    # agree (dlog_tail = -exp(h) dx), as the callers' arguments always are.
    tail = x > _tail_switch(x.dtype)
    return h, jnp.where(tail, (jnp.exp(jnp.where(tail, h, 0.0)) - x) * dx, -x * dx - dlog_tail)


def _ndtri_exp_slope(log_p, z):
    """``dz/dlog_p = Phi(z) / phi(z)`` at ``z = ndtri_exp(log_p)``, without cancellation.

    ``exp(log_p - log phi(z))`` (``log Phi(z) = log_p`` there) is exact to about
    ``eps z^2``; below ``z = -20`` (float64; ``-10`` in float32) the two logs would cancel
    down to ``log|z|``, and the asymptotic series ``S(x) / x``, ``x = -z``, is exact to
    rounding instead. Neither form needs ``log_ndtr``, which keeps the derivative cheap
    to compile.
    """
    switch = -_tail_switch(z.dtype)
    tail = z < switch
    x = -jnp.where(tail, z, switch)
    direct = jnp.exp(log_p - _log_normal_pdf(jnp.where(tail, 0.0, z)))
    return jnp.where(tail, _mills_series(x) / x, direct)


def _logit_ndtr(z):
    """``log Phi(z) - log Phi(-z)``, exact in both tails, from one ``log Phi(-|z|)``."""
    # jax's log_ndtr is exact at or below 0 with enough series terms (see log_ndtr).
    log_small = _jax_log_ndtr(-jnp.abs(z), series_order=12)  # <= log(1/2): log1p(-exp(.)) is exact
    logit = jnp.log1p(-jnp.exp(log_small)) - log_small
    return jnp.where(z < 0, -logit, logit)


def _ndtri_exp_lower(log_p):
    """``Phi^-1(exp(log_p))`` for ``log_p <= log(1/2)`` (or ``-inf``); the values only."""
    finfo = jnp.finfo(log_p.dtype)
    # Below this exp(log_p) is subnormal or zero and ndtri loses its precision.
    threshold = math.log(float(finfo.tiny)) + 2.0
    direct = ndtri(jnp.exp(jnp.maximum(log_p, threshold)))
    # Deep tail: log Phi(z) ~ -z^2/2 - log|z| - log sqrt(2 pi) gives z^2 ~ a - log a with
    # a = -2 log_p - log 2 pi; Newton on log Phi(z) = log_p then converges quadratically
    # (log Phi is concave, so after one step the iterates approach the root from below).
    # Every finite log_p: a / 2 = -log_p - log sqrt(2 pi) is formed instead of a, which
    # would overflow for log_p below -max / 2.
    lp = jnp.clip(log_p, -float(finfo.max), threshold)
    half_a = jnp.maximum(-lp - _HALF_LOG_2PI, 0.5)
    x = math.sqrt(2.0) * jnp.sqrt(half_a - 0.5 * (_LOG_2 + jnp.log(half_a)))  # x = -z >= 37 (12 in float32)
    for _ in range(4):
        # There log Phi(-x) = log phi(x) + log(S(x) / x), and Phi/phi = S(x) / x, with S
        # the asymptotic series: exact to rounding, and far cheaper to compile than log_ndtr.
        mills = _mills_series(x) / x
        log_cdf = _log_normal_pdf(x) + jnp.log(mills)
        step = (log_cdf - lp) * mills
        x = jnp.where(jnp.isfinite(step), x + step, x)
    z = jnp.where(log_p >= threshold, direct, -x)
    return jnp.where(log_p == -jnp.inf, -jnp.inf, z)


def _ndtri_exp_value(log_p):
    upper = log_p > _LOG_HALF
    # Above p = 1/2 use Phi^-1(p) = -Phi^-1(1 - p); expm1 keeps 1 - p exact near p = 1.
    lower_log_p = jnp.where(upper, jnp.log(-jnp.expm1(jnp.maximum(log_p, _LOG_HALF))), log_p)
    z = _ndtri_exp_lower(lower_log_p)
    return jnp.where(upper, -z, z)


@jax.custom_jvp
def ndtri_exp(log_p: jax.Array) -> jax.Array:
    """Inverse standard normal CDF of ``exp(log_p)``: the ``z`` with ``log Phi(z) = log_p``.

    Accurate to rounding over the whole range of ``log_p`` (from ``-finfo.max`` up to
    ``-1e-300`` and 0; compared with ``scipy.special.ndtri_exp`` in the tests): it uses
    ``jax.scipy.special.ndtri`` where ``exp(log_p)`` is a normal float at most 1/2, the
    reflection ``z = -ndtri_exp(log(1 - p))`` above 1/2, and in the far tail an asymptotic
    start refined by four Newton steps on ``log Phi(z) = log_p``, with ``log Phi`` from its
    asymptotic series. Differentiable to any order through a custom JVP (the value's own
    branches and Newton steps are never differentiated): ``dz/dlog_p = Phi(z)/phi(z)``,
    formed without cancellation (see ``_ndtri_exp_slope``). ``ndtri_exp(0) = inf``,
    ``ndtri_exp(-inf) = -inf``.

    Args:
        log_p: log-probabilities, ``<= 0``.

    Returns:
        ``Phi^-1(exp(log_p))`` elementwise.

    Example:
        >>> import jax.numpy as jnp
        >>> [round(float(v), 4) for v in ndtri_exp(jnp.log(jnp.array([0.025, 0.5])))]
        [-1.96, 0.0]
        >>> round(float(ndtri_exp(jnp.array(-804.6084))), 2)
        -40.0
    """
    return _ndtri_exp_value(log_p)


@ndtri_exp.defjvp
def _ndtri_exp_jvp(primals, tangents):
    (log_p,), (dlog_p,) = primals, tangents
    z = ndtri_exp(log_p)  # through the custom rule again, so higher derivatives work too
    # Implicit function: log Phi(z) = log_p, so dz/dlog_p = Phi(z) / phi(z).
    return z, dlog_p * _ndtri_exp_slope(log_p, z)


def _normal_icdf_from_logs(log_cdf, log_sf):
    """``Phi^-1(F)`` given both ``log F`` and ``log(1 - F)``: each tail from its own log.

    ``ndtri_exp(log F)`` where ``F < 1 - F``, else ``-ndtri_exp(log(1 - F))``; one call on
    the smaller log (at most ``log(1/2)``), so the solver is traced once, not twice.
    """
    lower = log_cdf < log_sf
    small = jnp.where(lower, log_cdf, log_sf)
    # The cap only catches rounding above log(1/2); a where (not minimum, which halves the
    # gradient at a tie) keeps the full derivative when F is exactly 1/2.
    z = ndtri_exp(jnp.where(small > _LOG_HALF, _LOG_HALF, small))
    return jnp.where(lower, z, -z)


def _log_slope(z, log_cdf, log_sf, hazard_lower, hazard_upper):
    """``log dz/du = log f(u) - log phi(z)`` where ``F(u) = Phi(z)``, without cancellation.

    In the lower tail ``log F = log Phi(z)``, so ``log f - log phi(z) = (log f - log F) -
    (log phi - log Phi)(z)``: the difference of the mixture's and the normal's hazards, each
    of moderate size (likewise with ``1 - F`` in the upper tail), where ``log f`` and
    ``log phi(z)`` are both about ``-z^2/2``.
    """
    lower = z < 0
    hazard = jnp.where(lower, hazard_lower, hazard_upper)
    return hazard - _log_normal_hazard(jnp.abs(z), jnp.where(lower, log_cdf, log_sf))


def _logsumexp(a):
    """``log sum exp`` over the last axis of finite values (lean: it is traced many times)."""
    m = jax.lax.stop_gradient(a.max(-1, keepdims=True))
    return m[..., 0] + jnp.log(jnp.exp(a - m).sum(-1))


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
    """One Gaussianization layer: JAX mirror of ``pyroflows.torch.transforms.Gaussianization``.

    The same maps as torch, whose docstring gives the maths: data to noise
    (``inverse_and_ladj``) rotates and sends each coordinate through ``Phi^-1 o F`` in
    closed form; noise to data (``call_and_ladj``) bisects per coordinate in a
    ``lax.while_loop`` on stopped gradients (to ``inverse_tol = 1e-10``, or 8 float32
    epsilons in single precision), then takes one implicit Newton step for exact first
    derivatives. Works under ``jit``, ``vmap`` and reverse-mode ``grad``.

    Args:
        dim: size of the vectors.
        num_components: logistic components per coordinate.
        num_reflections: Householder reflections in the rotation (default ``dim``).
        log_scale_bound: bound on the logistic log-scales.
        key: JAX key for the random reflection vectors.

    Example:
        >>> layer = Gaussianization(2, num_components=3, key=jax.random.key(0))
        >>> z, ildj = layer.inverse_and_ladj(jnp.array([0.5, -1.0]))  # data -> noise, closed form
        >>> y, ladj = layer.call_and_ladj(z)  # noise -> data, solved
        >>> [round(float(v), 4) for v in y], abs(round(float(ladj + ildj), 4))  # abs: no -0.0
        ([0.5, -1.0], 0.0)
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

    def __init__(
        self,
        dim: int,
        num_components: int = 8,
        num_reflections: int | None = None,
        log_scale_bound: float = 5.0,
        *,
        key: jax.Array,
    ):
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
        """``(log w, mu, log s, 1/s)``: softmax weights and soft-clamped log-scales."""
        log_w = jax.nn.log_softmax(self.logits, axis=-1)
        log_s = soft_clamp(self.unconstrained_log_scales, self.log_scale_bound)
        return log_w, self.means, log_s, jnp.exp(-log_s)

    @staticmethod
    def _mixture(u, params, parts="csd"):
        """Per coordinate, in this order, those of ``log F(u)`` (``c``), ``log(1 - F(u))``
        (``s``) and ``log f(u)`` (``d``) that ``parts`` names.

        The log-sum-exps are stacked into one (one ``exp``, one ``log``): this function is
        traced many times inside the solver loops, and each transcendental costs compile time.
        """
        log_w, means, log_s, inv_s = params
        t = (u[:, None] - means) * inv_s
        # log sigmoid(+-t) = min(+-t, 0) - log(1 + e^-|t|), sharing the second term.
        shared = jnp.log1p(jnp.exp(-jnp.abs(t)))
        lower, upper = jnp.minimum(t, 0.0) - shared, jnp.minimum(-t, 0.0) - shared
        terms = {"c": lambda: lower, "s": lambda: upper, "d": lambda: lower + upper - log_s}
        out = _logsumexp(jnp.stack([log_w + terms[p]() for p in parts]))
        return tuple(out)

    @staticmethod
    def _tails(u, params):
        """``log F``, ``log(1 - F)`` and the hazards ``log f - log F``, ``log f - log(1 - F)``.

        ``f = sum_k w_k sigmoid(t_k) sigmoid(-t_k) / s_k``, so ``f / F`` is the average of
        ``sigmoid(-t_k) / s_k`` under the weights ``w_k sigmoid(t_k) / F``: a log-sum-exp of
        bounded terms once the largest ``log(w_k sigmoid(t_k))`` is taken out, where
        ``log f - log F`` itself would cancel two numbers of size ``|u| / s``. One stacked
        log-sum-exp for all four.
        """
        log_w, means, log_s, inv_s = params
        t = (u[:, None] - means) * inv_s
        shared = jnp.log1p(jnp.exp(-jnp.abs(t)))
        lower, upper = jnp.minimum(t, 0.0) - shared, jnp.minimum(-t, 0.0) - shared
        a_cdf, a_sf = log_w + lower, log_w + upper
        # The shift cancels exactly in the hazards; stopped, it carries no gradient.
        m_cdf = jax.lax.stop_gradient(a_cdf.max(-1, keepdims=True))
        m_sf = jax.lax.stop_gradient(a_sf.max(-1, keepdims=True))
        r_cdf, r_sf = a_cdf - m_cdf, a_sf - m_sf
        out = _logsumexp(jnp.stack([r_cdf, r_sf, r_cdf + upper - log_s, r_sf + lower - log_s]))
        return m_cdf[:, 0] + out[0], m_sf[:, 0] + out[1], out[2] - out[0], out[3] - out[1]

    def _tol(self, dtype):
        return max(self.inverse_tol, 8 * float(jnp.finfo(dtype).eps))

    # --- the two directions ------------------------------------------------------------
    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Data to noise in closed form: rotate, then ``z_i = Phi^-1(F_i(u_i))``; with its log-determinant."""
        u = self._reflect(y, self._unit_reflections())
        tails = self._tails(u, self._mixture_params())
        z = _normal_icdf_from_logs(tails[0], tails[1])
        return z, _log_slope(z, *tails).sum()

    def call_and_ladj(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Noise to data, solved per coordinate (bisection, one implicit Newton step); with its log-determinant."""
        params = self._mixture_params()
        # logit Phi(z), exact in both tails; only ever used as a (detached) target.
        target = jax.lax.stop_gradient(_logit_ndtr(z))
        fixed = jax.lax.stop_gradient(params)
        # Each component reaches probability Phi(z) at mu_k + s_k logit Phi(z); the
        # mixture does so between the smallest and the largest of these points.
        ends = fixed[1] + jnp.exp(fixed[2]) * target[:, None]

        def logit_cdf(fixed, u):
            log_cdf, log_sf = self._mixture(u, fixed, "cs")
            return log_cdf - log_sf

        root = bisect_increasing(logit_cdf, fixed, target, tol=self._tol(z.dtype), lo=ends.min(-1), hi=ends.max(-1))
        tails = self._tails(root, params)
        value = _normal_icdf_from_logs(tails[0], tails[1])
        # The slope d Phi^-1(F(u)) / du at the root, with z for Phi^-1(F(root)) (equal to
        # the solve's tolerance): the log-det below then shares its normal hazard.
        u = implicit_step(root, value, jnp.exp(_log_slope(z, *tails)), z)
        # The log-det at the differentiable u, so it carries its own gradients; after the
        # Newton step the tail of F(u) equals that of Phi(z) to rounding.
        y = self._reflect(u, self._unit_reflections(), reverse=True)
        return y, -_log_slope(z, *self._tails(u, params)).sum()


@register_flow("gaussianization")
def gaussianization(
    dim: int, num_layers: int, num_components: int, num_reflections: int | None, *, key: jax.Array
) -> list[Gaussianization]:
    """The family's layers: JAX mirror of ``pyroflows.torch.transforms.gaussianization.gaussianization``.

    Example:
        >>> [layer.num_components for layer in gaussianization(2, 2, 3, None, key=jax.random.key(0))]
        [3, 3]
    """
    # The reflections inside each layer mix the coordinates: no permutations needed.
    return [Gaussianization(dim, num_components, num_reflections, key=k) for k in jax.random.split(key, num_layers)]
