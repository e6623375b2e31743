"""The tests' one raw HTTP/1.1 client: exact bytes in and out, nothing normalised.

* ``request(port, ...)``: one request on its own connection, the whole (de-chunked) response.
* ``Connection``: one blocking TCP connection, for keep-alive, raw bytes, streamed reads, half-sent
  requests, watching the server close, and leaving with a reset (``abort``).
* ``fetch(port, raw)``: the same exchange on asyncio, for many at once (load, aborts mid-stream),
  with timings; ``exchange`` runs one to completion from synchronous code.
* ``request_bytes``: a request's bytes, to send through either.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

#: SO_LINGER on with a zero timeout: close() sends a TCP RST, as a crashed or killed client does.
_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"

Headers = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass
class Response:
    """A response as received: status, lower-cased headers (the last of duplicates), the body."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Why the exchange did not end normally (``fetch`` only): None, "aborted" (by us, on purpose),
    #: "eof" (the server cut it), "timeout", or an error's name and text.
    error: str | None = None
    #: Seconds from sending to the response head, and to the end (``fetch`` only).
    t_head: float = 0.0
    t_end: float = 0.0

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[bytes]:
        """SSE event blocks (without the blank line that ends each)."""
        return [e for e in self.body.split(b"\n\n") if e]

    def __iter__(self) -> Iterator[Any]:
        """``status, headers, body = request(...)``."""
        return iter((self.status, self.headers, self.body))


#: The name ``fetch``'s callers know it by.
Result = Response


def encode_body(body: object) -> bytes:
    """``bytes`` as they are; anything else as JSON."""
    return body if isinstance(body, bytes) else orjson.dumps(body)


def request_bytes(
    method: str,
    path: str,
    body: object = None,
    headers: Headers | None = None,
    *,
    close: bool = True,
    version: str = "HTTP/1.1",
    host: str = "gateway",
    chunks: Sequence[bytes] | None = None,
) -> bytes:
    """A request's bytes. A body (``bytes``, or anything JSON-encodable) gets a Content-Length, and
    so does a POST without one, both with a JSON Content-Type unless ``headers`` name one;
    ``chunks`` sends the body chunked instead; ``close`` asks the server to close after answering."""
    lines = [f"{method} {path} {version}", f"host: {host}"]
    pairs = list(headers.items() if isinstance(headers, Mapping) else (headers or ()))
    lines += [f"{name}: {value}" for name, value in pairs]
    raw = b"" if body is None else encode_body(body)
    if chunks is not None:
        lines.append("transfer-encoding: chunked")
        raw = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
    elif body is not None or method == "POST":
        lines.append(f"content-length: {len(raw)}")
    if (body is not None or method == "POST") and not any(n.lower() == "content-type" for n, _ in pairs):
        lines.append("content-type: application/json")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and lower-cased headers of a response head (without its blank line)."""
    first, *rest = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in rest:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(first.split(" ", 2)[1]), headers


# -- blocking --------------------------------------------------------------------------------------


class Connection:
    """One TCP connection to 127.0.0.1:``port``; requests are sent one after another (keep-alive).

    ``rcvbuf`` shrinks the receive buffer (set before connecting, for slow-reader tests)."""

    def __init__(self, port: int, timeout: float = 10.0, *, rcvbuf: int | None = None) -> None:
        self.timeout = timeout
        self.sock = socket.socket()
        try:
            if rcvbuf is not None:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect(("127.0.0.1", port))
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """Leave with a TCP RST."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.sock.close()

    # -- writing --

    def sendall(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def send(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: Headers | None = None,
        *,
        version: str = "HTTP/1.1",
        chunks: Sequence[bytes] | None = None,
    ) -> None:
        raw = request_bytes(method, path, body, headers, close=False, version=version, chunks=chunks)
        self.sock.sendall(raw)

    # -- reading --

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_until(self, marker: bytes) -> bytes:
        """Everything up to and including ``marker`` (or all until the server closes)."""
        while marker not in self.buf:
            if not self._fill():
                out, self.buf = self.buf, b""
                return out
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def _take_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before " + repr(marker))
        out, _, self.buf = self.buf.partition(marker)
        return out

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[int, dict[str, str]]:
        return parse_head(self._take_until(b"\r\n\r\n"))

    def iter_chunks(self) -> Iterator[bytes]:
        """The payloads of a chunked body, one per HTTP chunk, as they arrive."""
        while True:
            size = int(self._take_until(b"\r\n").split(b";")[0], 16)
            data = self._take(size + 2)[:-2]
            if size == 0:
                return
            yield data

    def read_body(self, headers: Mapping[str, str], head_only: bool = False) -> bytes:
        if head_only:
            return b""
        if headers.get("transfer-encoding") == "chunked":
            return b"".join(self.iter_chunks())
        if "content-length" in headers:
            return self._take(int(headers["content-length"]))
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def read_response(self, head_only: bool = False) -> Response:
        status, headers = self.read_head()
        return Response(status, headers, self.read_body(headers, head_only))

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: Headers | None = None,
        *,
        chunks: Sequence[bytes] | None = None,
    ) -> Response:
        self.send(method, path, body, headers, chunks=chunks)
        return self.read_response(head_only=method == "HEAD")

    def answered(self, within: float) -> bool:
        """Whether bytes (or the end) are ready to read within ``within`` seconds."""
        return bool(self.buf) or bool(select.select([self.sock], [], [], within)[0])

    def closed_by_peer(self, within: float = 1.0) -> tuple[bool, bytes]:
        """Whether the server closes this connection within ``within`` seconds, and what it sent
        before (a reset counts as closed)."""
        got, self.buf = self.buf, b""
        deadline = time.monotonic() + within
        self.sock.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    return True, got
                if not chunk:
                    return True, got
                got += chunk
            return False, got
        finally:
            self.sock.settimeout(self.timeout)

    def is_closed_by_peer(self, wait: float = 1.0) -> bool:
        return self.closed_by_peer(wait)[0]


def connect(port: int, raw: bytes = b"", *, timeout: float = 10.0, rcvbuf: int | None = None) -> Connection:
    """A new connection that has sent ``raw`` (say a request whose answer the test reads, or not)."""
    conn = Connection(port, timeout, rcvbuf=rcvbuf)
    if raw:
        try:
            conn.sendall(raw)
        except BaseException:
            conn.close()
            raise
    return conn


def request(
    port: int,
    method: str,
    path: str,
    body: object = None,
    headers: Headers | None = None,
    *,
    timeout: float = 10.0,
    chunks: Sequence[bytes] | None = None,
) -> Response:
    """One request on its own connection."""
    with Connection(port, timeout) as conn:
        return conn.request(method, path, body, headers, chunks=chunks)


# -- asyncio ---------------------------------------------------------------------------------------


async def fetch(
    port: int,
    raw: bytes,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - one deadline for the whole exchange
    abort_after: bytes | None = None,
    on_head: asyncio.Event | None = None,
) -> Response:
    """Send ``raw`` on a new connection and read one response; never raises for the exchange.

    ``abort_after``: reset the connection (RST) as soon as the body holds these bytes.
    ``on_head``: set when the response head has arrived (to act while the body streams).
    """
    out = Response()
    t0 = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            writer.write(raw)
            await writer.drain()
            out.status, out.headers = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
            out.t_head = time.monotonic() - t0
            if on_head is not None:
                on_head.set()
            body = bytearray()
            if out.headers.get("transfer-encoding") == "chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    body += (await reader.readexactly(size + 2))[:-2]
                    if abort_after is not None and abort_after in body:
                        out.error = "aborted"
                        break
            elif "content-length" in out.headers:
                body += await reader.readexactly(int(out.headers["content-length"]))
            else:
                body += await reader.read()
            out.body = bytes(body)
    except asyncio.IncompleteReadError as exc:
        out.body += exc.partial
        out.error = "eof"
    except TimeoutError:
        out.error = "timeout"
    except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.t_end = time.monotonic() - t0
        if writer is not None:
            if out.error == "aborted":
                abort(writer)
            else:
                writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
    return out


def exchange(port: int, raw: bytes, *, timeout: float = 15.0) -> Response:
    """``fetch`` from synchronous code."""
    return asyncio.run(fetch(port, raw, timeout=timeout))


async def fetch_all(port: int, raws: Iterable[bytes], *, timeout: float = 30.0) -> list[Response]:  # noqa: ASYNC109
    """Several exchanges at once, each on its own connection."""
    return list(await asyncio.gather(*(fetch(port, raw, timeout=timeout) for raw in raws)))


def abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a client that crashed or was killed would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    writer.transport.abort()
