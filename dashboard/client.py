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

from dashboard.metrics import API_CALL_SECONDS, API_CALLS

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

    def with_token(self, token: str | None) -> ApiClient:
        return ApiClient(self.base_url, token or self.token, self.timeout_s)

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
        outcome = "ok"
        with API_CALL_SECONDS.labels(method).time():
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as exc:
                outcome = "client_error" if exc.code < 500 else "server_error"
                raise _problem(exc) from None
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                outcome = "unavailable"
                reason = getattr(exc, "reason", exc)
                raise ApiUnavailable(f"{self.base_url} unreachable: {reason}") from None
            except ValueError as exc:
                outcome = "server_error"
                raise ApiError(502, "Unreadable answer", str(exc)) from None
            finally:
                API_CALLS.labels(method, outcome).inc()

    # -- reads ---------------------------------------------------------------------------------
    # `span` is {"minutes": m} or {"from": epoch, "to": epoch} (see dashboard.common.Span).

    def health(self) -> bool:
        try:
            self.call("GET", "/healthz")
        except (ApiError, ApiUnavailable):
            return False
        return True

    def endpoints(self, span: dict[str, Any], sparkline: bool = False) -> list[dict[str, Any]]:
        """Endpoint summaries; with sparkline=True each has `sparkline` (requests per bucket,
        at most 60 buckets), all from one API call."""
        params = {**span, "sparkline": "true"} if sparkline else span
        return list(self.call("GET", f"{PREFIX}/endpoints", params)["endpoints"])

    def endpoint_names(self, span: dict[str, Any]) -> list[dict[str, Any]]:
        """Endpoint keys (route_id, method, http_route, requests), busiest first."""
        return list(self.call("GET", f"{PREFIX}/endpoints/names", span)["endpoints"])

    def timeseries(self, span: dict[str, Any], route_id: str | None = None,
                   method: str | None = None, route: str | None = None,
                   compare: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{PREFIX}/endpoints/timeseries", {
            **span, "route_id": route_id, "method": method, "route": route,
            "compare": compare})
        return result

    def top_clients(self, span: dict[str, Any], route_id: str, method: str, route: str,
                    limit: int = 10, compare: str | None = "prev") -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/endpoints/top-clients", {
            **span, "route_id": route_id, "method": method, "route": route,
            "limit": limit, "compare": compare})["clients"])

    def breakdown(self, span: dict[str, Any], route_id: str, method: str, route: str,
                  by: str = "status", compare: str | None = "prev",
                  limit: int = 10) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/endpoints/breakdown", {
            **span, "route_id": route_id, "method": method, "route": route,
            "by": by, "compare": compare, "limit": limit})["rows"])

    def requests(self, span: dict[str, Any], **filters: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{PREFIX}/requests", {**span, **filters})
        return result

    def anomalies(self, span: dict[str, Any], **filters: Any) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/anomalies", {**span, **filters})["anomalies"])

    def anomaly(self, anomaly_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{PREFIX}/anomalies/{_q(anomaly_id)}")
        return result

    def recommendations(self, status: str | None = None) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/recommendations",
                              {"status": status})["recommendations"])

    def policies(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{PREFIX}/policies")
        return result

    def policy_history(self, policy_id: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{PREFIX}/policies/{_q(policy_id)}/history")["versions"])

    def policy_diff(self, policy_id: str, older: int | None = None,
                    newer: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{PREFIX}/policies/{_q(policy_id)}/diff",
                                           {"from": older, "to": newer})
        return result

    def targeted_impact(self, span: dict[str, Any], route_id: str, method: str, client: str,
                        limit: int, window_s: float) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{PREFIX}/policies/targeted/impact", {
            **span, "route_id": route_id, "method": method, "client": client, "limit": limit,
            "window_s": window_s})
        return result

    def audit(self, count: int = 100, subject: str | None = None, actor: str | None = None,
              action: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Newest first; subject, actor and action match exactly or, ending in *, as a prefix;
        `since` (epoch seconds) keeps the records written from then on."""
        return list(self.call("GET", f"{PREFIX}/audit", {
            "count": count, "subject": subject, "actor": actor, "action": action,
            "from": since})["records"])

    def kill_switch(self) -> bool:
        return bool(self.call("GET", f"{PREFIX}/analytics/kill-switch")["engaged"])

    def auto_modes(self) -> dict[str, str]:
        return dict(self.call("GET", f"{PREFIX}/analytics/auto-mode")["modes"])

    # -- actions -------------------------------------------------------------------------------

    def act(self, recommendation_id: str, action: str, reason: str) -> dict[str, Any]:
        path = f"{PREFIX}/recommendations/{_q(recommendation_id)}/{action}"
        result: dict[str, Any] = self.call("POST", path, body={"reason": reason})
        return result

    def dismiss_anomaly(self, anomaly_id: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", f"{PREFIX}/anomalies/{_q(anomaly_id)}/dismiss",
                                           body={"reason": reason})
        return result

    def targeted_limit(self, **body: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", f"{PREFIX}/policies/targeted", body=body)
        return result

    def rollback_policy(self, policy_id: str, reason: str,
                        to_version: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "POST", f"{PREFIX}/policies/{_q(policy_id)}/rollback",
            body={"reason": reason, "to_version": to_version})
        return result

    def set_kill_switch(self, engaged: bool, reason: str) -> bool:
        return bool(self.call("PUT", f"{PREFIX}/analytics/kill-switch",
                              body={"engaged": engaged, "reason": reason})["engaged"])

    def set_auto_mode(self, group: str, mode: str | None, reason: str) -> dict[str, str]:
        return dict(self.call("PUT", f"{PREFIX}/analytics/auto-mode",
                              body={"group": group, "mode": mode, "reason": reason})["modes"])

    def run_analytics(self, reason: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", f"{PREFIX}/analytics/run",
                                           body={"reason": reason})
        return result


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _problem(exc: urllib.error.HTTPError) -> ApiError:
    try:
        document = json.loads(exc.read() or b"{}")
    except ValueError:
        document = {}
    if not isinstance(document, dict):
        document = {}
    return ApiError(exc.code, str(document.get("title") or exc.reason),
                    str(document.get("detail") or ""))
