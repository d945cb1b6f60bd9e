"""Render report blocks as GitHub-flavoured Markdown (plots linked as ``plots/<name>.png``)."""

from __future__ import annotations

import re

from rapidun.reporting.doc import Block, Code, Facts, Figure, Heading, Note, Paragraph, Table

_SPECIAL = re.compile(r"([\\`*\[\]|<>&#!~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def md_escape(text: str) -> str:
    """``text`` on one line with Markdown/HTML-significant characters backslash-escaped.

    Raw HTML in the input (e.g. ``<script>``) therefore shows as text in any CommonMark renderer.
    """
    return _SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _table(t: Table) -> list[str]:
    align = [t.align[i] if i < len(t.align) else "l" for i in range(len(t.headers))]
    lines = [
        "| " + " | ".join(md_escape(h) for h in t.headers) + " |",
        "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |",
    ]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in t.rows]
    if t.caption:
        lines += ["", f"*{md_escape(t.caption)}*"]
    return lines


def render_markdown(blocks: list[Block], plot_dir: str = "plots") -> str:
    """The report as Markdown text.

    Args:
        blocks: the report's blocks.
        plot_dir: folder of the PNG files, relative to the Markdown file.
    """
    out: list[str] = []
    for b in blocks:
        match b:
            case Heading():
                out.append("#" * b.level + " " + md_escape(b.text))
            case Paragraph():
                out.append(md_escape(b.text))
            case Note():
                out.append(f"> {md_escape(b.text)}")
            case Facts():
                out.append("\n".join(f"- **{md_escape(k)}:** {md_escape(v)}" for k, v in b.items))
            case Table():
                out.append("\n".join(_table(b)))
            case Figure():
                out.append(f"![{md_escape(b.title)}]({plot_dir}/{b.name}.png)\n\n*{md_escape(b.caption)}*")
            case Code():
                fence = _fence(b.text)
                out.append(f"{fence}{b.lang}\n{b.text.rstrip()}\n{fence}")
    return "\n\n".join(out) + "\n"
