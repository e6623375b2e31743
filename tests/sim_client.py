"""A tiny blocking HTTP/1.1 client on a raw socket, for looking at the simulator's exact bytes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[bytes]:
        """SSE event blocks (without the blank line that ends each)."""
        return [e for e in self.body.split(b"\n\n") if e]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


class RawClient:
    """One TCP connection; requests are sent one after another on it (keep-alive)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- writing --

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        version: str = "HTTP/1.1",
    ) -> None:
        raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        lines = [f"{method} {path} {version}", "host: sim"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"content-length: {len(raw)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + raw)

    # -- reading --

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before " + repr(marker))
        out, _, self.buf = self.buf.partition(marker)
        return out

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[int, dict[str, str]]:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        first, *rest = head.split("\r\n")
        status = int(first.split(" ")[1])
        headers = {}
        for line in rest:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def iter_chunks(self) -> Iterator[bytes]:
        """The payloads of a chunked body, one per HTTP chunk, as they arrive."""
        while True:
            size = int(self._read_until(b"\r\n"), 16)
            data = self._read_exact(size + 2)[:-2]
            if size == 0:
                return
            yield data

    def read_body(self, headers: dict[str, str], head_only: bool = False) -> bytes:
        if head_only:
            return b""
        if headers.get("transfer-encoding") == "chunked":
            return b"".join(self.iter_chunks())
        if "content-length" in headers:
            return self._read_exact(int(headers["content-length"]))
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def read_response(self, head_only: bool = False) -> Response:
        status, headers = self.read_head()
        return Response(status, headers, self.read_body(headers, head_only))

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Response:
        self.send(method, path, body, headers)
        return self.read_response(head_only=method == "HEAD")

    def is_closed_by_peer(self, wait: float = 1.0) -> bool:
        """True when the server closes this connection within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        self.sock.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                try:
                    if not self.sock.recv(65536):
                        return True
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    return True
            return False
        finally:
            self.sock.settimeout(5.0)


def request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Response:
    """One request on a fresh connection."""
    with RawClient(port) as client:
        return client.request(method, path, body, headers)


def chat_body(stream: bool = False, max_tokens: int | None = 4, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body
