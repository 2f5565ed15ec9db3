"""Generalised divisive normalisation (GDN) as a flow layer.

Balle, Laparra & Simoncelli 2016, arXiv:1511.06281. GDN divides each coordinate by a
power of a weighted sum of squares, the normalisation seen in early sensory neurons;
between invertible linear maps it Gaussianizes natural data. Normalising is the
data-to-noise direction (``inverse_and_ladj``); the forward (noise to data) is solved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...structure import GDN_VARIANTS, gdn_initial_parameters
from ..flows import register_flow
from .base import ElementwiseAffine, FlowTransform, bisect_increasing, implicit_step
from .glow import InvertibleLinear

__all__ = ["GDN"]

VARIANTS = GDN_VARIANTS


def _log_softplus(x):
    """``log(softplus(x))`` without underflow to ``-inf`` for very negative ``x``."""
    return torch.where(x > -30.0, torch.log(F.softplus(x.clamp_min(-30.0))), x)


class GDN(FlowTransform):
    """Generalised divisive normalisation: each coordinate divided by a power of a weighted sum of squares.

    Data to noise (``inverse_and_ladj``), for data ``z`` and noise ``y``::

        y_i = z_i / D_i^eps_i,      D_i = beta_i + sum_j gamma_ij z_j^2

    with ``beta_i = beta_min + softplus(.)``, ``gamma_ij = softplus(.) >= 0`` (only
    ``gamma_ii`` in the ``"diagonal"`` variant, the full matrix in ``"dense"``) and
    ``eps_i = max_exponent * sigmoid(.)`` in ``(0, max_exponent)``, ``max_exponent < 1/2``.

    Why it is a bijection of R^d for every parameter value: the Jacobian is
    ``J = diag(s) (I - M)`` with ``s_i = D_i^-eps_i`` and
    ``M_ik = 2 eps_i z_i gamma_ik z_k / D_i``. ``diag(z)^-1 M diag(z)`` is nonnegative
    with row sums ``2 eps_i sum_k gamma_ik z_k^2 / D_i < 2 eps_i < 1``, so the spectral
    radius of ``M`` is below 1 and ``det J > 0`` everywhere. The map is also proper: the
    largest ``|z_i|`` gives ``|y_i| >= |z_i| / (beta_i + sum_k gamma_ik |z_i|^2)^eps_i``, which
    grows like ``|z_i|^(1 - 2 eps_i)``. A proper local diffeomorphism of R^d is a global
    one (Hadamard). In the diagonal variant each coordinate is an odd increasing map onto R.

    Log-determinant: diagonal, ``sum_i -eps_i log D_i + log(beta_i + (1 - 2 eps_i) gamma_ii z_i^2)
    - log D_i`` (every term positive before the log); dense,
    ``sum_i -eps_i log D_i + log det(I - M)`` by ``torch.linalg.slogdet``. Sums of squares
    are formed after dividing by ``max |z|`` so that huge inputs do not overflow.

    Noise to data (``call_and_ladj``) is solved in log-magnitudes ``w_i = log|z_i|``,
    where the equations read ``w_i = log|y_i| + eps_i log(beta_i + sum_j gamma_ij e^(2 w_j))``
    (``z_i = sign(y_i) e^(w_i)``). Diagonal: bisection per coordinate inside the exact
    bracket given by the slope bounds ``1 - 2 eps_i <= d(w - eps log D)/dw <= 1``, to
    ``inverse_tol * (1 + |w|)``. Dense: Newton's method on that system, started from the
    diagonal (one-coordinate) estimate. The system is concave with an M-matrix Jacobian
    ``I - A`` (``A >= 0``, row sums below ``2 eps_i``), so full Newton steps converge
    monotonically from any start and need no damping; it stops when every step is below
    ``inverse_tol * (1 + |w| + |log|y||) / (1 - 2 max eps)`` (the last factor bounds
    ``|(I - A)^-1|``, which amplifies rounding) and raises ``RuntimeError`` if 100 steps do
    not get there. ``inverse_tol = 1e-10`` (a few float32 epsilons in single precision). One
    implicit Newton step in ``z`` with the detached Jacobian then gives exact first
    derivatives.

    Args:
        dim: size of the vectors.
        variant: ``"diagonal"`` (``gamma`` diagonal, coordinates normalised separately) or
            ``"dense"`` (every coordinate's energy enters every denominator).
        max_exponent: upper bound on ``eps``, in ``(0, 1/2)``.
        beta_min: lower bound on ``beta``.

    Raises:
        ValueError: an unknown variant, or ``max_exponent`` outside ``(0, 1/2)``.

    References:
        Balle, Laparra & Simoncelli 2016, "Density Modeling of Images using a Generalized
        Normalization Transformation", arXiv:1511.06281.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = GDN(2, variant="dense")
        >>> z = torch.randn(5, 2)
        >>> y, ildj = layer.inverse_and_ladj(z)  # data -> noise, closed form
        >>> z_back, ladj = layer.call_and_ladj(y)  # noise -> data, solved
        >>> tuple(y.shape), bool(torch.allclose(z_back, z, atol=1e-5)), bool(torch.allclose(ladj, -ildj, atol=1e-5))
        ((5, 2), True, True)
    """

    numerical_inverse = True
    inverse_tol = 1e-10
    max_newton_steps = 100

    def __init__(self, dim: int, variant: str = "diagonal", max_exponent: float = 0.4, beta_min: float = 1e-3):
        super().__init__(dim)
        initial = gdn_initial_parameters(dim, variant, max_exponent, beta_min)  # checks the options too
        self.variant = variant
        self.max_exponent = float(max_exponent)
        self.beta_min = float(beta_min)
        for name, value in zip(("beta", "gamma", "exponent"), initial):
            parameter = nn.Parameter(torch.as_tensor(value, dtype=torch.get_default_dtype()))
            setattr(self, f"unconstrained_{name}", parameter)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, variant={self.variant!r}, max_exponent={self.max_exponent}"

    # --- parameters --------------------------------------------------------------------
    def beta(self) -> torch.Tensor:
        """``beta = beta_min + softplus(.)``, shape ``(dim,)``."""
        return self.beta_min + F.softplus(self.unconstrained_beta)

    def gamma(self) -> torch.Tensor:
        """``gamma`` as a vector (diagonal variant) or a ``dim x dim`` matrix (dense)."""
        return F.softplus(self.unconstrained_gamma)

    def exponent(self) -> torch.Tensor:
        """``eps = max_exponent * sigmoid(.)``, shape ``(dim,)``."""
        return self.max_exponent * torch.sigmoid(self.unconstrained_exponent)

    def _tol(self, dtype):
        return max(self.inverse_tol, 8 * torch.finfo(dtype).eps)

    # --- data to noise -----------------------------------------------------------------
    def _denominator(self, z, beta, gamma):
        """``z / m``, ``D / m^2`` and ``log D`` with ``m = max(1, max |z|)``: no overflow for huge ``z``."""
        if self.variant == "diagonal":
            m = z.detach().abs().clamp_min(1.0)
            zs = z / m
            inner = beta / (m * m) + gamma * zs * zs
        else:
            m = z.detach().abs().amax(-1, keepdim=True).clamp_min(1.0)
            zs = z / m
            inner = beta / (m * m) + (zs * zs) @ gamma.transpose(0, 1)
        return zs, inner, 2 * torch.log(m) + torch.log(inner)

    @staticmethod
    def _log_slopes(zs, inner, gamma, eps):
        """Diagonal variant: ``log dy_i/dz_i = -eps log D + log(beta + (1 - 2 eps) gamma z^2) - log D``."""
        return torch.log(inner - 2 * eps * gamma * zs * zs) - torch.log(inner)

    @staticmethod
    def _i_minus_m(zs, inner, gamma, eps):
        """``I - M`` with ``M_ik = 2 eps_i z_i gamma_ik z_k / D_i`` (the scale ``m^2`` cancels)."""
        m = (2 * eps * zs / inner).unsqueeze(-1) * gamma * zs.unsqueeze(-2)
        return torch.eye(zs.shape[-1], dtype=zs.dtype, device=zs.device) - m

    def _normalise(self, z, beta, gamma, eps, with_ladj=True):
        """``y = z D^-eps`` and ``log|det dy/dz|`` in closed form (``None`` unless ``with_ladj``)."""
        zs, inner, log_d = self._denominator(z, beta, gamma)
        y = z * torch.exp(-eps * log_d)
        if not with_ladj:
            return y, None
        if self.variant == "diagonal":
            return y, (-eps * log_d + self._log_slopes(zs, inner, gamma, eps)).sum(-1)
        return y, (-eps * log_d).sum(-1) + torch.linalg.slogdet(self._i_minus_m(zs, inner, gamma, eps))[1]

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._normalise(y, self.beta(), self.gamma(), self.exponent())

    # --- noise to data -----------------------------------------------------------------
    def call_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta, gamma, eps = self.beta(), self.gamma(), self.exponent()
        tol = self._tol(y.dtype)
        with torch.no_grad():
            # log|y|, floored so that y = 0 gives z = sign(0) e^w = 0 without -inf.
            log_y = torch.log(y.detach().abs().clamp_min(torch.finfo(y.dtype).tiny))
            e, log_beta = eps.detach(), torch.log(beta.detach())
            log_gamma = _log_softplus(self.unconstrained_gamma.detach())
            if self.variant == "diagonal":
                w = self._solve_diagonal(log_y, log_beta, log_gamma, e, tol)
            else:
                w = self._solve_dense(log_y, log_beta, log_gamma, e, tol)
            root = torch.sign(y.detach()) * torch.exp(w)
            # The Jacobian at the root, detached, for one implicit Newton step.
            zs, inner, log_d = self._denominator(root, beta, gamma)
            g = gamma.detach()
            if self.variant == "diagonal":
                slope = torch.exp(-e * log_d + self._log_slopes(zs, inner, g, e))
            else:
                i_minus_m, s = self._i_minus_m(zs, inner, g, e), torch.exp(-e * log_d)
        value, _ = self._normalise(root, beta, gamma, eps, with_ladj=False)
        if self.variant == "diagonal":
            z = implicit_step(root, value, slope, y)
        else:
            # z = z* - J^-1 (f(z*) - y) with J = diag(s) (I - M) detached: exact first derivatives.
            z = root - torch.linalg.solve(i_minus_m, ((value - y) / s).unsqueeze(-1)).squeeze(-1)
        _, ladj = self._normalise(z, beta, gamma, eps)
        return z, -ladj

    @staticmethod
    def _solve_diagonal(log_y, log_beta, log_gamma, eps, tol):
        def phi(w):  # w - eps log D(e^w): increasing, slope in [1 - 2 eps, 1]
            return w - eps * torch.logaddexp(log_beta, log_gamma + 2 * w)

        gap = eps * torch.logaddexp(log_beta, log_gamma + 2 * log_y)  # log_y - phi(log_y)
        stretched = gap / (1 - 2 * eps)
        lo = log_y + torch.minimum(gap, stretched)
        hi = log_y + torch.maximum(gap, stretched)
        return bisect_increasing(phi, log_y, tol=tol, lo=lo, hi=hi)

    def _solve_dense(self, log_y, log_beta, log_gamma, eps, tol):
        # One fixed-point step with the diagonal of gamma: the diagonal variant's estimate.
        w = log_y + eps * torch.logaddexp(log_beta, torch.diagonal(log_gamma) + 2 * log_y)
        eye = torch.eye(self.dim, dtype=w.dtype, device=w.device)
        # |(I - A)^-1| <= 1 / (1 - 2 max eps) in the max norm: rounding in the residual
        # (relative to |w| + |log y|) is amplified at most that much.
        bound = tol / (1 - 2 * float(eps.max()))
        for _ in range(self.max_newton_steps):
            # log D_i = logsumexp(log beta_i, log gamma_ij + 2 w_j)
            terms = log_gamma + 2 * w.unsqueeze(-2)
            log_d = torch.logaddexp(log_beta, torch.logsumexp(terms, -1))
            residual = w - log_y - eps * log_d
            # A_ij = d(eps_i log D_i)/dw_j = 2 eps_i gamma_ij e^(2 w_j) / D_i >= 0
            a = 2 * eps.unsqueeze(-1) * torch.exp(terms - log_d.unsqueeze(-1))
            step = torch.linalg.solve(eye - a, residual.unsqueeze(-1)).squeeze(-1)
            w = w - step
            if not bool(torch.isfinite(w).all()):
                break
            if bool((step.abs() <= bound * (1 + w.abs() + log_y.abs())).all()):
                return w
        raise RuntimeError(
            f"GDN (dense): Newton's method for the inverse did not reach the tolerance {tol:g} in "
            f"{self.max_newton_steps} steps (largest step {float(step.abs().max()):g}); "
            "check the input and the parameters for non-finite values"
        )


@register_flow("gdn")
def gdn(dim: int, num_layers: int, variant: str, max_exponent: float) -> list[FlowTransform]:
    """The ``gdn`` family: ``num_layers`` blocks of ``GDN`` and ``InvertibleLinear``, then ``ElementwiseAffine``.

    Read backwards (data to noise) each block is Balle et al.'s stage: a linear map of
    the data, then the divisive normalisation; the affine map acts on the data first, so
    ``GDN`` (centred at 0) sees centred data.

    Example:
        >>> [type(layer).__name__ for layer in gdn(2, 1, "diagonal", 0.4)]
        ['GDN', 'InvertibleLinear', 'ElementwiseAffine']
    """
    layers = []
    for _ in range(num_layers):
        # Forward order noise -> data; read backwards (data -> noise) each block is Balle's
        # stage: a linear map of the data, then the divisive normalisation.
        layers += [GDN(dim, variant, max_exponent), InvertibleLinear(dim)]
    # Location and scale act on the data first, so GDN (centred at 0) sees centred data.
    return layers + [ElementwiseAffine(dim)]
