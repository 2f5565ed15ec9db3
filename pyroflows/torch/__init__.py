"""pyroflows for Pyro: flows as ``TransformModule``s, built by name.

>>> import pyroflows.torch as pf
>>> flow = pf.build_flow("maf", 5)
"""

from .flows import REGISTRY, available_flows, build_flow, register_flow
from .io import load_flow, save_flow
from . import transforms  # noqa: E402  (registers the built-in families)

__all__ = ["available_flows", "build_flow", "register_flow", "save_flow", "load_flow", "transforms", "REGISTRY"]
