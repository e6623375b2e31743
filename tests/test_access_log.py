"""The access log: whole-line batches, the text and JSON lines, each line's own time."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway import access_log
from gateway.access_log import LOG_BATCH, LOG_FLUSH_DELAY, AccessLog
from gateway.exchange import Exchange


def test_access_log_lines_go_out_in_whole_line_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    monkeypatch.setattr(access_log, "_write_out", writes.append)
    log = AccessLog("json")
    ex = Exchange(1.0)
    ex.status, ex.t_end, ex.request_id = 200, 1.01, b"r" * 100

    async def run() -> tuple[int, int]:
        for _ in range(40):
            log.write(ex, "POST", "/v1/chat/completions", "chat", "m")
        full = len(writes)  # the batches that filled up went out at once
        for _ in range(100):  # the rest within the delay (polled: a loaded machine runs late)
            await asyncio.sleep(LOG_FLUSH_DELAY)
            if len(writes) > full:
                break
        return full, len(writes)

    full, after = asyncio.run(run())
    assert full >= 2 and after == full + 1  # the rest followed within the delay
    lines = b"".join(writes).splitlines()
    assert len(lines) == 40 and all(orjson.loads(line)["status"] == 200 for line in lines)
    assert all(len(w) <= LOG_BATCH and w.endswith(b"\n") for w in writes)
    log.write(ex, "GET", "/v1/models", "models", "none")  # no event loop: written at once
    assert len(writes) == after + 1

    async def leave_a_line() -> None:
        log.write(ex, "GET", "/v1/models", "models", "none")  # its timer dies with this loop

    asyncio.run(leave_a_line())
    log.write(ex, "GET", "/v1/models", "models", "none")  # no loop now: out at once, with it
    assert len(writes) == after + 2 and writes[-1].count(b"\n") == 2


def test_access_log_text_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal: one plain line per request, with the same facts as the JSON one."""
    writes: list[bytes] = []
    monkeypatch.setattr(access_log, "_write_out", writes.append)
    log = AccessLog("text")
    ex = Exchange(1.0)
    ex.status, ex.t_first, ex.t_end, ex.request_id, ex.key_id = 200, 1.0125, 1.5, b"abc", "2b4144f5"
    ex.backend, ex.nbytes, ex.chunks, ex.end, ex.balance = "vllm", 42, 3, "done", "prefix"
    log.write(ex, "POST", "/v1/chat/completions", "chat", "m")  # no event loop: out at once
    (line,) = writes
    clock, rest = line.decode().split(" ", 1)
    assert len(clock) == 8 and clock[2] == clock[5] == ":"
    assert rest == (
        "200 POST /v1/chat/completions backend=vllm balance=prefix model=m ttft=12.5ms duration=500.0ms chunks=3 "
        "bytes=42 end=done key=2b4144f5 id=abc\n"
    )


def test_access_log_time_is_that_of_each_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timestamp is formatted once per millisecond and its seconds once per second: each line
    still carries its own millisecond."""
    log = AccessLog("json")
    clock = [1733370000.1234]
    monkeypatch.setattr("gateway.access_log.time.time", lambda: clock[0])
    stamps = [
        log._at(t)
        for t in (1733370000.1234, 1733370000.1236, 1733370000.1249, 1733370000.9991, 1733370001.0004, 1733370061.5)
    ]
    assert stamps == [
        "2024-12-05T03:40:00.123Z",
        "2024-12-05T03:40:00.123Z",
        "2024-12-05T03:40:00.124Z",
        "2024-12-05T03:40:00.999Z",
        "2024-12-05T03:40:01.000Z",
        "2024-12-05T03:41:01.500Z",
    ]

    # A line is formatted later, with its batch, and keeps the time its request ended.
    writes: list[bytes] = []
    monkeypatch.setattr(access_log, "_write_out", writes.append)
    ex = Exchange(1.0)
    ex.status, ex.t_end = 200, 1.5

    async def two_lines() -> None:
        for t in (1733370002.25, 1733370003.75):
            clock[0] = t
            log.write(ex, "GET", "/v1/models", "models", "none")
        assert not writes  # waiting for their batch
        clock[0] = 1733370009.0
        log.flush()

    asyncio.run(two_lines())
    assert [orjson.loads(line)["time"] for line in b"".join(writes).splitlines()] == [
        "2024-12-05T03:40:02.250Z",
        "2024-12-05T03:40:03.750Z",
    ]
