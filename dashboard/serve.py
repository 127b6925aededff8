"""The dashboard's process (`apigw dashboard`): Streamlit's server, with the modules every page
needs imported before it listens, logging JSON lines like every other process.

Streamlit imports a page's modules when the page first runs, so without this the first
visitor after a start or a deploy waits for pandas, pandas' table styling, Arrow and the
dashboard's own modules (~0.5 s on a 2-CPU machine, bench/dashboard_pageload.py's "first
session" line) on top of the page itself.

    python -m dashboard.serve run dashboard/asgi.py --server.port 8501 ...   # streamlit's CLI
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import Final

from apigw.logs import JsonFormatter, configure

COMPONENT: Final = "dashboard"

# Imported by every page (directly or by the first dataframe, table or chart drawn).
PAGE_MODULES: Final = ("pandas", "pandas.io.formats.style", "dashboard.common",
                       "dashboard.charts", "dashboard.client")
# Streamlit's own, loaded lazily by the elements the pages use; names that a Streamlit
# version does not have are skipped.
STREAMLIT_MODULES: Final = ("pyarrow", "streamlit.dataframe_util", "streamlit.elements.arrow",
                            "streamlit.elements.vega_charts", "streamlit.elements.widgets.button",
                            "streamlit.elements.lib.column_types")


def warm() -> None:
    # The pages' read cache is declared before Streamlit's runtime exists, which Streamlit
    # reports as a warning at every start; the cache works (the runtime's storage serves it).
    cache_log = logging.getLogger("streamlit.runtime.caching.cache_data_api")
    level = cache_log.level
    cache_log.setLevel(logging.ERROR)
    try:
        for name in PAGE_MODULES:
            importlib.import_module(name)
    finally:
        cache_log.setLevel(level)
    for name in STREAMLIT_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def json_logs() -> None:
    """Every log line as apigw's JSON: the root logger (our modules, libraries), and Streamlit's
    loggers, which do not propagate and each get a console handler of Streamlit's own text
    format as Streamlit sets them up (`streamlit.logger.setup_formatter`, which has no hook:
    wrapped, so each of those handlers formats JSON instead; if a Streamlit version renamed it,
    its lines would stay text, nothing else would change)."""
    import streamlit.logger as streamlit_logger

    configure(COMPONENT)
    formatter = JsonFormatter(COMPONENT)
    set_up = streamlit_logger.setup_formatter

    def setup_formatter(logger: logging.Logger) -> None:
        set_up(logger)
        handler = getattr(logger, "streamlit_console_handler", None)
        if isinstance(handler, logging.Handler):
            handler.setFormatter(formatter)

    streamlit_logger.setup_formatter = setup_formatter
    streamlit_logger.update_formatter()  # the loggers made before this


def main() -> None:
    json_logs()
    warm()
    from streamlit.web import cli

    sys.argv = ["streamlit", *sys.argv[1:]]
    cli.main(prog_name="streamlit")  # a click command: it exits the process itself


if __name__ == "__main__":
    main()
