"""The backend-neutral flow file: the builder's name and arguments as JSON, the weights as named arrays.

One ``.npz`` file. Array names are torch ``state_dict`` keys; the JAX backend names its
pytree leaves the same way, so a flow saved by either backend loads in the other. Floats
keep the dtype they were saved with; integer and boolean constants (masks,
permutations) are cast to whatever the loading backend stores them as.

The reader never unpickles (``allow_pickle=False``) and checks everything it returns:
a file that is not an ``.npz`` archive, a damaged or truncated one, one without the
pyroflows metadata, metadata without a required key, an array numpy cannot read
without pickling, and non-finite (NaN or inf) floating weights each raise a
``FlowFileError`` (a ``ValueError``) that names the file, the problem and what to do about it. A missing
file raises ``FileNotFoundError``. Nothing here knows about particular flows: the
config is whatever ``build_flow`` recorded, the arrays whatever the flow holds.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

__all__ = ["write", "read", "rebuild_arguments", "is_standardized", "match_arrays", "float_dtype", "build_error", "FlowFileError",
           "FORMAT"]

FORMAT = "pyroflows-flow-v1"
_META = "__pyroflows__"
_META_KEYS = ("format", "backend", "config")
_CONFIG_KEYS = ("name", "dim")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive's first entry, or an empty archive
_NPY_MAGIC = b"\x93NUMPY"
_RESAVE = "save the flow again with save_flow"
# What numpy and zipfile raise on a damaged archive, or on a member that needs pickling.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError)


class FlowFileError(ValueError):
    """A file ``load_flow`` cannot use; the message names the file, the problem and the fix."""


def _not_a_flow_file(path, problem: str, fix: str = "pass the path of a file written by save_flow") -> ValueError:
    return FlowFileError(f"{path} is not a pyroflows flow file (.npz written by save_flow): {problem}; {fix}")


def write(path, config: dict, arrays: dict, backend: str) -> None:
    """Write ``config`` (JSON-serialisable) and the named ``arrays`` to ``path`` as one ``.npz`` file.

    Args:
        path: where to write; the name is used as given (numpy adds no ``.npz``).
        config: what rebuilds the flow: ``name``, ``dim`` and ``build_flow``'s other arguments.
        arrays: the flow's weights and constants by torch ``state_dict`` name.
        backend: ``"torch"`` or ``"jax"``, recorded for information.
    """
    meta = {"format": FORMAT, "backend": backend, "config": config}
    with open(path, "wb") as f:
        np.savez(f, **{_META: np.array(json.dumps(meta))}, **{k: np.asarray(v) for k, v in arrays.items()})


def _check_file(path) -> None:
    """Raise the right error before numpy sees a path that is missing or holds no ``.npz``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such flow file; pass the path that save_flow wrote")
    if os.path.isdir(path):
        raise _not_a_flow_file(path, "it is a directory", "pass the path of the .npz file itself")
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(_NPY_MAGIC):
        raise _not_a_flow_file(
            path, "it holds a single numpy array (.npy, as numpy.save writes)",
            "load it with numpy.load, or write the flow with save_flow",
        )
    if not head.startswith(_ZIP_MAGIC):
        raise _not_a_flow_file(path, "it is not a zip archive (.npz), e.g. a text or pickle file")


def _read_meta(path, raw) -> dict:
    try:
        meta = json.loads(str(raw[()]))
    except (ValueError, TypeError) as e:
        raise FlowFileError(f"{path}: its {_META} metadata is not valid JSON ({e}); {_RESAVE}") from None
    if not isinstance(meta, dict):
        raise FlowFileError(f"{path}: its {_META} metadata is not a JSON object; {_RESAVE}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise FlowFileError(
            f"{path}: its {_META} metadata lacks the key(s) {missing} (it has {sorted(meta)}); "
            f"the file was edited or written by something other than save_flow: {_RESAVE}"
        )
    if meta["format"] != FORMAT:
        raise FlowFileError(
            f"{path} has format {meta['format']!r}; this version of pyroflows reads {FORMAT!r}: "
            "load it with the pyroflows version that wrote it and save it with this one"
        )
    config = meta["config"]
    if not isinstance(config, dict):
        raise FlowFileError(f"{path}: its config is {type(config).__name__}, not a JSON object; {_RESAVE}")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise FlowFileError(
            f"{path}: its config lacks the key(s) {missing} that build_flow needs (it has {sorted(config)}); "
            f"{_RESAVE}"
        )
    return meta


def _check_finite(path, arrays: dict) -> None:
    bad = []
    for name, a in arrays.items():
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            bad.append(f"{name!r} ({int(np.sum(np.isnan(a)))} NaN, {int(np.sum(np.isinf(a)))} inf of {a.size})")
    if bad:
        raise FlowFileError(
            f"{path}: non-finite weights in array(s) {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "the flow was saved after its training diverged: save it from a step before the loss went "
            "non-finite (lower the learning rate, or clip gradients)"
        )


def read(path) -> tuple[dict, dict, str]:
    """Read a flow file written by ``write``.

    Args:
        path: the file ``save_flow`` wrote.

    Returns:
        ``(config, arrays, saved_by_backend)``: the builder's arguments, the arrays by
        name (each checked finite where floating), and ``"torch"`` or ``"jax"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FlowFileError: (a ``ValueError``) ``path`` is not a readable pyroflows flow file;
            the message says why and what to do.
    """
    _check_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            if _META not in names:
                raise _not_a_flow_file(
                    path,
                    f"it is a zip archive without the {_META} entry (entries: {names[:5]}), "
                    "e.g. numpy.savez of plain arrays or torch.save",
                    "load it with numpy.load or torch.load, or write flows with save_flow",
                )
            meta = _read_meta(path, f[_META])
            arrays = {}
            for k in names:
                if k == _META:
                    continue
                try:
                    arrays[k] = f[k]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise  # damaged: reported below
                    raise FlowFileError(
                        f"{path}: array {k!r} holds Python objects, which pyroflows never unpickles; "
                        f"flow weights are numeric arrays: {_RESAVE}"
                    ) from None
                if not isinstance(arrays[k], np.ndarray):
                    raise FlowFileError(f"{path}: entry {k!r} is not a numpy array (.npy); {_RESAVE}")
    except FlowFileError:
        raise
    except _READ_ERRORS as e:
        raise FlowFileError(
            f"{path} is damaged or truncated (reading it failed with {type(e).__name__}: {e}); "
            f"{_RESAVE}, or copy the file again in full"
        ) from None
    _check_finite(path, arrays)
    return meta["config"], arrays, meta["backend"]


# Config keys that record what was done to the built flow, not arguments of ``build_flow``:
# ``standardize`` (added by ``fit_mle(standardize=True)``) means the flow ends in a fixed
# ``Standardize`` layer, which ``load_flow`` appends before it loads the arrays.
_NOT_BUILD_KEYS = ("name", "dim", "standardize")


def rebuild_arguments(config: dict) -> tuple[str, int, dict[str, Any]]:
    """``(name, dim, keyword arguments)`` that rebuild the saved flow with ``build_flow``.

    The keyword arguments leave out ``standardize``; see ``is_standardized``.
    """
    kwargs = {k: v for k, v in config.items() if k not in _NOT_BUILD_KEYS}
    return config["name"], config["dim"], kwargs


def is_standardized(config: dict) -> bool:
    """Whether the saved flow ends in a ``Standardize`` layer (``fit_mle(standardize=True)``).

    ``load_flow`` then appends ``Standardize(zeros(dim), ones(dim))`` to what ``build_flow``
    makes; the saved ``<index>.loc`` and ``<index>.scale`` arrays fill it.
    """
    return bool(config.get("standardize", False))


def float_dtype(arrays: dict) -> np.dtype:
    """The floating dtype of the saved weights (float32 when there are none)."""
    for a in arrays.values():
        if np.issubdtype(a.dtype, np.floating):
            return a.dtype
    return np.dtype(np.float32)


def build_error(path, config: dict, backend: str, error: Exception) -> ValueError:
    """The error for a config that ``build_flow`` of ``backend`` rejects (``error``)."""
    return FlowFileError(
        f"{path}: its config {config} does not build a flow on the {backend} backend ({error}); "
        "if the flow is a user-registered family, register it (register_flow) before load_flow"
    )


def match_arrays(expected: dict, arrays: dict, path) -> dict:
    """Check the file holds exactly the arrays the rebuilt flow has, with the same shapes.

    Args:
        expected: names mapped to ``(shape, dtype)`` of the rebuilt flow's arrays.
        arrays: the arrays ``read`` returned.
        path: the file, for the messages.

    Returns:
        The arrays, each cast to the flow's dtype except floating weights, which keep
        their saved precision (so a mask saved as booleans by JAX loads as torch's float
        buffer, and the other way round).

    Raises:
        FlowFileError: (a ``ValueError``) an array is missing, unexpected, of the wrong shape, or
            not numeric.
    """
    mismatch = (
        "the file does not match the flow its own config builds (was it edited, or written by another "
        f"pyroflows version?): {_RESAVE}"
    )
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise FlowFileError(f"{path}: missing arrays {missing[:5]}, unexpected arrays {extra[:5]}; {mismatch}")
    out = {}
    for name, (shape, dtype) in expected.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(shape):
            raise FlowFileError(
                f"{path}: array {name!r} has shape {a.shape}, the flow expects {tuple(shape)}; {mismatch}"
            )
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise FlowFileError(
                f"{path}: array {name!r} has dtype {a.dtype}, the flow expects {np.dtype(dtype)}; {mismatch}"
            )
        # The loading flow's dtype decides for constants: torch keeps masks and permutations
        # as float buffers, JAX as booleans and integers (NumPyro would otherwise train
        # them). Floating weights keep their saved precision.
        keep = np.issubdtype(np.dtype(dtype), np.floating) and np.issubdtype(a.dtype, np.floating)
        out[name] = a if keep else a.astype(dtype)
    return out
