"""Gaussianization flows: Householder rotations and per-coordinate Gaussianizing CDFs.

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

import torch
import torch.nn.functional as F
from torch import nn

from ..flows import register_flow
from .base import FlowTransform, bisect_increasing, implicit_step, soft_clamp

__all__ = ["Gaussianization"]

_LOG_HALF = -math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_sigmoid(t):
    # -softplus(-t), exact to rounding (log1p(e^-40) is below float64 resolution); F.logsigmoid
    # would do as well but its CPU kernel is much slower on small tensors.
    return -F.softplus(-t, threshold=40.0)


def _log_normal_pdf(z):
    return -0.5 * z * z - _HALF_LOG_2PI


def _ndtri_exp_lower(log_p):
    """``Phi^-1(exp(log_p))`` for ``log_p <= log(1/2)`` (or ``-inf``), without gradients."""
    finfo = torch.finfo(log_p.dtype)
    # Below this exp(log_p) is subnormal or zero and ndtri loses its precision.
    threshold = math.log(finfo.tiny) + 2.0
    direct = torch.special.ndtri(torch.exp(log_p.clamp_min(threshold)))
    # Deep tail: log Phi(z) ~ -z^2/2 - log|z| - log sqrt(2 pi) gives z^2 ~ a - log a with
    # a = -2 log_p - log 2 pi; Newton on log_ndtr(z) = log_p then converges quadratically
    # (log Phi is concave, so after one step the iterates approach the root from below).
    lp = log_p.clamp(min=-finfo.max / 8, max=threshold)
    a = (-2.0 * lp - math.log(2.0 * math.pi)).clamp_min(1.0)
    z = -torch.sqrt(a - torch.log(a))
    for _ in range(4):
        log_cdf = torch.special.log_ndtr(z)
        step = (log_cdf - lp) * torch.exp(log_cdf - _log_normal_pdf(z))
        z = torch.where(torch.isfinite(step), z - step, z)
    z = torch.where(log_p >= threshold, direct, z)
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
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        # Implicit function: log Phi(z) = log_p, so dz/dlog_p = Phi(z) / phi(z), formed in log space.
        slope = torch.exp(torch.special.log_ndtr(z) - _log_normal_pdf(z))
        slope = torch.where(z == -math.inf, torch.zeros_like(slope), slope)
        return grad * slope


def ndtri_exp(log_p: torch.Tensor) -> torch.Tensor:
    """Inverse standard normal CDF of ``exp(log_p)``: the ``z`` with ``log Phi(z) = log_p``.

    Accurate over the whole range of ``log_p`` (``-1e4`` and below, up to ``-1e-300``): it
    uses ``torch.special.ndtri`` where ``exp(log_p)`` is a normal float at most 1/2, the
    reflection ``z = -ndtri_exp(log(1 - p))`` above 1/2, and in the far tail an asymptotic
    start refined by Newton steps on ``torch.special.log_ndtr``. Differentiable, with
    ``dz/dlog_p = Phi(z)/phi(z)``.
    """
    return _NdtriExp.apply(log_p)


def _normal_icdf_from_logs(log_cdf, log_sf):
    """``Phi^-1(F)`` given both ``log F`` and ``log(1 - F)``: each tail from its own log."""
    lower = ndtri_exp(torch.minimum(log_cdf, torch.full_like(log_cdf, _LOG_HALF)))
    upper = -ndtri_exp(torch.minimum(log_sf, torch.full_like(log_sf, _LOG_HALF)))
    return torch.where(log_cdf < log_sf, lower, upper)


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
    (``inverse_tol = 1e-10``, or a few float32 epsilons in single precision); one
    implicit Newton step on ``Phi^-1(F(u)) = z`` then gives exact first derivatives; the
    reflections are undone last.

    Args:
        dim: size of the vectors.
        num_components: logistic components per coordinate.
        num_reflections: Householder reflections in the rotation (default ``dim``).
        log_scale_bound: bound on the logistic log-scales.

    >>> layer = Gaussianization(3, num_components=4)
    >>> y, ladj = layer.call_and_ladj(torch.randn(10, 3))
    """

    numerical_inverse = True
    inverse_tol = 1e-10

    def __init__(self, dim: int, num_components: int = 8, num_reflections: int | None = None,
                 log_scale_bound: float = 5.0):
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

    def extra_repr(self):
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
    def _mixture(u, params, density=True):
        """``log F(u)``, ``log(1 - F(u))`` and (optionally) ``log f(u)`` per coordinate."""
        log_w, means, log_s = params
        t = (u.unsqueeze(-1) - means) * torch.exp(-log_s)
        lower, upper = _log_sigmoid(t), _log_sigmoid(-t)
        log_cdf = torch.logsumexp(log_w + lower, -1)
        log_sf = torch.logsumexp(log_w + upper, -1)
        log_pdf = torch.logsumexp(log_w - log_s + lower + upper, -1) if density else None
        return log_cdf, log_sf, log_pdf

    def _tol(self, dtype):
        return max(self.inverse_tol, 8 * torch.finfo(dtype).eps)

    # --- the two directions ------------------------------------------------------------
    def inverse_and_ladj(self, y):
        u = self._reflect(y, self._unit_reflections())
        log_cdf, log_sf, log_pdf = self._mixture(u, self._mixture_params())
        z = _normal_icdf_from_logs(log_cdf, log_sf)
        return z, (log_pdf - _log_normal_pdf(z)).sum(-1)

    def call_and_ladj(self, z):
        params = self._mixture_params()
        # logit Phi(z), exact in both tails.
        target = torch.special.log_ndtr(z) - torch.special.log_ndtr(-z)
        with torch.no_grad():
            fixed = tuple(p.detach() for p in params)
            # Each component reaches probability Phi(z) at mu_k + s_k logit Phi(z); the
            # mixture does so between the smallest and the largest of these points.
            ends = fixed[1] + torch.exp(fixed[2]) * target.detach().unsqueeze(-1)

            def logit_cdf(u):
                log_cdf, log_sf, _ = self._mixture(u, fixed, density=False)
                return log_cdf - log_sf

            root = bisect_increasing(logit_cdf, target.detach(), tol=self._tol(z.dtype),
                                     lo=ends.amin(-1), hi=ends.amax(-1))
        log_cdf, log_sf, log_pdf = self._mixture(root, params)
        value = _normal_icdf_from_logs(log_cdf, log_sf)
        slope = torch.exp(log_pdf - _log_normal_pdf(z))  # d Phi^-1(F(u)) / du at the root
        u = implicit_step(root, value, slope, z)
        # Density at the differentiable u so the log-det carries its own gradients.
        _, _, log_pdf = self._mixture(u, params)
        y = self._reflect(u, self._unit_reflections().flip(0))
        return y, -(log_pdf - _log_normal_pdf(z)).sum(-1)


@register_flow("gaussianization")
def gaussianization(dim, num_layers, num_components, num_reflections):
    # The reflections inside each layer mix the coordinates: no permutations needed.
    return [Gaussianization(dim, num_components, num_reflections) for _ in range(num_layers)]
