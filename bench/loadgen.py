"""The load generator: an asyncio HTTP/1.1 client on raw sockets (uvloop when present).

It keeps one keep-alive connection per virtual user, writes a pre-encoded request, and reads raw
bytes with a small incremental parser (status line, headers, content-length or chunked body).
It never decodes JSON or SSE: it only timestamps the arrival of body bytes and counts events
(``\\n\\n`` separators), so its own cost per chunk stays far below the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from gateway.server import nofile_plan


@dataclass(slots=True)
class Sample:
    """One request as the client saw it. Times are ``time.perf_counter()`` seconds."""

    start: float
    status: int = 0
    #: First body byte after the headers (time to first token for a stream).
    first_byte: float | None = None
    end: float | None = None
    #: Arrival time of each read that carried body bytes.
    arrivals: list[float] = field(default_factory=list)
    events: int = 0
    nbytes: int = 0
    error: str | None = None
    aborted: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300 and self.end is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.start

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start

    def gaps(self) -> list[float]:
        a = self.arrivals
        return [a[i] - a[i - 1] for i in range(1, len(a))]

    def largest_gap(self) -> float | None:
        """The longest wait between two reads of this response's body (a stream's worst stall
        between tokens); None with fewer than two reads."""
        return max(self.gaps(), default=None)


class ProtocolError(Exception):
    pass


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """This process's cyclic garbage collector held off while a round is measured, and run once
    as the round ends, after its figures are read.

    The load generator keeps every sample of a run (each with its list of arrival times), so left
    to itself CPython's collector runs in the middle of rounds, over all of them: with 1,000
    paced streams, full collections of 120-190 ms and middle ones of up to 50 ms within the
    measured rounds. Each stalls the client's reads of every open stream, and shows up as a gap
    between tokens, or a later first token, of whichever server the round measures
    (bench/README.md, "The load generator's own pauses"). Reference counting still frees what a
    round drops; only cyclic garbage waits for the collection at the round's end.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def build_request(
    host: str, port: int, path: str, body: dict[str, object], api_key: str | None, extra: dict[str, str] | None = None
) -> bytes:
    payload = orjson.dumps(body)
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        "accept: text/event-stream, application/json",
        f"content-length: {len(payload)}",
    ]
    if api_key:
        lines.append(f"authorization: Bearer {api_key}")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class Connection:
    """One keep-alive HTTP/1.1 connection; ``request`` sends one request and reads its response."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self, abort: bool = False) -> None:
        if self._writer is not None:
            if abort:
                self._writer.transport.abort()
            else:
                self._writer.close()
        self._reader = self._writer = None

    async def request(self, raw: bytes, *, abort_after_events: int | None = None, timeout: float = 60.0) -> Sample:
        reused = self._writer is not None
        if self._writer is None:
            await self._connect()
        assert self._reader is not None and self._writer is not None
        sample = Sample(start=time.perf_counter())
        try:
            self._writer.write(raw)
            await asyncio.wait_for(self._read_response(sample, abort_after_events), timeout)
        except TimeoutError:
            sample.error = "timeout"
            self.close(abort=True)
        except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
            self.close(abort=True)
            if reused and sample.status == 0 and _closed_while_idle(exc):
                # The server had closed the idle keep-alive connection (llama.cpp does after 5 s):
                # like any HTTP client, send the request again on a new one.
                return await self.request(raw, abort_after_events=abort_after_events, timeout=timeout)
            sample.error = f"{type(exc).__name__}: {exc}"
        return sample

    async def _read_response(self, s: Sample, abort_after_events: int | None) -> None:
        reader = self._reader
        assert reader is not None
        s.status, length, chunked, close = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        last = b""
        if chunked:
            last = await self._read_chunked(reader, s, abort_after_events)
            if s.aborted:
                return
        elif length is not None:
            await _read_sized(reader, s, length)
        else:
            raise ProtocolError("response without content-length or chunked encoding")
        s.end = time.perf_counter()
        if s.status == 200 and chunked and b'data: {"error"' in last:  # the gateway's final error event
            s.error = "error event"
        if close:
            self.close()

    async def _read_chunked(self, reader: asyncio.StreamReader, s: Sample, abort_after_events: int | None) -> bytes:
        """A chunked body into ``s``; its last chunk. Past ``abort_after_events`` the connection is
        aborted and ``s.aborted`` set."""
        tail = b""  # the last byte of the previous piece, for events split across reads
        last = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return last
            data = await reader.readexactly(size + 2)
            now = time.perf_counter()
            if s.first_byte is None:
                s.first_byte = now
            s.arrivals.append(now)
            piece = data[:-2]
            s.nbytes += size
            s.events += (tail + piece).count(b"\n\n")
            tail = piece[-1:]
            last = piece
            if abort_after_events is not None and s.events >= abort_after_events:
                s.aborted = True
                s.end = now
                self.close(abort=True)
                return last


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """A response head's status, content-length, whether it is chunked and whether the server
    closes the connection after it."""
    status_line, _, header_block = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ProtocolError(f"bad status line {status_line[:80]!r}")
    status = int(parts[1])
    length: int | None = None
    chunked = False
    close = False
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            close = True
    return status, length, chunked, close


async def _read_sized(reader: asyncio.StreamReader, s: Sample, length: int) -> None:
    """A body of ``length`` bytes into ``s``."""
    tail = b""  # the last byte of the previous piece, for events split across reads
    remaining = length
    while remaining:
        data = await reader.read(min(remaining, 1 << 16))
        if not data:
            raise ProtocolError("connection closed mid-body")
        now = time.perf_counter()
        if s.first_byte is None:
            s.first_byte = now
        s.arrivals.append(now)
        remaining -= len(data)
        s.nbytes += len(data)
        s.events += (tail + data).count(b"\n\n")
        tail = data[-1:]


def _closed_while_idle(exc: BaseException) -> bool:
    """Whether a reused connection failed before any byte of the answer: closed by the server."""
    if isinstance(exc, asyncio.IncompleteReadError):
        return not exc.partial
    return isinstance(exc, ConnectionResetError | BrokenPipeError)


def raise_nofile(want: int = 16384) -> int:
    """Raise this process's soft limit on open files towards ``want`` (never above the hard
    limit, never lowered), for a thousand connections to each target at once; the servers the
    bench starts inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_soft, _ = nofile_plan(soft, hard, want)  # the gateway's own rule for its workers
    if new_soft is None:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return new_soft


def install_uvloop() -> str:
    """Use uvloop when available; returns the loop's name for the report."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return "asyncio"
