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

from . import (
    snf,  # noqa: E402  (stochastic normalizing flows)
    transforms,  # noqa: E402  (registers the built-in families)
)
from .autoguide import (
    AutoFlow,  # noqa: E402
    AutoSNF,  # noqa: E402
)
from .flows import REGISTRY, available_flows, build_flow, register_flow
from .io import load_flow, save_flow
from .posterior import fit_posterior  # noqa: E402
from .train import evaluate, fit_mle, fit_reverse_kl  # noqa: E402

__all__ = [
    "available_flows",
    "build_flow",
    "register_flow",
    "save_flow",
    "load_flow",
    "transforms",
    "REGISTRY",
    "AutoFlow",
    "fit_mle",
    "fit_reverse_kl",
    "evaluate",
    "snf",
    "AutoSNF",
    "fit_posterior",
]
