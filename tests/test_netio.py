"""The asyncio network backend's read deadlines (``gateway.netio.Stream``), on real loopback sockets.

A waiting read sets the stream's deadline and one timer per stream checks it: these tests pin
that a read times out at its own deadline, whether the timer was armed for an earlier or a later
one, and never when data came in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpcore
import pytest
import uvloop

from gateway.netio import AsyncioBackend, Stream

Scenario = Callable[[Stream, Callable[[bytes, float], None]], Awaitable[None]]


def run(scenario: Scenario) -> None:
    """Run ``scenario(stream, send_later)`` against a loopback server that sends what it is told."""

    async def main() -> None:
        peers: list[asyncio.StreamWriter] = []
        connected = asyncio.Event()

        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer)
            connected.set()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert isinstance(stream, Stream)
        await connected.wait()
        loop = asyncio.get_running_loop()

        def send_later(data: bytes, delay: float) -> None:
            loop.call_later(delay, peers[0].write, data)

        try:
            await scenario(stream, send_later)
        finally:
            await stream.aclose()
            for peer in peers:
                peer.close()
                await peer.wait_closed()
            server.close()
            await server.wait_closed()
            await asyncio.sleep(0)  # let the transports finish closing before the loop does

    uvloop.run(main())


def test_a_read_times_out_at_its_deadline() -> None:
    async def scenario(stream: Stream, send_later: Callable[[bytes, float], None]) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(1024, timeout=0.2)
        assert 0.15 <= loop.time() - t0 < 2.0

    run(scenario)


def test_a_shorter_deadline_than_the_armed_timer_still_fires() -> None:
    async def scenario(stream: Stream, send_later: Callable[[bytes, float], None]) -> None:
        loop = asyncio.get_running_loop()
        send_later(b"a", 0.05)
        assert await stream.read(1024, timeout=30) == b"a"  # leaves a timer armed for ~30 s
        t0 = loop.time()
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(1024, timeout=0.2)
        assert loop.time() - t0 < 2.0  # its own deadline, not the 30 s one

    run(scenario)


def test_a_later_deadline_than_the_armed_timer_does_not_fire_early() -> None:
    async def scenario(stream: Stream, send_later: Callable[[bytes, float], None]) -> None:
        send_later(b"a", 0.01)
        assert await stream.read(1024, timeout=0.3) == b"a"  # leaves a timer due in ~0.3 s
        send_later(b"b", 0.6)
        assert await stream.read(1024, timeout=2.0) == b"b"  # the old timer fires meanwhile
        send_later(b"c", 0.4)
        assert await stream.read(1024, timeout=None) == b"c"  # no deadline at all

    run(scenario)


def test_closing_cancels_the_timer() -> None:
    async def scenario(stream: Stream, send_later: Callable[[bytes, float], None]) -> None:
        send_later(b"a", 0.01)
        assert await stream.read(1024, timeout=60) == b"a"
        timer = stream._timer
        assert timer is not None
        await stream.aclose()
        assert stream._timer is None and timer.cancelled()

    run(scenario)


def test_reads_waiting_are_taken_together_in_order_up_to_the_limit() -> None:
    """Several reads that arrived while nobody was reading come out as one piece, in order; what
    is over ``max_bytes`` stays for the next read."""

    async def scenario(stream: Stream, send_later: Callable[[bytes, float], None]) -> None:
        proto = stream._proto
        for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"):
            proto.data_received(piece)  # three reads from the socket, none taken yet
        assert await stream.read(20) == b"data: 1\n\ndata: 2\n\nda"
        assert await stream.read(64) == b"ta: 3\n\n"
        assert proto._buffered == 0 and not proto._chunks
        proto.data_received(b"data: 4\n\n")  # a single read is handed over as it is
        assert await stream.read(64) == b"data: 4\n\n"

    run(scenario)
