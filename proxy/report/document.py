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
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from proxy.records import terminal_text


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
class Callout:
    """A boxed summary: a bold title, an optional lead sentence, then items (a report's headline,
    a verdict). ``tone`` ("pass" / "fail") colours the box in HTML."""

    title: str
    items: Sequence[str] = ()
    lead: str = ""
    tone: str = ""


@dataclass(frozen=True)
class Table:
    """Cells are formatted with :func:`fmt`. A ``status`` column colours its rows in HTML. In
    HTML a table scrolls sideways inside its own box when wider than the page, its first column
    stays in view; cells do not wrap, except those of the first column and the ``wrap`` columns
    (long text: notes, claims)."""

    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    wrap: Sequence[str] = ()


@dataclass(frozen=True)
class Figure:
    path: str  # a PNG, relative to the folder the document is written to
    caption: str = ""


Block = Union[Heading, Paragraph, Quote, Items, Callout, Table, Figure]


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
# Text from run dirs, for each viewer: run names, errors and overrides come from files that may
# have been copied from anyone, so each viewer gets them with its own syntax neutralised
# --------------------------------------------------------------------------------------------
_MARKDOWN = str.maketrans({"\\": "\\\\", "<": "&lt;", "\n": " ", "\r": " "})
_LINK = re.compile(r"\](?=[(\[])")  # the "](" or "][" of a link or an image


def md_text(text: Any) -> str:
    """Text as Markdown shows it literally: no raw HTML (``<`` escaped), no link or remote image
    (the ``]`` of ``](`` escaped), no heading or quote at its start, on one line. Backticks,
    emphasis, brackets and ``&`` are left alone: they change how text looks, not what the page does."""
    out = terminal_text(_LINK.sub(r"\\]", str(text).translate(_MARKDOWN)))  # control characters as text
    return "\\" + out if out.startswith(("#", ">")) else out


CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run (OWASP CSV injection)


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting like a formula gets a leading
    apostrophe (OWASP's advice); numbers are left as they are."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA):
        return "'" + value
    return value


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return md_text(text).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_cell(str(h)) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(fmt(v)) for v in row) + " |" for row in rows]
    return out + [""]


def markdown_callout(callout: Callout) -> list[str]:
    """A callout as a block quote: the title in bold, the lead, the items as a list."""
    lines = [f"**{md_text(callout.title)}**"]
    if callout.lead:
        lines += ["", md_text(callout.lead)]
    if callout.items:
        lines += [""] + [f"- {md_text(item)}" for item in callout.items]
    return [f"> {line}".rstrip() for line in lines] + [""]


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    out = [f"# {md_text(title)}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * (block.level + 1) + " " + md_text(block.text), ""]
        elif isinstance(block, Paragraph):
            out += [md_text(block.text), ""]
        elif isinstance(block, Quote):
            out += [f"> {md_text(block.text)}", ""]
        elif isinstance(block, Items):
            out += [f"- {md_text(item)}" for item in block.items] + [""]
        elif isinstance(block, Callout):
            out += markdown_callout(block)
        elif isinstance(block, Table):
            out += markdown_table(block.headers, block.rows)
        elif isinstance(block, Figure):
            out += [f"![{md_text(block.caption)}]({block.path})", ""]
            out += [f"*{md_text(block.caption)}*", ""] if block.caption else []
        else:
            raise TypeError(f"not a document block: {block!r}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em;color:#222}
.scroll{overflow-x:auto;max-width:100%;margin:0.5em 0 1.5em}
table{border-collapse:separate;border-spacing:0;font-size:13px}
th,td{border-right:1px solid #ccc;border-bottom:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap;
background:#fff}
tr:first-child th{border-top:1px solid #ccc}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left;position:sticky;left:0;z-index:1;border-left:1px solid #ccc;
white-space:normal;overflow-wrap:anywhere;min-width:8em;max-width:26em}
td.wrap,th.wrap{white-space:normal;text-align:left;min-width:16em}
.callout{border:1px solid #d0d7de;border-left:6px solid #0969da;background:#f6f8fa;padding:0.5em 1em;margin:1em 0}
.callout.pass{border-left-color:#1a7f37}.callout.fail{border-left-color:#cf222e}
.callout .title{font-weight:bold;font-size:1.1em;margin:0.3em 0}.callout ul{margin:0.3em 0;padding-left:1.4em}
tr.completed td.status{color:#1a7f37}tr.diverged td.status{color:#cf222e;font-weight:bold}
tr.failed td.status{color:#8250df;font-weight:bold}tr.running td.status,tr.interrupted td.status{color:#9a6700}
tr.unknown td.status{color:#6e7781;font-style:italic}
img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:13px;color:#555;margin-bottom:1.5em}
blockquote{color:#555;border-left:3px solid #ddd;margin:0.5em 0;padding-left:1em}
code{background:#f6f8fa;padding:0 3px}
"""


def _cell_class(header: str, table: Table) -> str:
    classes = [c for c, on in (("status", header == "status"), ("wrap", header in table.wrap)) if on]
    return f' class="{" ".join(classes)}"' if classes else ""


def _html_table(table: Table) -> list[str]:
    """The table in a box that scrolls sideways when the table is wider than the page."""
    esc = html.escape
    headers = [str(h) for h in table.headers]
    status_col: Optional[int] = headers.index("status") if "status" in headers else None
    classes = [_cell_class(h, table) for h in headers]
    out = [
        '<div class="scroll"><table><tr>' + "".join(f"<th{c}>{esc(h)}</th>" for h, c in zip(headers, classes)) + "</tr>"
    ]
    for row in table.rows:
        css = f' class="{esc(str(row[status_col]))}"' if status_col is not None else ""
        tds = "".join(f"<td{c}>{esc(fmt(v))}</td>" for v, c in zip(row, classes))
        out.append(f"<tr{css}>{tds}</tr>")
    out.append("</table></div>")
    return out


def _html_callout(callout: Callout) -> str:
    esc = html.escape
    tone = f" {esc(callout.tone)}" if callout.tone else ""
    out = [f'<div class="callout{tone}"><p class="title">{esc(callout.title)}</p>']
    if callout.lead:
        out.append(f"<p>{esc(callout.lead)}</p>")
    if callout.items:
        out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in callout.items) + "</ul>")
    return "".join(out) + "</div>"


CSS_DPI = 100  # a figure is shown at its size in inches x CSS_DPI CSS pixels, whatever its DPI


def png_css_width(data: bytes) -> Optional[int]:
    """The width a PNG is shown at: its pixel width scaled from the DPI it was saved at (its pHYs
    chunk) to :data:`CSS_DPI`, so a figure saved at 200 DPI is drawn at the size of the same figure
    at 100 DPI, with twice the pixels (sharp on HiDPI screens). None: not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width = struct.unpack(">I", data[16:20])[0]
    at = data.find(b"pHYs", 8, 4096)
    if at < 0:
        return width
    per_metre, _, unit = struct.unpack(">IIB", data[at + 4 : at + 13])
    if unit != 1 or per_metre == 0:
        return width
    return round(width * CSS_DPI / (per_metre * 0.0254))


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
        elif isinstance(block, Callout):
            out.append(_html_callout(block))
        elif isinstance(block, Table):
            out += _html_table(block)
        elif isinstance(block, Figure):
            raw = (Path(base_dir) / block.path).read_bytes()
            width = png_css_width(raw)
            size = f' width="{width}"' if width else ""
            data = base64.b64encode(raw).decode("ascii")
            out.append(
                f'<figure><img alt="{esc(block.caption)}"{size} src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
        else:
            raise TypeError(f"not a document block: {block!r}")
    out.append("</body></html>")
    return "\n".join(out)


__all__ = [
    "Block",
    "CSS",
    "CSS_DPI",
    "Callout",
    "Figure",
    "Heading",
    "Items",
    "Paragraph",
    "Quote",
    "Table",
    "csv_cell",
    "fmt",
    "markdown_callout",
    "markdown_table",
    "md_text",
    "png_css_width",
    "to_html",
    "to_markdown",
]
