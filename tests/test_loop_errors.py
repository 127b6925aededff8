"""The event loop's handler for errors nobody awaits (apigw.logs.new_event_loop)."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest

from apigw.logs import new_event_loop


async def _abandoned(error: BaseException) -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    del future  # never retrieved: the loop's handler reports it when it is collected


@pytest.mark.parametrize("error", [
    ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
    ConnectionResetError(104, "Connection reset by peer"),
])
def test_network_errors_nobody_awaits_are_one_warning_without_traceback(
        error: OSError, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asyncio"), \
            asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_abandoned(error))
    [record] = [r for r in caplog.records if r.name == "asyncio"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert str(error) in record.__dict__["error"]
    assert record.__dict__["context"] == "Future exception was never retrieved"


def test_a_tls_transport_failing_at_close_is_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """uvloop reports a write to a TLS transport the server already closed (a refused
    password) as "Fatal error on SSL protocol" with a RuntimeError."""
    loop = new_event_loop()
    try:
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            loop.call_exception_handler({
                "message": "Fatal error on SSL protocol\nprotocol: <SSLProtocol>",
                "exception": RuntimeError("unable to perform operation on <TCPTransport "
                                          "closed=True>; the handler is closed")})
    finally:
        loop.close()
    [record] = [r for r in caplog.records if r.name == "asyncio"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert record.__dict__["context"] == "Fatal error on SSL protocol"


def test_other_errors_keep_asyncios_report_with_the_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asyncio"), \
            asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_abandoned(ValueError("a bug")))
    [record] = [r for r in caplog.records if r.name == "asyncio"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
