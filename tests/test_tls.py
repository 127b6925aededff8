"""TLS on the listener and to upstreams, with a throwaway CA made by `cryptography` in the
test: real handshakes over loopback, a real https aiohttp upstream, real Redis for events."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import proxy.tls
from apigw.redis_server import free_port
from proxy.app import Gateway
from proxy.config import GatewayConfig
from proxy.reload import LiveGateway
from proxy.server import listener_tls, start_listener
from proxy.settings import ProxySettings
from proxy.tls import ListenerTls, TlsError, check_tls, server_context
from tests.test_proxy import STREAM, read_events

# --- a throwaway PKI --------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path  # CA certificate (PEM)
    cert: Path  # server certificate for localhost / 127.0.0.1, signed by the CA
    key: Path
    other_cert: Path  # a second CA-signed server certificate (for reload)
    other_key: Path
    self_signed: Path  # a certificate nobody trusts
    self_signed_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(directory: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("apigw test CA", ca_key, "apigw test CA", ca_key, ca=True)
    paths: dict[str, Path] = {"ca": _pem(ca, directory / "ca.pem")}
    for label in ("server", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        paths[f"{label}_key"] = _write_key(key, directory / f"{label}.key")
        paths[f"{label}_cert"] = _pem(_certificate("localhost", key, "apigw test CA", ca_key,
                                                   ca=False), directory / f"{label}.pem")
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _certificate("localhost", rogue_key, "localhost", rogue_key, ca=False)
    return Pki(ca=paths["ca"], cert=paths["server_cert"], key=paths["server_key"],
               other_cert=paths["other_cert"], other_key=paths["other_key"],
               self_signed=_pem(rogue, directory / "rogue.pem"),
               self_signed_key=_write_key(rogue_key, directory / "rogue.key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


# --- https upstreams ---------------------------------------------------------------------------

async def _hello(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path, "scheme": request.scheme,
                              "forwarded_proto": request.headers.get("X-Forwarded-Proto")})


@pytest.fixture
async def https_upstreams(pki: Pki) -> AsyncIterator[tuple[str, str]]:
    """(trusted upstream URL, self-signed upstream URL), both https on loopback."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", _hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    urls = []
    try:
        for cert, key in ((pki.cert, pki.key), (pki.self_signed, pki.self_signed_key)):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
            urls.append(f"https://127.0.0.1:{port}")
        yield urls[0], urls[1]
    finally:
        await runner.cleanup()


# --- the gateway, served as serve() serves it (LiveGateway + TLS listener) -----------------------

@dataclass
class Served:
    url: str
    live: LiveGateway
    redis: aioredis.Redis


Serve = Callable[[GatewayConfig], Awaitable[Served]]


@pytest.fixture
async def serve(redis_url: str) -> AsyncIterator[Serve]:
    started: list[tuple[LiveGateway, web.ServerRunner, aioredis.Redis]] = []

    async def start(config: GatewayConfig) -> Served:
        port = free_port()
        settings = ProxySettings(redis_url=redis_url, instance="tls-gw", events_stream=STREAM,
                                 listen=f"127.0.0.1:{port}", shutdown_grace_s=1)
        redis = aioredis.Redis.from_url(redis_url)
        gateway = Gateway(config, settings, redis)
        await gateway.start()
        live = LiveGateway(gateway, settings, redis, drain_s=1)
        runner = await start_listener(live, settings.listen, shutdown_grace_s=1,
                                      ssl_context=listener_tls(live))
        started.append((live, runner, redis))
        scheme = "https" if config.tls is not None else "http"
        return Served(f"{scheme}://127.0.0.1:{port}", live, redis)

    try:
        yield start
    finally:
        for live, runner, redis in reversed(started):
            await runner.cleanup()
            await live.stop(timeout_s=1.0)
            await redis.aclose()


def tls_config(pki: Pki, trusted: str, rogue: str, **tls: Any) -> GatewayConfig:
    timeouts = {"connect_s": 2, "read_s": 5, "total_s": 10}
    return GatewayConfig.model_validate({
        "upstreams": {
            "trusted": {"url": trusted, "tls": {"ca_file": str(pki.ca)}, "timeouts": timeouts},
            "rogue": {"url": rogue, "timeouts": timeouts},  # verified with the system CAs
            "optout": {"url": rogue, "tls": {"verify": False}, "timeouts": timeouts},
        },
        "routes": [{"id": "trusted", "match": {"prefix": "/t"}, "upstream": "trusted"},
                   {"id": "rogue", "match": {"prefix": "/r"}, "upstream": "rogue"},
                   {"id": "optout", "match": {"prefix": "/o"}, "upstream": "optout"}],
        "tls": {"cert_file": str(pki.cert), "key_file": str(pki.key), **tls},
        "events": {"flush_interval_ms": 20},
    })


async def peer_serial(url: str, context: ssl.SSLContext) -> int:
    host, port = url.removeprefix("https://").split(":")
    _, writer = await asyncio.open_connection(host, int(port), ssl=context,
                                              server_hostname="localhost")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        await writer.wait_closed()


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


# --- tests -------------------------------------------------------------------------------------

async def test_https_listener_and_verified_upstreams(pki: Pki, https_upstreams: tuple[str, str],
                                                     serve: Serve) -> None:
    trusted, rogue = https_upstreams
    gw = await serve(tls_config(pki, trusted, rogue))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=client_context(pki))) as client:
        async with client.get(f"{gw.url}/t/hello") as response:
            assert response.status == 200
            seen = await response.json()
        assert seen == {"path": "/t/hello", "scheme": "https", "forwarded_proto": "https"}
        async with client.get(f"{gw.url}/r/hello") as response:  # self-signed, verify on
            assert response.status == 502
            problem = await response.json()
            assert "tls" in problem["detail"]
        async with client.get(f"{gw.url}/o/hello") as response:  # verify: false
            assert response.status == 200
    events = {event["route_id"]: event for event in await read_events(gw.redis, 3)}
    assert events["trusted"]["url_scheme"] == "https"
    assert events["trusted"]["error_type"] == ""
    assert events["rogue"]["http_response_status_code"] == 502
    assert events["rogue"]["error_type"] == "upstream_tls_error"
    assert events["optout"]["http_response_status_code"] == 200

    # a client that does not trust the gateway's CA is refused by its own verification
    async with aiohttp.ClientSession() as untrusting:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await untrusting.get(f"{gw.url}/t/hello")


async def test_minimum_tls_version(pki: Pki, https_upstreams: tuple[str, str],
                                   serve: Serve) -> None:
    assert server_context(ListenerTls(cert_file=str(pki.cert), key_file=str(pki.key))
                          ).minimum_version == ssl.TLSVersion.TLSv1_2
    gw = await serve(tls_config(pki, *https_upstreams, min_version="1.3"))
    old = client_context(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # refused in the handshake
        await peer_serial(gw.url, old)
    assert await peer_serial(gw.url, client_context(pki)) == serial_of(pki.cert)


async def test_certificate_reloads_with_config_and_on_disk(
        pki: Pki, https_upstreams: tuple[str, str], serve: Serve, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    context = client_context(pki)
    gw = await serve(tls_config(pki, *https_upstreams))
    assert await peer_serial(gw.url, context) == serial_of(pki.cert)

    # a config naming another certificate: new handshakes get it
    other = tls_config(pki, *https_upstreams)
    assert other.tls is not None
    other.tls.cert_file, other.tls.key_file = str(pki.other_cert), str(pki.other_key)
    assert await gw.live.apply(other) == "success"
    assert await peer_serial(gw.url, context) == serial_of(pki.other_cert)

    # a config whose key file is missing is rejected; the current certificate keeps serving
    broken = tls_config(pki, *https_upstreams)
    assert broken.tls is not None
    broken.tls.key_file = str(tmp_path / "missing.key")
    with pytest.raises(TlsError, match=r"missing\.key"):
        check_tls(broken)
    assert await gw.live.apply(broken) == "error"
    assert await peer_serial(gw.url, context) == serial_of(pki.other_cert)

    # the files renewed on disk (same config): picked up at the next check
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(pki.cert.read_bytes())
    live_key.write_bytes(pki.key.read_bytes())
    renewed = tls_config(pki, *https_upstreams)
    assert renewed.tls is not None
    renewed.tls.cert_file, renewed.tls.key_file = str(live_cert), str(live_key)
    assert await gw.live.apply(renewed) == "success"
    assert await peer_serial(gw.url, context) == serial_of(pki.cert)
    monkeypatch.setattr(proxy.tls, "CHECK_EVERY_S", 0.0)
    live_key.write_bytes(b"not a key")  # a half-written renewal is not served
    assert await peer_serial(gw.url, context) == serial_of(pki.cert)
    live_cert.write_bytes(pki.other_cert.read_bytes())
    live_key.write_bytes(pki.other_key.read_bytes())
    assert await peer_serial(gw.url, context) == serial_of(pki.other_cert)


def test_config_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    bad = GatewayConfig.model_validate({
        "upstreams": {"a": {"url": "https://127.0.0.1:1", "tls": {"ca_file": str(pki.cert)}},
                      "b": {"url": "https://127.0.0.1:1",
                            "tls": {"ca_file": str(tmp_path / "nope.pem")}}},
        "routes": [{"id": "a", "match": {"prefix": "/"}, "upstream": "a"}]})
    with pytest.raises(TlsError, match=r"nope\.pem"):
        check_tls(bad)
    with pytest.raises(ValueError, match="cert_file"):
        GatewayConfig.model_validate({
            "upstreams": {"a": {"url": "https://x", "tls": {"cert_file": "c.pem"}}},
            "routes": [{"id": "a", "match": {"prefix": "/"}, "upstream": "a"}]})
