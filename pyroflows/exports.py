"""The public names both backends export, written once.

``pyroflows.torch`` and ``pyroflows.jax`` offer the same library under the same names
(``tests/test_exports.py`` checks it); their ``__init__`` modules, their ``transforms``
packages and ``transforms.base`` build ``__all__`` from these lists.
"""

from __future__ import annotations

import importlib

__all__ = ["PACKAGE", "BASE_LAYERS", "TRANSFORMERS", "LAYER_MODULES", "layer_names"]

#: What ``pyroflows.torch`` and ``pyroflows.jax`` export: building and storing flows, the
#: guides and the fits, and the ``transforms`` and ``snf`` subpackages.
PACKAGE = (
    "available_flows build_flow register_flow save_flow load_flow transforms REGISTRY "
    "AutoFlow fit_mle fit_reverse_kl evaluate snf AutoSNF fit_posterior"
).split()

#: The base class, the composed flow and the shared layers of ``transforms.base``.
BASE_LAYERS = [
    "FlowTransform",
    "Flow",
    "ConditionalFlow",
    "ConditionedFlow",
    "Permute",
    "ElementwiseAffine",
    "CholeskyAffine",
    "LogTails",
]

#: The element-wise transformers of ``transforms.transformers``.
TRANSFORMERS = ["Transformer", "Additive", "Affine", "RationalQuadraticSpline", "DeepSigmoid"]

#: The family modules of ``transforms`` whose whole ``__all__`` the package exports.
LAYER_MODULES = "planar sylvester conditioners glow autoregressive gaussianization gdn residual continuous".split()


def layer_names(package: str, *extra: str) -> list[str]:
    """The ``__all__`` of a backend's ``transforms`` package.

    Args:
        package: the package's module name (``pyroflows.torch.transforms`` or
            ``pyroflows.jax.transforms``).
        *extra: names only that backend exports, after ``BASE_LAYERS``.

    Returns:
        ``BASE_LAYERS``, ``extra``, ``TRANSFORMERS`` and every name of the
        ``LAYER_MODULES``, in that order.

    Example:
        >>> names = layer_names("pyroflows.torch.transforms")
        >>> names[:2], "Planar" in names, "CNF" in names
        (['FlowTransform', 'Flow'], True, True)
    """
    modules = [importlib.import_module(f"{package}.{name}") for name in LAYER_MODULES]
    return [*BASE_LAYERS, *extra, *TRANSFORMERS] + [name for module in modules for name in module.__all__]
