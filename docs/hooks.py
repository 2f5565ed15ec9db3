"""MkDocs hooks of the pyroflows site (``mkdocs.yml`` names this file under ``hooks:``).

- ``families.md`` is generated at every build from ``pyroflows.registry.SPECS``, so the
  list of families and their options cannot go stale: a family added to the table appears
  on the next build, and nothing generated is committed.
- The notebooks in ``tutorials/`` (outside ``docs/``) join the site as pages under
  ``tutorials/``; mkdocs-jupyter renders them with their saved outputs, without running them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"

# FlowSpec fields that the page shows in its own places; any other field (a later
# addition to FlowSpec) is listed where it differs from its default, so a new field shows
# up without an edit here.
_SHOWN = {"name", "family", "summary", "jacobian", "inverse", "reference", "num_layers", "hidden_dims", "options"}
# The conditioner x transformer fields, shown as one "structure" line.
_STRUCTURE = {"conditioner", "transformer", "reads"}


def _cell(value: object) -> str:
    """``value`` as text that is safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def families_markdown() -> str:
    """The families page: one section per entry of ``SPECS``, with its options as a table."""
    from pyroflows.registry import SPECS

    out = [
        "# Flow families",
        "",
        "Every family registered in `pyroflows.registry.SPECS`, generated from that table at "
        "each build of this site. The same name builds the same flow with the same options on "
        "both backends: `pyroflows.torch.build_flow(name, dim, **options)` and "
        "`pyroflows.jax.build_flow(name, dim, key=..., **options)`. `num_layers` and "
        "`hidden_dims` (where the family has a conditioner network) are keywords of every "
        "`build_flow` call; the defaults below apply when they are `None`. "
        "`pyroflows.registry.describe(name)` returns the same information as one paragraph.",
        "",
        "| name | family | summary |",
        "| --- | --- | --- |",
    ]
    for name, spec in SPECS.items():
        out.append(f"| [`{name}`](#{name}) | {_cell(spec.family)} | {_cell(spec.summary)} |")
    for name, spec in SPECS.items():
        hidden = "no conditioner network" if spec.hidden_dims is None else f"`{spec.hidden_dims}`"
        out += [
            "",
            f"## `{name}` {{#{name}}}",
            "",
            f"{spec.summary}.",
            "",
            f"- **family**: {spec.family}",
            f"- **Jacobian**: {spec.jacobian}",
            f"- **inverse**: {spec.inverse}",
            f"- **reference**: {spec.reference}",
            f"- **defaults**: `num_layers={spec.num_layers}`, hidden dims {hidden}",
        ]
        conditioner = getattr(spec, "conditioner", None)
        if conditioner is not None:
            reads = f", reading its {spec.reads}" if conditioner == "autoregressive" else ""
            out.append(f"- **structure**: `{conditioner}` conditioner{reads} x `{spec.transformer}` transformer")
        for field in dataclasses.fields(spec):
            value = getattr(spec, field.name)
            if field.name not in _SHOWN and field.name not in _STRUCTURE and value != field.default:
                out.append(f"- **{field.name}**: `{value!r}`")
        out.append("")
        if spec.options:
            out += ["| option | default | meaning |", "| --- | --- | --- |"]
            out += [f"| `{k}` | `{_cell(repr(o.default))}` | {_cell(o.doc)} |" for k, o in spec.options.items()]
        else:
            out.append("No options beyond `num_layers`.")
    return "\n".join(out) + "\n"


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps the notebooks
def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "families.md", content=families_markdown()))
    for notebook in sorted(TUTORIALS.glob("*.ipynb")):
        files.append(
            File(
                f"tutorials/{notebook.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
