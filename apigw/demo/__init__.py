"""The demo: three upstream services, traffic with an incident, and the story it tells.

`apigw demo` (apigw.cli) runs the usual stack plus the children made here.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from apigw.supervisor import Child, http_probe

ABUSER = "scraper-7"
INCIDENT_ROUTE = "/orders/{id}"
STUFFING_AFTER = 120.0  # when the credential-stuffing bot starts (apigw.demo.traffic)
MARKER = ".apigw-demo"
DEFAULT_CONFIG = Path("examples/demo.yaml")
DEFAULT_DATA_DIR = Path("var/demo")


def controlplane_env(interval_s: float) -> dict[str, str]:
    """Analytics settings that make the loop visible within minutes."""
    return {"APIGW_INTERVAL_S": f"{interval_s:g}", "APIGW_AUTO_MODE": "auto"}


def prepare_data_dir(path: Path, fresh: bool) -> None:
    """Create the demo's data dir; with `fresh`, wipe it first, but only if the demo made it."""
    if fresh and path.exists():
        if not (path / MARKER).exists() and any(path.iterdir()):
            raise ValueError(f"refusing to wipe {path}: it was not made by `apigw demo` (no "
                             f"{MARKER} file); pass --no-fresh or another --data-dir")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()


def upstream_env(host: str, ports: Sequence[int]) -> dict[str, str]:
    """The variables examples/demo.yaml reads for its upstream URLs."""
    return {f"DEMO_{name}_URL": f"http://{host}:{port}"
            for name, port in zip(("ORDERS", "USERS", "CATALOG"), ports, strict=True)}


def upstreams_child(host: str, ports: Sequence[int]) -> Child:
    return Child(
        name="upstreams",
        args=[sys.executable, "-m", "apigw.demo.upstreams", "--host", host,
              "--ports", ",".join(map(str, ports))],
        ready=http_probe(f"http://{host}:{ports[-1]}/healthz"),
        ready_what=f"http://{host}:{ports[-1]}/healthz", ready_timeout_s=30)


def traffic_child(target: str, incident_after: float, duration: float | None) -> Child:
    args = [sys.executable, "-m", "apigw.demo.traffic", "--target", target,
            "--incident-after", f"{incident_after:g}"]
    if duration is not None:
        args += ["--duration", f"{duration:g}"]
    return Child(name="traffic", args=args, restart=duration is None)


def story(incident_after: float, interval_s: float, dashboard_url: str | None,
          api_url: str) -> str:
    """What to look at, and when, counted from now (the traffic starts now)."""
    now = time.time()

    def at(offset: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(now + offset))

    expect = incident_after + 60 + interval_s
    where = (f"the dashboard {dashboard_url}" if dashboard_url
             else f"the API {api_url}/api/v1/anomalies")
    return "\n".join([
        f"demo timeline (T = {at(0)}):",
        "  T+0s     ~30 clients (client-01..client-30) send normal traffic, ~30 req/s, "
        "authenticated (JWTs and API keys); 3 anonymous visitors browse the public catalog",
        f"  T+{incident_after:.0f}s   ({at(incident_after)}) incident: client '{ABUSER}' hammers "
        f"GET {INCIDENT_ROUTE}; the orders service overloads into 5xx",
        f"  by T+{expect:.0f}s ({at(expect)}) expect in {where}: an error_spike anomaly on "
        f"GET {INCIDENT_ROUTE} naming {ABUSER}, an applied recommendation and a tightened "
        f"limit for {ABUSER} (analytics runs every {interval_s:g}s in auto mode)",
        f"  after that: the [traffic] lines show 429s for {ABUSER} only, and 5xx drop back",
        f"  T+{STUFFING_AFTER:.0f}s  ({at(STUFFING_AFTER)}) credential stuffing: 203.0.113.66 "
        f"sends "
        f"bad keys and tokens to GET /users/{{id}}; expect an auth_failure_burst anomaly by "
        f"T+{STUFFING_AFTER + 60 + interval_s:.0f}s",
    ])
