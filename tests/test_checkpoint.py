"""``load_flow`` on files it cannot use: each error names the file, the problem and the fix.

The same checks on both backends; each backend is imported only by its own cases, so a
machine with one backend runs that half.
"""

from __future__ import annotations

import gc
import json
import re
import warnings
import zipfile

import numpy as np
import pytest

from pyroflows import checkpoint

BACKENDS = ["torch", "jax"]


def _backend(name):
    return pytest.importorskip(f"pyroflows.{name}")


def _saved_flow(backend, path):
    """A small flow of ``backend`` saved at ``path``."""
    pf = _backend(backend)
    pf.save_flow(pf.build_flow("realnvp", 3, num_layers=2, hidden_dims=(4,)), path)
    return pf


def _rewrite(path, edit):
    """Rewrite a saved file with ``edit(meta, arrays)`` applied, using numpy alone."""
    with np.load(path) as f:
        meta = json.loads(str(f[checkpoint._META]))
        arrays = {k: f[k] for k in f.files if k != checkpoint._META}
    edit(meta, arrays)
    np.savez(path, **{checkpoint._META: np.array(json.dumps(meta))}, **arrays)


def _rewritten(backend, tmp_path, edit):
    """``(pf, path)``: a small flow of ``backend`` saved at ``tmp_path / "f.npz"``, rewritten by ``edit``."""
    path = tmp_path / "f.npz"
    pf = _saved_flow(backend, path)
    _rewrite(path, edit)
    return pf, path


def _refused(pf, path, pattern, error=ValueError):
    """Assert that ``pf.load_flow(path)`` raises ``error`` with a message matching ``pattern``."""
    with pytest.raises(error, match=pattern) as info:
        pf.load_flow(path)
    return info


def _first_weight(arrays):
    return next(k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating) and a.ndim == 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_valid_file_still_loads(backend, tmp_path):
    pf = _saved_flow(backend, tmp_path / "f.npz")
    assert pf.load_flow(tmp_path / "f.npz").config["name"] == "realnvp"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_file_is_named(backend, tmp_path):
    pattern = r"nope\.npz: no such flow file; pass the path that save_flow wrote"
    _refused(_backend(backend), tmp_path / "nope.npz", pattern, FileNotFoundError)


def _truncated(backend, path):
    _saved_flow(backend, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (file name, writer(backend, path), what load_flow's error must say)
_NOT_FLOW_FILES = {
    "npy": (
        "weights.npy",
        lambda backend, path: np.save(path, np.zeros(3)),
        r"weights\.npy is not a pyroflows flow file \(\.npz written by save_flow\): "
        r"it holds a single numpy array \(\.npy.*load it with numpy\.load, or write the flow with save_flow",
    ),
    "text": (
        "notes.txt",
        lambda backend, path: path.write_text("dim: 3\nname: realnvp\n"),
        r"notes\.txt is not a pyroflows flow file \(\.npz written by save_flow\): it is not a zip archive",
    ),
    "truncated": (
        "f.npz",
        _truncated,
        r"f\.npz is damaged or truncated \(reading it failed with BadZipFile.*\); "
        r"save the flow again with save_flow, or copy the file again in full",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_NOT_FLOW_FILES))
def test_a_file_that_is_not_a_flow_file_is_named_and_never_unpickled(backend, case, tmp_path):
    name, write, pattern = _NOT_FLOW_FILES[case]
    path = tmp_path / name
    write(backend, path)
    info = _refused(_backend(backend), path, pattern)
    assert "allow_pickle" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_changed_byte_inside_a_weight_is_caught_by_the_checksum(backend, tmp_path):
    # the zip keeps a CRC-32 of every array: a weight changed on disk is refused, not loaded
    # (safetensors, which has no checksum, loads it; benchmarks/libraries.py)
    path = tmp_path / "f.npz"
    pf = _saved_flow(backend, path)
    with np.load(path) as f:
        name = _first_weight({k: f[k] for k in f.files if k != checkpoint._META})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
    header = 30 + len(info.filename.encode()) + len(info.extra)  # the member's local header
    data[info.header_offset + header + info.file_size - 1] ^= 0x01  # the last byte of its data
    path.write_bytes(bytes(data))
    _refused(
        pf,
        path,
        rf"f\.npz is damaged or truncated \(reading it failed with BadZipFile: Bad CRC-32 for file "
        rf"'{re.escape(name)}\.npy'\); save the flow again with save_flow, or copy the file again in full",
    )


def test_a_damaged_file_is_closed_after_the_error(tmp_path):
    # np.load leaves a file it opened itself open when the archive is damaged
    path = tmp_path / "f.npz"
    checkpoint.write(path, {"name": "maf", "dim": 2}, {"w": np.zeros(1000)}, backend="torch")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(checkpoint.FlowFileError, match="damaged or truncated"):
            checkpoint.read(path)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_array_of_the_wrong_shape_is_named(backend, tmp_path):
    names = []

    def edit(meta, arrays):
        names.append(_first_weight(arrays))
        arrays[names[0]] = arrays[names[0]][:, :-1]

    pf, path = _rewritten(backend, tmp_path, edit)
    _refused(
        pf,
        path,
        rf"f\.npz: array '{re.escape(names[0])}' has shape \(\d+, \d+\), the flow expects \(\d+, \d+\); "
        r"the file does not match the flow its own config builds .*save the flow again with save_flow",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_array(backend, bad, tmp_path):
    names = []

    def edit(meta, arrays):
        names.append(_first_weight(arrays))
        arrays[names[0]] = arrays[names[0]].copy()
        arrays[names[0]][0, 0] = bad

    pf, path = _rewritten(backend, tmp_path, edit)
    counts = "1 NaN, 0 inf" if np.isnan(bad) else "0 NaN, 1 inf"
    _refused(
        pf,
        path,
        rf"f\.npz: non-finite weights in array\(s\) '{re.escape(names[0])}' \({counts} of \d+\); "
        r"the flow was saved after its training diverged",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["config", "format"])
def test_a_missing_metadata_key_is_named(backend, key, tmp_path):
    pf, path = _rewritten(backend, tmp_path, lambda meta, arrays: meta.pop(key))
    _refused(pf, path, rf"f\.npz: its __pyroflows__ metadata lacks the key\(s\) \['{key}'\].*save the flow again")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_config_without_the_flow_name_is_named(backend, tmp_path):
    pf, path = _rewritten(backend, tmp_path, lambda meta, arrays: meta["config"].pop("name"))
    _refused(pf, path, r"f\.npz: its config lacks the key\(s\) \['name'\] that build_flow needs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_config_this_backend_cannot_build_says_to_register_it(backend, tmp_path):
    pf, path = _rewritten(backend, tmp_path, lambda meta, arrays: meta["config"].update(name="my_own_flow"))
    _refused(pf, path, rf"f\.npz: its config .* does not build a flow on the {backend} backend .*register_flow")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_npz_of_plain_arrays_and_an_object_array_are_refused(backend, tmp_path):
    pf = _backend(backend)
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.zeros(3))
    _refused(pf, plain, r"plain\.npz is not a pyroflows flow file .*without the __pyroflows__ entry")
    # an object array can only be read by unpickling it, which load_flow never does
    _, path = _rewritten(backend, tmp_path, lambda meta, arrays: arrays.update(evil=np.array([{"a": 1}], dtype=object)))
    _refused(pf, path, r"f\.npz: array 'evil' holds Python objects, which pyroflows never unpickles")


# A flow from fit_mle(standardize=True) ends in a fixed Standardize layer and records
# standardize=True in its config; load_flow appends that layer again before loading.

_STD_DATA = 5.0 + np.random.default_rng(1).normal(size=(200, 2)) * np.array([1.0, 0.5])


def _fit_standardized(backend):
    """``(pf, fitted, log_prob)``: a realnvp fitted in float64 by ``fit_mle`` (standardize on)."""
    pf = _backend(backend)
    if backend == "torch":
        import torch

        from pyroflows.torch.train import flow_log_prob

        flow = pf.build_flow("realnvp", 2, num_layers=2, hidden_dims=(16, 16)).double()
        fitted, _ = pf.fit_mle(flow, torch.as_tensor(_STD_DATA), num_steps=20, progress=False)

        def log_prob(f, x):
            with torch.no_grad():
                return flow_log_prob(f, torch.as_tensor(x, dtype=torch.float64)).numpy()
    else:
        import jax

        jax.config.update("jax_enable_x64", True)  # as the JAX test modules do
        import jax.numpy as jnp

        from pyroflows.jax.train import flow_log_prob

        flow = pf.build_flow("realnvp", 2, key=jax.random.key(0), num_layers=2, hidden_dims=(16, 16))
        fitted, _ = pf.fit_mle(flow, _STD_DATA, num_steps=20, progress=False)

        def log_prob(f, x):
            return np.asarray(flow_log_prob(f, jnp.asarray(x, jnp.float64)))

    return pf, fitted, log_prob


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_standardized_fit_mle_flow_round_trips(backend, tmp_path):
    pf, fitted, log_prob = _fit_standardized(backend)
    assert fitted.config["standardize"] is True
    np.testing.assert_allclose(np.asarray(fitted.parts[-1].loc), 5.0, atol=0.3)  # the data's mean, not 0
    path = tmp_path / "fitted.npz"
    pf.save_flow(fitted, path)
    loaded = pf.load_flow(path)
    assert loaded.config == fitted.config
    assert type(loaded.parts[-1]).__name__ == "Standardize"
    np.testing.assert_allclose(np.asarray(loaded.parts[-1].loc), np.asarray(fitted.parts[-1].loc), rtol=0, atol=0)
    expected = log_prob(fitted, _STD_DATA)
    assert expected.dtype == np.float64 and np.isfinite(expected).all()
    np.testing.assert_allclose(log_prob(loaded, _STD_DATA), expected, rtol=0, atol=1e-10)


def test_a_standardized_torch_flow_loads_in_jax(tmp_path):
    pf_jax = _backend("jax")
    pf_torch, fitted, torch_log_prob = _fit_standardized("torch")
    path = tmp_path / "fitted.npz"
    pf_torch.save_flow(fitted, path)
    import jax

    jax.config.update("jax_enable_x64", True)  # the saved float64 weights stay float64
    import jax.numpy as jnp

    from pyroflows.jax.train import flow_log_prob

    loaded = pf_jax.load_flow(path)
    assert loaded.config == fitted.config
    got = np.asarray(flow_log_prob(loaded, jnp.asarray(_STD_DATA, jnp.float64)))
    np.testing.assert_allclose(got, torch_log_prob(fitted, _STD_DATA), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_v1_spline_coupling_file_loads_with_its_old_meaning(backend, tmp_path):
    """v1 files stored a spline coupling's MLP output coordinate-major; v2 reads them right.

    The reference is the v1 layer computed by hand from the file's arrays: the MLP's
    output reshaped to ``(dim - dim // 2, 3K - 1)``, then the spline.
    """
    torch = pytest.importorskip("torch")
    _backend(backend)
    from pyroflows.torch.transforms.transformers import rational_quadratic_spline

    dim, bins, hidden = 5, 4, (6,)
    rng = np.random.default_rng(0)
    # v1 arrays of a one-layer nsf coupling, written as the old code wrote them
    arrays = {
        "0.conditioner.net.0.weight": rng.normal(size=(6, 2)),
        "0.conditioner.net.0.bias": rng.normal(size=6),
        "0.conditioner.net.2.weight": rng.normal(size=(3 * 11, 6)) * 0.3,
        "0.conditioner.net.2.bias": rng.normal(size=3 * 11) * 0.3,
    }
    config = {"name": "nsf", "dim": dim, "num_layers": 1, "hidden_dims": list(hidden), "count_bins": bins}
    path = str(tmp_path / "v1.npz")
    meta = {"format": "pyroflows-flow-v1", "backend": "torch", "config": config}
    np.savez(path, **{checkpoint._META: np.array(json.dumps(meta))}, **arrays)

    x = rng.normal(size=(7, dim))
    h = np.maximum(x[:, :2] @ arrays["0.conditioner.net.0.weight"].T + arrays["0.conditioner.net.0.bias"], 0)
    out = h @ arrays["0.conditioner.net.2.weight"].T + arrays["0.conditioner.net.2.bias"]
    params = torch.as_tensor(out.reshape(7, dim - 2, 3 * bins - 1))  # coordinate-major: the v1 meaning
    yb, logd = rational_quadratic_spline(torch.as_tensor(x[:, 2:]), params, 3.0)
    expected_y = np.concatenate([x[:, :2], yb.numpy()], -1)

    pf = _backend(backend)
    flow = pf.load_flow(path)
    if backend == "torch":
        y, ladj = (t.detach().numpy() for t in flow.call_and_ladj(torch.as_tensor(x)))
    else:
        import jax

        y, ladj = (np.asarray(t) for t in jax.vmap(flow.call_and_ladj)(x))
    # JAX computes in float32 unless x64 is enabled; a wrong layout is off by O(1)
    tol = 1e-12 if y.dtype == np.float64 else 1e-5
    np.testing.assert_allclose(y, expected_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(ladj, logd.sum(-1).numpy(), rtol=tol, atol=tol)
