"""`pyroflows demo` (what `make demo` runs) on both backends, at a few steps."""

from __future__ import annotations

import math

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
