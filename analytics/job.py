"""The analytics job: features -> detectors -> anomalies -> recommendations -> write-back.

`AnalyticsJob.run_once` is one pass; `Scheduler` runs it every `interval_s` and on demand.
A pass reads the per-minute rollups over the lookback (cost follows endpoints x minutes, not
raw events), judges every window, and turns flagged windows of the last `report_minutes`
into anomalies (ClickHouse `anomalies`, one row per endpoint + kind + window, never twice)
and per-endpoint recommendations (Redis). Only the instance holding the leader lease writes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import pandas as pd
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from analytics import features
from analytics.detectors import severity
from analytics.guardrails import Guardrails
from analytics.models import Anomaly, AnomalyKind, Endpoint, Recommendation
from analytics.multivariate import MultivariateDetector, corroborated
from analytics.recommend import (
    LimitRecommender,
    LoosenRule,
    build_recommendation,
    build_targeted,
    config_ceiling,
    contributors,
    current_policy,
    targeted_policy_id,
    unauthenticated_addresses,
)
from analytics.scoring import detect_all
from analytics.settings import AnalyticsSettings
from analytics.writeback import LeaderLease, WriteBack
from apigw.logs import error_text
from collector.clickhouse import SharedClient
from proxy.policy import Policy, RedisKeys
from proxy.policy_store import PolicyStore

log = logging.getLogger(__name__)

RUNS = Counter("apigw_analytics_runs_total", "Analytics runs, by outcome.", ["outcome"])
RUN_DURATION = Histogram("apigw_analytics_run_duration_seconds", "Duration of analytics runs.",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ANOMALIES = Counter("apigw_analytics_anomalies_total", "New anomalies recorded, by kind.",
                    ["kind"])
RECOMMENDATIONS = Counter("apigw_analytics_recommendations_total",
                          "Recommendations created (pending) or applied, by status.", ["status"])
LEADER = Gauge("apigw_analytics_leader", "1 while this instance holds the analytics lease.")
LAST_SUCCESS = Gauge("apigw_analytics_last_success_timestamp_seconds",
                     "When the last successful run finished (epoch seconds).")

ANOMALY_COLUMNS: Final = [
    "id", "detected_at", "window_start", "window_end", "route_id", "http_request_method",
    "http_route", "kind", "severity", "score", "metric", "baseline", "observed", "top_clients",
    "example_request_ids", "example_trace_ids", "summary",
]
MAX_EXAMPLE_QUERIES: Final = 50  # per run: evidence is bounded, whatever is flagged
MAX_ADDRESS_QUERIES: Final = 50  # per run: auth-failure windows looked at per client address
# The per-client figure whose share names an anomaly's contributors (none: no blame).
_METRIC_OF_KIND: Final[dict[AnomalyKind, str | None]] = {
    AnomalyKind.ERROR_SPIKE: "errors_5xx", AnomalyKind.CLIENT_DOMINANCE: "requests",
    AnomalyKind.TRAFFIC_SURGE: "requests", AnomalyKind.AUTH_FAILURE_BURST: "auth_failures",
    AnomalyKind.ENUMERATION: "requests", AnomalyKind.UNDECLARED_ENDPOINT: "requests",
    AnomalyKind.LATENCY_REGRESSION: None, AnomalyKind.TRAFFIC_DROP: None,
}
# Kinds a per-client limit can help with; the others are reported, not limited.
LIMITABLE: Final = frozenset({AnomalyKind.ERROR_SPIKE, AnomalyKind.CLIENT_DOMINANCE,
                              AnomalyKind.TRAFFIC_SURGE, AnomalyKind.AUTH_FAILURE_BURST,
                              AnomalyKind.ENUMERATION})
# Kinds whose named contributors get a targeted (per-client, expiring) limit.
TARGETABLE: Final = frozenset({AnomalyKind.ERROR_SPIKE, AnomalyKind.CLIENT_DOMINANCE,
                               AnomalyKind.AUTH_FAILURE_BURST, AnomalyKind.ENUMERATION})
# Status floor of example requests per kind (evidence shows the failing requests).
_EXAMPLE_STATUS: Final = {AnomalyKind.ERROR_SPIKE: 500, AnomalyKind.AUTH_FAILURE_BURST: 400}
# Kinds whose examples come from the top contributor rather than from anyone.
_BLAME_EXAMPLES: Final = frozenset({AnomalyKind.CLIENT_DOMINANCE, AnomalyKind.ENUMERATION,
                                    AnomalyKind.AUTH_FAILURE_BURST, AnomalyKind.TRAFFIC_SURGE})


class RunReport(BaseModel):
    started_at: float
    duration_s: float
    endpoints: int  # endpoints with traffic in the lookback
    anomalies: list[Anomaly] = Field(default_factory=list)  # flagged in the report window
    recommendations: list[Recommendation] = Field(default_factory=list)
    applied: list[str] = Field(default_factory=list)  # recommendation ids applied in this run
    new_anomalies: int = 0  # of `anomalies`, how many were recorded by this run
    leader: bool = False  # False: computed only, nothing written
    guardrail_actions: list[str] = Field(default_factory=list)  # "<action> <rec id>: why"


@dataclass
class Unauthenticated:
    """Of one endpoint's auth-failure bursts: the client addresses whose traffic never
    authenticated (each with the anomalies behind it), and the client values seen from them
    (a limit keyed by client id cannot reach traffic that fails authentication)."""

    addresses: dict[str, list[Anomaly]] = field(default_factory=dict)
    clients: set[str] = field(default_factory=set)
    requests: dict[str, dict[pd.Timestamp, int]] = field(default_factory=dict)  # per minute


def anomaly_id(endpoint: Endpoint, kind: str, window_start: float) -> str:
    digest = hashlib.sha1(f"{endpoint.key}|{kind}|{int(window_start)}".encode(),
                          usedforsecurity=False).hexdigest()
    return f"an-{digest[:16]}"


def _epoch(minute: pd.Timestamp) -> float:
    return float(minute.timestamp())


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


class AnalyticsJob:
    def __init__(self, settings: AnalyticsSettings, redis: aioredis.Redis, ch: SharedClient,
                 store: PolicyStore) -> None:
        self.settings = settings
        self._ch = ch
        self._store = store
        keys = RedisKeys(settings.key_prefix)
        self.lease = LeaderLease(redis, keys.analytics_lock, settings.lease_s(),
                                 holder=settings.instance)
        self.writeback = WriteBack(settings, redis, store)
        self.guardrails = Guardrails(settings, self.writeback, store, ch)
        self.writeback.guardrails = self.guardrails
        self.multivariate = MultivariateDetector(train_windows=settings.lookback_minutes)

    def detect(self, frame: pd.DataFrame, since: pd.Timestamp | None = None,
               complete_before: pd.Timestamp | None = None) -> pd.DataFrame:
        """Every window (from `since` on) scored by every detector (scoring.detect_all)."""
        return detect_all(frame, self.settings, since=since, complete_before=complete_before)

    async def frame(self, now: float) -> pd.DataFrame:
        """What a run judges: detail minutes over the lookback (empty minutes of each endpoint
        filled in: an outage is a window), preceded by request counts of the same time of
        day on previous days for seasonal baselines. Only those slices of earlier days are
        read (cost: endpoints x days x ~1.5 h, not x 24 h), so judge this frame's recent
        windows only (`detect(since=...)`), as the run does."""
        s = self.settings
        recent_start = (now // 60) * 60 - (s.report_minutes - 1) * 60
        detail_minutes = max(s.lookback_minutes, 3 * s.history_minutes + s.report_minutes + 10)
        detail_start = (now // 60) * 60 - detail_minutes * 60
        detail = await features.endpoint_minutes(self._ch, detail_start, now)
        last_complete = pd.Timestamp((now // 60) * 60 - 60, unit="s", tz="UTC")
        detail = features.complete_minutes(detail, last_complete)
        if not s.season_days:
            return detail
        margin = 10 * 60  # beyond the traffic detector's smoothing
        season = await features.season_minutes(
            self._ch, detail_start - s.season_days * 86_400 - (s.history_minutes + 20) * 60,
            detail_start,
            time_of_day=(recent_start - s.history_minutes * 60 - margin, now + margin))
        if season.empty:
            return detail
        if detail.empty:
            return season
        return pd.concat([season, detail], ignore_index=True)

    async def run_once(self, now: float | None = None) -> RunReport:
        started = time.perf_counter()
        now = time.time() if now is None else now
        try:
            report = await self._run(now)
        except Exception:
            RUNS.labels(outcome="error").inc()
            raise
        finally:
            RUN_DURATION.observe(time.perf_counter() - started)
        report.duration_s = time.perf_counter() - started
        RUNS.labels(outcome="ok").inc()
        LAST_SUCCESS.set(time.time())
        log.info("analytics run", extra={
            "duration_s": round(report.duration_s, 3), "endpoints": report.endpoints,
            "anomalies": len(report.anomalies), "new_anomalies": report.new_anomalies,
            "recommendations": len(report.recommendations), "applied": len(report.applied),
            "leader": report.leader})
        return report

    async def _run(self, now: float) -> RunReport:
        s = self.settings
        frame = await self.frame(now)
        recent_start = pd.Timestamp((now // 60) * 60 - (s.report_minutes - 1) * 60, unit="s",
                                    tz="UTC")
        detections = self.detect(frame, since=recent_start,
                                 complete_before=pd.Timestamp((now // 60) * 60, unit="s",
                                                              tz="UTC"))
        report = RunReport(started_at=now, duration_s=0.0,
                           endpoints=_count_endpoints(frame[frame["route_id"] != ""])
                           if not frame.empty else 0)
        if detections.empty:
            report.leader = await self._lead()
            if report.leader:
                report.guardrail_actions = await self.guardrails.review(now)
            return report
        minutes = pd.to_datetime(detections["minute"], utc=True)
        flagged = detections[detections["flagged"].astype(bool) & (minutes >= recent_start)]
        mv_scores = await asyncio.to_thread(self._multivariate, frame, flagged, recent_start)
        anomalies, client_frames, flagged_clients, unauthenticated = await self._anomalies(
            flagged, now, mv_scores)
        report.anomalies = anomalies
        recommendations = await self._recommend(anomalies, client_frames, flagged_clients, now,
                                                unauthenticated)
        recommendations += await self._loosen(frame, flagged, now)
        report.recommendations = recommendations
        report.leader = await self._lead()
        if not report.leader:
            return report
        report.new_anomalies = await self._record(anomalies)
        report.guardrail_actions = await self.guardrails.review(now)
        written = await self.writeback.write(recommendations, now=now)
        RECOMMENDATIONS.labels(status="pending").inc(len(written.created))
        RECOMMENDATIONS.labels(status="applied").inc(len(written.applied))
        report.recommendations = written.stored
        report.applied = written.applied
        return report

    async def _lead(self) -> bool:
        leader = await self.lease.acquire()
        LEADER.set(1 if leader else 0)
        if not leader:
            log.info("not the analytics leader: computing only",
                     extra={"leader": await self.lease.holder()})
        return leader

    def _multivariate(self, frame: pd.DataFrame, flagged: pd.DataFrame,
                      since: pd.Timestamp) -> dict[tuple[str, str, str, int], float]:
        """IsolationForest scores of the flagged endpoints' recent windows, each endpoint's
        forest fitted on its windows before `since` (a bounded number of forests a run)."""
        if flagged.empty:
            return {}
        endpoints = {(str(r), str(m), str(h)) for r, m, h in zip(
            flagged["route_id"], flagged["http_request_method"], flagged["http_route"],
            strict=True) if r}
        matched = frame[frame["route_id"] != ""]
        if not endpoints or matched.empty:
            return {}
        scored = self.multivariate.score(matched, since=since, endpoints=endpoints)
        scored = scored[scored["mv_score"].notna()]
        return {(str(r), str(m), str(h), int(pd.Timestamp(t).timestamp())): float(v)
                for t, r, m, h, v in zip(scored["minute"], scored["route_id"],
                                         scored["http_request_method"], scored["http_route"],
                                         scored["mv_score"], strict=True)}

    async def _anomalies(self, flagged: pd.DataFrame, now: float,
                         mv_scores: dict[tuple[str, str, str, int], float] | None = None,
                         ) -> tuple[list[Anomaly], dict[Endpoint, pd.DataFrame],
                                    dict[Endpoint, list[str]], dict[Endpoint, Unauthenticated]]:
        """Anomaly records for the flagged windows, with contributors and examples, and the
        unauthenticated client addresses behind auth-failure bursts."""
        if flagged.empty:
            return [], {}, {}, {}
        s = self.settings
        endpoints = sorted({Endpoint(route_id=str(r), method=str(m), http_route=str(h))
                            for r, m, h in zip(flagged["route_id"], flagged["http_request_method"],
                                               flagged["http_route"], strict=True)},
                           key=lambda e: e.key)
        clients = await features.client_minutes(
            self._ch, endpoints, now - s.client_lookback_hours * 3600, now)
        client_frames = {
            endpoint: clients[(clients["route_id"] == endpoint.route_id)
                              & (clients["http_request_method"] == endpoint.method)
                              & (clients["http_route"] == endpoint.http_route)]
            for endpoint in endpoints
        }
        anomalies: list[Anomaly] = []
        flagged_clients: dict[Endpoint, list[str]] = {endpoint: [] for endpoint in endpoints}
        example_budget = MAX_EXAMPLE_QUERIES
        address_budget = MAX_ADDRESS_QUERIES
        unauthenticated: dict[Endpoint, Unauthenticated] = {}
        ordered = flagged.sort_values("minute", ascending=False)  # newest evidence first
        for row in ordered.to_dict("records"):
            endpoint = Endpoint(route_id=str(row["route_id"]),
                                method=str(row["http_request_method"]),
                                http_route=str(row["http_route"]))
            kind = AnomalyKind(str(row["kind"]))
            minute = pd.Timestamp(row["minute"])
            window_start = _epoch(minute)
            baseline, observed = float(row["baseline"]), float(row["observed"])
            metric = _METRIC_OF_KIND.get(kind)
            top = [] if metric is None else contributors(
                client_frames[endpoint], [minute], metric=metric,
                min_share=s.contributor_min_share, ratio=s.contributor_ratio,
                min_count=s.contributor_min_count, top=s.contributor_top)
            blamed = str(row.get("client") or "")
            if kind == AnomalyKind.ENUMERATION and blamed:
                top = [blamed, *[client for client in top if client != blamed]]
            if kind in LIMITABLE:
                for client in top:
                    if client not in flagged_clients[endpoint]:
                        flagged_clients[endpoint].append(client)
            request_ids: list[str] = []
            trace_ids: list[str] = []
            paths: list[tuple[str, int]] = []
            if example_budget > 0 and s.examples:
                example_budget -= 1
                request_ids, trace_ids = await features.examples(
                    self._ch, endpoint, window_start, window_start + 60,
                    min_status=_EXAMPLE_STATUS.get(kind, 0),
                    client=top[0] if kind in _BLAME_EXAMPLES and top else "",
                    limit=s.examples)
                if kind == AnomalyKind.UNDECLARED_ENDPOINT:
                    paths = await features.unmatched_paths(
                        self._ch, endpoint.method, window_start, window_start + 60)
            addresses: list[str] = []
            seen_from: set[str] = set()
            sent: dict[str, int] = {}
            if kind == AnomalyKind.AUTH_FAILURE_BURST and endpoint.route_id and address_budget:
                address_budget -= 1
                by_address = await features.address_auth(self._ch, endpoint, window_start,
                                                         window_start + 60)
                addresses = unauthenticated_addresses(
                    by_address, min_share=s.contributor_min_share,
                    min_count=s.contributor_min_count, top=s.contributor_top)
                chosen = by_address[by_address["client_address"].isin(addresses)]
                for address, requests, clients_seen in zip(
                        chosen["client_address"], chosen["requests"], chosen["clients"],
                        strict=True):
                    seen_from.update(clients_seen)
                    sent[address] = int(requests)
            level = severity(kind, baseline, observed, float(row["score"]))
            mv = (mv_scores or {}).get((endpoint.route_id, endpoint.method,
                                        endpoint.http_route, int(window_start)))
            text = _summary(kind, endpoint, baseline, observed, int(row["requests"]), top,
                            paths)
            if addresses:
                text += f"; unauthenticated traffic from {', '.join(addresses)}"
            if mv is not None:
                raised = corroborated(level, mv, self.multivariate.threshold)
                text += (f"; multivariate score {mv:.2f}"
                         + (f" (corroborates: severity {level} -> {raised})"
                            if raised != level else ""))
                level = raised
            anomaly = Anomaly(
                id=anomaly_id(endpoint, kind, window_start), detected_at=now,
                window_start=window_start, window_end=window_start + 60, endpoint=endpoint,
                kind=kind, severity=level,
                score=min(1.0, max(0.0, float(row["score"]))), metric=str(row["metric"]),
                baseline=baseline, observed=observed, top_clients=top,
                example_request_ids=request_ids, example_trace_ids=trace_ids, summary=text,
            )
            anomalies.append(anomaly)
            if addresses:
                found = unauthenticated.setdefault(endpoint, Unauthenticated())
                found.clients.update(seen_from)
                for address in addresses:
                    found.addresses.setdefault(address, []).append(anomaly)
                    found.requests.setdefault(address, {})[minute] = sent[address]
        return anomalies, client_frames, flagged_clients, unauthenticated

    async def _recommend(self, anomalies: Sequence[Anomaly],
                         client_frames: dict[Endpoint, pd.DataFrame],
                         flagged_clients: dict[Endpoint, list[str]],
                         now: float,
                         unauthenticated: dict[Endpoint, Unauthenticated] | None = None,
                         ) -> list[Recommendation]:
        if not anomalies:
            return []
        s = self.settings
        effective = await self._store.effective(now)
        recommendations: list[Recommendation] = []
        for endpoint, frame in client_frames.items():
            of_endpoint = [anomaly for anomaly in anomalies if anomaly.endpoint == endpoint
                           and anomaly.kind in LIMITABLE and endpoint.route_id]
            if not of_endpoint:
                continue
            recommender = LimitRecommender.from_settings(s)
            recommendation = build_recommendation(
                endpoint=endpoint, anomalies=of_endpoint, client_frame=frame,
                flagged_clients=flagged_clients.get(endpoint, []), recommender=recommender,
                current=current_policy(effective, endpoint),
                span_s=s.client_lookback_hours * 3600, now=now)
            if recommendation is None:
                log.info("no tighter limit to recommend", extra={"endpoint": endpoint.key})
            else:
                recommendations.append(recommendation)
            recommendations += self._targeted(endpoint, of_endpoint, frame, recommender,
                                              effective, now,
                                              (unauthenticated or {}).get(endpoint))
        return recommendations

    def _targeted(self, endpoint: Endpoint, anomalies: Sequence[Anomaly], frame: pd.DataFrame,
                  recommender: LimitRecommender, effective: Sequence[Policy],
                  now: float, unauthenticated: Unauthenticated | None = None,
                  ) -> list[Recommendation]:
        """A targeted, expiring limit for each client an anomaly of a TARGETABLE kind names
        (`recommender` is already fitted without the flagged clients); for traffic that never
        authenticated, keyed by the client address instead (`_ip_targeted`)."""
        s = self.settings
        named = [anomaly for anomaly in anomalies if anomaly.kind in TARGETABLE]
        unreachable = unauthenticated.clients if unauthenticated is not None else set()
        clients = sorted({client for anomaly in named for client in anomaly.top_clients}
                         - unreachable)
        by_id = {policy.id: policy for policy in effective}
        governing = current_policy(effective, endpoint)
        governing_limit = (governing.limit * recommender.window_s / governing.window_s
                           if governing is not None and governing.key_by == "client_id"
                           else None)
        out: list[Recommendation] = []
        for client in clients:
            targeted = build_targeted(
                endpoint=endpoint, anomalies=named, client=client, client_frame=frame,
                recommender=recommender, expiry_s=s.auto_expiry_s,
                span_s=s.client_lookback_hours * 3600, now=now,
                current=by_id.get(targeted_policy_id(endpoint, client)))
            if targeted is not None and (governing_limit is None
                                         or targeted.policy.limit < governing_limit):
                out.append(targeted)
        if unauthenticated is not None:
            out += self._ip_targeted(endpoint, unauthenticated, recommender, by_id, now)
        return out

    def _ip_targeted(self, endpoint: Endpoint, unauthenticated: Unauthenticated,
                     recommender: LimitRecommender, by_id: dict[str, Policy],
                     now: float) -> list[Recommendation]:
        """A targeted limit keyed by `ip` for each unauthenticated address of an auth-failure
        burst. No client-keyed limit governs such traffic (it never reaches the post-authn
        rate limit), so none is compared with; the impact replays the address's requests in
        the burst's windows."""
        s = self.settings
        out: list[Recommendation] = []
        for address, behind in sorted(unauthenticated.addresses.items()):
            per_minute = unauthenticated.requests.get(address, {})
            rows = pd.DataFrame({"minute": list(per_minute), "client": address,
                                 "requests": list(per_minute.values())})
            targeted = build_targeted(
                endpoint=endpoint, anomalies=behind, client=address, client_frame=rows,
                recommender=recommender, key_by="ip", expiry_s=s.auto_expiry_s,
                span_s=s.client_lookback_hours * 3600, now=now, named=False,
                current=by_id.get(targeted_policy_id(endpoint, address, "ip")))
            if targeted is not None:
                out.append(targeted)
        return out

    async def _loosen(self, frame: pd.DataFrame, flagged: pd.DataFrame,
                      now: float) -> list[Recommendation]:
        """Looser limits where unflagged clients often hit 429s (recommendation only)."""
        s = self.settings
        rule = LoosenRule.from_settings(s)
        until = pd.Timestamp((now // 60) * 60, unit="s", tz="UTC")
        endpoints = rule.candidates(frame, flagged, until)
        if not endpoints:
            return []
        effective = await self._store.effective(now)
        clients = await features.client_minutes(
            self._ch, endpoints, now - s.client_lookback_hours * 3600, now)
        targeted = {p.match_key for p in effective if p.match_key is not None}
        out: list[Recommendation] = []
        for endpoint in endpoints:
            of_endpoint = clients[(clients["route_id"] == endpoint.route_id)
                                  & (clients["http_request_method"] == endpoint.method)
                                  & (clients["http_route"] == endpoint.http_route)]
            loosened = rule.build(
                endpoint=endpoint, client_frame=of_endpoint,
                current=current_policy(effective, endpoint),
                ceiling=config_ceiling(effective, endpoint), excluded=targeted, until=until,
                span_s=s.client_lookback_hours * 3600, now=now)
            if loosened is not None:
                out.append(loosened)
        return out

    async def _record(self, anomalies: Sequence[Anomaly]) -> int:
        """Insert the anomalies not recorded yet; return how many were inserted."""
        if not anomalies:
            return 0
        since = min(anomaly.window_start for anomaly in anomalies)
        known = await asyncio.to_thread(self._known_ids, [a.id for a in anomalies], since)
        new = [anomaly for anomaly in anomalies if anomaly.id not in known]
        if not new:
            return 0
        await asyncio.to_thread(self._insert, new)
        for anomaly in new:
            ANOMALIES.labels(kind=str(anomaly.kind)).inc()
            log.info("anomaly", extra={"anomaly_id": anomaly.id, "kind": str(anomaly.kind),
                                       "endpoint": anomaly.endpoint.key,
                                       "summary": anomaly.summary})
        return len(new)

    def _known_ids(self, ids: list[str], since: float) -> set[str]:
        with self._ch.lock:
            result = self._ch.client.query(
                "SELECT id FROM anomalies WHERE detected_at >= toDateTime64({since:Float64}, 3, "
                "'UTC') AND id IN {ids:Array(String)}",
                parameters={"since": since, "ids": ids})
        return {str(row[0]) for row in result.result_rows}

    def _insert(self, anomalies: Sequence[Anomaly]) -> None:
        rows = [[a.id, _utc(a.detected_at), _utc(a.window_start), _utc(a.window_end),
                 a.endpoint.route_id, a.endpoint.method, a.endpoint.http_route, str(a.kind),
                 str(a.severity), a.score, a.metric, a.baseline, a.observed, a.top_clients,
                 a.example_request_ids, a.example_trace_ids, a.summary] for a in anomalies]
        with self._ch.lock:
            self._ch.client.insert("anomalies", rows, column_names=ANOMALY_COLUMNS)

    async def close(self) -> None:
        """Give up the leader lease so a standby instance can act at once."""
        try:
            await self.lease.release()
        except (RedisError, OSError) as exc:  # best effort on shutdown; the lease expires
            log.warning("could not release the analytics lease",
                        extra={"error": error_text(exc)})
        except Exception:
            log.warning("could not release the analytics lease", exc_info=True)
        LEADER.set(0)


def _count_endpoints(frame: pd.DataFrame) -> int:
    if frame.empty:
        return 0
    return int(frame.groupby(["route_id", "http_request_method", "http_route"]).ngroups)


def _summary(kind: AnomalyKind, endpoint: Endpoint, baseline: float, observed: float,
             requests: int, top: Sequence[str], paths: Sequence[tuple[str, int]] = ()) -> str:
    where = f"{endpoint.method} {endpoint.http_route} (route {endpoint.route_id})"
    if kind == AnomalyKind.ERROR_SPIKE:
        text = (f"5xx rate {observed:.1%} vs baseline {baseline:.1%} over {requests} requests "
                f"on {where}")
    elif kind == AnomalyKind.CLIENT_DOMINANCE:
        text = (f"top client sent {observed:.0%} of {requests} requests (baseline "
                f"{baseline:.0%}) on {where}")
    elif kind == AnomalyKind.AUTH_FAILURE_BURST:
        text = (f"auth failure rate {observed:.1%} vs baseline {baseline:.1%} over {requests} "
                f"requests on {where}")
    elif kind == AnomalyKind.LATENCY_REGRESSION:
        text = f"p95 latency {observed:.0f} ms vs baseline {baseline:.0f} ms on {where}"
    elif kind in (AnomalyKind.TRAFFIC_SURGE, AnomalyKind.TRAFFIC_DROP):
        text = (f"{observed:.0f} requests/min vs expected {baseline:.0f} "
                f"({observed / baseline if baseline else float('inf'):.2g}x) on {where}")
    elif kind == AnomalyKind.ENUMERATION:
        text = (f"one client requested {observed:.0f} distinct paths in a minute (baseline "
                f"{baseline:.0f}) on {where}")
    elif kind == AnomalyKind.UNDECLARED_ENDPOINT:
        text = (f"{observed:.0f} {endpoint.method} requests/min to paths no route declares "
                f"(baseline {baseline:.0f})")
        if paths:
            text += "; top paths: " + ", ".join(f"{path} ({hits})" for path, hits in paths[:5])
    else:
        text = f"{kind}: {observed:.3g} vs baseline {baseline:.3g} on {where}"
    if top:
        text += f"; top contributors: {', '.join(top[:3])}"
    return text


class Scheduler:
    """Runs the job every `interval_s`, and at once when triggered; one run at a time."""

    def __init__(self, job: AnalyticsJob, interval_s: float) -> None:
        self.job = job
        self.interval_s = interval_s
        self.last_report: RunReport | None = None
        self.last_error: str | None = None
        self.runs = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def trigger(self) -> None:
        """Ask for a run now (the scheduled loop picks it up)."""
        self._wake.set()

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    async def run_now(self) -> RunReport:
        """Run once, waiting for a run in progress to finish first."""
        async with self._lock:
            try:
                report = await self.job.run_once()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            self.runs += 1
            self.last_error = None
            self.last_report = report
            return report

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; then release the leader lease."""
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.run_now()
                except (RedisError, OSError) as exc:  # Redis refused or is down: one line
                    log.warning("analytics run failed: redis error; retrying",
                                extra={"error": error_text(exc), "retry_in_s": self.interval_s})
                except Exception:
                    log.exception("analytics run failed")
                waiters = {asyncio.ensure_future(self._wake.wait()),
                           asyncio.ensure_future(stop.wait())}
                try:
                    await asyncio.wait(waiters, timeout=self.interval_s,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
        finally:
            await self.job.close()
