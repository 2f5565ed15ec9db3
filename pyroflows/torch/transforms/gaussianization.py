"""Gaussianization flows: Householder rotations and per-coordinate Gaussianizing CDFs.

Meng, Song, Song & Ermon 2020, arXiv:2003.01941. A layer rotates its input and then
sends every coordinate through ``Phi^-1 o F``, where ``F`` is the CDF of a mixture of
logistics and ``Phi`` the standard normal CDF. That is the data-to-noise direction, so
here it is ``inverse_and_ladj``; the forward (noise to data) solves it per coordinate.

The numerics live in log space: ``log F`` and ``log(1 - F)`` are log-sum-exps of
log-sigmoids, and ``ndtri_exp`` inverts the normal CDF from a log-probability, so the
layer stays exact and finite when ``F`` is far closer to 0 or 1 than a float can hold.
The log-det ``log f(u) - log phi(z)`` is never formed as that difference (both terms
are about ``-z^2/2``, so it would cancel to nothing in the tails); it is the difference
of two hazards, ``log f - log F`` of the mixture and ``log phi - log Phi`` of the
normal, taken in the same tail, each of the size of ``log|z|`` (see ``_tails`` and
``_log_normal_hazard``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..flows import register_flow
from .base import FlowTransform, bisect_increasing, implicit_step, soft_clamp

__all__ = ["Gaussianization"]

_LOG_2 = math.log(2.0)
_LOG_HALF = -_LOG_2
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_sigmoid(t):
    # -softplus(-t), exact to rounding (log1p(e^-40) is below float64 resolution); F.logsigmoid
    # would do as well but its CPU kernel is much slower on small tensors.
    return -F.softplus(-t, threshold=40.0)


def _log_normal_pdf(z):
    # (z / 2) z, not z^2 / 2: the same value (halving is exact), and finite for every z
    # whose log-density is (z up to sqrt(2 max) rather than sqrt(max)).
    return -(0.5 * z) * z - _HALF_LOG_2PI


def _mills_series(x, terms=12):
    """``sum_n (-1)^n (2n-1)!! / x^(2n)``: ``x Phi(-x) / phi(x)`` for large ``x`` (asymptotic).

    With 12 terms the first omitted one is below 1e-19 at ``x = 20`` and 1e-13 at
    ``x = 10``: exact to rounding from there on in float64 (resp. float32).
    """
    inv2 = 1.0 / (x * x)
    series, term = torch.ones_like(x), torch.ones_like(x)
    for n in range(1, terms + 1):
        term = term * (-(2 * n - 1)) * inv2
        series = series + term
    return series


def _tail_switch(dtype):
    return 20.0 if torch.finfo(dtype).bits == 64 else 10.0


def _log_normal_hazard(x, log_tail):
    """``log(phi(x) / Phi(-x))`` for ``x >= 0`` given ``log_tail = log Phi(-x)``, without cancellation.

    Both logs are about ``-x^2/2``: their difference ``log phi(x) - log_tail`` is formed only
    up to ``x = 20`` (float64; 10 in float32), where it is exact to about ``eps x^2``;
    beyond, ``log x - log S(x)`` with the asymptotic series ``S = x Phi(-x) / phi(x)``, and
    ``log_tail`` is not used. Callers pass the log tail they already hold (the mixture's,
    equal to ``log Phi(-x)`` by construction), so no normal CDF is evaluated here.
    """
    switch = _tail_switch(x.dtype)
    tail = x > switch
    zero = torch.zeros_like(x)
    far = torch.where(tail, x, torch.full_like(x, switch))
    direct = _log_normal_pdf(torch.where(tail, zero, x)) - torch.where(tail, zero, log_tail)
    return torch.where(tail, torch.log(far) - torch.log(_mills_series(far)), direct)


def _ndtri_exp_slope(log_p, z):
    """``dz/dlog_p = Phi(z) / phi(z)`` at ``z = ndtri_exp(log_p)``, without cancellation.

    ``exp(log_p - log phi(z))`` (``log Phi(z) = log_p`` there) is exact to about
    ``eps z^2``; below ``z = -20`` (float64; ``-10`` in float32) the two logs would cancel
    down to ``log|z|``, and the asymptotic series ``S(x) / x``, ``x = -z``, is exact to
    rounding instead (mirrors the JAX backend).
    """
    switch = -_tail_switch(z.dtype)
    tail = z < switch
    x = -torch.where(tail, z, torch.full_like(z, switch))
    direct = torch.exp(log_p - _log_normal_pdf(torch.where(tail, torch.zeros_like(z), z)))
    return torch.where(tail, _mills_series(x) / x, direct)


def _ndtri_exp_lower(log_p):
    """``Phi^-1(exp(log_p))`` for ``log_p <= log(1/2)`` (or ``-inf``), without gradients."""
    finfo = torch.finfo(log_p.dtype)
    # Below this exp(log_p) is subnormal or zero and ndtri loses its precision.
    threshold = math.log(finfo.tiny) + 2.0
    direct = torch.special.ndtri(torch.exp(log_p.clamp_min(threshold)))
    # Deep tail: log Phi(z) ~ -z^2/2 - log|z| - log sqrt(2 pi) gives z^2 ~ a - log a with
    # a = -2 log_p - log 2 pi; Newton on log_ndtr(z) = log_p then converges quadratically
    # (log Phi is concave, so after one step the iterates approach the root from below).
    # Every finite log_p: a / 2 = -log_p - log sqrt(2 pi) is formed instead of a, which
    # would overflow for log_p below -max / 2.
    lp = log_p.clamp(min=-finfo.max, max=threshold)
    half_a = (-lp - _HALF_LOG_2PI).clamp_min(0.5)
    x = math.sqrt(2.0) * torch.sqrt(half_a - 0.5 * (_LOG_2 + torch.log(half_a)))  # x = -z >= 37 (12 in float32)
    for _ in range(4):
        # There Phi(-x) / phi(x) = S(x) / x: the Newton slope without the cancellation of
        # exp(log Phi - log phi) (both near -x^2/2, which float32 holds only to ~x^2 eps).
        mills = _mills_series(x) / x
        log_cdf = _log_normal_pdf(x) + torch.log(mills)
        step = (log_cdf - lp) * mills
        x = torch.where(torch.isfinite(step), x + step, x)
    z = torch.where(log_p >= threshold, direct, -x)
    return torch.where(log_p == -math.inf, torch.full_like(z, -math.inf), z)


def _ndtri_exp_value(log_p):
    upper = log_p > _LOG_HALF
    # Above p = 1/2 use Phi^-1(p) = -Phi^-1(1 - p); expm1 keeps 1 - p exact near p = 1.
    lower_log_p = torch.where(upper, torch.log(-torch.expm1(log_p.clamp_min(_LOG_HALF))), log_p)
    z = _ndtri_exp_lower(lower_log_p)
    return torch.where(upper, -z, z)


class _NdtriExp(torch.autograd.Function):
    generate_vmap_rule = True  # works under torch.func (vmap, jacrev) too

    @staticmethod
    def forward(log_p):
        with torch.no_grad():
            return _ndtri_exp_value(log_p)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad):
        log_p, z = ctx.saved_tensors
        # Implicit function: log Phi(z) = log_p, so dz/dlog_p = Phi(z) / phi(z).
        return grad * _ndtri_exp_slope(log_p, z)


def ndtri_exp(log_p: torch.Tensor) -> torch.Tensor:
    """Inverse standard normal CDF of ``exp(log_p)``: the ``z`` with ``log Phi(z) = log_p``.

    Accurate over the whole range of ``log_p`` (``-1e4`` and below, up to ``-1e-300``): it
    uses ``torch.special.ndtri`` where ``exp(log_p)`` is a normal float at most 1/2, the
    reflection ``z = -ndtri_exp(log(1 - p))`` above 1/2, and in the far tail an asymptotic
    start refined by Newton steps on ``torch.special.log_ndtr``. Differentiable, with
    ``dz/dlog_p = Phi(z)/phi(z)``.

    Args:
        log_p: log-probabilities, at most 0 (``-inf`` gives ``-inf``).

    Returns:
        ``Phi^-1(exp(log_p))``, the same shape.

    Example:
        >>> z = ndtri_exp(torch.tensor([math.log(0.5), -1e4], dtype=torch.float64))
        >>> [round(v, 4) for v in z.tolist()]
        [0.0, -141.3798]
    """
    return _NdtriExp.apply(log_p)


def _normal_icdf_from_logs(log_cdf, log_sf):
    """``Phi^-1(F)`` given both ``log F`` and ``log(1 - F)``: each tail from its own log.

    ``ndtri_exp(log F)`` where ``F < 1 - F``, else ``-ndtri_exp(log(1 - F))``; one call on
    the smaller log (at most ``log(1/2)``).
    """
    lower = log_cdf < log_sf
    small = torch.where(lower, log_cdf, log_sf)
    # A where (not minimum, which halves the gradient at a tie) caps rounding above log(1/2).
    z = ndtri_exp(torch.where(small > _LOG_HALF, torch.full_like(small, _LOG_HALF), small))
    return torch.where(lower, z, -z)


def _log_slope(z, log_cdf, log_sf, hazard_lower, hazard_upper):
    """``log dz/du = log f(u) - log phi(z)`` where ``F(u) = Phi(z)``, without cancellation.

    In the lower tail ``log F = log Phi(z)``, so ``log f - log phi(z) = (log f - log F) -
    (log phi - log Phi)(z)``: the difference of the mixture's and the normal's hazards, each
    of moderate size (likewise with ``1 - F`` in the upper tail), where ``log f`` and
    ``log phi(z)`` are both about ``-z^2/2``.
    """
    lower = z < 0
    hazard = torch.where(lower, hazard_lower, hazard_upper)
    return hazard - _log_normal_hazard(z.abs(), torch.where(lower, log_cdf, log_sf))


def _initial_mixture(num_components: int):
    """Means on a grid, Gaussian-shaped weights and a common scale so that F ~ Phi."""
    k = num_components
    spread = min(2.0, 0.7 * (k - 1))
    means = torch.linspace(-spread, spread, k, dtype=torch.float64)
    logits = -0.5 * (means / 0.8) ** 2
    weights = torch.exp(logits - torch.logsumexp(logits, 0))
    # Logistic variance s^2 pi^2 / 3 makes up what the spread of the means leaves to 1.
    rest = max(1.0 - float((weights * means**2).sum()), 0.1)
    log_scale = 0.5 * math.log(3.0 * rest) - math.log(math.pi)
    return means, logits, log_scale


class Gaussianization(FlowTransform):
    """One Gaussianization layer: a rotation, then per-coordinate Gaussianizing CDFs.

    Data to noise (``inverse_and_ladj``)::

        u = H_m ... H_1 y,          H_j = I - 2 v_j v_j^T / |v_j|^2
        z_i = Phi^-1(F_i(u_i)),     F_i(u) = sum_k w_ik sigmoid((u - mu_ik) / s_ik)

    with ``w_i = softmax(logits_i)`` and ``s_ik = exp(soft_clamp(raw_ik, log_scale_bound))``.
    ``log F`` and ``log(1 - F)`` are log-sum-exps of log-sigmoids, and ``Phi^-1`` is taken
    from whichever tail is smaller (``ndtri_exp``), so extreme inputs stay exact. The
    log-determinant is ``sum_i log f_i(u_i) - log phi(z_i)`` with ``f_i`` the mixture
    density, computed as a difference of hazards (module docstring) so that it stays
    exact for any finite input; reflections contribute 0.

    Noise to data (``call_and_ladj``) has no closed form: per coordinate ``u`` solves
    ``F(u) = Phi(z)`` by bisection on ``logit F(u) = logit Phi(z)``, an increasing function
    equivalent to ``Phi^-1(F(u)) = z``, inside the exact bracket
    ``[min_k, max_k] (mu_k + s_k logit Phi(z))``, to ``inverse_tol * (1 + |u|)``
    (``inverse_tol = 1e-10``, or a few float32 epsilons in single precision); one
    implicit Newton step on ``Phi^-1(F(u)) = z`` then gives exact first derivatives; the
    reflections are undone last.

    Args:
        dim: size of the vectors.
        num_components: logistic components per coordinate.
        num_reflections: Householder reflections in the rotation (default ``dim``).
        log_scale_bound: bound on the logistic log-scales.

    References:
        Meng, Song, Song & Ermon 2020, "Gaussianization Flows", arXiv:2003.01941.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = Gaussianization(2, num_components=4)
        >>> y = torch.randn(5, 2)
        >>> z, ildj = layer.inverse_and_ladj(y)  # data -> noise, closed form
        >>> y_back, ladj = layer.call_and_ladj(z)  # noise -> data, solved
        >>> tuple(z.shape), bool(torch.allclose(y_back, y, atol=1e-4)), bool(torch.allclose(ladj, -ildj, atol=1e-4))
        ((5, 2), True, True)
    """

    numerical_inverse = True
    inverse_tol = 1e-10

    def __init__(
        self, dim: int, num_components: int = 8, num_reflections: int | None = None, log_scale_bound: float = 5.0
    ):
        super().__init__(dim)
        self.num_components = int(num_components)
        self.num_reflections = int(dim if num_reflections is None else num_reflections)
        self.log_scale_bound = float(log_scale_bound)
        means, logits, log_scale = _initial_mixture(self.num_components)
        raw_log_scale = log_scale_bound * math.atanh(log_scale / log_scale_bound)
        self.reflections = nn.Parameter(torch.randn(self.num_reflections, dim))
        self.logits = nn.Parameter(logits.float().repeat(dim, 1))
        self.means = nn.Parameter(means.float().repeat(dim, 1))
        self.unconstrained_log_scales = nn.Parameter(torch.full((dim, self.num_components), raw_log_scale))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_components={self.num_components}, num_reflections={self.num_reflections}"

    # --- pieces ----------------------------------------------------------------------
    def _unit_reflections(self):
        v = self.reflections
        # The floor turns a zero vector into the identity instead of 0/0.
        return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny ** 0.5)

    @staticmethod
    def _reflect(x, units):
        for u in units:
            x = x - 2.0 * (x @ u).unsqueeze(-1) * u
        return x

    def _mixture_params(self):
        log_w = self.logits - torch.logsumexp(self.logits, -1, keepdim=True)
        log_s = soft_clamp(self.unconstrained_log_scales, self.log_scale_bound)
        return log_w, self.means, log_s

    @staticmethod
    def _mixture(u, params):
        """``log F(u)`` and ``log(1 - F(u))`` per coordinate."""
        log_w, means, log_s = params
        t = (u.unsqueeze(-1) - means) * torch.exp(-log_s)
        return torch.logsumexp(log_w + _log_sigmoid(t), -1), torch.logsumexp(log_w + _log_sigmoid(-t), -1)

    @staticmethod
    def _tails(u, params):
        """``log F``, ``log(1 - F)`` and the hazards ``log f - log F``, ``log f - log(1 - F)``.

        ``f = sum_k w_k sigmoid(t_k) sigmoid(-t_k) / s_k``, so ``f / F`` is the average of
        ``sigmoid(-t_k) / s_k`` under the weights ``w_k sigmoid(t_k) / F``: a log-sum-exp of
        bounded terms once the largest ``log(w_k sigmoid(t_k))`` is taken out, where
        ``log f - log F`` itself would cancel two numbers of size ``|u| / s``.
        """
        log_w, means, log_s = params
        t = (u.unsqueeze(-1) - means) * torch.exp(-log_s)
        lower, upper = _log_sigmoid(t), _log_sigmoid(-t)
        a_cdf, a_sf = log_w + lower, log_w + upper
        # The shift cancels exactly in the hazards; detached, it carries no gradient.
        m_cdf = a_cdf.detach().amax(-1, keepdim=True)
        m_sf = a_sf.detach().amax(-1, keepdim=True)
        r_cdf, r_sf = a_cdf - m_cdf, a_sf - m_sf
        lse_cdf, lse_sf = torch.logsumexp(r_cdf, -1), torch.logsumexp(r_sf, -1)
        hazard_lower = torch.logsumexp(r_cdf + upper - log_s, -1) - lse_cdf
        hazard_upper = torch.logsumexp(r_sf + lower - log_s, -1) - lse_sf
        return m_cdf.squeeze(-1) + lse_cdf, m_sf.squeeze(-1) + lse_sf, hazard_lower, hazard_upper

    def _tol(self, dtype):
        return max(self.inverse_tol, 8 * torch.finfo(dtype).eps)

    # --- the two directions ------------------------------------------------------------
    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self._reflect(y, self._unit_reflections())
        tails = self._tails(u, self._mixture_params())
        z = _normal_icdf_from_logs(tails[0], tails[1])
        return z, _log_slope(z, *tails).sum(-1)

    def call_and_ladj(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self._mixture_params()
        # logit Phi(z), exact in both tails.
        target = torch.special.log_ndtr(z) - torch.special.log_ndtr(-z)
        with torch.no_grad():
            fixed = tuple(p.detach() for p in params)
            # Each component reaches probability Phi(z) at mu_k + s_k logit Phi(z); the
            # mixture does so between the smallest and the largest of these points.
            ends = fixed[1] + torch.exp(fixed[2]) * target.detach().unsqueeze(-1)

            def logit_cdf(u):
                log_cdf, log_sf = self._mixture(u, fixed)
                return log_cdf - log_sf

            root = bisect_increasing(
                logit_cdf, target.detach(), tol=self._tol(z.dtype), lo=ends.amin(-1), hi=ends.amax(-1)
            )
        tails = self._tails(root, params)
        value = _normal_icdf_from_logs(tails[0], tails[1])
        # The slope d Phi^-1(F(u)) / du at the root, with z for Phi^-1(F(root)) (equal to
        # the solve's tolerance): the log-det below then shares its normal hazard.
        u = implicit_step(root, value, torch.exp(_log_slope(z, *tails)), z)
        # The log-det at the differentiable u, so it carries its own gradients; after the
        # Newton step the tail of F(u) equals that of Phi(z) to rounding.
        y = self._reflect(u, self._unit_reflections().flip(0))
        return y, -_log_slope(z, *self._tails(u, params)).sum(-1)


@register_flow("gaussianization")
def gaussianization(
    dim: int, num_layers: int, num_components: int, num_reflections: int | None
) -> list[Gaussianization]:
    """The ``gaussianization`` family: ``num_layers`` ``Gaussianization`` layers.

    The reflections inside each layer mix the coordinates: no permutations needed.

    Example:
        >>> [layer.num_components for layer in gaussianization(2, 2, 4, None)]
        [4, 4]
    """
    return [Gaussianization(dim, num_components, num_reflections) for _ in range(num_layers)]
