"""An in-memory network for httpcore: connections that never touch a socket.

Every ``read()`` hands out the next of a fixed list of pieces (a pre-built HTTP/1.1 response,
one read each), and every ``write()`` (a request) rewinds it. A response read to the end leaves
the connection idle, so the gateway's pool reuses it. Shared by the pool's unit tests and the
micro-benchmarks (``bench/micro``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore


class MemoryStream(httpcore.AsyncNetworkStream):
    """One keep-alive connection that answers every request with the same pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces
        self._next = len(pieces)  # nothing to read until a request was written

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        i = self._next
        if i >= len(self._pieces):
            return b""  # EOF: only reached if httpcore reads past the end of a response
        self._next = i + 1
        return self._pieces[i]

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # httpcore writes the whole request before it reads: any write starts a new response.
        self._next = 0

    async def aclose(self) -> None:
        return None

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError("the in-memory upstream is plain HTTP")

    def get_extra_info(self, info: str) -> Any:
        # False: an idle connection never looks closed by the server (httpcore's has_expired).
        return False if info == "is_readable" else None


class MemoryNetwork(httpcore.AsyncNetworkBackend):
    """Hands out ``MemoryStream`` connections; ``connects`` counts them (1 means keep-alive works)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.connects = 0

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects += 1
        return MemoryStream(self.pieces)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError("the in-memory upstream is TCP only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
