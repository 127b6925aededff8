"""The rate limiter's pipelined Redis lane against real redis-servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from apigw.redis_server import RedisServer
from proxy.redis_lane import LaneScript, LaneTimeout, RedisLane

ECHO = LaneScript("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}")
SLOW = LaneScript("""
local started = redis.call('TIME')
local now = started
while (now[1] - started[1]) * 1000000 + (now[2] - started[2]) < tonumber(ARGV[1]) do
  now = redis.call('TIME')
end
return 1
""")


class CountingTransport:
    """The lane's transport, its writes recorded."""

    def __init__(self, inner: asyncio.WriteTransport) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def lane(redis_client: aioredis.Redis) -> AsyncIterator[RedisLane]:
    made = RedisLane(redis_client)  # connects on its first call
    try:
        yield made
    finally:
        await made.close()


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_answer(
        redis_client: aioredis.Redis, lane: RedisLane) -> None:
    before = {client["id"] for client in await redis_client.client_list()}
    replies = await asyncio.gather(*(lane.run(ECHO, [f"k{n % 7}"], [n]) for n in range(500)))
    assert [(key, int(arg)) for key, arg, _ in replies] == \
        [(f"k{n % 7}".encode(), n) for n in range(500)]
    for index in range(7):  # each key incremented once per call, in call order
        counts = [count for key, _, count in replies if key == f"k{index}".encode()]
        assert counts == list(range(1, len(counts) + 1))
    new = {client["id"] for client in await redis_client.client_list()} - before
    assert len(new) == 1  # the lane's one connection (the server is shared by the session)


async def test_calls_made_in_one_turn_of_the_loop_go_out_in_one_write(
        lane: RedisLane, monkeypatch: pytest.MonkeyPatch) -> None:
    await lane.run(ECHO, ["w"], [0])  # connected
    transport = lane._transport
    assert transport is not None
    counting = CountingTransport(transport)
    monkeypatch.setattr(lane, "_transport", counting)
    replies = await asyncio.gather(*(lane.run(ECHO, ["w"], [n]) for n in range(100)))
    assert [int(count) for _, _, count in replies] == list(range(2, 102))
    assert len(counting.writes) == 1
    assert counting.writes[0].count(b"EVALSHA") == 100


async def test_a_call_queued_when_the_connection_drops_fails_and_the_next_reconnects(
        lane: RedisLane) -> None:
    await lane.run(ECHO, ["d"], [0])
    first = asyncio.ensure_future(lane.run(ECHO, ["d"], [1]))
    await asyncio.sleep(0)  # queued, not yet written
    lane._abandon(RedisConnectionError("dropped for the test"))
    with pytest.raises(RedisConnectionError):
        await first
    assert (await lane.run(ECHO, ["d"], [2]))[1:] == [b"2", 2]


async def test_calls_queued_when_the_connection_closes_fail_and_the_next_reconnects(
        lane: RedisLane) -> None:
    await lane.run(ECHO, ["q"], [0])
    transport = lane._transport
    assert transport is not None
    queued = asyncio.ensure_future(lane.run(ECHO, ["q"], [1]))
    await asyncio.sleep(0)  # queued for the end of the turn, not written
    transport.abort()
    with pytest.raises(RedisConnectionError):
        async with asyncio.timeout(1.0):  # at once, not when some timeout notices
            await queued
    assert (await lane.run(ECHO, ["q"], [2]))[1] == b"2"


async def test_redis_closing_the_connection_is_noticed_and_the_next_call_reconnects(
        redis_client: aioredis.Redis, lane: RedisLane) -> None:
    await lane.run(ECHO, ["x"], [0])
    first = lane._transport
    assert first is not None
    host, port = first.get_extra_info("sockname")[:2]
    ids = [client["id"] for client in await redis_client.client_list()
           if client.get("addr") == f"{host}:{port}"]
    assert len(ids) == 1  # the lane's connection (the server is shared by the session)
    await redis_client.client_kill_filter(_id=ids[0])
    async with asyncio.timeout(2.0):  # noticed when the connection closes, not on a call
        while lane._transport is not None:
            await asyncio.sleep(0.01)
    assert (await lane.run(ECHO, ["x"], [1]))[1:] == [b"1", 2]
    assert lane._transport is not None
    assert lane._transport is not first


async def test_a_script_redis_does_not_have_is_sent_whole_once(
        redis_client: aioredis.Redis, lane: RedisLane) -> None:
    await redis_client.script_flush()
    assert (await lane.run(ECHO, ["a"], ["x"]))[2] == 1
    assert (await redis_client.script_exists(ECHO.sha)) == [True]
    assert (await lane.run(ECHO, ["a"], ["x"]))[2] == 2


async def test_a_script_error_is_raised_and_the_lane_goes_on(lane: RedisLane) -> None:
    failing = LaneScript("return redis.call('INCR', KEYS[1], 'too', 'many')")
    with pytest.raises(ResponseError):
        await lane.run(failing, ["a"], [])
    assert (await lane.run(ECHO, ["a"], ["y"]))[1] == b"y"


async def test_an_abandoned_call_drops_the_connection_and_the_next_call_reconnects(
        lane: RedisLane) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await lane.run(SLOW, ["s"], [300_000])  # Redis busy for 0.3 s
    assert (await lane.run(ECHO, ["b"], ["z"]))[1] == b"z"


async def test_a_call_past_its_deadline_fails_with_the_calls_behind_it_then_reconnects(
        lane: RedisLane) -> None:
    await lane.run(ECHO, ["t"], [0])
    first = lane._transport
    slow = asyncio.ensure_future(lane.run(SLOW, ["t"], [400_000], timeout_s=0.05))
    behind = asyncio.ensure_future(lane.run(ECHO, ["t"], [1], timeout_s=5.0))
    with pytest.raises(LaneTimeout):
        await slow  # Redis is busy for 0.4 s: without the deadline this would succeed
    with pytest.raises(LaneTimeout):
        await behind  # queued on the same stuck connection
    assert lane._transport is None
    assert not lane._deadlines
    assert (await lane.run(ECHO, ["t"], [2], timeout_s=5.0))[1] == b"2"
    assert lane._transport is not None
    assert lane._transport is not first


async def test_calls_answered_in_time_keep_the_connection_and_leave_no_deadline_behind(
        lane: RedisLane) -> None:
    await lane.run(ECHO, ["k"], [0])
    transport = lane._transport
    replies = await asyncio.gather(*(lane.run(ECHO, ["k"], [n], timeout_s=0.1)
                                     for n in range(200)))
    assert [int(count) for _, _, count in replies] == list(range(2, 202))
    assert lane._deadline_timer is not None  # armed lazily; not cancelled per reply
    await asyncio.sleep(0.2)  # past every deadline: the timer finds them all answered
    assert lane._transport is transport
    assert not lane._deadlines
    assert lane._deadline_timer is None
    assert (await lane.run(ECHO, ["k"], [9], timeout_s=0.1))[1] == b"9"
    assert lane._transport is transport


async def test_redis_down_fails_fast_and_the_lane_recovers_when_it_returns(
        tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1.0)
    lane = RedisLane(client)
    try:
        assert (await lane.run(ECHO, ["c"], [1]))[2] == 1
        server.stop()
        for _ in range(2):  # the broken connection, then a refused reconnect
            with pytest.raises(RedisConnectionError):
                async with asyncio.timeout(2.0):
                    await lane.run(ECHO, ["c"], [1])
        server = RedisServer(tmp_path / "r2", port=server.port).start()
        assert (await lane.run(ECHO, ["c"], [1]))[2] == 1  # a new, empty server
    finally:
        await lane.close()
        await client.aclose()
        server.stop()


async def test_a_closed_lane_refuses_calls(lane: RedisLane) -> None:
    await lane.run(ECHO, ["d"], [1])
    await lane.close()
    with pytest.raises(RedisConnectionError):
        await lane.run(ECHO, ["d"], [1])
