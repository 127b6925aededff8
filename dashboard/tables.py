"""Investigate's summary tables as HTML: the comparison with earlier windows and the share
tables (status codes, error classes, top clients, top IPs), drawn as one `st.html` element.

One element instead of ten (headings, captions, columns, tables) is ~100-150 ms less per load
of the page on a 2-CPU machine (docs/dashboard.md); the tables stay plain HTML whose cells
select and copy as text. Every value is escaped: client ids and addresses come from requests.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import pandas as pd
from pandas.io.formats.style import Styler

NARROW_COLUMNS = 5  # a share table with more (top clients: 8) takes a whole row of the grid
_WIDE = " style='grid-column: 1 / -1'"


def share_table(rows: list[dict[str, Any]], name: str) -> pd.DataFrame:
    """Rows of the API's top clients or breakdown (share now and before) as a frame."""
    return pd.DataFrame([{
        name: row.get("client", row.get("value")) or "(none)", "requests": row["requests"],
        "share": row["share"], "share before": row["compare_share"],
        "change": row["share"] - (row["compare_share"] or 0.0),
        **({"5xx": row["errors_5xx"], "auth failures": row["auth_failures"],
            "distinct paths": row["distinct_paths"]} if "errors_5xx" in row else {}),
    } for row in rows])


def share_block(title: str, rows: list[dict[str, Any]], name: str) -> str:
    """A titled share table, formatted, its values (client ids, addresses) escaped; a wide
    one (top clients) takes a whole row of the grid."""
    frame = share_table(rows, name)
    percent: dict[Any, str | Callable[[object], str] | None] = {
        column: "{:.1%}" for column in ("share", "share before", "change")}
    table = frame.style.hide(axis="index").format(percent, na_rep="-", escape="html").to_html()
    wide = _WIDE if len(frame.columns) > NARROW_COLUMNS else ""
    return f"<div{wide}><p><strong>{html.escape(title)}</strong></p>{table}</div>"


def comparison(rows: dict[str, dict[str, float]]) -> Styler:
    """This window's totals against the same window a day and a week earlier (rows)."""
    return pd.DataFrame(rows).T.style.format({
        "5xx rate": "{:.2%}", "requests": "{:,.0f}", "5xx": "{:,.0f}", "429s": "{:,.0f}",
        "auth failures": "{:,.0f}", "worst p95 ms": "{:,.1f}"})


_STYLE = """<style>
.apigw-tables table { border-collapse: collapse; font-size: 0.875rem; margin-bottom: 0.5rem; }
.apigw-tables th, .apigw-tables td { padding: 0.25rem 0.5rem; white-space: nowrap;
  border-bottom: 1px solid rgba(49, 51, 63, 0.1); text-align: left; }
.apigw-tables thead th { font-weight: 600; }
.apigw-tables .grid { display: grid; gap: 1rem;
  grid-template-columns: repeat(auto-fit, minmax(24rem, 1fr)); }
.apigw-tables .grid > div { overflow-x: auto; }
</style>"""


def tables_html(compared: Styler, during_label: str, blocks: list[str]) -> str:
    """The comparison, then the share blocks side by side (two a row where they fit)."""
    return (f"{_STYLE}<div class='apigw-tables'>"
            "<h3>Compared with the same window earlier</h3>" + compared.to_html()
            + "<h3>Who and what</h3>"
            + f"<p><small>Shares {html.escape(during_label)}; a client absent before shows 0% "
            f"before.</small></p><div class='grid'>{''.join(blocks)}</div></div>")
