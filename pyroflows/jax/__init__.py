"""pyroflows for NumPyro: flows as equinox modules that give NumPyro ``Transform``s.

>>> import jax, pyroflows.jax as pf
>>> flow = pf.build_flow("maf", 5, key=jax.random.key(0))
>>> transform = flow.to_transform()
"""

from .flows import REGISTRY, available_flows, build_flow, register_flow
from .io import load_flow, save_flow
from . import transforms  # noqa: E402  (registers the built-in families)
from .autoguide import AutoFlow  # noqa: E402
from .train import evaluate, fit_mle, fit_reverse_kl  # noqa: E402
from . import snf  # noqa: E402  (stochastic normalizing flows)
from .autoguide import AutoSNF  # noqa: E402
from .posterior import fit_posterior  # noqa: E402

__all__ = ["available_flows", "build_flow", "register_flow", "save_flow", "load_flow", "transforms", "REGISTRY",
           "AutoFlow", "fit_mle", "fit_reverse_kl", "evaluate", "snf", "AutoSNF", "fit_posterior"]
