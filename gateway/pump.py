"""A response body relayed from the upstream socket's own callbacks: no task wake-up per piece.

On the usual path a streamed body costs, per piece, a future for the read, its wake-up of the
request's task and the resumption of the frames between the task and the socket (the relay's
loop, the body iterator, the read). Here the upstream protocol hands each read to the ``Pump``
(``netio._Protocol.sink``), which decodes it (``gateway.h1``) and passes the piece straight to the
ASGI ``send``, in the same callback; the request's task waits once, for the end of the body.

``send`` is the server's: its awaitable is driven here as a task would drive it. Granian's is
done at once (its body channel had room); when it is not (the client is slow, the channel is
full), the upstream socket stops being read until it is, so the client's backpressure reaches the
backend as before, and the pieces stay in order. A coroutine ``send`` (another server, the tests)
runs the same way. Timeouts are one deadline per read, checked by one timer per body, as in
``netio.Stream``; a read that only brings framing resets the deadline too, as a read does there.
A piece's deadline is taken from the time its bookkeeping already read (``handle``'s answer),
so a piece reads the clock once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

import httpcore

from gateway.h1 import BodyState, ChunkedBody, SizedBody
from gateway.types import Send

_DONE = BodyState.DONE


#: The type of awaitable a ``send`` returns done at its creation, always: Granian's
#: ``PyEmptyAwaitable``, what its ``send`` returns when the message went out at once (its
#: ``__next__`` ends at once; granian ``src/callbacks.rs``, from ``empty_future_into_py``): a piece
#: answered with one needs no driving. Granian does not export the class, so it is known by its
#: name when first met (None until then); any other type is driven (the same result, slower).
_DONE_TYPE: type | None = None


def _at_once(kind: type) -> bool:
    """Whether ``kind`` is Granian's always-done awaitable (then kept as ``_DONE_TYPE``)."""
    global _DONE_TYPE
    if kind.__module__ == "granian._granian" and kind.__qualname__ == "PyEmptyAwaitable":
        _DONE_TYPE = kind
        return True
    return False


class Pump:
    """Relays one body from the protocol's callbacks; ``run`` starts it and returns the future the
    request's task waits on: its result says whether the last piece went out as the final body
    message (``more_body`` false), it fails with what ended the body early (httpcore's errors, or
    what ``send`` or ``handle`` raised)."""

    __slots__ = (
        "_proto",
        "_decoder",
        "_send",
        "_handle",
        "_loop",
        "_idle",
        "_timeout",
        "_deadline",
        "_timer",
        "_done",
        "_waiting",
        "_awaited",
        "_ended",
        "_lost",
    )

    def __init__(
        self,
        proto: Any,  # netio._Protocol (not imported: netio imports nothing of the gateway's)
        decoder: ChunkedBody | SizedBody,
        send: Send,
        handle: Callable[[bytes], float],
        loop: asyncio.AbstractEventLoop,
        first_timeout: float | None,
        idle_timeout: float | None,
    ) -> None:
        self._proto = proto
        self._decoder = decoder
        self._send = send
        #: Called with each piece before it is sent (the relay's bookkeeping: ``Exchange.piece``);
        #: answers the piece's time (``time.perf_counter``), which the read deadline starts from.
        self._handle = handle
        self._loop = loop
        self._idle = idle_timeout
        #: The timeout of the read now awaited: ``first`` until a piece has come, then ``idle``.
        self._timeout = first_timeout
        #: When the read awaited is late (``time.perf_counter``).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[bool] = loop.create_future()
        #: A ``send`` not finished at once: its iterator, and what it waits on.
        self._waiting: Iterator[Any] | None = None
        self._awaited: Any = None
        #: The body ended (its last piece handed to ``send``): the result once that send is done.
        self._ended: bool | None = None
        #: The connection ended while a piece was with the client: the failure, raised once the
        #: client has taken that piece (what the backend sent before it closed is never dropped).
        self._lost: BaseException | None = None

    def run(self, data: bytes) -> asyncio.Future[bool]:
        """Relay ``data`` (what was read already), then every read as it arrives."""
        if data:
            self.data(data)
        if not self._done.done() and self._ended is None:
            proto = self._proto
            proto.sink = self
            if proto._eof:  # the backend closed before the pump began: nothing more will come
                self.ended(proto._exc)
            else:
                self._arm()
        return self._done

    def detach(self) -> None:
        """No more reads come here (the body ended, failed, or its task was cancelled): the
        protocol buffers them again, a pending send is let go, the timer stops."""
        proto = self._proto
        if proto.sink is self:
            proto.sink = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiting is not None:
            awaited, self._waiting, self._awaited = self._awaited, None, None
            cancel = getattr(awaited, "cancel", None)
            if cancel is not None:
                cancel()
            self._resume_reading()

    # -- from the protocol ----------------------------------------------------------------------

    def data(self, data: bytes) -> None:
        """One read from the backend."""
        try:
            decoder = self._decoder
            piece = decoder.feed(data)
            if decoder.finished:
                self._end(piece)
                return
            if piece:
                now = self._handle(piece)
                idle = self._idle
                if self._timeout is not idle:  # the first piece: from here on, the idle timeout
                    self._timeout = idle
                    if self._timer is None and self._proto.sink is self:
                        self._arm()
                if idle is not None:
                    self._deadline = now + idle
                self._put(piece, True)
            elif self._timeout is not None:
                self._deadline = perf_counter() + self._timeout
        except BaseException as exc:  # noqa: BLE001 - a callback: whatever it was ends the body
            self._fail(exc)

    def ended(self, exc: BaseException | None) -> None:
        """The backend closed the connection before the body's end (or it was lost)."""
        if exc is not None:
            error: BaseException = httpcore.ReadError(str(exc) or type(exc).__name__)
        else:
            error = httpcore.RemoteProtocolError(str(self._decoder.eof_error()))
        if self._waiting is not None:
            if self._lost is None:
                self._lost = error
            return
        self._fail(error)

    # -- the body's end -------------------------------------------------------------------------

    def _end(self, piece: bytes) -> None:
        """The decoder finished: the message ended (the last piece is the final body message),
        or trailers follow, or the framing broke (the data before the fault goes out first)."""
        proto = self._proto
        if proto.sink is self:
            proto.sink = None  # what comes after the body is buffered for the connection's owner
        last = self._decoder.state is _DONE
        self._ended = last and bool(piece)
        if piece:
            self._handle(piece)
            self._put(piece, not last)
        if self._waiting is None:
            self._finish()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._done.done():
            self._done.set_result(bool(self._ended))

    def _fail(self, exc: BaseException) -> None:
        self.detach()
        if not self._done.done():
            self._done.set_exception(exc)

    # -- the client side: ``send`` driven as a task would ---------------------------------------

    def _put(self, piece: bytes, more: bool) -> None:
        sent = self._send({"type": "http.response.body", "body": piece, "more_body": more})
        kind = type(sent)
        if kind is _DONE_TYPE or _DONE_TYPE is None and _at_once(kind):
            return  # Granian's answer when its body channel had room: nothing to wait for
        it = sent.__await__()
        try:
            awaited = next(it)
        except StopIteration:
            return  # done at once: the usual case
        self._waiting = it
        transport = self._proto.transport
        if transport is not None and self._ended is None:
            transport.pause_reading()
        self._wait(awaited)

    def _wait(self, awaited: Any) -> None:
        self._awaited = awaited
        if awaited is None:  # a bare yield: go on at the next loop iteration
            self._loop.call_soon(self._step, None)
            return
        if getattr(awaited, "_asyncio_future_blocking", False):
            awaited._asyncio_future_blocking = False
        awaited.add_done_callback(self._step)

    def _step(self, awaited: Any) -> None:
        it = self._waiting
        if it is None or awaited is not self._awaited:
            return  # let go by ``detach``
        try:
            awaited = next(it)
        except StopIteration:
            self._waiting = self._awaited = None
            if self._lost is not None:
                self._fail(self._lost)
            elif self._ended is not None:
                self._finish()
            else:
                self._resume_reading()
            return
        except BaseException as exc:  # noqa: BLE001 - the server's send failed: the body ends
            self._waiting = self._awaited = None
            self._fail(exc)
            return
        self._wait(awaited)

    def _resume_reading(self) -> None:
        transport = self._proto.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    # -- the read timeout -----------------------------------------------------------------------

    def _arm(self) -> None:
        timeout = self._timeout
        if timeout is None:
            return
        self._deadline = perf_counter() + timeout
        self._timer = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._done.done() or self._ended is not None:
            return
        now = perf_counter()
        if self._waiting is not None:  # the client's turn: no read is awaited while it takes a piece
            self._deadline = now + (self._timeout or 0.0)
        elif now >= self._deadline:
            self._fail(httpcore.ReadTimeout(f"no data within {self._timeout:g} s"))
            return
        self._timer = self._loop.call_later(self._deadline - now, self._check)
