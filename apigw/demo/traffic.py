"""Demo traffic: many well-behaved clients, then one client hammering one endpoint, and a
credential-stuffing bot.

Normal clients client-01..client-30 each send about one request per second over a steady mix
of the demo routes, authenticated (apigw/demo/credentials.py): client-01..20 with JWTs they
renew before expiry, client-21..30 with API keys. A few anonymous visitors browse the public
catalog and sometimes try an order without credentials (401). After `--incident-after`
seconds the incident starts: client `scraper-7` (a valid API key) walks GET /orders/{id} with
increasing ids at a high rate, which overloads the orders service into 5xx. It never backs
off, so once the gateway tightens its limit the 429s show up in the summary for that client
only. After `--stuffing-after` seconds a bot from 203.0.113.66 sends made-up API keys and
forged tokens to GET /users/{id} at a steady rate (all 401): the analytics' auth_failure_burst.
Each client comes from its own address (X-Forwarded-For; the demo config trusts 127.0.0.1 as
its load balancer). A summary line per client group is printed every `--report-every` seconds.

    python -m apigw.demo.traffic --target http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from apigw.demo import ABUSER, INCIDENT_ROUTE, STUFFING_AFTER
from apigw.demo.credentials import Tokens, bad_credential, credential_headers
from apigw.signals import stop_on_signals

NORMAL = "normal"
ANONYMOUS = "anonymous"
STUFFER = "stuffer"
STUFFER_ADDRESS = "203.0.113.66"
STUFFING_ROUTE = "/users/{id}"

# What anonymous visitors do: mostly the public catalog, sometimes an order (-> 401).
_ANONYMOUS_MIX: tuple[tuple[int, str, str], ...] = (
    (45, "GET", "/catalog/items"),
    (35, "GET", "/catalog/items/{sku}"),
    (20, "GET", "/orders/{n}"),
)

# (weight, method, path template); {n} is a random id, {sku} a catalog sku.
_MIX: tuple[tuple[int, str, str], ...] = (
    (40, "GET", "/orders/{n}"),
    (5, "POST", "/orders"),
    (25, "GET", "/users/{n}"),
    (15, "GET", "/catalog/items"),
    (15, "GET", "/catalog/items/{sku}"),
)


@dataclass
class Options:
    target: str
    clients: int = 30
    client_rate: float = 1.0  # requests/s of each normal client
    incident_after: float = 150.0
    incident_rate: float = 18.0  # requests/s of the abusive client (~45x a normal one)
    incident_concurrency: int = 8
    anonymous: int = 3
    anonymous_rate: float = 0.5  # requests/s of each anonymous visitor
    stuffing_after: float = STUFFING_AFTER
    stuffing_rate: float = 3.0  # bad credentials/s of the stuffing bot
    jwt_secret: str | None = None  # None = $DEMO_JWT_SECRET or the demo default
    duration: float | None = None  # None = until stopped
    report_every: float = 10.0
    abuser: str = ABUSER
    seed: int | None = None
    timeout_s: float = 5.0


@dataclass
class Counts:
    sent: int = 0
    ok: int = 0  # 2xx and 3xx
    client_errors: int = 0  # 4xx other than 429
    limited: int = 0  # 429
    server_errors: int = 0  # 5xx
    failed: int = 0  # no response: connection error or timeout

    def add(self, status: int | None) -> None:
        self.sent += 1
        if status is None:
            self.failed += 1
        elif status == 429:
            self.limited += 1
        elif status >= 500:
            self.server_errors += 1
        elif status >= 400:
            self.client_errors += 1
        else:
            self.ok += 1

    def minus(self, other: Counts) -> Counts:
        return Counts(self.sent - other.sent, self.ok - other.ok,
                      self.client_errors - other.client_errors, self.limited - other.limited,
                      self.server_errors - other.server_errors, self.failed - other.failed)

    def copy(self) -> Counts:
        return self.minus(Counts())

    def line(self) -> str:
        return (f"sent {self.sent} 2xx {self.ok} 4xx {self.client_errors} 429 {self.limited} "
                f"5xx {self.server_errors} err {self.failed}")


class Traffic:
    """The generator; `run()` returns the totals per client group (normal, the abuser)."""

    def __init__(self, options: Options, out: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.totals = {NORMAL: Counts(), ANONYMOUS: Counts(), options.abuser: Counts(),
                       STUFFER: Counts()}
        self._out = out or (lambda line: print(line, flush=True))
        self._rng = random.Random(options.seed)
        self._tokens = Tokens(options.jwt_secret)
        self._started = 0.0
        self._incident = asyncio.Event()
        self._stuffing = asyncio.Event()
        self._stopping = asyncio.Event()

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Counts]:
        options = self.options
        stop = stop or asyncio.Event()
        self._started = time.monotonic()
        self._out(f"traffic: {options.clients} clients at ~{options.client_rate:g} req/s each "
                  f"-> {options.target}; incident at +{options.incident_after:g}s: "
                  f"{options.abuser} GET {INCIDENT_ROUTE} at ~{options.incident_rate:g} req/s; "
                  f"credential stuffing at +{options.stuffing_after:g}s: GET {STUFFING_ROUTE} "
                  f"at ~{options.stuffing_rate:g} req/s")
        connector = aiohttp.TCPConnector(limit=options.clients + options.anonymous
                                         + options.incident_concurrency + 12)
        timeout = aiohttp.ClientTimeout(total=options.timeout_s)
        async with aiohttp.ClientSession(options.target, connector=connector,
                                         timeout=timeout) as session:
            senders = [asyncio.create_task(self._normal_client(session, f"client-{index:02d}"))
                       for index in range(1, options.clients + 1)]
            senders += [asyncio.create_task(self._anonymous_client(session, index))
                        for index in range(1, options.anonymous + 1)]
            senders.append(asyncio.create_task(self._incident_clients(session)))
            senders.append(asyncio.create_task(self._stuffing_client(session)))
            report = asyncio.create_task(self._report())
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=options.duration)
            finally:
                # Stop sending, let the requests in flight finish so every one is counted.
                self._stopping.set()
                await asyncio.wait(senders, timeout=options.timeout_s + 1)
                for task in [*senders, report]:
                    task.cancel()
                await asyncio.gather(*senders, report, return_exceptions=True)
        for group, counts in self.totals.items():
            self._out(f"total after {self._elapsed():.0f}s  {group}: {counts.line()}")
        return self.totals

    async def _send(self, session: aiohttp.ClientSession, group: str, client: str,
                    method: str, path: str, credential: dict[str, str] | None = None,
                    address: str = "") -> None:
        headers = {"User-Agent": f"apigw-demo/{client}", "X-Forwarded-For": address,
                   **(credential or {})}
        body = {"items": [{"sku": "SKU-1001", "qty": 1}]} if method == "POST" else None
        status: int | None
        try:
            async with session.request(method, path, headers=headers, json=body) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status = None
        self.totals[group].add(status)

    async def _normal_client(self, session: aiohttp.ClientSession, client: str) -> None:
        rng = random.Random(f"{self.options.seed}-{client}")
        address = f"10.1.0.{int(client.rpartition('-')[2]) % 250 + 1}"
        weights = [weight for weight, _, _ in _MIX]
        await self._pause(rng.uniform(0, 1 / self.options.client_rate))
        while not self._stopping.is_set():
            _, method, template = rng.choices(_MIX, weights=weights)[0]
            path = template.format(n=rng.randint(1, 5000), sku=f"SKU-{rng.randint(1000, 1007)}")
            started = time.monotonic()
            await self._send(session, NORMAL, client, method, path,
                             credential_headers(client, self._tokens), address)
            await self._pause(rng.expovariate(self.options.client_rate)
                              - (time.monotonic() - started))

    async def _anonymous_client(self, session: aiohttp.ClientSession, index: int) -> None:
        client = f"visitor-{index}"
        rng = random.Random(f"{self.options.seed}-{client}")
        weights = [weight for weight, _, _ in _ANONYMOUS_MIX]
        rate = self.options.anonymous_rate
        await self._pause(rng.uniform(0, 1 / rate))
        while not self._stopping.is_set():
            _, method, template = rng.choices(_ANONYMOUS_MIX, weights=weights)[0]
            path = template.format(n=rng.randint(1, 5000), sku=f"SKU-{rng.randint(1000, 1007)}")
            started = time.monotonic()
            await self._send(session, ANONYMOUS, client, method, path,
                             address=f"198.51.100.{10 + index}")
            await self._pause(rng.expovariate(rate) - (time.monotonic() - started))

    async def _stuffing_client(self, session: aiohttp.ClientSession) -> None:
        options = self.options
        await self._pause(options.stuffing_after - self._elapsed())
        if self._stopping.is_set():
            return
        self._stuffing.set()
        self._out(f"t=+{self._elapsed():.0f}s credential stuffing: {STUFFER_ADDRESS} tries made-"
                  f"up keys and forged tokens on GET {STUFFING_ROUTE} at "
                  f"~{options.stuffing_rate:g} req/s")
        rng = random.Random(f"{options.seed}-{STUFFER}")
        while not self._stopping.is_set():
            started = time.monotonic()
            await self._send(session, STUFFER, STUFFER, "GET",
                             f"/users/{rng.randint(1, 5000)}", bad_credential(rng.getrandbits),
                             STUFFER_ADDRESS)
            await self._pause(1 / options.stuffing_rate - (time.monotonic() - started))

    async def _pause(self, seconds: float) -> None:
        """Sleep, waking up early when the generator stops."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _incident_clients(self, session: aiohttp.ClientSession) -> None:
        options = self.options
        await self._pause(options.incident_after - self._elapsed())
        if self._stopping.is_set():
            return
        self._incident.set()
        self._out(f"t=+{self._elapsed():.0f}s incident: {options.abuser} starts hammering "
                  f"GET {INCIDENT_ROUTE} at ~{options.incident_rate:g} req/s")
        next_id = self._rng.randint(10_000, 20_000)
        interval = options.incident_concurrency / options.incident_rate

        async def worker(offset: int) -> None:
            nonlocal next_id
            await self._pause(offset * interval / options.incident_concurrency)
            while not self._stopping.is_set():
                next_id += 1
                started = time.monotonic()
                await self._send(session, options.abuser, options.abuser, "GET",
                                 f"/orders/{next_id}",
                                 credential_headers(options.abuser, self._tokens), "10.9.0.7")
                await self._pause(interval - (time.monotonic() - started))

        await asyncio.gather(*(worker(offset)
                               for offset in range(options.incident_concurrency)))

    async def _report(self) -> None:
        last = {group: Counts() for group in self.totals}
        while True:
            await asyncio.sleep(self.options.report_every)
            parts = []
            for group, counts in self.totals.items():
                if group == self.options.abuser and not self._incident.is_set():
                    parts.append(f"{group}: idle until +{self.options.incident_after:g}s")
                    continue
                if group == STUFFER and not self._stuffing.is_set():
                    parts.append(f"{group}: idle until +{self.options.stuffing_after:g}s")
                    continue
                label = {NORMAL: f"{group}({self.options.clients})",
                         ANONYMOUS: f"{group}({self.options.anonymous})"}.get(group, group)
                parts.append(f"{label}: {counts.minus(last[group]).line()}")
                last[group] = counts.copy()
            self._out(f"t=+{self._elapsed():.0f}s last {self.options.report_every:g}s  "
                      + "  |  ".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apigw.demo.traffic",
        description="Demo traffic for `apigw demo`: normal clients, then an incident.")
    parser.add_argument("--target", default="http://127.0.0.1:8080",
                        help="the gateway (default http://127.0.0.1:8080)")
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--client-rate", type=float, default=1.0, metavar="RPS",
                        help="requests/s of each normal client (default 1)")
    parser.add_argument("--incident-after", type=float, default=150.0, metavar="SECONDS")
    parser.add_argument("--incident-rate", type=float, default=18.0, metavar="RPS",
                        help="requests/s of the abusive client (default 18: under the demo's "
                             "default per-client limit, over the orders service's capacity)")
    parser.add_argument("--anonymous", type=int, default=3,
                        help="anonymous visitors (catalog, and orders without credentials)")
    parser.add_argument("--stuffing-after", type=float, default=STUFFING_AFTER,
                        metavar="SECONDS",
                        help="when the credential-stuffing bot starts (default 120)")
    parser.add_argument("--stuffing-rate", type=float, default=3.0, metavar="RPS",
                        help="bad credentials/s it sends to GET /users/{id} (default 3)")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this long (default: until SIGINT/SIGTERM)")
    parser.add_argument("--report-every", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if (args.clients < 0 or args.anonymous < 0 or args.client_rate <= 0
            or args.incident_rate <= 0 or args.stuffing_rate <= 0):
        parser.error("--clients and --anonymous must be >= 0 and the rates > 0")
    options = Options(target=args.target, clients=args.clients, client_rate=args.client_rate,
                      incident_after=args.incident_after, incident_rate=args.incident_rate,
                      anonymous=args.anonymous, stuffing_after=args.stuffing_after,
                      stuffing_rate=args.stuffing_rate,
                      duration=args.duration, report_every=args.report_every, seed=args.seed)

    async def run() -> None:
        stop = stop_on_signals()
        await Traffic(options).run(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
