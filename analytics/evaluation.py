"""Evaluation: detectors over labelled scenarios (analytics.scenarios), scored per kind.

Alerts are runs of flagged windows of one endpoint and kind (windows at most `merge_gap`
apart form one alert). An incident is **detected** when an alert of its kind on its endpoint
overlaps [start, end + grace]; its **delay** is the first flagged window minus its start (or
minus its `onset`, where the label sets one: a slow drift counts from the window it crosses
the label's threshold), in windows, at least 0. An alert is a **true** alert when it
overlaps such an interval of an incident of its kind; an alert of a kind the incident also
legitimately shows (`Incident.also`, e.g. a one-client surge is also dominance) counts
neither way; any other alert is **false**.
Precision = true alerts / counted alerts, recall = detected incidents / incidents, F1 their
harmonic mean; per kind and overall (micro). False alerts per endpoint-week: false alerts /
(endpoints x weeks). The live job's code path is used: `scoring.detect_all`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pandas as pd

from analytics.models import AnomalyKind
from analytics.scenarios import START, Scenario, generate
from analytics.scoring import detect_all
from analytics.settings import AnalyticsSettings

KINDS: Final = [str(kind) for kind in AnomalyKind]
GRACE: Final = 2  # windows after an incident's end that still count as during it


@dataclass
class KindScore:
    kind: str
    incidents: int = 0
    detected: int = 0
    true_alerts: int = 0
    false_alerts: int = 0
    delays: list[int] = field(default_factory=list)

    @property
    def precision(self) -> float:
        counted = self.true_alerts + self.false_alerts
        return self.true_alerts / counted if counted else 1.0

    @property
    def recall(self) -> float:
        return self.detected / self.incidents if self.incidents else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def median_delay(self) -> float:
        return float(np.median(self.delays)) if self.delays else math.nan


@dataclass
class Evaluation:
    per_kind: dict[str, KindScore]
    overall: KindScore
    false_alerts_per_endpoint_week: float
    benign_false_alerts: int  # false alerts during benign look-alikes
    endpoints: int
    days: float
    windows: int
    detect_s: float
    false_alert_list: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)


def alerts(detections: pd.DataFrame, merge_gap: int = 3) -> pd.DataFrame:
    """Runs of flagged windows per endpoint and kind: endpoint key, kind, start, end
    (window numbers since the scenario start)."""
    flagged = detections[detections["flagged"].astype(bool)].copy()
    columns = ["route_id", "http_request_method", "http_route", "kind", "start", "end"]
    if flagged.empty:
        return pd.DataFrame(columns=columns)
    minutes = pd.to_datetime(flagged["minute"], utc=True)
    flagged["window"] = ((minutes - START) // pd.Timedelta(minutes=1)).astype("int64")
    flagged = flagged.sort_values(["route_id", "http_request_method", "http_route", "kind",
                                   "window"])
    key = flagged[["route_id", "http_request_method", "http_route", "kind"]].astype(str).agg(
        "|".join, axis=1)
    new_run = (key != key.shift()) | (flagged["window"].diff() > merge_gap)
    flagged["run"] = new_run.cumsum()
    runs = flagged.groupby("run").agg(route_id=("route_id", "first"),
                                      http_request_method=("http_request_method", "first"),
                                      http_route=("http_route", "first"),
                                      kind=("kind", "first"), start=("window", "min"),
                                      end=("window", "max"))
    return runs.reset_index(drop=True)[columns]


def score(scenario: Scenario, detections: pd.DataFrame) -> tuple[
        dict[str, KindScore], int, list[str], list[str]]:
    """Per-kind scores, false alerts during benign look-alikes, and readable lists of false
    alerts and missed incidents."""
    per_kind = {kind: KindScore(kind) for kind in KINDS}
    found = alerts(detections)
    false_list: list[str] = []
    benign_false = 0
    labelled = scenario.labelled
    for incident in labelled:
        per_kind[incident.kind].incidents += 1
    detected: set[int] = set()
    for record in found.to_dict("records"):
        endpoint = (str(record["route_id"]), str(record["http_request_method"]),
                    str(record["http_route"]))
        kind = str(record["kind"])
        start, end = int(record["start"]), int(record["end"])
        matched = ignored = False
        for number, incident in enumerate(labelled):
            if incident.endpoint != endpoint:
                continue
            if start > incident.end + GRACE or end < incident.start:
                continue
            if incident.kind == kind:
                matched = True
                if number not in detected:
                    detected.add(number)
                    per_kind[kind].detected += 1
                    per_kind[kind].delays.append(max(0, start - incident.delay_from))
            elif kind in incident.also:
                ignored = True
        if matched:
            per_kind[kind].true_alerts += 1
        elif not ignored:
            per_kind[kind].false_alerts += 1
            during = [b for b in scenario.benign if b.endpoint == endpoint
                      and not (start > b.end + GRACE or end < b.start)]
            benign_false += bool(during)
            false_list.append(f"{kind} on {endpoint[1]} {endpoint[2] or '(undeclared)'} "
                              f"windows {start}-{end}"
                              + (f" during benign {during[0].what}" if during else ""))
    missed = [f"{i.kind} on {i.endpoint[1]} {i.endpoint[2] or '(undeclared)'} "
              f"{i.start}-{i.end} ({i.what})"
              for number, i in enumerate(labelled) if number not in detected]
    return per_kind, benign_false, false_list, missed


def evaluate(seed: int = 1, days: float = 8.0, endpoints: int = 8,
             settings: AnalyticsSettings | None = None) -> Evaluation:
    """Generate a scenario, run the live detector set over all of it, score it."""
    settings = settings or AnalyticsSettings()
    scenario = generate(seed=seed, days=days, endpoints=endpoints)
    started = time.perf_counter()
    detections = detect_all(scenario.frame, settings)
    detect_s = time.perf_counter() - started
    per_kind, benign_false, false_list, missed = score(scenario, detections)
    overall = KindScore("overall")
    for kind_score in per_kind.values():
        overall.incidents += kind_score.incidents
        overall.detected += kind_score.detected
        overall.true_alerts += kind_score.true_alerts
        overall.false_alerts += kind_score.false_alerts
        overall.delays += kind_score.delays
    endpoint_weeks = len(scenario.endpoints) * days / 7.0
    return Evaluation(per_kind=per_kind, overall=overall,
                      false_alerts_per_endpoint_week=overall.false_alerts / endpoint_weeks,
                      benign_false_alerts=benign_false, endpoints=len(scenario.endpoints),
                      days=days, windows=len(scenario.frame), detect_s=detect_s,
                      false_alert_list=false_list, missed=missed)


def format_report(result: Evaluation) -> str:
    lines = [f"{result.endpoints} endpoints (incl. undeclared) x {result.days:g} days, "
             f"{result.windows} endpoint-minutes; detectors ran in {result.detect_s:.2f} s",
             "",
             f"{'kind':<22}{'incidents':>10}{'detected':>10}{'alerts':>8}{'false':>7}"
             f"{'precision':>11}{'recall':>8}{'F1':>7}{'delay':>7}"]
    rows = [*sorted(result.per_kind.values(), key=lambda k: k.kind), result.overall]
    for row in rows:
        delay = "-" if math.isnan(row.median_delay) else f"{row.median_delay:g}"
        lines.append(f"{row.kind:<22}{row.incidents:>10}{row.detected:>10}"
                     f"{row.true_alerts + row.false_alerts:>8}{row.false_alerts:>7}"
                     f"{row.precision:>11.3f}{row.recall:>8.3f}{row.f1:>7.3f}{delay:>7}")
    lines += ["", f"false alerts per endpoint-week: {result.false_alerts_per_endpoint_week:.2f}"
                  f" ({result.overall.false_alerts} false alerts, "
                  f"{result.benign_false_alerts} of them during benign look-alikes)",
              f"median detection delay: {result.overall.median_delay:g} windows"]
    if result.false_alert_list:
        lines += ["", "false alerts:", *(f"  {text}" for text in result.false_alert_list)]
    if result.missed:
        lines += ["", "missed incidents:", *(f"  {text}" for text in result.missed)]
    return "\n".join(lines)
