"""`rows_table`: short tables as static HTML, long ones as a data grid."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest


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
