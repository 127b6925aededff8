"""Demo upstream services: orders, users and catalog, small aiohttp apps with realistic JSON.

Each service answers after a little latency jitter. Each has a capacity: when the requests of
the last second exceed it, a matching share of requests fails with 503 and latency grows, as
with a saturated database. The orders service's capacity is low enough that one client
hammering it (the demo's incident) pushes it over, and a rate limit on that client brings it
back. `GET/POST /_demo/mode` reads or changes a service's capacity and a forced error rate.

    python -m apigw.demo.upstreams --ports 9101,9102,9103
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from apigw.signals import stop_on_signals

SERVICES = ("orders", "users", "catalog")
DEFAULT_PORTS = (9101, 9102, 9103)
DEFAULT_CAPACITY_RPS = {"orders": 22.0, "users": 200.0, "catalog": 200.0}
_STATUSES = ("paid", "shipped", "delivered", "pending")
_PRODUCTS = ("kettle", "mug", "teapot", "grinder", "scale", "filter", "tin", "spoon")


@dataclass
class Load:
    """A service's recent request rate, capacity and failure counters."""

    capacity_rps: float
    error_rate: float = 0.0  # forced share of failures, on top of overload
    served: int = 0
    failed: int = 0
    _recent: deque[float] = field(default_factory=deque)

    def rate(self, now: float) -> int:
        while self._recent and now - self._recent[0] > 1.0:
            self._recent.popleft()
        return len(self._recent)

    def admit(self, rng: random.Random, now: float | None = None) -> bool:
        """Record one request; False when it should fail."""
        now = time.monotonic() if now is None else now
        self._recent.append(now)
        rate = self.rate(now)
        overload = max(0.0, (rate - self.capacity_rps) / rate) if rate else 0.0
        ok = rng.random() >= max(overload, self.error_rate)
        if ok:
            self.served += 1
        else:
            self.failed += 1
        return ok

    def overloaded(self) -> bool:
        return self.rate(time.monotonic()) > self.capacity_rps


_LOAD = web.AppKey("load", Load)
_RNG = web.AppKey("rng", random.Random)


def _load(request: web.Request) -> Load:
    return request.config_dict[_LOAD]


def _rng(request: web.Request) -> random.Random:
    return request.config_dict[_RNG]


async def _work(request: web.Request) -> web.Response | None:
    """Latency jitter and the capacity check; a 503 response when the request fails."""
    load, rng = _load(request), _rng(request)
    ok = load.admit(rng)
    base = rng.uniform(0.002, 0.012)
    if load.overloaded():
        base += rng.uniform(0.02, 0.08)
    await asyncio.sleep(base)
    if ok:
        return None
    return web.json_response({"error": "service overloaded, try again later"}, status=503,
                             headers={"Retry-After": "1"})


def _number(request: web.Request, name: str) -> int | None:
    value = request.match_info[name]
    return int(value) if value.isdigit() and len(value) < 12 else None


async def get_order(request: web.Request) -> web.Response:
    failure = await _work(request)
    if failure is not None:
        return failure
    order_id = _number(request, "id")
    if order_id is None:
        return web.json_response({"error": "order id must be a number"}, status=400)
    rng = random.Random(order_id)
    lines = [(f"SKU-{rng.randint(1000, 9999)}", rng.choice(_PRODUCTS), rng.randint(1, 3),
              round(rng.uniform(3, 60), 2)) for _ in range(rng.randint(1, 4))]
    return web.json_response({
        "id": order_id, "customer_id": rng.randint(1, 5000), "status": rng.choice(_STATUSES),
        "currency": "EUR",
        "items": [{"sku": sku, "name": name, "qty": qty, "price": price}
                  for sku, name, qty, price in lines],
        "total": round(sum(qty * price for _, _, qty, price in lines), 2)})


async def list_orders(request: web.Request) -> web.Response:
    failure = await _work(request)
    if failure is not None:
        return failure
    raw = request.query.get("limit", "10")
    limit = min(int(raw), 50) if raw.isdigit() else 10
    rng = _rng(request)
    return web.json_response({"orders": [
        {"id": rng.randint(1, 100_000), "status": rng.choice(_STATUSES),
         "total": round(rng.uniform(5, 200), 2)} for _ in range(limit)]})


async def create_order(request: web.Request) -> web.Response:
    failure = await _work(request)
    if failure is not None:
        return failure
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        return web.json_response({"error": "expected {\"items\": [...]}"}, status=422)
    return web.json_response({"id": _rng(request).randint(100_000, 999_999),
                              "status": "pending", "items": body["items"]}, status=201)


async def get_user(request: web.Request) -> web.Response:
    failure = await _work(request)
    if failure is not None:
        return failure
    user_id = _number(request, "id")
    if user_id is None:
        return web.json_response({"error": "user id must be a number"}, status=400)
    rng = random.Random(user_id)
    return web.json_response({"id": user_id, "name": f"user-{user_id}",
                              "plan": rng.choice(("free", "pro", "enterprise")),
                              "country": rng.choice(("DE", "FR", "NL", "PL", "IE"))})


async def list_items(request: web.Request) -> web.Response:
    failure = await _work(request)
    if failure is not None:
        return failure
    return web.json_response({"items": [
        {"sku": f"SKU-{1000 + index}", "name": name, "price": 4.5 + index * 3}
        for index, name in enumerate(_PRODUCTS)]}, headers={"Cache-Control": "max-age=30"})


async def get_item(request: web.Request) -> web.Response:
    failure = await _work(request)
    if failure is not None:
        return failure
    sku = request.match_info["sku"]
    rng = random.Random(sku)
    return web.json_response({"sku": sku, "name": rng.choice(_PRODUCTS),
                              "price": round(rng.uniform(3, 60), 2),
                              "stock": rng.randint(0, 500)})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def mode(request: web.Request) -> web.Response:
    load = _load(request)
    if request.method == "POST":
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("not an object")
            if "capacity_rps" in body:
                load.capacity_rps = max(0.0, float(body["capacity_rps"]))
            if "error_rate" in body:
                load.error_rate = min(1.0, max(0.0, float(body["error_rate"])))
        except (ValueError, TypeError, AttributeError):
            return web.json_response(
                {"error": "expected {\"capacity_rps\": number, \"error_rate\": 0..1}"},
                status=400)
    return web.json_response({"capacity_rps": load.capacity_rps, "error_rate": load.error_rate,
                              "rate_1s": load.rate(time.monotonic()), "served": load.served,
                              "failed": load.failed})


_ROUTES = {
    "orders": [("GET", "/orders", list_orders), ("POST", "/orders", create_order),
               ("GET", "/orders/{id}", get_order)],
    "users": [("GET", "/users/{id}", get_user)],
    "catalog": [("GET", "/catalog/items", list_items), ("GET", "/catalog/items/{sku}", get_item)],
}


def make_app(services: Sequence[str], capacity_rps: float | None = None,
             seed: int | None = None) -> web.Application:
    """One app serving the given services' routes, sharing one capacity."""
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown service(s) {sorted(unknown)}; choose from {SERVICES}")
    app = web.Application()
    capacity = capacity_rps if capacity_rps is not None else min(
        DEFAULT_CAPACITY_RPS[name] for name in services)
    app[_LOAD] = Load(capacity_rps=capacity)
    app[_RNG] = random.Random(seed)
    for name in services:
        for method, path, handler in _ROUTES[name]:
            app.router.add_route(method, path, handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/_demo/mode", mode)
    return app


def load_of(app: web.Application) -> Load:
    return app[_LOAD]


async def start(host: str, ports: Sequence[int], capacities: dict[str, float] | None = None,
                seed: int | None = None) -> list[web.AppRunner]:
    """Start orders, users and catalog on the given ports; returns their runners."""
    if len(ports) != len(SERVICES):
        raise ValueError(f"need {len(SERVICES)} ports (orders, users, catalog), got {len(ports)}")
    runners: list[web.AppRunner] = []
    try:
        for offset, (name, port) in enumerate(zip(SERVICES, ports, strict=True)):
            capacity = (capacities or {}).get(name)
            app = make_app([name], capacity, None if seed is None else seed + offset)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port).start()
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return runners


async def _serve(args: argparse.Namespace) -> int:
    ports = [int(part) for part in args.ports.split(",")]
    capacities = {"orders": args.orders_capacity}
    try:
        runners = await start(args.host, ports, capacities, args.seed)
    except (OSError, ValueError) as exc:
        print(f"cannot start the demo upstreams: {exc}", file=sys.stderr)
        return 2
    for name, port in zip(SERVICES, ports, strict=True):
        print(f"{name} listening on http://{args.host}:{port}", flush=True)
    stop = stop_on_signals()
    last: dict[str, tuple[int, int]] = {}
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=args.report_every)
            for name, runner in zip(SERVICES, runners, strict=True):
                load = load_of(runner.app)
                served, failed = last.get(name, (0, 0))
                if (load.served, load.failed) != (served, failed):
                    print(f"{name}: last {args.report_every:.0f}s served {load.served - served}, "
                          f"failed {load.failed - failed} (capacity {load.capacity_rps:.0f} "
                          "req/s)", flush=True)
                last[name] = (load.served, load.failed)
    finally:
        for runner in runners:
            await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apigw.demo.upstreams",
        description="Demo upstream services (orders, users, catalog) for `apigw demo`.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports", default=",".join(map(str, DEFAULT_PORTS)),
                        help="ports of orders,users,catalog (default 9101,9102,9103)")
    parser.add_argument("--orders-capacity", type=float,
                        default=DEFAULT_CAPACITY_RPS["orders"], metavar="RPS",
                        help="requests/s the orders service handles before it fails "
                             "(default 22)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--report-every", type=float, default=10.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
