"""Flow layers for Pyro, one module per family; importing this registers their builders."""

from . import autoregressive, base, coupling, gaussianization, gdn, glow, planar, spline, sylvester
from .autoregressive import *  # noqa: F401,F403
from .continuous import *  # noqa: F401,F403
from .base import CholeskyAffine, ElementwiseAffine, Flow, FlowTransform, LogTails, Permute
from .coupling import *  # noqa: F401,F403
from .gaussianization import *  # noqa: F401,F403
from .gdn import *  # noqa: F401,F403
from .glow import *  # noqa: F401,F403
from .planar import *  # noqa: F401,F403
from .residual import *  # noqa: F401,F403
from .spline import *  # noqa: F401,F403
from .sylvester import *  # noqa: F401,F403

__all__ = ["FlowTransform", "Flow", "Permute", "ElementwiseAffine", "CholeskyAffine", "LogTails"] + [
    name
    for module in (planar, sylvester, coupling, glow, autoregressive, spline, gaussianization, gdn)
    for name in module.__all__
]
__all__ += continuous.__all__  # noqa: F405
__all__ += residual.__all__  # noqa: F405
