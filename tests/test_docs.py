"""The documentation site builds in strict mode, so a broken cross-reference, a malformed
docstring or a page missing from the navigation fails the suite.

The build is the one ``make docs`` runs (``mkdocs build --strict``), into a temporary
directory; the tutorials are rendered from their saved outputs, not executed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyroflows.registry import SPECS

pytest.importorskip("mkdocs", reason="the docs extra (mkdocs) is not installed")

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("pyroflows_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    warnings = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, "\n".join(warnings) or result.stderr[-4000:]
    for page in [
        "index.html",
        "architecture/index.html",
        "adding_a_family/index.html",
        "api/torch/index.html",
        "api/jax/index.html",
        "api/registry/index.html",
        "tutorials/01_flows_as_distributions/index.html",
    ]:
        assert (site / page).is_file(), page
    # The API pages hold the rendered reference, not just their headings.
    torch_api = (site / "api" / "torch" / "index.html").read_text()
    assert 'id="pyroflows.torch.build_flow"' in torch_api and 'id="pyroflows.torch.AutoFlow"' in torch_api
    families = (site / "families" / "index.html").read_text()
    for name in SPECS:
        assert f'id="{name}"' in families, name


def test_families_page_lists_every_family_and_option():
    """The page is generated from ``SPECS`` at each build, so it cannot go stale."""
    page = _hooks().families_markdown()
    for name, spec in SPECS.items():
        assert f"## `{name}` {{#{name}}}" in page
        for option in spec.options:
            assert f"| `{option}` |" in page, (name, option)
