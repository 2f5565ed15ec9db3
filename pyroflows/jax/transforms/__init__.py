"""Flow layers for NumPyro (equinox modules), one module per family; importing this registers their builders."""

from ...exports import layer_names
from . import autoregressive, base, conditioners, gaussianization, gdn, glow, planar, sylvester, transformers
from .autoregressive import *  # noqa: F401,F403
from .base import (
    CholeskyAffine,
    ConditionalFlow,
    ConditionedFlow,
    ElementwiseAffine,
    EqxTransform,
    Flow,
    FlowTransform,
    LogTails,
    Permute,
)
from .conditioners import *  # noqa: F401,F403
from .continuous import *  # noqa: F401,F403
from .gaussianization import *  # noqa: F401,F403
from .gdn import *  # noqa: F401,F403
from .glow import *  # noqa: F401,F403
from .planar import *  # noqa: F401,F403
from .residual import *  # noqa: F401,F403
from .sylvester import *  # noqa: F401,F403
from .transformers import Additive, Affine, DeepSigmoid, RationalQuadraticSpline, Transformer

__all__ = layer_names(__name__, "EqxTransform")
