"""Render report blocks as one self-contained HTML page (inline CSS, plots as base64 PNG data URIs, no script)."""

from __future__ import annotations

import base64
from html import escape

from rapidun.reporting.doc import Block, Code, Facts, Figure, Heading, Note, Paragraph, Table

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       background: #f6f7f9; color: #1d232a; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 1.7em; margin-top: 0.3em; border-bottom: 2px solid #dde1e6; padding-bottom: 0.3em; }
h2 { font-size: 1.35em; margin-top: 1.8em; border-bottom: 1px solid #e4e7eb; padding-bottom: 0.2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0 0.2em; font-size: 0.84em; }
th, td { border: 1px solid #cfd4da; padding: 3px 6px; vertical-align: top; }
td { overflow-wrap: anywhere; }
th { background: #eef1f4; text-align: left; font-weight: 600; }
th.r { text-align: right; }
td.r { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td:first-child { white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
.scroll { overflow-x: auto; }
.caption, figcaption { color: #5b6670; font-size: 0.82em; margin: 0.2em 0 1em; font-style: italic; }
.note { color: #7a5a00; background: #fff8e1; border-left: 3px solid #e0b100; padding: 4px 10px; font-size: 0.9em; }
figure { margin: 0.5em 0 1.2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e7eb; }
pre { background: #f3f4f6; border: 1px solid #e1e4e8; padding: 10px 12px; overflow-x: auto; font-size: 0.82em; }
ul.facts { padding-left: 1.2em; }
"""

# The page needs nothing but its inline style and data: images; the browser enforces that (no script, no fetch).
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'; base-uri 'none'; "
    "form-action 'none'"
)


def _table(t: Table) -> str:
    align = [t.align[i] if i < len(t.align) else "l" for i in range(len(t.headers))]
    cls = [' class="r"' if a == "r" else "" for a in align]
    head = "".join(f"<th{c}>{escape(h)}</th>" for h, c in zip(t.headers, cls, strict=True))
    body = "".join(
        "<tr>" + "".join(f"<td{c}>{escape(v)}</td>" for v, c in zip(row, cls, strict=False)) + "</tr>\n"
        for row in t.rows
    )
    cap = f'<div class="caption">{escape(t.caption)}</div>' if t.caption else ""
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table></div>{cap}'


def render_html(blocks: list[Block], title: str = "RapidUn report") -> str:
    """The report as a standalone HTML document; every text is escaped, every image is a ``data:`` URI."""
    parts: list[str] = []
    for b in blocks:
        match b:
            case Heading():
                anchor = f' id="{escape(b.anchor)}"' if b.anchor else ""
                parts.append(f"<h{b.level}{anchor}>{escape(b.text)}</h{b.level}>")
            case Paragraph():
                parts.append(f"<p>{escape(b.text)}</p>")
            case Note():
                parts.append(f'<p class="note">{escape(b.text)}</p>')
            case Facts():
                items = "".join(f"<li><b>{escape(k)}:</b> {escape(v)}</li>" for k, v in b.items)
                parts.append(f'<ul class="facts">{items}</ul>')
            case Table():
                parts.append(_table(b))
            case Figure():
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(
                    f'<figure id="plot-{escape(b.name)}"><img src="data:image/png;base64,{data}" '
                    f'alt="{escape(b.title)}"><figcaption>{escape(b.caption)}</figcaption></figure>'
                )
            case Code():
                parts.append(f"<pre><code>{escape(b.text)}</code></pre>")
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
