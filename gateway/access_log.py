"""The access log: one line per request on stdout, written in batches after the requests end."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from gateway.exchange import Exchange

#: Lines are written in batches of at most this many bytes: writes to a pipe up to PIPE_BUF are
#: atomic, so several workers' lines never interleave mid-line.
LOG_BATCH = 4096
#: Seconds a line may wait for its batch to fill.
LOG_FLUSH_DELAY = 0.05
#: Lines waiting (as their fields, not yet formatted) that make a batch go out at once.
LOG_PENDING = 32


class AccessLog:
    """One line per request on stdout: JSON (orjson) or, on a terminal, plain text.

    A finished request leaves its fields in a tuple; they are formatted together, and written in
    whole-line batches of up to ``LOG_BATCH`` bytes, when ``LOG_PENDING`` are waiting, at the
    latest ``LOG_FLUSH_DELAY`` after the first one (on an event loop; at once without one), and at
    shutdown: one write per a dozen requests under load instead of one each, and the formatting
    out of the request's way, in one tight loop.
    """

    def __init__(self, fmt: str) -> None:
        if fmt == "auto":
            fmt = "text" if os.isatty(1) else "json"
        self.json = fmt == "json"
        self._second = -1
        self._stamp = ""
        self._milli = -1
        self._time = ""
        self._pending: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def flush(self) -> None:
        """Write the lines waiting, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        line = self._line
        lines = [line(fields) for fields in self._pending]
        self._pending.clear()
        batch: list[bytes] = []
        size = 0
        for text in lines:
            if size + len(text) > LOG_BATCH and batch:
                _write_out(b"".join(batch))
                batch.clear()
                size = 0
            batch.append(text)
            size += len(text)
        _write_out(b"".join(batch))

    def _at(self, now: float) -> str:
        """``now`` in ISO 8601 UTC with milliseconds; the seconds part is formatted once per
        second, the whole once per millisecond."""
        milli = int(now * 1000)
        if milli == self._milli:
            return self._time
        second, rest = divmod(milli, 1000)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._milli = milli
        self._time = f"{self._stamp}.{rest:03d}Z"
        return self._time

    def write(self, ex: Exchange, method: str, path: str, route: str, model: str) -> None:
        pending = self._pending
        pending.append(
            (
                time.time(),
                ex.t_start,
                ex.t_first,
                ex.t_end,
                ex.request_id,
                ex.key_id,
                method,
                path,
                route,
                model,
                ex.backend,
                ex.balance,
                ex.status,
                ex.nbytes,
                ex.chunks,
                ex.end,
            )
        )
        if len(pending) >= LOG_PENDING:
            self.flush()
            return
        if self._timer is not None and self._timer_loop is not None and not self._timer_loop.is_closed():
            return  # the batch's timer will write it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._timer = loop.call_later(LOG_FLUSH_DELAY, self.flush)
        self._timer_loop = loop

    def _line(self, fields: tuple[Any, ...]) -> bytes:
        """One request's line, from the fields ``write`` kept."""
        (now, t_start, t_first, t_end, request_id, key_id, method, path, route, model, backend, balance, status,
         nbytes, chunks, end) = fields  # fmt: skip
        ttft = None if not t_first else round((t_first - t_start) * 1000, 3)
        duration = round((t_end - t_start) * 1000, 3)
        if self.json:
            return orjson.dumps(
                {
                    "time": self._at(now),
                    "request_id": request_id.decode("ascii"),
                    "key_id": key_id,
                    "method": method,
                    "path": path,
                    "route": route,
                    "model": model,
                    "backend": backend,
                    "balance": balance,
                    "status": status,
                    "bytes": nbytes,
                    "ttft_ms": ttft,
                    "duration_ms": duration,
                    "chunks": chunks,
                    "end": end,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        return (
            f"{time.strftime('%H:%M:%S', time.localtime(now))} {status} {method} {path} backend={backend} "
            f"balance={balance} model={model} ttft={ttft}ms duration={duration}ms chunks={chunks} bytes={nbytes} "
            f"end={end} key={key_id} id={request_id.decode('ascii')}\n"
        ).encode()


def _write_out(data: bytes) -> None:
    try:
        while data:
            data = data[os.write(1, data) :]
    except OSError:
        pass
