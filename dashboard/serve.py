"""The dashboard's process (`apigw dashboard`): Streamlit's server, with the modules every page
needs imported before it listens.

Streamlit imports a page's modules when the page first runs, so without this the first
visitor after a start or a deploy waits for pandas, pandas' table styling, Arrow and the
dashboard's own modules (~0.5 s on a 2-CPU machine, bench/dashboard_pageload.py's "first
session" line) on top of the page itself.

    python -m dashboard.serve run dashboard/asgi.py --server.port 8501 ...   # streamlit's CLI
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Final

# Imported by every page (directly or by the first dataframe, table or chart drawn).
PAGE_MODULES: Final = ("pandas", "pandas.io.formats.style", "dashboard.common",
                       "dashboard.charts", "dashboard.client")
# Streamlit's own, loaded lazily by the elements the pages use; names that a Streamlit
# version does not have are skipped.
STREAMLIT_MODULES: Final = ("pyarrow", "streamlit.dataframe_util", "streamlit.elements.arrow",
                            "streamlit.elements.vega_charts", "streamlit.elements.widgets.button",
                            "streamlit.elements.lib.column_types")


def warm() -> None:
    for name in PAGE_MODULES:
        importlib.import_module(name)
    for name in STREAMLIT_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def main() -> None:
    warm()
    from streamlit.web import cli

    sys.argv = ["streamlit", *sys.argv[1:]]
    cli.main(prog_name="streamlit")  # a click command: it exits the process itself


if __name__ == "__main__":
    main()
