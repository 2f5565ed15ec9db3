"""The backend-neutral flow file: the builder's name and arguments as JSON, the weights as named arrays.

One ``.npz`` file. Array names are torch ``state_dict`` keys; the JAX backend names its
pytree leaves the same way, so a flow saved by either backend loads in the other. Floats
keep the dtype they were saved with; integer and boolean constants (masks,
permutations) are cast to whatever the loading backend stores them as.
"""

from __future__ import annotations

import json

import numpy as np

__all__ = ["write", "read", "rebuild_arguments", "match_arrays"]

FORMAT = "pyroflows-flow-v1"
_META = "__pyroflows__"
_BUILD_KEYS = ("name", "dim", "num_layers", "hidden_dims")


def write(path, config: dict, arrays: dict, backend: str) -> None:
    meta = {"format": FORMAT, "backend": backend, "config": config}
    with open(path, "wb") as f:
        np.savez(f, **{_META: np.array(json.dumps(meta))}, **{k: np.asarray(v) for k, v in arrays.items()})


def read(path):
    """Return ``(config, arrays, saved_by_backend)``."""
    with np.load(path, allow_pickle=False) as f:
        if _META not in f.files:
            raise ValueError(f"{path} is not a pyroflows flow file (no {_META} entry)")
        meta = json.loads(str(f[_META]))
        arrays = {k: f[k] for k in f.files if k != _META}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    return meta["config"], arrays, meta["backend"]


def rebuild_arguments(config: dict):
    """``(name, dim, keyword arguments)`` that rebuild the saved flow with ``build_flow``."""
    kwargs = {k: v for k, v in config.items() if k not in ("name", "dim")}
    return config["name"], config["dim"], kwargs


def float_dtype(arrays: dict):
    """The floating dtype of the saved weights (float32 when there are none)."""
    for a in arrays.values():
        if np.issubdtype(a.dtype, np.floating):
            return a.dtype
    return np.dtype(np.float32)


def match_arrays(expected: dict, arrays: dict, path) -> dict:
    """Check the file holds exactly the arrays the rebuilt flow has, with the same shapes.

    ``expected`` maps names to ``(shape, dtype)`` of the rebuilt flow. Returns the arrays,
    cast to the flow's dtype where the flow keeps an integer or boolean constant.
    """
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path} does not match the flow its config builds: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out = {}
    for name, (shape, dtype) in expected.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{path}: array {name!r} has shape {a.shape}, the flow expects {tuple(shape)}")
        # The loading flow's dtype decides: torch keeps masks as float buffers, JAX as
        # booleans (NumPyro would otherwise train them); weights keep their saved precision.
        out[name] = a if np.issubdtype(np.dtype(dtype), np.floating) else a.astype(dtype)
    return out
