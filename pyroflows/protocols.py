"""What the training helpers need from a flow, as a structural protocol.

``fit_mle``, ``fit_reverse_kl`` and ``evaluate`` on both backends work through these
methods and never test for a type. ``Flow`` (what ``build_flow`` returns) and
``StochasticFlow`` (``pyroflows.<backend>.snf``) both implement them, so the training
modules import neither class, and a user's own flow trains once it has them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["TrainableFlow"]


@runtime_checkable
class TrainableFlow(Protocol):
    """A density on R^dim that the training helpers can fit.

    ``runtime_checkable``: ``isinstance(obj, TrainableFlow)`` checks that the attributes
    and methods exist (not their signatures).

    Attributes:
        dim: the event size.
        standardizable: whether ``fit_mle(standardize=True)`` may put a fixed affine
            layer in front of the flow (``False`` for a stochastic flow, whose blocks are
            tied to a target density in the original coordinates).

    Example:
        >>> import numpy as np
        >>> class StandardNormal:  # a density with no weights, to show the three methods
        ...     dim, standardizable = 2, True
        ...     def log_prob(self, x):
        ...         return -0.5 * (x**2).sum(-1) - np.log(2 * np.pi)
        ...     def sample_and_log_prob(self, num_samples, rng):
        ...         x = rng.standard_normal((num_samples, 2))
        ...         return x, self.log_prob(x)
        ...     def fit_target(self, log_density, stick_the_landing):
        ...         return log_density
        >>> q = StandardNormal()
        >>> isinstance(q, TrainableFlow), isinstance(object(), TrainableFlow)
        (True, False)
        >>> x, log_q = q.sample_and_log_prob(4, np.random.default_rng(0))
        >>> x.shape, log_q.shape, round(float(q.log_prob(np.zeros(2))), 4)
        ((4, 2), (4,), -1.8379)
    """

    dim: int
    standardizable: bool

    def log_prob(self, x: Any) -> Any:
        """The model density at data points, what ``fit_mle`` maximises.

        Exact for a ``Flow`` (its base is ``N(0, I)``), a lower bound for a
        ``StochasticFlow``.

        Args:
            x: a batch of points, shape ``(..., dim)``.

        Returns:
            ``log q(x)``, shape ``(...)``.
        """

    def sample_and_log_prob(self, num_samples: int, rng: Any) -> tuple[Any, Any]:
        """Draws and their ``log q``, differentiable in the flow's weights (``fit_reverse_kl``).

        For a stochastic flow ``log q`` is that of the whole sampled path.

        Args:
            num_samples: how many draws.
            rng: a ``torch.Generator`` (torch) or a PRNG key (JAX).

        Returns:
            ``(x, log_q)`` with shapes ``(num_samples, dim)`` and ``(num_samples,)``.
        """

    def fit_target(self, log_density: Callable, stick_the_landing: bool) -> Callable:
        """The log-density ``fit_reverse_kl`` trains against, given the user's target.

        A ``Flow`` returns the target itself; a stochastic flow may wrap it.

        Args:
            log_density: the user's unnormalised target, ``(n, dim) -> (n,)``.
            stick_the_landing: whether the fit scores its draws with fixed weights.

        Returns:
            The log-density to fit.
        """
