"""The body-read stage: the client's request body, bounded in size and in time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from gateway import errors
from gateway.types import Receive


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class BodyReader:
    """The stage, configured once per worker: the size limit, the time limit (0: none) and where
    to find the loop that serves the requests (for the timer)."""

    __slots__ = ("limit", "timeout", "_loop")

    def __init__(self, limit: int, timeout: float, loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.limit = limit
        self.timeout = timeout
        self._loop = loop

    async def __call__(self, receive: Receive, content_length: bytes | None) -> bytes:
        """The whole body: 413 past the limit (from Content-Length, or as soon as it is passed),
        408 when it takes longer than the timeout, ``ClientGone`` on a disconnect."""
        limit = self.limit
        declared = -1
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise errors.bad_request("Invalid Content-Length header.") from None
            if declared > limit:
                raise errors.too_large(limit)
        timeout = self.timeout
        if not timeout:
            return await _receive_body(receive, limit, declared)
        # asyncio.timeout()'s semantics with one timer and no context object (~4 us a request):
        # the timer cancels the task; that cancellation, and only that one, becomes the 408.
        loop = self._loop()
        task = asyncio.current_task(loop)
        assert task is not None
        cancelling = task.cancelling()
        expired: list[bool] = []
        timer = loop.call_later(timeout, _body_expired, task, expired)
        try:
            return await _receive_body(receive, limit, declared)
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                raise errors.request_timeout(timeout) from None
            raise
        finally:
            timer.cancel()


async def _receive_body(receive: Receive, limit: int, declared: int) -> bytes:
    """The body's messages up to the last one, or up to the declared length (``declared``, -1
    for none): Granian hands a body over as its bytes with ``more_body`` true and then an empty
    last message, each ``receive()`` a hand-over through its blocking thread; once the declared
    bytes are in, that last one is left to the disconnect watcher (``gateway.watch``)."""
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone
    body = message.get("body", b"")
    if not message.get("more_body", False) or len(body) == declared:
        if len(body) > limit:
            raise errors.too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False) or size == declared:
            return b"".join(parts)


def _body_expired(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()
