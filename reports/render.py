"""Sections of the report and their rendering as HTML (self-contained) and Markdown."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #eaf6ea; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
p.no-data { color: #777; font-style: italic; } p.note { color: #555; font-size: 0.9em; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; font-size: 0.85em; }
pre { padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
.status-FAILED { color: #b00; font-weight: bold; }
"""


@dataclass
class Cell:
    """A table cell: its text, and for numbers the exact value and whether it is the best."""

    text: str
    value: float | None = None
    best: bool = False
    code: bool = False


@dataclass
class Table:
    """A table with a header row and a CSV file it was written to (relative path)."""

    columns: list[str]
    rows: list[list[Cell]]
    table_id: str
    csv: str | None = None


@dataclass
class Image:
    """A figure: relative path of its PNG and a caption."""

    src: str
    caption: str


@dataclass
class Section:
    """One section of the report.

    Attributes:
        section_id: HTML id (``leaderboard``, ``pareto``...).
        title: heading.
        has_data: whether there was data for it (else ``empty`` says why).
        blocks: paragraphs (str), tables, images and preformatted text, in order.
    """

    section_id: str
    title: str
    has_data: bool = True
    empty: str = ""
    blocks: list[object] = field(default_factory=list)


@dataclass
class Pre:
    """Preformatted text (a spec, a command)."""

    text: str


def num(value: float | None, digits: int = 4) -> str:
    """A number as shown in tables (``-`` when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _html_table(table: Table) -> str:
    out = [f'<table id="{html.escape(table.table_id)}">', "<thead><tr>"]
    out += [f"<th>{html.escape(c)}</th>" for c in table.columns]
    out.append("</tr></thead><tbody>")
    for row in table.rows:
        out.append("<tr>")
        for cell in row:
            classes = []
            attrs = ""
            if cell.value is not None:
                classes.append("num")
                attrs = f' data-value="{float(cell.value)!r}"'
            if cell.best:
                classes.append("best")
            if cell.text in ("FAILED", "FINISHED", "KILLED", "RUNNING"):
                classes.append(f"status-{cell.text}")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            text = html.escape(cell.text) + (" ★" if cell.best else "")
            if cell.code:
                text = f"<code>{text}</code>"
            out.append(f"<td{cls}{attrs}>{text}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if table.csv:
        out.append(f'<p class="note">CSV: <a href="{html.escape(table.csv)}">{table.csv}</a></p>')
    return "".join(out)


def render_html(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole report as one HTML page (no scripts, no network: figures are relative PNGs)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(subtitle)}</p>",
        "<nav><ul>",
    ]
    parts += [f'<li><a href="#{s.section_id}">{html.escape(s.title)}</a></li>' for s in sections]
    parts.append("</ul></nav>")
    for section in sections:
        flag = "true" if section.has_data else "false"
        parts.append(f'<section id="{section.section_id}" data-has-data="{flag}">')
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if not section.has_data:
            parts.append(f'<p class="no-data">No data: {html.escape(section.empty)}</p>')
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append(_html_table(block))
            elif isinstance(block, Image):
                parts.append(
                    f'<figure><img src="{html.escape(block.src)}" '
                    f'alt="{html.escape(block.caption)}"><figcaption>'
                    f"{html.escape(block.caption)}</figcaption></figure>"
                )
            elif isinstance(block, Pre):
                parts.append(f"<pre>{html.escape(block.text)}</pre>")
            else:
                parts.append(f"<p>{html.escape(str(block))}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The report as Markdown (figures linked by relative path)."""
    lines = [f"# {title}", "", subtitle, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if not section.has_data:
            lines += [f"_No data: {section.empty}_", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(_md_escape(c) for c in block.columns) + " |")
                lines.append("|" + "---|" * len(block.columns))
                for row in block.rows:
                    cells = [
                        (f"**{_md_escape(c.text)}**" if c.best else _md_escape(c.text)) for c in row
                    ]
                    lines.append("| " + " | ".join(cells) + " |")
                if block.csv:
                    lines += ["", f"CSV: [{block.csv}]({block.csv})"]
            elif isinstance(block, Image):
                lines.append(f"![{block.caption}]({block.src})")
            elif isinstance(block, Pre):
                lines += ["```", block.text, "```"]
            else:
                lines.append(str(block))
            lines.append("")
    return "\n".join(lines) + "\n"
