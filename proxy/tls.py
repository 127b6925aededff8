"""TLS: terminating it on the client listener, and speaking it to upstreams.

Listener (`tls:` at the top of the config): a certificate chain and key in PEM files, TLS 1.2
at least (1.3 if `min_version: "1.3"`). The listening socket keeps one SSLContext for its
life; every handshake is pointed (through the SNI callback, which OpenSSL runs for every
ClientHello, with or without a server name) at the context of the *current* certificate.
That certificate is rebuilt when the config is reloaded and when the files change on disk
(checked at most every `CHECK_EVERY_S` seconds, at a handshake), so a renewed certificate
is served without a restart. A certificate that cannot be loaded is an error at start and a
rejected reload; a broken renewal on disk is logged and the previous certificate stays.
Turning TLS on or off, and `min_version`, need a restart (they belong to the socket).

Upstreams (`upstreams.X.tls:`): https targets are verified against the system's CAs by
default (hostname included, TLS 1.2 at least); `ca_file` trusts a private CA instead,
`cert_file`/`key_file` present a client certificate (mTLS), `verify: false` is the explicit
opt-out. A failed handshake or verification is a 502 with error_type `upstream_tls_error`.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from proxy.config import GatewayConfig

log = logging.getLogger(__name__)

CHECK_EVERY_S: Final = 2.0
_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


class ListenerTls(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert_file: str = Field(description="PEM certificate chain (leaf first).")
    key_file: str = Field(description="PEM private key of the certificate.")
    min_version: Literal["1.2", "1.3"] = Field(default="1.2",
                                               description="Oldest TLS version accepted.")


class UpstreamTls(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verify: bool = Field(default=True, description="false: accept any certificate (opt-out).")
    ca_file: str | None = Field(default=None, description="PEM CA bundle trusted instead of "
                                                          "the system's.")
    cert_file: str | None = Field(default=None, description="Client certificate (mTLS).")
    key_file: str | None = Field(default=None, description="Key of the client certificate.")

    @model_validator(mode="after")
    def _pairs(self) -> UpstreamTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both `cert_file` and `key_file`, or neither")
        if not self.verify and self.ca_file is not None:
            raise ValueError("`ca_file` has no effect with `verify: false`")
        return self


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    for path in (cert_file, key_file):
        if not os.path.isfile(path):
            raise TlsError(f"TLS: cannot read {path}: no such file")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"TLS: cannot load certificate {cert_file} with key {key_file}: "
                       f"{getattr(exc, 'reason', None) or exc}") from None


def server_context(config: ListenerTls) -> ssl.SSLContext:
    """The listener's context for `config`; raises TlsError naming the bad file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[config.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    _load_chain(context, config.cert_file, config.key_file)
    return context


def upstream_context(config: UpstreamTls | None) -> ssl.SSLContext | bool:
    """What aiohttp's connector gets as `ssl=`: a verifying context, or False (opt-out)."""
    if config is not None and not config.verify:
        return False
    ca_file = config.ca_file if config is not None else None
    try:  # with a CA file, only that CA is trusted
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except FileNotFoundError:
        raise TlsError(f"TLS: cannot read CA file {ca_file}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"TLS: cannot load CA file {ca_file}: "
                       f"{getattr(exc, 'reason', None) or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config is not None and config.cert_file is not None and config.key_file is not None:
        _load_chain(context, config.cert_file, config.key_file)
    return context


def unverified_context() -> ssl.SSLContext:
    """The lean upstream client's context for `verify: false` (aiohttp's `ssl=False`)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _stamp(*paths: str) -> tuple[tuple[int, int], ...] | None:
    try:
        return tuple((stat.st_mtime_ns, stat.st_size) for stat in map(os.stat, paths))
    except OSError:
        return None


class ServerCertificate:
    """The listener certificate of one config, rebuilt when its files change."""

    def __init__(self, config: ListenerTls) -> None:
        self.config = config
        self._stamp = _stamp(config.cert_file, config.key_file)
        self.context = server_context(config)
        self._checked = time.monotonic()
        self.reloads = 0

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY_S:
            return self.context
        self._checked = now
        stamp = _stamp(self.config.cert_file, self.config.key_file)
        if stamp is None or stamp == self._stamp:
            return self.context
        self._stamp = stamp
        try:
            self.context = server_context(self.config)
        except TlsError as exc:  # a half-written renewal: keep serving the previous one
            log.error("TLS certificate changed on disk but cannot be loaded; the previous "
                      "one keeps serving", extra={"error": str(exc)})
            return self.context
        self.reloads += 1
        log.info("TLS certificate reloaded from disk",
                 extra={"cert_file": self.config.cert_file})
        return self.context


class TlsListener:
    """The SSLContext a listening socket is created with; each handshake is switched to the
    context `current()` returns (the live config's certificate)."""

    def __init__(self, initial: ssl.SSLContext,
                 current: Callable[[], ssl.SSLContext | None]) -> None:
        self.context = initial
        self._current = current
        initial.sni_callback = self._select

    def _select(self, connection: ssl.SSLObject, server_name: str | None,
                context: ssl.SSLContext) -> None:
        try:
            chosen = self._current()
        except Exception:  # never fail a handshake over a reload problem
            log.exception("choosing the TLS certificate failed; using the listener's own")
            return None
        if chosen is not None and chosen is not connection.context:
            connection.context = chosen
        return None


def check_tls(config: GatewayConfig) -> None:
    """Load every certificate, key and CA file the config names; raise TlsError if one fails."""
    if config.tls is not None:
        server_context(config.tls)
    for upstream in config.upstreams.values():
        if upstream.tls is not None:
            upstream_context(upstream.tls)
