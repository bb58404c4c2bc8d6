"""The sweep report's HTML page: one self-contained file, its PNG images embedded as data
URIs. What goes on it is gathered by :mod:`orchestrator.report`."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Panel", "TrialRow", "render_page"]


@dataclass(frozen=True)
class Panel:
    """One figure of the report, or the reason it is not drawn yet."""

    title: str
    caption: str
    image: bytes | None = None  # PNG
    note: str | None = None


@dataclass(frozen=True)
class TrialRow:
    """A top trial: its number, objective values and parameters (as text)."""

    number: int
    values: Sequence[float]
    params: str


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 980px; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
p.caption, p.meta { color: #555; } p.note { color: #a15c00; font-style: italic; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 0.2rem 0.6rem; text-align: right; }
th { border-bottom: 1px solid #999; } td.params { text-align: left; font-size: 0.85rem; }
"""


def _trials_html(objectives: Sequence[str], rows: Sequence[TrialRow]) -> str:
    """The top trials (Pareto set or best) with their values and parameters."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["trial", *objectives, "params"])
    cells = []
    for row in rows:
        values = "".join(f"<td>{v:.4g}</td>" for v in row.values)
        params = html.escape(row.params)
        cells.append(f"<tr><td>{row.number}</td>{values}<td class='params'>{params}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(cells)}</table>" if cells else ""


def render_page(
    name: str,
    meta: str,
    objectives: Sequence[str],
    top: Sequence[TrialRow],
    panels: Sequence[Panel],
) -> str:
    """The report's HTML: a title, the `meta` line (plain text), the top trials' table and
    every panel; every image is embedded, so the file stands alone."""
    parts = [
        f"<h1>Sweep {html.escape(name)}</h1>",
        f"<p class='meta'>{html.escape(meta)}</p>",
        _trials_html(objectives, top),
    ]
    for panel in panels:
        parts.append(f"<h2>{html.escape(panel.title)}</h2>")
        parts.append(f"<p class='caption'>{html.escape(panel.caption)}</p>")
        if panel.image is not None:
            data = base64.b64encode(panel.image).decode("ascii")
            alt = html.escape(panel.title, quote=True)
            parts.append(f"<img alt='{alt}' src='data:image/png;base64,{data}'>")
        else:
            parts.append(f"<p class='note'>Not drawn yet: {html.escape(panel.note or '')}.</p>")
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Sweep {html.escape(name)}</title><style>{_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
