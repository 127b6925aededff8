"""Labelled gateway traffic for evaluating the detectors: per-minute endpoint rollups.

`generate(seed, days, endpoints)` returns the endpoint-minute frame the live job would read
from `events_1m`/`events_client_1m` (features.ENDPOINT_MINUTE_COLUMNS) and the labels:
every injected incident (kind, endpoint, first and last window, the kinds it legitimately
also looks like) and every benign look-alike (windows where any alert is a false alarm).

Traffic model per endpoint and minute: requests ~ Poisson(base x daily sine (peak/trough
3:1, own phase) x slow drift x lognormal noise) from a population of clients with Zipf-like
weights (distinct clients and the top client's requests follow from it); 5xx and auth
failures binomial at small base rates; p95 lognormal around the endpoint's base. The
unmatched pseudo-endpoint (route id '') carries a trickle of scanner noise.

Incidents (one client or a few doing it, unless said otherwise): error_spike (5xx rate
15-60 %), latency_regression (p95 x 2-4), traffic_surge (5 new clients, total x 3-6),
traffic_drop (x 0.05-0.35), auth_failure_burst (1-3 clients, 90 % failures, + 0.5-2 x
traffic), enumeration (one client, 80-400 distinct ids a minute on a templated route),
client_dominance (one client takes 60-85 % of the traffic), undeclared_endpoint (one client,
40-300 requests a minute to an undeclared path).
Slow drifts and level shifts (scenarios of at least 4 days: in the last day, where three
previous days give a seasonal profile): every endpoint gets a latency drift - p95 x (1 +
(F - 1) x minutes since start / ramp), F 2-3, creeping up for 2-4 h until a fix steps it
back; labelled `latency_regression` with an **onset**: the first window where p95 reaches
`DRIFT_LABEL_RATIO` (1.5) x the level before the drift and `DRIFT_LABEL_MS` (25 ms) above it
(the latency detector's margins), 60-120 windows after its start or later; detection delay
is measured from the onset, not the start. Then a level shift of 2-4 h: even endpoints a
drop to 50-70 % of the traffic (`traffic_drop`), odd ones 1-2 new clients adding 60-100 %
(`traffic_surge`, also dominance); onset = start.
Benign look-alikes: a campaign surge (x 2.5-3 spread over proportionally more clients,
normal errors and latency), error blips (2-3 errors in a minute), one slow minute-ish wobble
(p95 x 1.3), and an endpoint that one internal client always dominates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pandas as pd

from analytics.features import ENDPOINT_MINUTE_COLUMNS
from analytics.models import AnomalyKind

START: Final = pd.Timestamp("2026-01-05 00:00", tz="UTC")
ROUTED_KINDS: Final = [AnomalyKind.ERROR_SPIKE, AnomalyKind.LATENCY_REGRESSION,
                       AnomalyKind.TRAFFIC_SURGE, AnomalyKind.TRAFFIC_DROP,
                       AnomalyKind.AUTH_FAILURE_BURST, AnomalyKind.ENUMERATION,
                       AnomalyKind.CLIENT_DOMINANCE]
# Kinds an incident of one kind also legitimately shows (not false alarms, not required).
ALSO: Final[dict[AnomalyKind, frozenset[str]]] = {
    AnomalyKind.ERROR_SPIKE: frozenset(),
    AnomalyKind.LATENCY_REGRESSION: frozenset(),
    AnomalyKind.TRAFFIC_SURGE: frozenset({AnomalyKind.CLIENT_DOMINANCE}),
    AnomalyKind.TRAFFIC_DROP: frozenset(),
    AnomalyKind.AUTH_FAILURE_BURST: frozenset({AnomalyKind.TRAFFIC_SURGE,
                                               AnomalyKind.CLIENT_DOMINANCE,
                                               AnomalyKind.ERROR_SPIKE}),
    AnomalyKind.ENUMERATION: frozenset({AnomalyKind.TRAFFIC_SURGE,
                                        AnomalyKind.CLIENT_DOMINANCE}),
    AnomalyKind.CLIENT_DOMINANCE: frozenset({AnomalyKind.TRAFFIC_SURGE}),
    AnomalyKind.UNDECLARED_ENDPOINT: frozenset(),
}
UNMATCHED: Final = ("", "GET", "")
# A latency drift's onset: the first window where p95 is DRIFT_LABEL_RATIO x its level before
# the drift and DRIFT_LABEL_MS above it (the latency detector's default margins).
DRIFT_LABEL_RATIO: Final = 1.5
DRIFT_LABEL_MS: Final = 25.0
TAIL_DAYS_FROM: Final = 4  # scenarios this long get drifts and level shifts in the last day


@dataclass(frozen=True)
class Incident:
    kind: str  # an AnomalyKind, or "benign" for a look-alike
    endpoint: tuple[str, str, str]
    start: int  # first window (minutes since START)
    end: int  # last window, inclusive
    also: frozenset[str] = field(default_factory=frozenset)
    what: str = ""
    onset: int | None = None  # the window the label's threshold is crossed (delay from it)

    @property
    def delay_from(self) -> int:
        return self.start if self.onset is None else self.onset


@dataclass
class Scenario:
    frame: pd.DataFrame
    incidents: list[Incident]
    endpoints: list[tuple[str, str, str]]
    minutes: int

    @property
    def benign(self) -> list[Incident]:
        return [i for i in self.incidents if i.kind == "benign"]

    @property
    def labelled(self) -> list[Incident]:
        return [i for i in self.incidents if i.kind != "benign"]


def _endpoints(count: int) -> list[tuple[str, str, str]]:
    names = [("orders", "GET", "/orders/{id}"), ("users", "GET", "/users/{id}"),
             ("search", "GET", "/search"), ("cart", "POST", "/cart/items"),
             ("items", "GET", "/items/{id}"), ("login", "POST", "/login"),
             ("invoices", "GET", "/invoices/{id}"), ("feed", "GET", "/feed")]
    out = []
    for i in range(count):
        route, method, template = names[i % len(names)]
        copy = i // len(names)
        if copy:
            template = template.replace(f"/{route}", f"/{route}{copy}", 1)
            route = f"{route}{copy}"
        out.append((route, method, template))
    return out


def _schedule(rng: np.random.Generator, kinds: list[str], minutes: int, start_after: int,
              ) -> list[tuple[str, int, int]]:
    """Non-overlapping (kind, start, duration) slots, at least 2 h apart, random order."""
    slots = len(kinds)
    span = (minutes - start_after - 120) // max(slots, 1)
    order = rng.permutation(slots)
    placed = []
    for slot, index in enumerate(order):
        kind = kinds[int(index)]
        duration = int(rng.integers(8, 31)) if kind != "benign_surge" else int(rng.integers(30, 61))
        begin = start_after + slot * span + int(rng.integers(0, max(span - duration - 90, 1)))
        placed.append((kind, begin, duration))
    return placed


def generate(seed: int = 1, days: float = 8.0, endpoints: int = 8) -> Scenario:
    """A labelled scenario: `endpoints` routed endpoints + the unmatched one, `days` long."""
    rng = np.random.default_rng(seed)
    minutes = int(days * 1440)
    t = np.arange(minutes)
    keys = _endpoints(endpoints)
    frames: list[pd.DataFrame] = []
    incidents: list[Incident] = []
    for index, key in enumerate(keys):
        templated = "{" in key[2]
        dominated = index == 2  # one endpoint an internal client always dominates
        base = float(rng.uniform(60, 400))
        phase = float(rng.uniform(0, 2 * np.pi))
        daily = 1.0 + 0.5 * np.sin(2 * np.pi * t / 1440 + phase)
        drift = 1.0 + float(rng.uniform(-0.2, 0.3)) * t / minutes
        rate = base * daily * drift * np.exp(rng.normal(0, 0.05, minutes))
        population = int(rng.integers(60, 250))
        weights = 1.0 / np.arange(1, population + 1) ** 0.8
        weights /= weights.sum()
        top_weight = float(weights[0]) if not dominated else 0.7
        p95_base = float(rng.uniform(20, 300))
        columns = _legit(rng, rate, population, weights, top_weight, p95_base, templated)
        kinds: list[str] = [k for k in ROUTED_KINDS
                            if templated or k != AnomalyKind.ENUMERATION]
        kinds += ["benign_surge", "benign_blip", "benign_wobble"]
        tail = 1440 if days >= TAIL_DAYS_FROM else 0
        for kind, begin, duration in _schedule(rng, kinds, minutes - tail, start_after=180):
            end = min(begin + duration - 1, minutes - 1)
            window = slice(begin, end + 1)
            what = _inject(rng, columns, kind, window, templated)
            label = "benign" if kind.startswith("benign") else kind
            incidents.append(Incident(kind=label, endpoint=key, start=begin, end=end,
                                      also=ALSO.get(AnomalyKind(label), frozenset())
                                      if label != "benign" else frozenset(), what=what))
        if tail:
            incidents += _drift_and_shift(rng, columns, key, minutes - tail,
                                          shift="drop" if index % 2 == 0 else "surge",
                                          p95_base=p95_base)
        frames.append(_frame(key, columns))
    frames.append(_unmatched(rng, minutes, incidents))
    frame = pd.concat(frames, ignore_index=True)
    frame = frame[frame["requests"] > 0].reset_index(drop=True)
    return Scenario(frame=frame[ENDPOINT_MINUTE_COLUMNS], incidents=incidents,
                    endpoints=[*keys, UNMATCHED], minutes=minutes)


def _legit(rng: np.random.Generator, rate: np.ndarray, population: int, weights: np.ndarray,
           top_weight: float, p95_base: float, templated: bool) -> dict[str, np.ndarray]:
    size = len(rate)
    requests = rng.poisson(rate).astype("float64")
    expected_clients = population - np.exp(-np.outer(requests, weights)).sum(axis=1)
    clients = np.maximum(1.0, np.round(expected_clients + rng.normal(0, 1, size)))
    top = rng.binomial(requests.astype("int64"), top_weight).astype("float64")
    working_set = 30.0 if templated else 1.0
    paths = np.round(working_set * (1 - (1 - 1 / working_set) ** top)) if templated else (
        np.minimum(top, 1.0))
    return {
        "requests": requests,
        "errors_5xx": rng.binomial(requests.astype("int64"), 0.004).astype("float64"),
        "errors_4xx": rng.binomial(requests.astype("int64"), 0.02).astype("float64"),
        "auth_failures": rng.binomial(requests.astype("int64"), 0.008).astype("float64"),
        "p95_ms": p95_base * np.exp(rng.normal(0, 0.08, size)),
        "clients": clients,
        "top_client_requests": top,
        "top_client": np.full(size, "client-001", dtype=object),
        "top_client_paths": paths,
        "top_paths_client": np.full(size, "client-001", dtype=object),
    }


def _add_client(columns: dict[str, np.ndarray], window: slice, name: str,
                extra: np.ndarray, paths: np.ndarray | None = None) -> None:
    """One new client sending `extra` requests a minute in the window."""
    columns["requests"][window] += extra
    columns["clients"][window] += 1
    bigger = extra > columns["top_client_requests"][window]
    columns["top_client_requests"][window] = np.maximum(columns["top_client_requests"][window],
                                                        extra)
    columns["top_client"][window] = np.where(bigger, name, columns["top_client"][window])
    if paths is not None:
        more = paths > columns["top_client_paths"][window]
        columns["top_client_paths"][window] = np.maximum(columns["top_client_paths"][window],
                                                         paths)
        columns["top_paths_client"][window] = np.where(more, name,
                                                       columns["top_paths_client"][window])


def _inject(rng: np.random.Generator, columns: dict[str, np.ndarray], kind: str,
            window: slice, templated: bool) -> str:
    requests = columns["requests"][window].copy()
    size = len(requests)
    if kind == AnomalyKind.ERROR_SPIKE:
        rate = float(rng.uniform(0.15, 0.6))
        columns["errors_5xx"][window] = rng.binomial(requests.astype("int64"), rate)
        return f"5xx rate {rate:.0%}"
    if kind == AnomalyKind.LATENCY_REGRESSION:
        factor = float(rng.uniform(2.0, 4.0))
        columns["p95_ms"][window] *= factor
        return f"p95 x{factor:.1f}"
    if kind == AnomalyKind.TRAFFIC_SURGE:
        factor = float(rng.uniform(3.0, 6.0))
        for n in range(5):
            extra = rng.poisson(requests * (factor - 1) / 5).astype("float64")
            _add_client(columns, window, f"scraper-{n}", extra)
        return f"5 scrapers, traffic x{factor:.1f}"
    if kind == AnomalyKind.TRAFFIC_DROP:
        factor = float(rng.uniform(0.05, 0.35))
        kept = rng.binomial(requests.astype("int64"), factor).astype("float64")
        ratio = np.where(requests > 0, kept / np.maximum(requests, 1), 0)
        for name in ("requests", "errors_5xx", "errors_4xx", "auth_failures",
                     "top_client_requests"):
            columns[name][window] = np.round(columns[name][window] * ratio)
        columns["clients"][window] = np.maximum(1, np.round(columns["clients"][window]
                                                            * np.sqrt(ratio)))
        return f"traffic x{factor:.2f}"
    if kind == AnomalyKind.AUTH_FAILURE_BURST:
        attackers = int(rng.integers(1, 4))
        factor = float(rng.uniform(0.5, 2.0))
        for n in range(attackers):
            extra = rng.poisson(requests * factor / attackers).astype("float64")
            failures = rng.binomial(extra.astype("int64"), 0.9)
            _add_client(columns, window, f"stuffer-{n}", extra)
            columns["auth_failures"][window] += failures
            columns["errors_4xx"][window] += failures
        return f"{attackers} clients, +{factor:.1f}x traffic, 90% auth failures"
    if kind == AnomalyKind.ENUMERATION:
        per_minute = rng.integers(80, 401, size).astype("float64")
        _add_client(columns, window, "enumerator", per_minute, paths=per_minute)
        columns["errors_4xx"][window] += np.round(per_minute * 0.7)
        return f"one client, ~{per_minute.mean():.0f} distinct ids/min"
    if kind == AnomalyKind.CLIENT_DOMINANCE:
        share = float(rng.uniform(0.6, 0.85))
        extra = rng.poisson(requests * share / (1 - share)).astype("float64")
        _add_client(columns, window, "hog", extra)
        return f"one client takes {share:.0%}"
    if kind == "benign_surge":
        factor = float(rng.uniform(2.5, 3.0))
        columns["requests"][window] = rng.poisson(requests * factor)
        for name in ("clients", "top_client_requests"):
            columns[name][window] = np.round(columns[name][window] * factor)
        for name in ("errors_5xx", "errors_4xx", "auth_failures"):
            columns[name][window] = rng.binomial(
                columns["requests"][window].astype("int64"),
                np.clip(columns[name][window] / np.maximum(requests, 1), 0, 1))
        return f"campaign: traffic and clients x{factor:.1f}"
    if kind == "benign_blip":
        columns["errors_5xx"][window] = np.minimum(requests, rng.integers(2, 4, size))
        return "2-3 errors a minute"
    if kind == "benign_wobble":
        columns["p95_ms"][window] *= 1.3
        return "p95 x1.3"
    raise ValueError(f"unknown incident kind {kind!r}")


def _drift_and_shift(rng: np.random.Generator, columns: dict[str, np.ndarray],
                     key: tuple[str, str, str], tail_start: int, shift: str,
                     p95_base: float) -> list[Incident]:
    """A slow latency drift, then a level shift ("drop" or "surge"), in the last day."""
    begin = tail_start + int(rng.integers(30, 151))
    to_onset = int(rng.integers(60, 121))
    factor = float(rng.uniform(2.0, 3.0))
    ramp = to_onset * (factor - 1.0) / (DRIFT_LABEL_RATIO - 1.0)
    end = begin + to_onset + int(rng.integers(60, 121))
    steps = np.arange(end + 1 - begin)
    drift = 1.0 + (factor - 1.0) * steps / ramp
    columns["p95_ms"][begin:end + 1] *= drift
    label = max(DRIFT_LABEL_RATIO, 1.0 + DRIFT_LABEL_MS / p95_base)
    onset = begin + int(np.argmax(drift >= label - 1e-9))
    out = [Incident(kind=AnomalyKind.LATENCY_REGRESSION, endpoint=key, start=begin, end=end,
                    onset=onset, what=f"p95 drifting up to x{drift[-1]:.1f} over "
                                      f"{end + 1 - begin} min (x{label:.2f} at +{onset - begin})")]
    begin = end + int(rng.integers(200, 301))
    end = begin + int(rng.integers(120, 241))
    window = slice(begin, end + 1)
    requests = columns["requests"][window].copy()
    if shift == "drop":
        kept = float(rng.uniform(0.5, 0.7))
        ratio = rng.binomial(requests.astype("int64"), kept) / np.maximum(requests, 1)
        for name in ("requests", "errors_5xx", "errors_4xx", "auth_failures",
                     "top_client_requests"):
            columns[name][window] = np.round(columns[name][window] * ratio)
        columns["clients"][window] = np.maximum(1, np.round(columns["clients"][window]
                                                            * np.sqrt(ratio)))
        out.append(Incident(kind=AnomalyKind.TRAFFIC_DROP, endpoint=key, start=begin,
                            end=end, onset=begin,
                            what=f"level shift: traffic x{kept:.2f} for {end + 1 - begin} min"))
    else:
        added = float(rng.uniform(0.6, 1.0))
        newcomers = int(rng.integers(1, 3))
        for n in range(newcomers):
            extra = rng.poisson(requests * added / newcomers).astype("float64")
            _add_client(columns, window, f"integration-{n}", extra)
        out.append(Incident(kind=AnomalyKind.TRAFFIC_SURGE, endpoint=key, start=begin,
                            end=end, onset=begin,
                            also=ALSO[AnomalyKind.TRAFFIC_SURGE],
                            what=f"level shift: {newcomers} new clients, traffic "
                                 f"x{1 + added:.1f} for {end + 1 - begin} min"))
    return out


def _frame(key: tuple[str, str, str], columns: dict[str, np.ndarray]) -> pd.DataFrame:
    size = len(columns["requests"])
    requests = columns["requests"]
    frame = pd.DataFrame({
        "minute": START + pd.to_timedelta(np.arange(size), unit="min"),
        "route_id": key[0], "http_request_method": key[1], "http_route": key[2],
    })
    for name in ("requests", "errors_5xx", "errors_4xx", "auth_failures", "clients",
                 "top_client_requests", "top_client_paths"):
        frame[name] = np.round(columns[name]).astype("int64")
    frame["errors_5xx"] = np.minimum(frame["errors_5xx"], frame["requests"])
    frame["auth_failures"] = np.minimum(frame["auth_failures"], frame["requests"])
    frame["rate_limited"] = 0
    frame["p95_ms"] = columns["p95_ms"]
    frame["p50_ms"] = columns["p95_ms"] * 0.4
    frame["p99_ms"] = columns["p95_ms"] * 1.6
    frame["top_client"] = columns["top_client"]
    frame["top_paths_client"] = columns["top_paths_client"]
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["top_client_share"] = np.where(requests > 0, frame["top_client_requests"]
                                             / np.maximum(requests, 1), 0.0)
    return frame


def _unmatched(rng: np.random.Generator, minutes: int,
               incidents: list[Incident]) -> pd.DataFrame:
    columns = {
        "requests": rng.poisson(1.5, minutes).astype("float64"),
        "errors_5xx": np.zeros(minutes), "errors_4xx": np.zeros(minutes),
        "auth_failures": np.zeros(minutes), "p95_ms": np.full(minutes, 2.0),
        "clients": np.ones(minutes), "top_client_requests": np.zeros(minutes),
        "top_client": np.full(minutes, "scanner", dtype=object),
        "top_client_paths": np.ones(minutes),
        "top_paths_client": np.full(minutes, "scanner", dtype=object),
    }
    columns["top_client_requests"] = columns["requests"].copy()
    columns["errors_4xx"] = columns["requests"].copy()
    count = max(2, minutes // 1440)
    for kind, begin, duration in _schedule(rng, [AnomalyKind.UNDECLARED_ENDPOINT] * count,
                                           minutes, start_after=180):
        end = min(begin + duration - 1, minutes - 1)
        window = slice(begin, end + 1)
        volume = float(rng.uniform(40, 300))
        extra = rng.poisson(volume, end + 1 - begin).astype("float64")
        _add_client(columns, window, "shadow-caller", extra)
        incidents.append(Incident(kind=str(kind), endpoint=UNMATCHED, start=begin, end=end,
                                  what=f"~{volume:.0f} requests/min to /internal/export"))
    return _frame(UNMATCHED, columns)
