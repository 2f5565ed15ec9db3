"""The README's Python examples run as written (one namespace per block)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


# The quick start runs fit_posterior at its defaults, which may take up to 40,000 steps: the
# suite caps that budget at a few hundred steps, below one ELBO window (the code is otherwise
# exactly the README's, and the test asks only that it runs).
SHORTER = {"fit_posterior(model, y)": "fit_posterior(model, y, max_steps=300, progress=False)"}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    code = BLOCKS[index]
    for long, short in SHORTER.items():
        code = code.replace(long, short)
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})
