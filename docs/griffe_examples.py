"""A griffe extension of the pyroflows site (``mkdocs.yml`` loads it for mkdocstrings).

The project's docstrings follow the Google style with an ``Example:`` section of
doctest lines. griffe's Google parser knows only the plural heading, ``Examples:``, as
a section of examples, and would render ``Example:`` as an admonition of Markdown text
(so ``>>>`` lines became block quotes and ``[0.5, 1.0]`` a link). This extension renames
the heading before the docstring is parsed, so both spellings render as code.

It also reports an ``Example:`` heading whose lines are not indented under it: Google
style needs the indent, and without it the lines render as prose. The warning names the
object and, under ``mkdocs build --strict``, fails the build.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from griffe import Extension, Object

_HEADING = re.compile(r"^(\s*)Examples?:[ \t]*$")
_LOG = logging.getLogger("mkdocs.plugins.pyroflows_docstrings")


def _unindented_example(lines: list[str]) -> int | None:
    """The line number of an ``Example(s):`` heading whose next text line is not indented under it."""
    for i, line in enumerate(lines):
        match = _HEADING.match(line)
        if not match:
            continue
        following = next((nxt for nxt in lines[i + 1 :] if nxt.strip()), None)
        if following is not None and len(following) - len(following.lstrip()) <= len(match.group(1)):
            return i
    return None


class ExampleSections(Extension):
    """Treat a Google ``Example:`` heading as ``Examples:``; warn when its lines are not indented."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        lines = obj.docstring.value.splitlines()
        bad = _unindented_example(lines)
        if bad is not None:
            _LOG.warning(
                "%s:%s: (%s) the lines of an Example section must be indented under its heading "
                "(Google style); they would render as prose",
                obj.filepath,
                (obj.docstring.lineno or 0) + bad,
                obj.path,
            )
        obj.docstring.value = "\n".join(_HEADING.sub(r"\1Examples:", line) for line in lines)
