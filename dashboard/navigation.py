"""The dashboard's pages: file under dashboard/views, title, icon and URL path."""

from __future__ import annotations

from pathlib import Path
from typing import Final

VIEWS: Final = Path(__file__).resolve().parent / "views"
DEFAULT_PAGE: Final = "overview"  # served at the app's root
PAGES: Final = (("overview.py", "Overview", ":material/monitoring:", DEFAULT_PAGE),
                ("investigate.py", "Investigate", ":material/troubleshoot:", "investigate"),
                ("security.py", "Security review", ":material/shield:", "security"),
                ("policies.py", "Policies", ":material/tune:", "policies"),
                ("audit.py", "Audit", ":material/history:", "audit"))
