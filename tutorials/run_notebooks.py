"""Execute the tutorials in full mode and save them with their outputs (what gets committed).

    python tutorials/run_notebooks.py                 # every notebook
    python tutorials/run_notebooks.py 01_flows_as_distributions.ipynb

The test suite runs the same notebooks in fast mode (PYROFLOWS_TUTORIAL_FAST=1).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent


def run(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    env_fast = os.environ.pop("PYROFLOWS_TUTORIAL_FAST", None)
    start = time.perf_counter()
    try:
        nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    finally:
        if env_fast is not None:
            os.environ["PYROFLOWS_TUTORIAL_FAST"] = env_fast
    seconds = time.perf_counter() - start
    nb.metadata["pyroflows"] = {"fast_mode": False, "executed": datetime.date.today().isoformat(),
                                "seconds": round(seconds)}
    nbformat.write(nb, path)
    return seconds


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
    for name in names:
        print(f"{name}: {run(HERE / name):.0f} s", flush=True)
