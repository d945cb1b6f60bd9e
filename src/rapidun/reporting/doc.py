"""Format-neutral report blocks; :mod:`.markdown` and :mod:`.html` render the same list of blocks.

Every text field holds plain (unescaped) text: the renderers escape it for their format.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Heading:
    """A section title; ``anchor`` is the HTML id (and the table-of-contents target)."""

    text: str
    level: int = 2
    anchor: str | None = None


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Note:
    """A one-line remark, e.g. why a plot or section was skipped."""

    text: str


@dataclass(frozen=True)
class Facts:
    """Labelled values, rendered as a bullet list."""

    items: list[tuple[str, str]]


@dataclass(frozen=True)
class Table:
    """A table of text cells; ``align`` holds ``"l"`` or ``"r"`` per column (default: left)."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    align: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Figure:
    """A PNG plot; written to ``plots/<name>.png`` and embedded in the HTML."""

    name: str
    title: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class Code:
    """A preformatted block (e.g. the YAML config)."""

    text: str
    lang: str = ""


Block = Heading | Paragraph | Note | Facts | Table | Figure | Code
