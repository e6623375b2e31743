"""Writes a simulated stream's events, counts them, and fires the faults due after each."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.sim import responses
from gateway.sim.config import Fault
from gateway.sim.http import HttpConnection
from gateway.sim.surfaces import MessagesFrames, ResponsesFrames

if TYPE_CHECKING:
    from gateway.sim.app import SimApp

#: The events of one stream: the kind's OpenAI chunks, or a Messages or Responses stream.
Frames = responses.StreamFrames | MessagesFrames | ResponsesFrames


class ClientGone(Exception):
    """The connection closed under a generation (seen before the cancellation arrived)."""


class Emitter:
    """Writes a stream's events, counts them, and fires the faults due after each."""

    __slots__ = ("_app", "_conn", "_fault", "_frames", "sent")

    def __init__(self, app: SimApp, conn: HttpConnection, fault: Fault, frames: Frames) -> None:
        self._app = app
        self._conn = conn
        self._fault = fault
        self._frames = frames
        self.sent = 0

    async def emit(self, event: bytes) -> bool:
        """Send one event; False when a fault ended the stream."""
        conn = self._conn
        if conn.lost:
            raise ClientGone
        if not conn.started:
            conn.start_stream(200, self._app.wire.stream_headers)
        conn.send_chunk(event)
        self.sent += 1
        if conn.write_blocked:
            await conn.drain()
            if conn.lost:
                raise ClientGone
        return await self.check() if self._fault.any else True

    async def check(self) -> bool:
        fault, conn, app, n = self._fault, self._conn, self._app, self.sent
        if fault.reset_after == n:
            app.stats.faults_total += 1
            conn.reset()
            return False
        if fault.stall_after == n and fault.stall_ms:
            await asyncio.sleep(fault.stall_ms / 1000.0)
        if fault.error_after == n:
            app.stats.faults_total += 1
            message = "simulated fault: generation error"
            if not conn.started:
                # Nothing sent yet: the kind answers a plain error (llama.cpp, Ollama).
                app._error(conn, 500, message)
                return False
            wire = app.wire
            own = getattr(self._frames, "stream_error", None)
            conn.send_chunk(own(message) if own is not None else wire.stream_error(wire.sse_data, message))
            if wire.done_after_error:
                conn.send_chunk(self._frames.done)
            conn.end_stream()
            return False
        return True
