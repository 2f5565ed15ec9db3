"""The `pyroflows demo` command (what `make demo` runs), at a few steps."""

import math
import re

import pytest

from pyroflows.cli import main


def test_demo_prints_a_table_of_elbos(capsys):
    main(["demo", "--flow", "realnvp", "--steps", "30", "--no-progress"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["AutoNormal (mean field)", "pyroflows 'realnvp'"]
    for row in rows:
        elbo = float(row.split("|")[2])
        assert math.isfinite(elbo) and elbo < 0
    assert re.search(r"30 SVI steps", out)


def test_demo_rejects_an_unknown_flow():
    with pytest.raises(SystemExit, match="unknown flow 'nope'"):
        main(["demo", "--flow", "nope", "--steps", "1"])
