"""The one Markdown / HTML writer: a document is a title and a list of blocks.

The instability report (proxy/report/build.py), the verdicts (proxy/verdict.py) and the spike-kit
dissection (proxy/forensics/dissect.py) all describe what they say as blocks; this module alone
knows how Markdown and HTML spell them. HTML is self-contained: figures are embedded as base64
PNG, so one file can be mailed or opened anywhere; Markdown links the PNG files.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 1  # 1 is the first level under the document's title


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Quote:
    text: str


@dataclass(frozen=True)
class Items:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    """Cells are formatted with :func:`fmt`. A ``status`` column colours its rows in HTML."""

    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True)
class Figure:
    path: str  # a PNG, relative to the folder the document is written to
    caption: str = ""


Block = Union[Heading, Paragraph, Quote, Items, Table, Figure]


def fmt(value: Any) -> str:
    """A cell: 4 significant digits, thousands separators from 10,000, '—' for nothing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}×{v}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "—"
    return str(value)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_cell(str(h)) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(fmt(v)) for v in row) + " |" for row in rows]
    return out + [""]


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    out = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * (block.level + 1) + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Quote):
            out += [f"> {block.text}", ""]
        elif isinstance(block, Items):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            out += markdown_table(block.headers, block.rows)
        elif isinstance(block, Figure):
            out += [f"![{block.caption}]({block.path})", ""]
            out += [f"*{block.caption}*", ""] if block.caption else []
        else:
            raise TypeError(f"not a document block: {block!r}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
tr.completed td.status{color:#1a7f37}tr.diverged td.status{color:#cf222e;font-weight:bold}
tr.failed td.status{color:#8250df;font-weight:bold}tr.running td.status,tr.interrupted td.status{color:#9a6700}
tr.unknown td.status{color:#6e7781;font-style:italic}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555;margin-bottom:1.5em}
blockquote{color:#555;border-left:3px solid #ddd;margin:0.5em 0;padding-left:1em}
code{background:#f6f8fa;padding:0 3px}
"""


def _html_table(table: Table) -> list[str]:
    esc = html.escape
    status_col: Optional[int] = list(table.headers).index("status") if "status" in table.headers else None
    out = ["<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in table.headers) + "</tr>"]
    for row in table.rows:
        css = f' class="{esc(str(row[status_col]))}"' if status_col is not None else ""
        tds = "".join(
            f'<td class="status">{esc(fmt(v))}</td>' if i == status_col else f"<td>{esc(fmt(v))}</td>"
            for i, v in enumerate(row)
        )
        out.append(f"<tr{css}>{tds}</tr>")
    out.append("</table>")
    return out


def to_html(title: str, blocks: Sequence[Block], base_dir: str | Path) -> str:
    """The document as one HTML file; figure paths are read relative to ``base_dir``."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level + 1}>{esc(block.text)}</h{block.level + 1}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Quote):
            out.append(f"<blockquote>{esc(block.text)}</blockquote>")
        elif isinstance(block, Items):
            out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            out += _html_table(block)
        elif isinstance(block, Figure):
            data = base64.b64encode((Path(base_dir) / block.path).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(block.caption)}</figcaption></figure>")
        else:
            raise TypeError(f"not a document block: {block!r}")
    out.append("</body></html>")
    return "\n".join(out)


__all__ = ["Block", "CSS", "Figure", "Heading", "Items", "Paragraph", "Quote", "Table", "fmt",
           "markdown_table", "to_html", "to_markdown"]
