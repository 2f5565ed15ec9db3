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

Why ``.npz`` and not safetensors: ``benchmarks/libraries.py`` compares the two on the same
flows (``benchmarks/results/libraries.md``). safetensors reads and writes faster (a few to
twenty times, tens of milliseconds at a million parameters) at the same file size, and
refuses truncated and foreign files as this reader does; but it keeps no checksum, so a
changed byte inside a weight loads silently, where the zip's CRC-32 of every array makes
this reader refuse the file. The npz needs numpy alone, and every file saved so far is one.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

__all__ = [
    "write",
    "read",
    "rebuild_arguments",
    "is_standardized",
    "match_arrays",
    "float_dtype",
    "build_error",
    "FlowFileError",
    "FORMAT",
]

FORMAT = "pyroflows-flow-v2"
#: Older formats this version still reads, upgrading their arrays (``_upgrade``).
_READS = ("pyroflows-flow-v1", FORMAT)
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


def write(path: str | os.PathLike, config: dict, arrays: dict, backend: str) -> None:
    """Write ``config`` (JSON-serialisable) and the named ``arrays`` to ``path`` as one ``.npz`` file.

    Args:
        path: where to write; the name is used as given (numpy adds no ``.npz``).
        config: what rebuilds the flow: ``name``, ``dim`` and ``build_flow``'s other arguments.
        arrays: the flow's weights and constants by torch ``state_dict`` name.
        backend: ``"torch"`` or ``"jax"``, recorded for information.

    Raises:
        TypeError: ``config`` is not JSON-serialisable.
        OSError: ``path`` cannot be written.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "flow.npz")
        >>> write(path, {"name": "maf", "dim": 2}, {"0.weight": np.eye(2, dtype=np.float32)}, backend="torch")
        >>> read(path)[0]
        {'name': 'maf', 'dim': 2}
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
            path,
            "it holds a single numpy array (.npy, as numpy.save writes)",
            "load it with numpy.load, or write the flow with save_flow",
        )
    if not head.startswith(_ZIP_MAGIC):
        raise _not_a_flow_file(path, "it is not a zip archive (.npz), e.g. a text or pickle file")


def _require_keys(path, obj: dict, keys, what: str, needs: str = "", hint: str = "") -> None:
    """Raise ``FlowFileError`` naming the ``keys`` that ``obj`` (the file's ``what``) lacks."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise FlowFileError(
            f"{path}: its {what} lacks the key(s) {missing}{needs} (it has {sorted(obj)}); {hint}{_RESAVE}"
        )


def _read_meta(path, raw) -> dict:
    try:
        meta = json.loads(str(raw[()]))
    except (ValueError, TypeError) as e:
        raise FlowFileError(f"{path}: its {_META} metadata is not valid JSON ({e}); {_RESAVE}") from None
    if not isinstance(meta, dict):
        raise FlowFileError(f"{path}: its {_META} metadata is not a JSON object; {_RESAVE}")
    edited = "the file was edited or written by something other than save_flow: "
    _require_keys(path, meta, _META_KEYS, f"{_META} metadata", hint=edited)
    if meta["format"] not in _READS:
        raise FlowFileError(
            f"{path} has format {meta['format']!r}; this version of pyroflows reads {list(_READS)}: "
            "load it with the pyroflows version that wrote it and save it with this one"
        )
    config = meta["config"]
    if not isinstance(config, dict):
        raise FlowFileError(f"{path}: its config is {type(config).__name__}, not a JSON object; {_RESAVE}")
    _require_keys(path, config, _CONFIG_KEYS, "config", " that build_flow needs")
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


def read(path: str | os.PathLike) -> tuple[dict, dict, str]:
    """Read a flow file written by ``write``.

    Nothing is unpickled; a damaged file (a truncated archive, or an array whose bytes no
    longer match their CRC-32) is refused.

    Args:
        path: the file ``save_flow`` wrote.

    Returns:
        ``(config, arrays, saved_by_backend)``: the builder's arguments, the arrays by
        name (each checked finite where floating), and ``"torch"`` or ``"jax"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FlowFileError: (a ``ValueError``) ``path`` is not a readable pyroflows flow file;
            the message says why and what to do.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "flow.npz")
        >>> write(path, {"name": "maf", "dim": 2}, {"0.weight": np.eye(2, dtype=np.float32)}, backend="jax")
        >>> config, arrays, backend = read(path)
        >>> config["name"], arrays["0.weight"].dtype, backend
        ('maf', dtype('float32'), 'jax')
        >>> with open(path, "w") as f:
        ...     _ = f.write("not a flow")
        >>> read(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pyroflows.checkpoint.FlowFileError: ...flow.npz is not a pyroflows flow file (.npz written by save_flow): ...
    """
    _check_file(path)
    try:
        # Opened here, not by numpy: np.load leaves a file it opened itself open when the
        # archive turns out damaged (a ResourceWarning per failed load).
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
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
    return meta["config"], _upgrade(meta, arrays), meta["backend"]


def _upgrade(meta: dict, arrays: dict) -> dict:
    """Arrays of an older format in today's layout.

    v1 -> v2: a spline coupling's MLP output was coordinate-major (``dim - dim // 2``
    blocks of ``3K - 1`` spline parameters); every coupling is now parameter-major, so the
    rows of the last layer of each ``nsf`` coupling conditioner are reordered.
    """
    config = meta["config"]
    if meta["format"] != "pyroflows-flow-v1" or config.get("name") != "nsf":
        return arrays
    if config.get("conditioner", "coupling") != "coupling":
        return arrays
    n = int(config["dim"]) - int(config["dim"]) // 2
    p = 3 * int(config.get("count_bins", 8)) - 1
    last: dict[str, int] = {}
    for key in arrays:
        head, sep, tail = key.rpartition("conditioner.net.")
        if sep and tail.split(".")[0].isdigit():
            last[head + sep] = max(last.get(head + sep, -1), int(tail.split(".")[0]))
    out = dict(arrays)
    for prefix, index in last.items():
        for kind in ("weight", "bias"):
            a = out[f"{prefix}{index}.{kind}"]
            out[f"{prefix}{index}.{kind}"] = a.reshape(n, p, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
    return out


# Config keys that record what was done to the built flow, not arguments of ``build_flow``:
# ``standardize`` (added by ``fit_mle(standardize=True)``) means the flow ends in a fixed
# ``Standardize`` layer, which ``load_flow`` appends before it loads the arrays.
_NOT_BUILD_KEYS = ("name", "dim", "standardize")


def rebuild_arguments(config: dict) -> tuple[str, int, dict[str, Any]]:
    """``(name, dim, keyword arguments)`` that rebuild the saved flow with ``build_flow``.

    Args:
        config: the config ``read`` returned (it has ``name`` and ``dim``).

    Returns:
        The family name, the dimension, and the other keyword arguments, without
        ``standardize`` (see ``is_standardized``).

    Example:
        >>> rebuild_arguments({"name": "maf", "dim": 3, "num_layers": 2, "standardize": True})
        ('maf', 3, {'num_layers': 2})
    """
    kwargs = {k: v for k, v in config.items() if k not in _NOT_BUILD_KEYS}
    return config["name"], config["dim"], kwargs


def is_standardized(config: dict) -> bool:
    """Whether the saved flow ends in a ``Standardize`` layer (``fit_mle(standardize=True)``).

    ``load_flow`` then appends ``Standardize(zeros(dim), ones(dim))`` to what ``build_flow``
    makes; the saved ``<index>.loc`` and ``<index>.scale`` arrays fill it.

    Args:
        config: the config ``read`` returned.

    Returns:
        ``True`` when the config records ``standardize=True``.

    Example:
        >>> is_standardized({"name": "maf", "dim": 2}), is_standardized({"name": "maf", "dim": 2, "standardize": True})
        (False, True)
    """
    return bool(config.get("standardize", False))


def float_dtype(arrays: dict) -> np.dtype:
    """The floating dtype of the saved weights.

    Args:
        arrays: the arrays ``read`` returned.

    Returns:
        The dtype of the first floating array; float32 when there is none.

    Example:
        >>> import numpy as np
        >>> float_dtype({"mask": np.ones(2, bool), "weight": np.zeros(2)})
        dtype('float64')
    """
    for a in arrays.values():
        if np.issubdtype(a.dtype, np.floating):
            return a.dtype
    return np.dtype(np.float32)


def build_error(path: str | os.PathLike, config: dict, backend: str, error: Exception) -> ValueError:
    """The error for a config that ``build_flow`` of ``backend`` rejects.

    Args:
        path: the file, for the message.
        config: its config.
        backend: ``"torch"`` or ``"jax"``.
        error: what ``build_flow`` raised.

    Returns:
        A ``FlowFileError`` to raise: it names the file, the config and the fix.

    Example:
        >>> build_error("f.npz", {"name": "mine", "dim": 2}, "torch", KeyError("mine"))  # doctest: +ELLIPSIS
        FlowFileError("f.npz: its config {'name': 'mine', 'dim': 2} does not build a flow on the torch backend ...")
    """
    return FlowFileError(
        f"{path}: its config {config} does not build a flow on the {backend} backend ({error}); "
        "if the flow is a user-registered family, register it (register_flow) before load_flow"
    )


def match_arrays(expected: dict, arrays: dict, path: str | os.PathLike) -> dict:
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

    Example:
        >>> import numpy as np
        >>> expected = {"mask": ((2,), np.dtype(np.float32)), "weight": ((2,), np.dtype(np.float32))}
        >>> out = match_arrays(expected, {"mask": np.ones(2, bool), "weight": np.zeros(2)}, "f.npz")
        >>> out["mask"].dtype, out["weight"].dtype  # the constant is cast, the weight keeps float64
        (dtype('float32'), dtype('float64'))
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
