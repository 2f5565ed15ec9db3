"""`pyroflows demo` (what `make demo` runs) on both backends, at a few steps."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from pyroflows.cli import main


def _rows(out):
    lines = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


# torch only: the JAX demo's pieces (AutoFlow, evaluate, Predictive) are tested in tests/jax,
# and compiling its four programs again here would cost about a minute of the suite's budget.
@pytest.mark.parametrize("backend", ["torch"])
def test_demo_prints_its_table_and_writes_the_figure(backend, capsys, tmp_path):
    out_png = tmp_path / "demo.png"
    main(["demo", "--backend", backend, "--flow", "realnvp", "--steps", "20", "--no-progress", "--out", str(out_png)])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [r[0] for r in rows] == ["AutoNormal", "AutoFlow realnvp"]
    for r in rows:
        elbo, iwelbo, khat = float(r[1]), float(r[2]), float(r[3])
        assert math.isfinite(elbo) and elbo < 0 and iwelbo >= elbo and math.isfinite(khat)
        assert float(r[4]) <= float(r[5])  # mean error <= max error
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"
    assert f"{backend}, 20 SVI steps" in out


def test_reference_is_a_converged_nuts_run():
    from pyroflows.demo import reference

    ref = reference()
    assert ref["draws"].shape == (800, 31) and ref["rhat"] < 1.01 and ref["ess"] > 1000
    # the shipped draws are a thinned subset of the run the means summarise
    assert np.all(np.abs(ref["draws"].mean(0) - ref["mean"]) < 8 * ref["sd"] / np.sqrt(800))


def test_demo_rejects_an_unknown_flow_and_lists_commands(capsys):
    with pytest.raises(SystemExit, match="unknown flow 'nope'"):
        main(["demo", "--flow", "nope", "--steps", "1"])
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "flows" in out


def test_the_demo_data_ship_with_the_package_and_need_no_sklearn(monkeypatch):
    from pyroflows.demo import breast_cancer

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    x, y = breast_cancer()
    assert x.shape == (569, 30) and x.dtype == np.float64 and y.shape == (569,)
    assert sorted(np.unique(y)) == [0.0, 1.0] and int(y.sum()) == 357  # 357 benign, 212 malignant
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(x.std(0), 1.0, rtol=1e-12)


def test_the_shipped_data_are_sklearns_and_cite_their_source(tmp_path):
    datasets = pytest.importorskip("sklearn.datasets")
    from pyroflows.demo import _load_reference_file, breast_cancer, write_breast_cancer

    d = datasets.load_breast_cancer()
    shipped = _load_reference_file("breast_cancer.npz")
    np.testing.assert_array_equal(shipped["data"], d.data)
    np.testing.assert_array_equal(shipped["target"], d.target)
    assert list(shipped["feature_names"]) == list(d.feature_names)
    assert "CC BY 4.0" in str(shipped["source"]) and "10.24432/C5DW2B" in str(shipped["source"])
    x, y = breast_cancer()
    np.testing.assert_array_equal(x, (d.data - d.data.mean(0)) / d.data.std(0))
    # the file is what write_breast_cancer makes
    with np.load(write_breast_cancer(tmp_path / "bc.npz")) as f:
        assert all(np.array_equal(f[k], shipped[k]) for k in shipped) and sorted(f.files) == sorted(shipped)


def _fake_fits(ref):
    rng = np.random.default_rng(0)
    diag = {"elbo": -80.0, "iwelbo": -79.0, "khat": 0.4}
    return [
        {
            "guide": g,
            "draws": ref["draws"] + 0.01 * rng.standard_normal(ref["draws"].shape),
            "diag": diag,
            "seconds": 1.0,
        }
        for g in ("AutoNormal", "AutoFlow iaf")
    ]


def test_without_matplotlib_the_demo_prints_its_table_and_a_note(monkeypatch, capsys, tmp_path):
    """`pip install pyroflows[torch]` alone: no sklearn, no matplotlib; the demo still runs."""
    import pyroflows.torch.demo as torch_demo
    from pyroflows.demo import breast_cancer, reference

    def fit_guides(flow, steps, seed, progress):  # the data step runs; SVI is the part tested elsewhere
        x, y = breast_cancer()
        assert x.shape == (569, 30)
        return _fake_fits(reference())

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(torch_demo, "fit_guides", fit_guides)
    out_png = tmp_path / "demo.png"
    main(["demo", "--backend", "torch", "--steps", "5", "--no-progress", "--out", str(out_png)])
    out = capsys.readouterr().out
    assert [r[0] for r in _rows(out)] == ["AutoNormal", "AutoFlow iaf"]
    assert f"skipped the figure {out_png}: it needs matplotlib (pip install matplotlib, or 'pyroflows[all]')" in out
    assert "wrote" not in out and not out_png.exists()
