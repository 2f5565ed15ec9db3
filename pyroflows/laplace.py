"""The backend-neutral half of ``AutoFlow(init_scale="laplace")``: the posterior mode and
the Laplace approximation ``N(mode, H^-1)`` of an unconstrained log-density.

Both backends hand in the potential ``U(z) = -log p(x, z)`` (with its gradient) and its
Hessian as functions of a float64 numpy vector; the search below is plain numpy, so it
runs the same steps on either backend.

The search is Newton's method with the Hessian's eigenvalues replaced by their absolute
values (so every step goes downhill, also from a point where ``U`` is not convex;
Dauphin et al. 2014, arXiv:1406.2572) and an Armijo backtracking line search (Nocedal &
Wright, *Numerical Optimization*, 2nd ed., ch. 3). It stops when the Newton decrement
``g^T H^-1 g / 2``, the predicted distance to the minimum in nats, is below ``tol``.

Why our own and not scipy's trust-region Newton methods: ``benchmarks/libraries.py``
compares ``find_mode`` with ``scipy.optimize.minimize`` (``trust-exact``, ``trust-krylov``,
``trust-ncg``) on the same callbacks (``benchmarks/results/libraries.md``). Where a mode
exists, ours reaches it as precisely in as few Hessians and less time; trust-krylov and
trust-ncg report failure on logistic regressions whose mode they found; every scipy method
stops at a trial point where the density is undefined (NaN) or where the model raises, which
this search backs off from; and scipy would be a new runtime dependency.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import warnings
from collections.abc import Callable

import numpy as np

__all__ = [
    "AUTO",
    "LAPLACE",
    "MAX_LAPLACE_DIM",
    "LAPLACE_KHAT_LIMIT",
    "LAPLACE_LOG_WEIGHT_SD_LIMIT",
    "LAPLACE_CONDITION_LIMIT",
    "Start",
    "check_init_scale",
    "choose_start",
    "find_mode",
    "laplace_scale_tril",
]

AUTO = "auto"
LAPLACE = "laplace"
# A dense Hessian costs D backward passes and D^2 memory; above this "auto" skips it.
MAX_LAPLACE_DIM = 1000
# "auto" rejects the Laplace approximation N(mode, H^-1) as the neck of a funnel (a finite
# "mode" whose Hessian degenerates: e^40 against 0.1 for Neal's funnel in 10 dimensions)
# when all three exceed these: the PSIS k-hat of its importance weights, their sd, and the
# condition number of H. Neither weight statistic is enough alone: posteriordb's
# eight_schools has a Laplace k-hat of 1.2 and a log-weight sd of 185 nats, and is still a
# good start (condition number below 1e3).
LAPLACE_KHAT_LIMIT = 0.7
LAPLACE_LOG_WEIGHT_SD_LIMIT = 20.0
LAPLACE_CONDITION_LIMIT = 1e8
# The isotropic scale where no curvature is known (the start of the first release).
_ISOTROPIC_SCALE = 0.1
_FIX = "; start from a float init_scale instead (e.g. init_scale=0.1), or a better init_loc_fn"
_logger = logging.getLogger("pyroflows")


def _finite(value) -> bool:
    return bool(np.all(np.isfinite(value)))


def check_init_scale(init_scale: str | float, caller: str = "AutoFlow", bound: float = 5.0) -> str | float:
    """``init_scale`` as a float, or one of the strings ``"auto"`` and ``"laplace"``.

    Args:
        init_scale: the guide's starting scale (in the unconstrained space), ``"auto"`` or ``"laplace"``.
        caller: the name that starts the error message.
        bound: the bound of the guide's soft-clamped log-scale; a float must lie in ``(e^-bound, e^bound)``.

    Returns:
        The validated value: the string, or the number as a float.

    Raises:
        ValueError: a string other than the two, a non-finite, non-positive or boolean number, or a
            scale the bounded log-scale cannot reach.

    Example:
        >>> check_init_scale("auto"), check_init_scale(1)
        ('auto', 1.0)
        >>> check_init_scale(0.0)
        Traceback (most recent call last):
        ...
        ValueError: AutoFlow: init_scale=0.0 must be 'auto', 'laplace' or a positive float
    """
    if isinstance(init_scale, str):
        if init_scale not in (AUTO, LAPLACE):
            raise ValueError(f"{caller}: init_scale={init_scale!r} must be 'auto', 'laplace' or a positive float")
        return init_scale
    if (
        isinstance(init_scale, bool)
        or not isinstance(init_scale, numbers.Real)
        or not (math.isfinite(init_scale) and init_scale > 0)
    ):
        raise ValueError(f"{caller}: init_scale={init_scale!r} must be 'auto', 'laplace' or a positive float")
    if not abs(math.log(init_scale)) < bound:
        raise ValueError(
            f"{caller}: init_scale={init_scale!r} must lie in ({math.exp(-bound):.4g}, {math.exp(bound):.4g}): "
            f"the final affine layer's log-scale is bounded by {bound:g}"
        )
    return float(init_scale)


@dataclasses.dataclass
class Start:
    """Where a guide starts: ``N(loc, scale_tril scale_tril^T)`` in the unconstrained space.

    Attributes:
        kind: ``"laplace"`` (mode and ``chol(H^-1)``), ``"diagonal"`` (the ``init_loc_fn``
            point and ``1/sqrt(H_ii)`` there), or ``"isotropic"`` (that point, a float scale).
        loc: the start's centre, float64, shape ``(D,)``.
        scale_tril: lower-triangular ``(D, D)`` float64, or None for the isotropic start
            (the guide's affine layer then carries ``scale``; no ``D x D`` matrix, so it
            suits models of any size).
        message: one line that says which start was taken and why.
        scale: the isotropic start's scale (unused otherwise).
    """

    kind: str
    loc: np.ndarray
    scale_tril: np.ndarray | None
    message: str
    scale: float = 0.1


def _safely(fn: Callable, *args):
    """``fn(*args)``, with a model's own error at an extreme point read as zero density.

    The line search probes points where a model's distributions may reject their
    parameters (Pyro's validation of a scale that underflowed to 0): that is a point to
    back off from, not a reason to stop.
    """
    try:
        return fn(*args)
    except (ValueError, RuntimeError, FloatingPointError, OverflowError, ZeroDivisionError):
        return None


def choose_start(
    init_scale: str | float,
    potential_and_grad: Callable,
    hessian: Callable,
    potentials: Callable,
    x0: np.ndarray,
    *,
    eps: float = float(np.finfo(float).eps),
    caller: str = "AutoFlow",
    num_draws: int = 256,
    seed: int = 0,
) -> Start:
    """The guide's start for ``init_scale`` (``"auto"``, ``"laplace"`` or a float).

    ``"laplace"``: the Laplace approximation ``N(mode, H^-1)`` (``find_mode``) under the
    same checks, or a ValueError that names the failed one. ``"auto"``: the Laplace
    approximation when the mode search finds a mode with a positive-definite Hessian (in
    ``D <= MAX_LAPLACE_DIM`` dimensions) and ``num_draws`` draws from it, weighted by the
    posterior, do not exceed all of ``LAPLACE_KHAT_LIMIT`` (their PSIS k-hat),
    ``LAPLACE_LOG_WEIGHT_SD_LIMIT`` (their sd, in nats) and ``LAPLACE_CONDITION_LIMIT`` (the
    condition number of ``H``), which together mark the neck of a funnel; else the
    diagonal of the Hessian at ``x0`` (``scale_i = 1/sqrt(H_ii)``, which suits coordinates
    of different scales, a funnel's included); else an isotropic scale 0.1 at ``x0``. A fallback is reported by a
    ``UserWarning`` carrying the one-line ``Start.message``.

    Args:
        init_scale: ``"auto"``, ``"laplace"`` or a float (returned as an isotropic start).
        potential_and_grad: ``x -> (U(x), grad U(x))``, ``U = -log p(x, z)``, float64 numpy in and out.
        hessian: ``x -> H(x)``, float64 numpy.
        potentials: ``(n, D) -> (n,)`` values of ``U`` at many points (NaN/inf allowed).
        x0: the ``init_loc_fn`` point, shape ``(D,)``.
        eps: the machine epsilon of the model's dtype; the mode search's tolerance follows it.
        caller: the name in messages.
        num_draws: draws from the Laplace approximation for its k-hat.
        seed: seed of those draws.

    Returns:
        A ``Start``.

    Raises:
        ValueError: ``init_scale="laplace"`` and no mode was found, its Hessian is not
            positive definite, or the mode looks like the neck of a funnel (the message
            names which, and the fix); ``"auto"`` falls back instead. An error the model
            raises at ``x0`` itself is passed on for either.

    Example:
        >>> import numpy as np
        >>> fg = lambda x: (float((x[0] - 3.0) ** 2), np.array([2 * (x[0] - 3.0)]))  # N(3, 1/2)
        >>> hessian = lambda x: np.array([[2.0]])
        >>> potentials = lambda xs: (xs[:, 0] - 3.0) ** 2
        >>> start = choose_start("auto", fg, hessian, potentials, np.zeros(1))
        >>> start.kind, start.loc, start.scale_tril.round(4)
        ('laplace', array([3.]), array([[0.7071]]))
        >>> choose_start(0.1, fg, hessian, potentials, np.zeros(1)).kind
        'isotropic'
    """
    from .diagnostics import psis_khat  # diagnostics imports nothing from here

    x0 = np.asarray(x0, dtype=float)
    dim = x0.size
    if not isinstance(init_scale, str):
        message = f"{caller}: started at the init_loc_fn point with scale {init_scale:g}"
        return Start("isotropic", x0, None, message, float(init_scale))
    tol = max(1e-10, 10 * eps)
    if init_scale == AUTO and dim > MAX_LAPLACE_DIM:
        why = f"{dim} latent dimensions are more than the {MAX_LAPLACE_DIM} a dense Hessian is computed for"
        return _fallback(None, x0, why, caller)
    try:
        mode, h = find_mode(potential_and_grad, hessian, x0, caller=caller, tol=tol)
        scale_tril = laplace_scale_tril(h, caller)
    except ValueError as e:
        if init_scale == LAPLACE:
            raise
        return _fallback(hessian, x0, str(e).split(": ", 1)[-1].split(_FIX)[0], caller)
    draws = mode + np.random.default_rng(seed).standard_normal((num_draws, dim)) @ scale_tril.T
    log_q = -0.5 * np.sum(np.linalg.solve(scale_tril, (draws - mode).T) ** 2, axis=0)
    with np.errstate(all="ignore"):
        log_p = -np.asarray(potentials(draws), dtype=float)
    log_w = np.where(np.isnan(log_p), -np.inf, log_p) - log_q
    finite = log_w[np.isfinite(log_w)]
    # an infinite density at a draw (U = -inf) is the worst tail there is, not an error
    khat = psis_khat(log_w) if finite.size and not np.isposinf(log_w).any() else math.inf
    spread = float(finite.std()) if finite.size > 1 else math.inf
    eig = np.linalg.eigvalsh((h + h.T) / 2)
    condition = float(eig.max() / eig.min())
    if not (khat < LAPLACE_KHAT_LIMIT or spread < LAPLACE_LOG_WEIGHT_SD_LIMIT or condition < LAPLACE_CONDITION_LIMIT):
        why = (
            f"the mode found looks like the neck of a funnel, such as a centred hierarchical model: the Hessian "
            f"there is degenerate (condition number {condition:.3g}) and the Laplace approximation fits the "
            f"posterior badly (PSIS k-hat {khat:.2f}, log-weight sd {spread:.3g} nats)"
        )
        if init_scale == LAPLACE:
            raise ValueError(f"{caller}(init_scale='laplace'): {why}{_FIX}")
        return _fallback(hessian, x0, why, caller)
    message = f"{caller}: Laplace start N(mode, H^-1) (PSIS k-hat of the Laplace approximation {khat:.2f})"
    _logger.info(message)
    return Start("laplace", mode, scale_tril, message)


def _fallback(hessian, x0, why: str, caller: str) -> Start:
    diag = None
    if hessian is not None:
        h = _safely(hessian, x0)
        if h is not None and _finite(h):
            diag = np.diagonal(np.asarray(h, dtype=float))
    if diag is not None and np.any(diag > 0):
        # coordinates without curvature at x0 take the isotropic scale
        scale = np.where(diag > 0, 1 / np.sqrt(np.where(diag > 0, diag, 1.0)), _ISOTROPIC_SCALE)
        scale = np.clip(scale, 1e-4, 1e4)
        kind, how = "diagonal", "the init_loc_fn point with scales 1/sqrt(H_ii) from the Hessian there"
        scale_tril = np.diag(scale)
    else:
        kind, how = "isotropic", f"the init_loc_fn point with scale {_ISOTROPIC_SCALE:g}"
        scale_tril = None
    message = f"{caller}(init_scale='auto'): no Laplace start ({why}); started at {how}"
    warnings.warn(message, UserWarning, stacklevel=4)
    return Start(kind, x0, scale_tril, message, _ISOTROPIC_SCALE)


def find_mode(
    potential_and_grad: Callable,
    hessian: Callable,
    x0: np.ndarray,
    *,
    max_steps: int = 200,
    tol: float = 1e-10,
    caller: str = "AutoFlow",
) -> tuple[np.ndarray, np.ndarray]:
    """The minimiser of ``U`` started at ``x0``, and the Hessian there: ``(mode, H)``.

    Newton steps on ``|H|`` (the Hessian with its eigenvalues made positive) with an
    Armijo backtracking line search, until the Newton decrement is below ``tol``; then
    one more full step.

    Args:
        potential_and_grad: ``x -> (U(x), grad U(x))``, float64 numpy in and out. ``U`` may
            be ``inf`` or ``nan``, or the call may raise ``ValueError``/``RuntimeError``,
            where the density is 0 or undefined: the line search backs off.
        hessian: ``x -> H(x)``, float64 numpy.
        x0: the start, shape ``(D,)``.
        max_steps: the most Newton steps.
        tol: the stopping tolerance on the Newton decrement, relative to ``1 + |U|``.
        caller: the name that starts error messages.

    Returns:
        ``(mode, H)``: the minimiser and the Hessian there, float64.

    Raises:
        ValueError: ``U`` or its gradient is not finite at ``x0``, the Hessian is not
            finite at an iterate, it is not positive definite at a stationary point (a flat
            direction or a saddle), or no minimum is reached in ``max_steps`` Newton steps (an
            improper posterior, or a funnel whose density grows without bound). Each
            message names the problem and the fix.

    Note:
        A density that approaches its supremum without reaching it (separable logistic
        data under a flat prior) is returned as a "mode" once ``U`` is within ``tol`` of
        that supremum, far out along the ray, as scipy's trust-region methods do too;
        ``choose_start``'s checks do not reject it either
        (``benchmarks/results/libraries.md``).

    References:
        Dauphin, Y. et al. (2014). Identifying and attacking the saddle point problem in
        high-dimensional non-convex optimization. arXiv:1406.2572. Nocedal, J. & Wright,
        S. J. (2006). Numerical Optimization, 2nd ed., ch. 3.

    Example:
        >>> import numpy as np
        >>> def fg(x):  # U = x - log x, a Gamma(2, 1) density negated: NaN for x <= 0
        ...     with np.errstate(invalid="ignore"):
        ...         return float(x[0] - np.log(x[0])), np.array([1 - 1 / x[0]])
        >>> # the first full Newton step from 10 lands at -80: the line search backs off
        >>> mode, h = find_mode(fg, lambda x: np.array([[1 / x[0] ** 2]]), np.array([10.0]))
        >>> mode.round(10), h.round(10)
        (array([1.]), array([[1.]]))
    """
    x = np.asarray(x0, dtype=float).copy()
    f, g = potential_and_grad(x)  # the model's own errors at its start point are the user's to see
    if not (_finite(f) and _finite(g)):
        raise ValueError(
            f"{caller}(init_scale='laplace'): log p(x, z) or its gradient is not finite at the init_loc_fn point{_FIX}"
        )
    decrement, taken = np.inf, 0
    for taken in range(1, max_steps + 1):  # noqa: B007 (read after the loop)
        h = _safely(hessian, x)
        if h is None or not _finite(h):
            raise ValueError(f"{caller}(init_scale='laplace'): the Hessian of log p(x, z) is not finite at {x}{_FIX}")
        w, v = np.linalg.eigh((h + h.T) / 2)
        floor = 1e-12 * max(np.abs(w).max(), 1.0)
        direction = -v @ ((v.T @ g) / np.maximum(np.abs(w), floor))
        decrement = float(-g @ direction)
        if decrement / 2 <= tol * (1 + abs(f)) and not w.min() > 0:
            raise ValueError(
                f"{caller}(init_scale='laplace'): log p(x, z) is flat (or has a saddle) at its stationary point "
                f"{x}: the Hessian of -log p there is not positive definite (smallest eigenvalue {w.min():.3g}), "
                f"so there is no Laplace approximation; a parameter may be unidentified or have a flat prior{_FIX}"
            )
        if decrement / 2 <= tol * (1 + abs(f)):
            # one more full step squares the error, and costs one Hessian
            polished = x + direction
            f_new, g_new = _safely(potential_and_grad, polished) or (np.nan, np.nan)
            if _finite(f_new) and _finite(g_new) and f_new <= f:
                h_new = _safely(hessian, polished)
                if h_new is not None and _finite(h_new):
                    return polished, h_new
            return x, h
        step = 1.0
        while step > 1e-12:
            x_new = x + step * direction
            f_new, g_new = _safely(potential_and_grad, x_new) or (np.nan, np.nan)
            if _finite(f_new) and _finite(g_new) and f_new <= f - 1e-4 * step * decrement:
                break
            step /= 2
        else:
            # no decrease left at the arithmetic's resolution: a minimum if H is positive there
            if w.min() > 0 and decrement / 2 <= np.sqrt(tol) * (1 + abs(f)):
                return x, h
            break
        x, f, g = x_new, f_new, g_new
    raise ValueError(
        f"{caller}(init_scale='laplace'): found no posterior mode after {taken} Newton steps "
        f"(log p = {-f:.6g}, Newton decrement {decrement:.3g}): the log-density may grow without bound "
        f"(an improper posterior, or a funnel such as a centred hierarchical model){_FIX}"
    )


def laplace_scale_tril(hessian: np.ndarray, caller: str = "AutoFlow") -> np.ndarray:
    """The lower Cholesky factor ``L`` of ``H^-1`` (``L L^T = H^-1``), the Laplace covariance.

    Args:
        hessian: ``H``, the Hessian of ``-log p`` at the mode, ``(D, D)`` (symmetrised here).
        caller: the name that starts the error message.

    Returns:
        ``L``, lower triangular with a positive diagonal, float64.

    Raises:
        ValueError: ``H`` is not positive definite (the message gives its smallest eigenvalue).

    Example:
        >>> import numpy as np
        >>> laplace_scale_tril(np.diag([4.0, 0.25]))
        array([[0.5, 0. ],
               [0. , 2. ]])
    """
    h = np.asarray(hessian, dtype=float)
    h = (h + h.T) / 2
    w = np.linalg.eigvalsh(h)
    if not w.min() > 0:
        raise ValueError(
            f"{caller}(init_scale='laplace'): the Hessian of -log p(x, z) at the mode is not positive definite "
            f"(smallest eigenvalue {w.min():.3g}){_FIX}"
        )
    cov = np.linalg.inv(h)
    return np.linalg.cholesky((cov + cov.T) / 2)
