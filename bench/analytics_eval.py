"""The evaluation suite on the full set: several seeds x 8 days x 8 endpoints (+ undeclared).

Prints each seed's table (precision, recall, F1 and median detection delay per kind,
false alerts per endpoint-week) and the pooled totals, and exits 1 if a target is missed
(F1 >= 0.9 overall and >= 0.8 per kind, <= 1 false alert per endpoint-week, median delay
<= 2 windows).

    PYTHONPATH=. .venv/bin/python bench/analytics_eval.py [--seeds 1,2,3,4,5] [--days 8]
"""

from __future__ import annotations

import argparse
import sys

from analytics.evaluation import Evaluation, KindScore, evaluate, format_report
from analytics.settings import AnalyticsSettings


def pooled(results: list[Evaluation]) -> Evaluation:
    kinds = {kind: KindScore(kind) for kind in results[0].per_kind}
    overall = KindScore("overall")
    for result in results:
        for kind, score in result.per_kind.items():
            for target in (kinds[kind], overall):
                target.incidents += score.incidents
                target.detected += score.detected
                target.true_alerts += score.true_alerts
                target.false_alerts += score.false_alerts
                target.delays += score.delays
    endpoint_weeks = sum(r.endpoints * r.days / 7 for r in results)
    return Evaluation(
        per_kind=kinds, overall=overall,
        false_alerts_per_endpoint_week=overall.false_alerts / endpoint_weeks,
        benign_false_alerts=sum(r.benign_false_alerts for r in results),
        endpoints=results[0].endpoints, days=sum(r.days for r in results),
        windows=sum(r.windows for r in results), detect_s=sum(r.detect_s for r in results),
        false_alert_list=[a for r in results for a in r.false_alert_list],
        missed=[m for r in results for m in r.missed])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--days", type=float, default=8.0)
    parser.add_argument("--endpoints", type=int, default=8)
    args = parser.parse_args()
    settings = AnalyticsSettings()
    results = []
    for seed in (int(part) for part in args.seeds.split(",")):
        result = evaluate(seed=seed, days=args.days, endpoints=args.endpoints,
                          settings=settings)
        print(f"== seed {seed}\n{format_report(result)}\n")
        results.append(result)
    total = pooled(results)
    print(f"== all seeds pooled\n{format_report(total)}")
    ok = (total.overall.f1 >= 0.9 and all(k.f1 >= 0.8 for k in total.per_kind.values())
          and total.false_alerts_per_endpoint_week <= 1.0 and total.overall.median_delay <= 2)
    print("targets:", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
