"""pyroflows for Pyro: flows as ``TransformModule``s, built by name.

``build_flow`` returns a ``Flow``; ``fit_mle`` and ``fit_reverse_kl`` train it (or a
``snf.StochasticFlow``) through ``pyroflows.protocols.TrainableFlow``; ``AutoFlow``,
``AutoSNF`` and ``fit_posterior`` put flows in Pyro guides; ``evaluate`` judges a guide.

Example:
    >>> import torch
    >>> import pyroflows.torch as pf
    >>> _ = torch.manual_seed(0)
    >>> flow = pf.build_flow("maf", 5)
    >>> flow.log_prob(torch.zeros(3, 5)).shape
    torch.Size([3])
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
