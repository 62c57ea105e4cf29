"""Griffe extension for the API reference: turn the reST bits of convlora's docstrings into Markdown.

convlora's docstrings are Google style (``Args:``, ``Returns:``) but also use a few reStructuredText
habits that Markdown renders badly: ``:func:`name``` roles, bare ``>>>`` examples (Markdown reads them as
nested block quotes), and ``====`` simple tables (Markdown reads the rules as headings). This extension
rewrites them on the docstring text before mkdocstrings parses it; the source files are left alone.

- roles become optional cross-references: a link where the target is documented, plain code otherwise;
- consecutive ``>>>``/``...`` lines and their output become a fenced ``pycon`` block;
- a reST simple table becomes a Markdown table.

Loaded by mkdocs.yml (``extensions: [tools/griffe_docstrings.py]``).
"""

from __future__ import annotations

import html
import importlib
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc|const):`(~?)([^`]+)`")
RULE = re.compile(r"^(\s*)(=+)((?: +=+)+)\s*$")
DOCTEST_FLAG = re.compile(r"\s*# doctest:.*$")


class ConvloraDocstrings(griffe.Extension):
    """Rewrites reST roles, doctest lines and simple tables in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = obj.docstring.value
        text = convert_tables(text)
        text = fence_doctests(text)
        text = ROLE.sub(lambda m: _role(m, obj), text)
        obj.docstring.value = text


def _canonical(path: str) -> str:
    """``convlora.Name`` (a re-export) -> the path where the object is defined, when it can be imported."""
    head, _, name = path.rpartition(".")
    if not head.startswith("convlora") or not name:
        return path
    try:
        target = getattr(importlib.import_module(head), name)
    except (ImportError, AttributeError):
        return path
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and module.startswith("convlora"):
        return f"{module}.{qualname}"
    return path


def _lookup(obj: griffe.Object, name: str) -> str | None:
    """Path of ``name`` as seen from ``obj``: a member of its class, else of its module (aliases followed)."""
    scopes: list[Any] = []
    if obj.is_class:
        scopes.append(obj)
    if obj.parent is not None and obj.parent.is_class:
        scopes.append(obj.parent)
    scopes.append(obj.module)
    for scope in scopes:
        member = scope.members.get(name)
        if member is not None:
            return member.target_path if member.is_alias else member.path
    return None


def _role(match: re.Match[str], obj: griffe.Object) -> str:
    tilde, target = match.group(1), match.group(2).strip().rstrip("()")
    shown = target.rsplit(".", 1)[-1] if tilde else target
    if target.startswith("convlora"):
        identifier = _canonical(target)
    else:
        first, _, rest = target.partition(".")
        found = _lookup(obj, first)
        identifier = (f"{found}.{rest}" if rest else found) if found else target
    code = f"<code>{html.escape(shown)}</code>"
    return f'<autoref identifier="{html.escape(identifier)}" optional>{code}</autoref>'


def fence_doctests(text: str) -> str:
    """Wrap each run of ``>>>`` lines (with their continuation and output lines) in a ``pycon`` fence."""
    lines = text.splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.lstrip()
        if not stripped.startswith(">>>"):
            out.append(line)
            index += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block = []
        while index < len(lines) and lines[index].strip() and lines[index].startswith(indent):
            block.append(DOCTEST_FLAG.sub("", lines[index][len(indent) :]))
            index += 1
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        out.extend(f"{indent}{b}" for b in block)
        out.append(f"{indent}```")
    return "\n".join(out)


def convert_tables(text: str) -> str:
    """Turn reST simple tables (``====  ====`` rules, a header, a rule, rows, a closing rule) into Markdown."""
    lines = text.splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        match = RULE.match(lines[index])
        if not match:
            out.append(lines[index])
            index += 1
            continue
        indent = match.group(1)
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[index])]
        closing = next((j for j in range(index + 2, len(lines)) if RULE.match(lines[j])), None)
        end = next((j for j in range(closing + 1, len(lines)) if RULE.match(lines[j])), None) if closing else None
        if closing is None or end is None:
            out.append(lines[index])
            index += 1
            continue
        header = _cells(lines[index + 1], spans)
        rows: list[list[str]] = []
        for raw in lines[closing + 1 : end]:
            if not raw.strip():
                continue
            cells = _cells(raw, spans)
            if rows and not cells[0]:
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "---|" * len(header))
        out.extend(indent + "| " + " | ".join(row) + " |" for row in rows)
        index = end + 1
    return "\n".join(out)


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    cells = []
    for number, (start, stop) in enumerate(spans):
        stop = len(line) if number == len(spans) - 1 else spans[number + 1][0]
        cells.append(line[start:stop].strip().replace("|", "\\|"))
    return cells
