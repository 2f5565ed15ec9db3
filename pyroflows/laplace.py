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
"""

from __future__ import annotations

import numpy as np

__all__ = ["LAPLACE", "find_mode", "laplace_scale_tril"]

LAPLACE = "laplace"
_FIX = "; start from a float init_scale instead (e.g. init_scale=0.1), or a better init_loc_fn"


def _finite(value) -> bool:
    return bool(np.all(np.isfinite(value)))


def find_mode(potential_and_grad, hessian, x0, *, max_steps: int = 200, tol: float = 1e-10, caller: str = "AutoFlow"):
    """The minimiser of ``U`` started at ``x0``, and the Hessian there: ``(mode, H)``.

    ``potential_and_grad(x) -> (U(x), grad U(x))`` and ``hessian(x) -> H(x)`` take and
    return float64 numpy arrays (``U`` may be ``inf`` or ``nan`` where the density is 0
    or undefined: the line search backs off). ``tol`` is relative to ``1 + |U|``.
    Raises ``ValueError`` naming the problem when ``U`` is not finite at ``x0``, when no
    minimum is reached in ``max_steps`` Newton steps (an improper posterior, or a funnel
    whose density grows without bound), or when the Hessian at the minimum is not
    positive definite.
    """
    x = np.asarray(x0, dtype=float).copy()
    f, g = potential_and_grad(x)
    if not (_finite(f) and _finite(g)):
        raise ValueError(
            f"{caller}(init_scale='laplace'): log p(x, z) or its gradient is not finite at the init_loc_fn point{_FIX}"
        )
    decrement, taken = np.inf, 0
    for taken in range(1, max_steps + 1):
        h = hessian(x)
        if not _finite(h):
            raise ValueError(f"{caller}(init_scale='laplace'): the Hessian of log p(x, z) is not finite at {x}{_FIX}")
        w, v = np.linalg.eigh((h + h.T) / 2)
        floor = 1e-12 * max(np.abs(w).max(), 1.0)
        direction = -v @ ((v.T @ g) / np.maximum(np.abs(w), floor))
        decrement = float(-g @ direction)
        if decrement / 2 <= tol * (1 + abs(f)) and w.min() > 0:
            # one more full step squares the error, and costs one Hessian
            polished = x + direction
            f_new, g_new = potential_and_grad(polished)
            if _finite(f_new) and _finite(g_new) and f_new <= f:
                h_new = hessian(polished)
                if _finite(h_new):
                    return polished, h_new
            return x, h
        step = 1.0
        while step > 1e-12:
            x_new = x + step * direction
            f_new, g_new = potential_and_grad(x_new)
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


def laplace_scale_tril(hessian, caller: str = "AutoFlow") -> np.ndarray:
    """The lower Cholesky factor ``L`` of ``H^-1`` (``L L^T = H^-1``), the Laplace covariance."""
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
