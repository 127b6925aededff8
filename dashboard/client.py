"""A small typed client of the control-plane API (the dashboard's only data source).

Plain `urllib.request`, a timeout on every call. Failures surface as `ApiUnavailable` (nothing
answered) or `ApiError` (the API answered with a problem document), never as raw tracebacks.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Final

DEFAULT_URL: Final = "http://127.0.0.1:8088"
PREFIX: Final = "/api/v1"


class ApiError(Exception):
    """The API answered with an error (an RFC 9457 problem document when it could)."""

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail


class ApiUnavailable(Exception):
    """Nothing answered at the API's address (down, refused, timed out)."""


@dataclass(frozen=True, slots=True)
class ApiClient:
    base_url: str = DEFAULT_URL
    token: str | None = None
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls) -> ApiClient:
        return cls(os.environ.get("APIGW_API_URL", DEFAULT_URL).rstrip("/"),
                   os.environ.get("APIGW_API_TOKEN") or None,
                   float(os.environ.get("APIGW_API_TIMEOUT_S", "10")))

    def call(self, method: str, path: str, params: dict[str, Any] | None = None,
             body: dict[str, Any] | None = None) -> Any:
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        url = self.base_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        if not url.startswith(("http://", "https://")):
            raise ApiUnavailable(f"APIGW_API_URL must be http(s)://, got {self.base_url!r}")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method,  # noqa: S310 - http(s) only
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise _problem(exc) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiUnavailable(f"{self.base_url} unreachable: {reason}") from None
        except ValueError as exc:
            raise ApiError(502, "Unreadable answer", str(exc)) from None

    # -- reads ---------------------------------------------------------------------------------

    def health(self) -> bool:
        try:
            self.call("GET", "/healthz")
        except (ApiError, ApiUnavailable):
            return False
        return True

    def endpoints(self, minutes: float) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/endpoints", {"minutes": minutes})["endpoints"])

    def timeseries(self, minutes: float, route_id: str | None = None, method: str | None = None,
                   route: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{PREFIX}/endpoints/timeseries", {
            "minutes": minutes, "route_id": route_id, "method": method, "route": route})
        return result

    def top_clients(self, minutes: float, route_id: str, method: str, route: str,
                    limit: int = 10) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/endpoints/top-clients", {
            "minutes": minutes, "route_id": route_id, "method": method, "route": route,
            "limit": limit})["clients"])

    def breakdown(self, minutes: float, route_id: str, method: str, route: str,
                  by: str = "status") -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/endpoints/breakdown", {
            "minutes": minutes, "route_id": route_id, "method": method, "route": route,
            "by": by})["rows"])

    def requests(self, minutes: float, **filters: Any) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/requests",
                              {"minutes": minutes, **filters})["requests"])

    def anomalies(self, minutes: float, **filters: Any) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/anomalies",
                              {"minutes": minutes, **filters})["anomalies"])

    def recommendations(self, status: str | None = None) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/recommendations",
                              {"status": status})["recommendations"])

    def policies(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{PREFIX}/policies")
        return result

    def policy_history(self, policy_id: str) -> list[dict[str, Any]]:
        path = f"{PREFIX}/policies/{urllib.parse.quote(policy_id, safe='')}/history"
        return list(self.call("GET", path)["versions"])

    def audit(self, count: int = 100) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/audit", {"count": count})["records"])

    def kill_switch(self) -> bool:
        return bool(self.call("GET", f"{PREFIX}/analytics/kill-switch")["engaged"])

    def auto_modes(self) -> dict[str, str]:
        return dict(self.call("GET", f"{PREFIX}/analytics/auto-mode")["modes"])

    # -- actions -------------------------------------------------------------------------------

    def act(self, recommendation_id: str, action: str, reason: str) -> dict[str, Any]:
        path = f"{PREFIX}/recommendations/{urllib.parse.quote(recommendation_id, safe='')}"
        result: dict[str, Any] = self.call("POST", f"{path}/{action}", body={"reason": reason})
        return result

    def rollback_policy(self, policy_id: str, reason: str) -> dict[str, Any]:
        path = f"{PREFIX}/policies/{urllib.parse.quote(policy_id, safe='')}/rollback"
        result: dict[str, Any] = self.call("POST", path, body={"reason": reason})
        return result

    def set_kill_switch(self, engaged: bool, reason: str) -> bool:
        return bool(self.call("PUT", f"{PREFIX}/analytics/kill-switch",
                              body={"engaged": engaged, "reason": reason})["engaged"])

    def run_analytics(self, reason: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", f"{PREFIX}/analytics/run",
                                           body={"reason": reason})
        return result


def _problem(exc: urllib.error.HTTPError) -> ApiError:
    try:
        document = json.loads(exc.read() or b"{}")
    except ValueError:
        document = {}
    if not isinstance(document, dict):
        document = {}
    return ApiError(exc.code, str(document.get("title") or exc.reason),
                    str(document.get("detail") or ""))
