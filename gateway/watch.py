"""The disconnect watcher: cancels a forwarded request when its client goes away.

Granian's ``send()`` does not fail when the client has gone (ASGI spec 2.3), so without a watcher
the gateway would keep pulling a whole generation nobody reads. Closing the upstream connection
on that cancellation is what makes the backend abort the generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from gateway.exchange import Exchange
from gateway.types import Receive

#: An exchange still running this long (up to twice as long) gets its disconnect watcher.
WATCH_AFTER = 0.025
#: What a ``receive()`` that failed means: the server closed the channel, the client is gone.
_GONE = {"type": "http.disconnect"}


class DisconnectWatch:
    """Arms the disconnect watcher only for exchanges that outlive one tick of ``WATCH_AFTER``.

    Most non-streamed answers take a few milliseconds: watching them would cost a second
    ``receive()`` each (about 7 us with Granian) for a disconnect that could at most cancel the
    last millisecond of their work. An exchange that is still running at the second tick after it
    began (25 to 50 ms) is watched as before; a client that left before then is noticed at that
    tick, because the server's ``receive()`` answers ``http.disconnect`` for a disconnect already
    past.
    Per request this costs a dict insert and pop; the tick runs only while exchanges wait.
    """

    __slots__ = ("_young", "_old", "_watching", "_timer", "_loop")

    def __init__(self) -> None:
        #: Exchanges begun since the last tick, and those begun the tick before, with what they
        #: need to be watched: the request's ``receive`` and its task.
        self._young: dict[Exchange, tuple[Receive, asyncio.Task[Any]]] = {}
        self._old: dict[Exchange, tuple[Receive, asyncio.Task[Any]]] = {}
        #: Exchanges being watched: the pending ``receive()`` (Granian's future, or the task that
        #: runs another server's coroutine) and its callback, both let go when the exchange ends.
        self._watching: dict[Exchange, tuple[Any, Callable[[Any], None]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        #: The loop the tick runs on: the one serving the requests.
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, ex: Exchange, receive: Receive, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._young[ex] = (receive, task)
        if self._timer is None or self._loop is not loop:  # (a loop gone with its timer: tests)
            self._loop = loop
            self._timer = loop.call_later(WATCH_AFTER, self._tick)

    def discard(self, ex: Exchange) -> None:
        """The exchange ended: forget it, and let its pending ``receive()`` go.

        Cancelling Granian's future (its callback removed first) spares the server's answer at
        the response's end: without it that ``receive()`` resolves to ``http.disconnect`` through
        Granian's blocking thread and the loop (a thread-safe call and a callback per stream)
        only to be ignored; cancelled, Granian just drops it (``PyFutureAwaitable.cancel``).
        """
        if self._young.pop(ex, None) is None and self._old.pop(ex, None) is None and self._watching:
            watched = self._watching.pop(ex, None)
            if watched is not None:
                pending, on_message = watched
                pending.remove_done_callback(on_message)
                pending.cancel()

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        due, self._old, self._young = self._old, self._young, {}
        for ex, (receive, task) in due.items():
            self._watch(ex, receive, task, loop)
        self._timer = loop.call_later(WATCH_AFTER, self._tick) if self._old else None

    def _watch(
        self,
        ex: Exchange,
        receive: Receive,
        task: asyncio.Task[Any],
        loop: asyncio.AbstractEventLoop,
        ended: bool = False,
    ) -> None:
        """Cancel ``task`` when the client disconnects (Granian's send() does not fail then).

        Granian's ``receive()`` returns a future-like object: a done-callback on it watches for
        the disconnect without a task of its own. A server whose ``receive()`` is a coroutine gets
        it wrapped in a task. After the body the next message is ``http.disconnect``, or, where
        the body stage stopped at the declared Content-Length (``gateway.body``), first the
        body's empty last ``http.request``: then the watch goes on with the next one. Past the
        body's end (``ended``) another ``http.request`` breaks the ASGI spec; it ends the watch
        rather than have it ask again and again.
        """
        pending: Any = receive()
        if not hasattr(pending, "add_done_callback"):
            pending = loop.create_task(pending)

        def on_message(fut: Any) -> None:
            if fut.cancelled():
                return
            try:
                message = fut.result()
            except BaseException:  # noqa: BLE001 - the server closed the channel: the client is gone
                message = _GONE
            kind = message["type"]
            if kind == "http.request":  # the body's last message, not taken by the body stage
                if not ended and ex.active and ex in self._watching:
                    self._watch(ex, receive, task, loop, not message.get("more_body", False))
            elif kind == "http.disconnect" and ex.active:
                ex.cancelled_by = "disconnect"
                task.cancel()

        pending.add_done_callback(on_message)
        self._watching[ex] = (pending, on_message)

    def close(self) -> None:
        """Stop the tick (shutdown); exchanges not yet watched stay unwatched."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
