"""pyroflows for NumPyro: flows as equinox modules that give NumPyro ``Transform``s.

``build_flow`` builds a registered flow, ``AutoFlow`` / ``AutoSNF`` use one as a
NumPyro autoguide, ``fit_mle`` / ``fit_reverse_kl`` / ``fit_posterior`` train without a
hand-written loop, ``evaluate`` scores a fitted guide and ``save_flow`` / ``load_flow``
store one.

Example:
    >>> import jax, jax.numpy as jnp, pyroflows.jax as pf
    >>> flow = pf.build_flow("realnvp", 2, num_layers=2, hidden_dims=(8,), key=jax.random.key(0))
    >>> flow.to_transform()(jnp.zeros((3, 2))).shape
    (3, 2)
"""

# The package's names are those of pyroflows.exports.PACKAGE, the same on both backends.
from ..exports import PACKAGE
from . import snf, transforms  # noqa: F401  (importing transforms registers the built-in families)
from .autoguide import AutoFlow, AutoSNF  # noqa: F401
from .flows import REGISTRY, available_flows, build_flow, register_flow  # noqa: F401
from .io import load_flow, save_flow  # noqa: F401
from .posterior import fit_posterior  # noqa: F401
from .train import evaluate, fit_mle, fit_reverse_kl  # noqa: F401

__all__ = list(PACKAGE)
