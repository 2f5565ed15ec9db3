"""JAX mirror of ``pyroflows.torch.transforms.gdn``: generalised divisive normalisation (GDN).

Normalising is the data-to-noise direction (``inverse_and_ladj``); the forward (noise to
data) is solved. The torch module gives the maths and why the map is a bijection.

References:
    Balle, Laparra & Simoncelli 2016, "Density modeling of images using a generalized
    normalization transformation", arXiv:1511.06281.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ...structure import GDN_VARIANTS, gdn_initial_parameters
from ..flows import register_flow
from .base import ElementwiseAffine, FlowTransform, bisect_increasing, implicit_step
from .glow import InvertibleLinear

__all__ = ["GDN"]

VARIANTS = GDN_VARIANTS


def _log_softplus(x):
    """``log(softplus(x))`` without underflow to ``-inf`` for very negative ``x``."""
    return jnp.where(x > -30.0, jnp.log(jax.nn.softplus(jnp.maximum(x, -30.0))), x)


class GDN(FlowTransform):
    """Generalised divisive normalisation: JAX mirror of ``pyroflows.torch.transforms.GDN``.

    The same map, parameters, log-determinant and solvers as torch, whose docstring gives
    the maths (here the dense log-determinant uses ``jnp.linalg.slogdet``, and the dense
    Newton solve runs in a ``lax.while_loop`` on stopped gradients). Unlike torch, which
    raises ``RuntimeError`` when ``max_newton_steps = 100`` Newton steps fall short, the JAX
    layer cannot raise under ``jit``: it returns the last iterate (then refined by the
    implicit step), and a step that would leave the finite range is not taken, so finite
    input gives finite output. ``newton_steps(y)`` reports how many steps a point needed.

    Args:
        dim: size of the vectors.
        variant: ``"diagonal"`` (``gamma`` diagonal, coordinates normalised separately) or
            ``"dense"`` (every coordinate's energy enters every denominator).
        max_exponent: upper bound on ``eps``, in ``(0, 1/2)``.
        beta_min: lower bound on ``beta``.

    Raises:
        ValueError: an unknown variant, or ``max_exponent`` outside ``(0, 1/2)``.

    Example:
        >>> layer = GDN(2, variant="dense")
        >>> y, ildj = layer.inverse_and_ladj(jnp.array([0.5, -1.0]))  # data -> noise, closed form
        >>> z, ladj = layer.call_and_ladj(y)  # noise -> data, solved by Newton's method
        >>> [round(float(v), 4) for v in z], abs(round(float(ladj + ildj), 4)), int(layer.newton_steps(y)) < 10
        ([0.5, -1.0], 0.0, True)
    """

    numerical_inverse: ClassVar[bool] = True
    inverse_tol: ClassVar[float] = 1e-10
    max_newton_steps: ClassVar[int] = 100

    unconstrained_beta: jax.Array
    unconstrained_gamma: jax.Array
    unconstrained_exponent: jax.Array
    variant: str = eqx.field(static=True)
    max_exponent: float = eqx.field(static=True)
    beta_min: float = eqx.field(static=True)

    def __init__(self, dim: int, variant: str = "diagonal", max_exponent: float = 0.4, beta_min: float = 1e-3):
        beta, gamma, exponent = gdn_initial_parameters(dim, variant, max_exponent, beta_min)  # checks too
        self.dim = int(dim)
        self.variant = variant
        self.max_exponent = float(max_exponent)
        self.beta_min = float(beta_min)
        self.unconstrained_beta = jnp.asarray(beta, dtype=float)
        self.unconstrained_gamma = jnp.asarray(gamma, dtype=float)
        self.unconstrained_exponent = jnp.asarray(exponent, dtype=float)

    # --- parameters --------------------------------------------------------------------
    def beta(self) -> jax.Array:
        """``beta = beta_min + softplus(.)``, shape ``(dim,)``.

        Example:
            >>> [round(float(v), 4) for v in GDN(2).beta()]
            [1.0, 1.0]
        """
        return self.beta_min + jax.nn.softplus(self.unconstrained_beta)

    def gamma(self) -> jax.Array:
        """``gamma`` as a vector (diagonal variant) or a ``dim x dim`` matrix (dense).

        Example:
            >>> GDN(2).gamma().shape, GDN(2, variant="dense").gamma().shape
            ((2,), (2, 2))
        """
        return jax.nn.softplus(self.unconstrained_gamma)

    def exponent(self) -> jax.Array:
        """``eps = max_exponent * sigmoid(.)``, shape ``(dim,)``, in ``(0, max_exponent)``.

        Example:
            >>> [round(float(v), 4) for v in GDN(2, max_exponent=0.4).exponent()]
            [0.1, 0.1]
        """
        return self.max_exponent * jax.nn.sigmoid(self.unconstrained_exponent)

    def _tol(self, dtype):
        return max(self.inverse_tol, 8 * float(jnp.finfo(dtype).eps))

    # --- data to noise -----------------------------------------------------------------
    def _denominator(self, z, beta, gamma):
        """``z / m``, ``D / m^2`` and ``log D`` with ``m = max(1, max |z|)``: no overflow for huge ``z``."""
        if self.variant == "diagonal":
            m = jnp.maximum(jnp.abs(jax.lax.stop_gradient(z)), 1.0)
            zs = z / m
            inner = beta / (m * m) + gamma * zs * zs
        else:
            m = jnp.maximum(jnp.abs(jax.lax.stop_gradient(z)).max(), 1.0)
            zs = z / m
            inner = beta / (m * m) + gamma @ (zs * zs)
        return zs, inner, 2 * jnp.log(m) + jnp.log(inner)

    @staticmethod
    def _log_slopes(zs, inner, gamma, eps):
        """Diagonal variant: ``log dy_i/dz_i = -eps log D + log(beta + (1 - 2 eps) gamma z^2) - log D``."""
        return jnp.log(inner - 2 * eps * gamma * zs * zs) - jnp.log(inner)

    @staticmethod
    def _i_minus_m(zs, inner, gamma, eps):
        """``I - M`` with ``M_ik = 2 eps_i z_i gamma_ik z_k / D_i`` (the scale ``m^2`` cancels)."""
        m = (2 * eps * zs / inner)[:, None] * gamma * zs[None, :]
        return jnp.eye(zs.shape[-1], dtype=zs.dtype) - m

    def _normalise(self, z, beta, gamma, eps, with_ladj=True):
        """``y = z D^-eps`` and ``log|det dy/dz|`` in closed form (``None`` unless ``with_ladj``)."""
        zs, inner, log_d = self._denominator(z, beta, gamma)
        y = z * jnp.exp(-eps * log_d)
        if not with_ladj:
            return y, None
        if self.variant == "diagonal":
            return y, (-eps * log_d + self._log_slopes(zs, inner, gamma, eps)).sum()
        return y, (-eps * log_d).sum() + jnp.linalg.slogdet(self._i_minus_m(zs, inner, gamma, eps))[1]

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Data to noise in closed form, ``z_i / D_i^eps_i`` of the data ``z``, with its log-determinant."""
        return self._normalise(y, self.beta(), self.gamma(), self.exponent())

    # --- noise to data -----------------------------------------------------------------
    def _log_magnitudes(self, y):
        """The solver's inputs, all detached: ``log|y|`` (floored), ``log beta``, ``log gamma``, ``eps``."""
        y = jax.lax.stop_gradient(y)
        # Floored so that y = 0 gives z = sign(0) e^w = 0 without -inf.
        log_y = jnp.log(jnp.maximum(jnp.abs(y), float(jnp.finfo(y.dtype).tiny)))
        eps = jax.lax.stop_gradient(self.exponent())
        log_beta = jnp.log(jax.lax.stop_gradient(self.beta()))
        log_gamma = _log_softplus(jax.lax.stop_gradient(self.unconstrained_gamma))
        return log_y, log_beta, log_gamma, eps

    def call_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Noise to data, solved in log-magnitudes (bisection or Newton), with its log-determinant."""
        beta, gamma, eps = self.beta(), self.gamma(), self.exponent()
        tol = self._tol(y.dtype)
        log_y, log_beta, log_gamma, e = self._log_magnitudes(y)
        if self.variant == "diagonal":
            w = self._solve_diagonal(log_y, log_beta, log_gamma, e, tol)
        else:
            w = self._solve_dense(log_y, log_beta, log_gamma, e, tol)[0]
        root = jax.lax.stop_gradient(jnp.sign(y) * jnp.exp(w))
        # The Jacobian at the root, detached, for one implicit Newton step.
        b, g = jax.lax.stop_gradient(beta), jax.lax.stop_gradient(gamma)
        zs, inner, log_d = self._denominator(root, b, g)
        value, _ = self._normalise(root, beta, gamma, eps, with_ladj=False)
        if self.variant == "diagonal":
            slope = jnp.exp(-e * log_d + self._log_slopes(zs, inner, g, e))
            z = implicit_step(root, value, slope, y)
        else:
            # z = z* - J^-1 (f(z*) - y) with J = diag(s) (I - M) detached: exact first derivatives.
            i_minus_m, s = self._i_minus_m(zs, inner, g, e), jnp.exp(-e * log_d)
            z = root - jnp.linalg.solve(i_minus_m, (value - y) / s)
        _, ladj = self._normalise(z, beta, gamma, eps)
        return z, -ladj

    def newton_steps(self, y: jax.Array) -> jax.Array:
        """Dense variant: how many Newton steps the forward solve took for ``y`` (one vector).

        Args:
            y: one noise vector, shape ``(dim,)``.

        Returns:
            The integer step count.

        Raises:
            ValueError: the diagonal variant (which bisects).

        Example:
            >>> import jax.numpy as jnp
            >>> int(GDN(2, variant="dense").newton_steps(jnp.ones(2))) < 10
            True
        """
        if self.variant != "dense":
            raise ValueError("newton_steps is for the dense variant (the diagonal one bisects)")
        return self._solve_dense(*self._log_magnitudes(y), self._tol(y.dtype))[1]

    @staticmethod
    def _solve_diagonal(log_y, log_beta, log_gamma, eps, tol):
        def phi(args, w):  # w - eps log D(e^w): increasing, slope in [1 - 2 eps, 1]
            log_beta, log_gamma, eps = args
            return w - eps * jnp.logaddexp(log_beta, log_gamma + 2 * w)

        gap = eps * jnp.logaddexp(log_beta, log_gamma + 2 * log_y)  # log_y - phi(log_y)
        stretched = gap / (1 - 2 * eps)
        lo = log_y + jnp.minimum(gap, stretched)
        hi = log_y + jnp.maximum(gap, stretched)
        return bisect_increasing(phi, (log_beta, log_gamma, eps), log_y, tol=tol, lo=lo, hi=hi)

    def _solve_dense(self, log_y, log_beta, log_gamma, eps, tol):
        """Newton's method for ``w``; returns ``(w, steps taken)``. Inputs are detached."""
        # One fixed-point step with the diagonal of gamma: the diagonal variant's estimate.
        w0 = log_y + eps * jnp.logaddexp(log_beta, jnp.diagonal(log_gamma) + 2 * log_y)
        eye = jnp.eye(self.dim, dtype=w0.dtype)
        # |(I - A)^-1| <= 1 / (1 - 2 max eps) in the max norm: rounding in the residual
        # (relative to |w| + |log y|) is amplified at most that much.
        bound = tol / (1 - 2 * eps.max())

        def cond(state):
            _, i, done = state
            return ~done & (i < self.max_newton_steps)

        def body(state):
            w, i, _ = state
            # log D_i = logsumexp(log beta_i, log gamma_ij + 2 w_j)
            terms = log_gamma + 2 * w[None, :]
            log_d = jnp.logaddexp(log_beta, jax.nn.logsumexp(terms, axis=-1))
            residual = w - log_y - eps * log_d
            # A_ij = d(eps_i log D_i)/dw_j = 2 eps_i gamma_ij e^(2 w_j) / D_i >= 0
            a = 2 * eps[:, None] * jnp.exp(terms - log_d[:, None])
            step = jnp.linalg.solve(eye - a, residual)
            new = w - step
            finite = jnp.all(jnp.isfinite(new))
            converged = jnp.all(jnp.abs(step) <= bound * (1 + jnp.abs(new) + jnp.abs(log_y)))
            # A non-finite step is not taken (and ends the loop): finite in, finite out.
            return jnp.where(finite, new, w), i + 1, converged | ~finite

        w, steps, _ = jax.lax.while_loop(cond, body, (w0, jnp.asarray(0), jnp.asarray(False)))
        return w, steps


@register_flow("gdn")
def gdn(dim: int, num_layers: int, variant: str, max_exponent: float, *, key: jax.Array) -> list[FlowTransform]:
    """``GDN`` / ``InvertibleLinear`` blocks and an affine map: JAX mirror of ``pyroflows.torch.transforms.gdn.gdn``.

    Example:
        >>> [type(layer).__name__ for layer in gdn(2, 1, "diagonal", 0.4, key=jax.random.key(0))]
        ['GDN', 'InvertibleLinear', 'ElementwiseAffine']
    """
    layers = []
    for k in jax.random.split(key, num_layers):
        # Forward order noise -> data; read backwards (data -> noise) each block is Balle's
        # stage: a linear map of the data, then the divisive normalisation.
        layers += [GDN(dim, variant, max_exponent), InvertibleLinear(dim, key=k)]
    # Location and scale act on the data first, so GDN (centred at 0) sees centred data.
    return layers + [ElementwiseAffine(dim)]
