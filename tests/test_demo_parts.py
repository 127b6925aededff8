"""The demo's upstream services and traffic generator, against real servers on loopback."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import jwt
import pytest
from aiohttp import web

from apigw.demo import ABUSER
from apigw.demo.credentials import (
    AUDIENCE,
    ISSUER,
    JWT_CLIENTS,
    KEY_CLIENTS,
    Tokens,
    api_key,
    keys_yaml,
)
from apigw.demo.traffic import ANONYMOUS, NORMAL, STUFFER, STUFFER_ADDRESS, Options, Traffic
from apigw.demo.upstreams import SERVICES, load_of, make_app, start
from apigw.redis_server import free_port


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def services() -> AsyncIterator[dict[str, str]]:
    ports = [free_port() for _ in SERVICES]
    runners = await start("127.0.0.1", ports, seed=3)
    try:
        yield {name: f"http://127.0.0.1:{port}" for name, port in zip(SERVICES, ports,
                                                                      strict=True)}
    finally:
        for runner in runners:
            await runner.cleanup()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def test_upstreams_answer_with_json(services: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        status, order = await _get(session, f"{services['orders']}/orders/42")
        assert status == 200
        assert isinstance(order, dict)
        assert order["id"] == 42
        assert order["items"]
        assert order == (await _get(session, f"{services['orders']}/orders/42"))[1]
        status, listing = await _get(session, f"{services['orders']}/orders?limit=3")
        assert status == 200
        assert isinstance(listing, dict)
        assert len(listing["orders"]) == 3
        async with session.post(f"{services['orders']}/orders",
                                json={"items": [{"sku": "SKU-1", "qty": 1}]}) as response:
            assert response.status == 201
        async with session.post(f"{services['orders']}/orders", data=b"not json") as response:
            assert response.status == 400
        status, user = await _get(session, f"{services['users']}/users/7")
        assert status == 200
        assert isinstance(user, dict)
        assert user["id"] == 7
        status, items = await _get(session, f"{services['catalog']}/catalog/items")
        assert status == 200
        assert isinstance(items, dict)
        assert len(items["items"]) == 8
        status, item = await _get(session, f"{services['catalog']}/catalog/items/SKU-1003")
        assert status == 200
        assert isinstance(item, dict)
        assert item["sku"] == "SKU-1003"
        assert (await _get(session, f"{services['orders']}/orders/abc"))[0] == 400
        async with session.get(f"{services['users']}/orders/1") as response:
            assert response.status == 404  # each service serves only its own routes


async def test_orders_fails_when_overloaded_and_on_demand(services: dict[str, str]) -> None:
    orders = services["orders"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{orders}/_demo/mode", json={"capacity_rps": 10}) as response:
            assert response.status == 200
        burst = await asyncio.gather(*(_get(session, f"{orders}/orders/{n}")
                                       for n in range(100)))
        statuses = Counter(status for status, _ in burst)
        assert statuses[503] >= 50, statuses  # 100 in a second against a capacity of 10
        assert statuses[200] >= 1, statuses
        await asyncio.sleep(1.1)  # the second has passed: healthy again
        assert (await _get(session, f"{orders}/orders/1"))[0] == 200

        async with session.post(f"{orders}/_demo/mode",
                                json={"capacity_rps": 1000, "error_rate": 1.0}) as response:
            assert (await response.json())["error_rate"] == 1.0
        assert (await _get(session, f"{orders}/orders/1"))[0] == 503
        async with session.post(f"{orders}/_demo/mode", json=["nonsense"]) as response:
            assert response.status == 400


SECRET = "a-test-secret-for-the-demo-traffic-0123456789"


class Recorder:
    """A stand-in gateway: checks credentials as the demo config would, answers everything
    else, and limits the abuser after 10 requests."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.paths: Counter[str] = Counter()
        self.principals: dict[str, set[str]] = {}
        self.addresses: dict[str, set[str]] = {}
        self.refused: Counter[str] = Counter()

    def principal(self, request: web.Request) -> str:
        """The verified client id, "" for none, "!" for a bad credential."""
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            try:
                claims = jwt.decode(authorization[7:], SECRET, algorithms=["HS256"],
                                    audience=AUDIENCE, issuer=ISSUER)
            except jwt.InvalidTokenError:
                return "!"
            return str(claims["sub"])
        key = request.headers.get("X-API-Key")
        if key is not None:
            owners = [client for client in KEY_CLIENTS if api_key(client) == key]
            return owners[0] if owners else "!"
        return ""

    async def handle(self, request: web.Request) -> web.Response:
        client = request.headers["User-Agent"].removeprefix("apigw-demo/")
        assert "X-Client-Id" not in request.headers
        self.seen[client] += 1
        self.paths[f"{request.method} {request.path.split('/')[1]}"] += 1
        principal = self.principal(request)
        self.principals.setdefault(client, set()).add(principal)
        self.addresses.setdefault(client, set()).add(request.headers["X-Forwarded-For"])
        if principal == "!" or (not principal and not request.path.startswith("/catalog")):
            self.refused[client] += 1
            return web.json_response({"error": "unauthorized"}, status=401)
        if client == ABUSER:
            assert request.method == "GET"
            assert request.path.startswith("/orders/")
            status = 503 if self.seen[client] <= 10 else 429
            return web.json_response({"error": "no"}, status=status)
        return web.json_response({"ok": True})


async def test_traffic_counts_match_what_the_server_saw() -> None:
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner, url = await _serve(app)
    lines: list[str] = []
    try:
        options = Options(target=url, clients=5, client_rate=10.0, incident_after=1.5,
                          incident_rate=40.0, incident_concurrency=4, duration=3.0,
                          report_every=1.0, seed=5, anonymous=2, anonymous_rate=10.0,
                          stuffing_after=1.0, stuffing_rate=20.0, jwt_secret=SECRET)
        totals = await asyncio.wait_for(Traffic(options, lines.append).run(), 30)
    finally:
        await runner.cleanup()
    normal, abuser = totals[NORMAL], totals[ABUSER]
    normal_clients = {f"client-0{n}" for n in range(1, 6)}
    normal_seen = sum(recorder.seen[client] for client in normal_clients)
    assert set(recorder.seen) == normal_clients | {ABUSER, STUFFER, "visitor-1", "visitor-2"}
    assert normal.sent == normal.ok == normal_seen > 50
    for client in [*normal_clients, ABUSER]:  # each authenticates as itself, every time
        assert recorder.principals[client] == {client}, client
        assert len(recorder.addresses[client]) == 1
    assert {"client-01", "client-05"} <= set(JWT_CLIENTS)
    anonymous, stuffer = totals[ANONYMOUS], totals[STUFFER]
    assert recorder.principals["visitor-1"] == {""}
    assert anonymous.sent == recorder.seen["visitor-1"] + recorder.seen["visitor-2"] > 10
    assert anonymous.client_errors == recorder.refused["visitor-1"] + recorder.refused[
        "visitor-2"] > 0
    assert anonymous.ok > 0
    assert recorder.principals[STUFFER] == {"!"}  # never a valid credential
    assert recorder.addresses[STUFFER] == {STUFFER_ADDRESS}
    assert stuffer.sent == stuffer.client_errors == recorder.seen[STUFFER] > 20
    assert abuser.sent == recorder.seen[ABUSER] > 20
    assert abuser.server_errors == 10
    assert abuser.limited == abuser.sent - 10
    assert normal.failed == abuser.failed == 0
    assert {"GET orders", "POST orders", "GET users", "GET catalog"} <= set(recorder.paths)
    reports = [line for line in lines if line.startswith("t=+")]
    assert len(reports) >= 2
    assert any(f"{ABUSER}: idle" in line for line in reports)
    assert any("credential stuffing" in line for line in lines)
    assert any(f"{ABUSER}: sent" in line and "429" in line for line in reports)
    assert lines[-1].startswith("total after")
    assert any(line.startswith("total after") and f"{ABUSER}: sent {abuser.sent} " in line
               for line in lines[-4:])


async def test_traffic_through_the_demo_services_sees_the_overload() -> None:
    """The generator's paths exist on the demo services, and the incident overloads orders."""
    orders = make_app(list(SERVICES), capacity_rps=30, seed=1)  # all routes on one port
    runner, url = await _serve(orders)
    try:
        options = Options(target=url, clients=5, client_rate=4.0, incident_after=1.0,
                          incident_rate=120.0, incident_concurrency=12, duration=3.5,
                          report_every=10.0, seed=2)
        totals = await asyncio.wait_for(Traffic(options, lambda line: None).run(), 30)
        load = load_of(orders)
    finally:
        await runner.cleanup()
    normal, abuser = totals[NORMAL], totals[ABUSER]
    assert normal.client_errors == 0
    assert normal.failed == 0
    assert normal.sent > 20
    assert abuser.server_errors > abuser.sent * 0.3, abuser
    anonymous = totals[ANONYMOUS]
    assert anonymous.sent > 0
    assert load.failed == normal.server_errors + abuser.server_errors + anonymous.server_errors


def test_command_lines_start() -> None:
    """Both tools are runnable as modules."""
    import subprocess

    for module in ("apigw.demo.upstreams", "apigw.demo.traffic"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout


def test_tokens_are_renewed_before_they_expire() -> None:
    now = [1_000_000.0]
    tokens = Tokens(SECRET, clock=lambda: now[0])
    first = tokens.token("client-01")
    assert tokens.token("client-01") == first
    now[0] += 89  # 31 s left: still used
    assert tokens.token("client-01") == first
    now[0] += 2  # 29 s left: renewed
    second = tokens.token("client-01")
    assert second != first
    claims = jwt.decode(second, SECRET, algorithms=["HS256"], audience=AUDIENCE,
                        options={"verify_exp": False})
    assert claims["sub"] == "client-01"
    assert claims["exp"] - claims["iat"] == 120


def test_demo_config_holds_the_digests_of_the_demo_keys() -> None:
    """examples/demo.yaml lists exactly what `python -m apigw.demo.credentials` prints."""
    from pathlib import Path

    config = (Path(__file__).resolve().parent.parent / "examples" / "demo.yaml").read_text()
    assert keys_yaml() in config
    for client in KEY_CLIENTS:
        assert api_key(client) not in config
