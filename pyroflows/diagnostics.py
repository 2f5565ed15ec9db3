"""Importance-weight diagnostics for a fitted guide, on numpy arrays (both backends use them).

``log_weights`` are ``log p(x, z) - log q(z)`` for draws ``z ~ q``: their mean is the
ELBO, their log-mean-exp the importance-weighted bound, and the tail of the weights says
whether ``q`` covers ``p`` well enough for importance sampling to be trusted.

- ``psis_khat``: the shape of a generalised Pareto distribution fitted to the largest
  weights (Pareto-smoothed importance sampling; Vehtari, Simpson, Gelman, Yao & Gabry,
  arXiv:1507.02646). Below 0.5 the weights have finite variance; up to 0.7 the
  estimate is usable; above 0.7 ``q`` misses mass of ``p``. The fit is Zhang &
  Stephens' (2009) empirical-Bayes estimator with the weakly informative prior on the
  shape used by PSIS.
- ``ess``: Kish's effective sample size ``(sum w)^2 / sum w^2``.

Degenerate weights, and what each function returns for them:

- A log-weight of ``-inf`` is a draw where ``p`` has no mass (weight 0). It counts in
  ``n`` (the tail size ``M``, ``ess / n``), adds nothing to the weights' sums, is left
  out of the tail fit, and makes the ELBO (a plain mean) ``-inf``.
- Every log-weight ``-inf``: the guide puts all its mass where the model has none.
  ``psis_khat`` is ``inf`` and ``ess`` is ``0.0`` (the worst values, so a report that
  thresholds them flags the fit), ``log_mean_exp`` and the ELBO are ``-inf``.
- The ``M`` largest weights all equal (up to rounding): ``p / q`` is constant on the top
  of the weights, as for an exact guide. The exceedances are all equal and
  ``psis_khat`` is ``-inf``: a generalised Pareto distribution with all its mass at one
  point is the limit ``k -> -inf`` (the lightest tail there is). ArviZ's
  ``psislw``, R's loo and PSIS.jl report ``inf`` here instead, meaning "could not fit";
  we do not, because an exact guide would then be flagged as the worst.
- One to four weights above the cutoff (a tied top with a few weights clearly above
  it, or fewer than five draws with any weight at all): too short a tail to fit, and
  ``psis_khat`` is ``inf``, as in those libraries: a handful of draws carries the
  excess weight.
- ``NaN`` or ``+inf`` log-weights raise a ``ValueError``: ``log p`` or ``log q`` was not
  finite where it has to be.

Why our own and not a library's: ``benchmarks/libraries.py`` compares ``psis_khat`` with
arviz-stats' PSIS on the same draws (``benchmarks/results/libraries.md``). The two give the
same k-hat (the same estimator and prior; the tail sizes round differently at some ``n``),
ours is several times faster, and arviz-stats has no contract for the degenerate cases above
(it raises on tied weights, scores a single finite weight 0.048, returns NaN for NaN input)
and needs scipy.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["psis_khat", "ess", "log_mean_exp", "summarize_weights", "gpd_fit"]


def _as_log_weights(log_weights: ArrayLike) -> np.ndarray:
    lw = np.asarray(log_weights, dtype=float).reshape(-1)
    if lw.size < 2:
        raise ValueError(f"need at least 2 log-weights, got {lw.size}")
    if np.isnan(lw).any() or np.isposinf(lw).any():
        bad = "NaN" if np.isnan(lw).any() else "+inf"
        raise ValueError(
            f"log-weights contain {bad}: log p(x, z) or log q(z) was not finite for some draws; "
            "check the model's support and the guide"
        )
    return lw


def _logsumexp(a: np.ndarray) -> float:
    m = np.max(a)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(a - m))))


def log_mean_exp(log_weights: ArrayLike) -> float:
    """``log(mean(exp(log_weights)))``, without overflow: the importance-weighted bound.

    Args:
        log_weights: ``log p(x, z) - log q(z)`` for ``n >= 2`` draws; ``-inf`` entries allowed.

    Returns:
        The log of the mean weight; ``-inf`` when every log-weight is ``-inf``.

    Raises:
        ValueError: fewer than 2 log-weights, or a ``NaN`` or ``+inf`` among them.

    Example:
        >>> import numpy as np
        >>> round(log_mean_exp([0.0, np.log(3.0)]), 6)  # log((1 + 3) / 2)
        0.693147
        >>> log_mean_exp([1000.0, 1000.0])  # exp(1000) would overflow
        1000.0
    """
    lw = _as_log_weights(log_weights)
    return _logsumexp(lw) - math.log(lw.size)


def ess(log_weights: ArrayLike) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of the self-normalised weights.

    Computed on the raw weights (not on Pareto-smoothed ones), on the log scale so that
    large log-weights do not overflow.

    Args:
        log_weights: ``log p(x, z) - log q(z)`` for ``n >= 2`` draws; ``-inf`` entries (zero
            weights) allowed.

    Returns:
        Between 1 and ``n`` when some weight is positive; ``0.0`` when every log-weight is
        ``-inf`` (no draw has weight).

    Raises:
        ValueError: fewer than 2 log-weights, or a ``NaN`` or ``+inf`` among them.

    Example:
        >>> import numpy as np
        >>> ess([0.0, 0.0, 0.0, 0.0])  # equal weights: every draw counts
        4.0
        >>> ess([0.0, -np.inf]), ess([-np.inf, -np.inf])
        (1.0, 0.0)
    """
    lw = _as_log_weights(log_weights)
    if np.isneginf(lw).all():
        return 0.0
    return float(np.exp(2 * _logsumexp(lw) - _logsumexp(2 * lw)))


def gpd_fit(exceedances: ArrayLike) -> tuple[float, float]:
    """Shape ``k`` and scale ``sigma`` of a generalised Pareto fit to positive exceedances.

    Zhang & Stephens' empirical-Bayes estimator: a posterior mean of ``b = -k / sigma``
    over a grid of profile-likelihood values, then ``k = mean(log(1 - b x))``; the shape
    is shrunk towards 0.5 by a prior worth 10 observations, as in PSIS.

    Args:
        exceedances: positive values (the excess of the largest weights over a cutoff),
            at least 5 of them; any order.

    Returns:
        ``(k, sigma)``: the shape (after the prior) and the scale.

    References:
        Zhang, J. & Stephens, M. A. (2009). A new and efficient estimation method for the
        generalized Pareto distribution. Technometrics 51(3).

    Example:
        >>> import numpy as np
        >>> p = (np.arange(1000) + 0.5) / 1000
        >>> x = ((1 - p) ** -0.5 - 1) / 0.5  # quantiles of the GPD with k = 0.5, sigma = 1
        >>> [round(v, 2) for v in gpd_fit(x)]
        [0.5, 1.0]
    """
    x = np.sort(np.asarray(exceedances, dtype=float))
    n = x.size
    grid_size = 30 + int(math.sqrt(n))
    quartile = x[max(int(n / 4 + 0.5) - 1, 0)]
    b = (1 - np.sqrt(grid_size / (np.arange(1, grid_size + 1) - 0.5))) / (3 * quartile) + 1 / x[-1]
    k = np.mean(np.log1p(-b[:, None] * x[None, :]), axis=1)
    profile = n * (np.log(-b / k) - k - 1)
    weights = np.exp(profile - _logsumexp(profile))  # posterior weights of the grid points
    keep = weights >= 10 * np.finfo(float).eps
    weights, b = weights[keep], b[keep]
    b_hat = np.sum(b * weights / weights.sum())
    k_hat = float(np.mean(np.log1p(-b_hat * x)))
    sigma = -k_hat / b_hat
    prior_n = 10
    k_hat = (n * k_hat + prior_n * 0.5) / (n + prior_n)
    return k_hat, float(sigma)


# Log-weights within this of the largest, relative to its size, tie: rounding leaves an
# exact guide's log-weights that close in float32 (a few units in the last place) and
# float64.
_TIE_RTOL = 1e-6


def psis_khat(log_weights: ArrayLike) -> float:
    """Pareto k-hat of importance weights given on the log scale (PSIS diagnostic).

    The tail is the ``M = ceil(min(n / 5, 3 sqrt(n)))`` largest weights; their
    exceedances over the next-largest weight are fitted by ``gpd_fit``. Needs at least
    a few hundred draws to be meaningful.

    Args:
        log_weights: ``log p(x, z) - log q(z)`` for ``n >= 25`` draws ``z ~ q``; ``-inf``
            entries (draws outside the model's support) are allowed, and when all are
            ``-inf`` any ``n >= 2`` gives ``inf``.

    Returns:
        The shape estimate; ``inf`` when every log-weight is ``-inf`` or when only one to
        four weights stand above a tie, ``-inf`` when the ``M`` largest weights tie
        (equal to within a relative ``1e-6`` on the log scale; see the module docstring).

    Raises:
        ValueError: fewer than 25 log-weights (some of them finite), or a ``NaN`` or
            ``+inf`` among them.

    References:
        Vehtari, A., Simpson, D., Gelman, A., Yao, Y. & Gabry, J. Pareto smoothed importance
        sampling. arXiv:1507.02646. The comparison with arviz-stats:
        ``benchmarks/results/libraries.md``.

    Example:
        >>> import numpy as np
        >>> p = (np.arange(1000) + 0.5) / 1000
        >>> round(psis_khat(np.log((1 - p) ** -0.5)), 1)  # Pareto weights with tail shape 0.5
        0.5
        >>> psis_khat(np.full(100, -2.0)), psis_khat(np.full(100, -np.inf))  # exact guide; no weight
        (-inf, inf)
    """
    lw = _as_log_weights(log_weights)
    top = lw.max()
    if top == -math.inf:
        return math.inf  # no draw has weight: q puts its mass where p has none
    n = lw.size
    tail = int(math.ceil(min(0.2 * n, 3 * math.sqrt(n))))
    if n < 25:  # 21 to 24 draws would give a tail of 5, but from fewer than 5 draws above a cutoff each
        raise ValueError(
            f"psis_khat needs at least 25 log-weights to fit a tail, got {n}; draw more samples "
            "(k-hat is reliable from a few hundred)"
        )
    lw = np.sort(lw - top)
    if -lw[-tail] <= _TIE_RTOL * max(1.0, abs(top)):
        return -math.inf  # the M largest weights tie: equal exceedances, the lightest tail
    cutoff = lw[-tail - 1]  # -inf when fewer than M + 1 draws have weight: the tail is theirs
    exceed = np.exp(lw[-tail:]) - np.exp(cutoff)
    exceed = exceed[exceed > 0]  # weights tied with the cutoff, and zero weights, add no tail
    if exceed.size < 5:
        return math.inf  # too few distinct large weights to fit: a handful carries the excess
    return gpd_fit(exceed)[0]


def summarize_weights(log_weights: ArrayLike) -> dict[str, float]:
    """ELBO, importance-weighted ELBO, k-hat, ESS and ESS / n from one set of log-weights.

    Args:
        log_weights: ``log p(x, z) - log q(z)`` for ``n >= 2`` draws ``z ~ q``.

    Returns:
        ``elbo`` (mean), ``iwelbo`` (log-mean-exp), ``ess``, ``ess_fraction``,
        ``khat`` and ``num_samples``. ``ess`` is never NaN: ``0.0`` when every
        log-weight is ``-inf`` (then ``khat`` is ``inf`` and both bounds ``-inf``).
        ``khat`` is NaN for fewer than 25 draws (too few to fit a tail) unless no
        draw has weight.

    Raises:
        ValueError: fewer than 2 log-weights, or a ``NaN`` or ``+inf`` among them.

    Example:
        >>> import numpy as np
        >>> out = summarize_weights(np.full(100, -1.5))  # an exact guide, log Z = -1.5
        >>> out["elbo"], out["iwelbo"], round(out["ess_fraction"], 6), out["khat"]
        (-1.5, -1.5, 1.0, -inf)
    """
    lw = _as_log_weights(log_weights)
    n = lw.size
    out = {"elbo": float(np.mean(lw)), "iwelbo": log_mean_exp(lw), "ess": ess(lw), "num_samples": n}
    out["ess_fraction"] = out["ess"] / n
    out["khat"] = psis_khat(lw) if n >= 25 or np.isneginf(lw).all() else float("nan")
    return out
