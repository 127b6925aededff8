"""The dashboard process's Prometheus metrics, served at `/metrics` (dashboard/asgi.py).

What the dashboard asks of the control-plane API, as it asks it: reads served from its 5 s
read cache make no call and are not counted here.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Histogram

# outcome: ok, client_error (4xx problem), server_error (5xx or an unreadable answer),
# unavailable (no answer: refused, timed out)
API_CALLS: Final = Counter("apigw_dashboard_api_calls_total",
                           "Control-plane API calls made by the dashboard.",
                           ["method", "outcome"])
API_CALL_SECONDS: Final = Histogram("apigw_dashboard_api_call_duration_seconds",
                                    "Control-plane API calls made by the dashboard, until "
                                    "answered or failed.", ["method"],
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                             2.5, 5.0, 10.0))
