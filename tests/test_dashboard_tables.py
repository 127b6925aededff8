"""`rows_table`: short tables as static HTML, long ones as a data grid; Investigate's summary
tables as one HTML element, escaped."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.tables import comparison, share_block, tables_html


def _page(rows: int) -> None:
    import pandas as pd

    from dashboard.common import rows_table

    rows_table(pd.DataFrame({"policy": [f"p{i}" for i in range(rows)], "limit": range(rows)}))


@pytest.mark.parametrize(("rows", "static"), [(1, True), (25, True), (26, False), (400, False)])
def test_short_tables_are_static_and_long_ones_a_grid(rows: int, static: bool) -> None:
    app = AppTest.from_function(_page, args=(rows,)).run()
    assert not app.exception
    shown = app.table if static else app.dataframe
    assert len(app.table) == int(static)
    assert len(app.dataframe) == int(not static)
    [element] = shown
    assert list(element.value["policy"]) == [f"p{i}" for i in range(rows)]
    assert element.value.shape == (rows, 2)


def test_investigate_tables_escape_what_clients_sent() -> None:
    hostile = '<img src=x onerror="alert(1)">'
    row = {"client": hostile, "requests": 3, "share": 0.5, "compare_share": None,
           "errors_5xx": 0, "auth_failures": 0, "distinct_paths": 1}
    drawn = tables_html(comparison({"this window": {"requests": 3.0}}), "since <now>",
                        [share_block("Top clients", [row], "client")])
    assert hostile not in drawn
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in drawn
    assert "since &lt;now&gt;" in drawn
    assert drawn.count("<table") == 2
    assert "grid-column: 1 / -1" in drawn  # eight columns: a whole row
