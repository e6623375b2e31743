"""Graceful shutdown across Granian's worker processes, through a small control directory.

``gateway serve`` (the supervisor) creates the directory and passes its path to the workers in
``GATEWAY_CONTROL_DIR``. On SIGTERM it creates ``draining`` there; each worker notices within
``TICK`` seconds, answers 503 to new requests and ``draining`` on /ready, and keeps writing its
in-flight count to ``w-<pid>``. The supervisor stops Granian once every worker reports zero, or
when the grace period is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

CONTROL_ENV = "GATEWAY_CONTROL_DIR"
DRAIN_FILE = "draining"
TICK = 0.05


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class WorkerDrain:
    """A worker's side: a poll task started in the lifespan."""

    def __init__(self, control_dir: Path, inflight: Callable[[], int], on_drain: Callable[[], None]) -> None:
        self._dir = control_dir
        self._inflight = inflight
        self._on_drain = on_drain
        self._me = control_dir / f"w-{os.getpid()}"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        _write_atomic(self._me, "up")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        flag = self._dir / DRAIN_FILE
        while not flag.exists():  # noqa: ASYNC110 - polls a file another process creates
            await asyncio.sleep(TICK)
        self._on_drain()
        while True:
            _write_atomic(self._me, str(self._inflight()))
            await asyncio.sleep(TICK)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            self._me.unlink()


def begin_drain(control_dir: Path) -> None:
    (control_dir / DRAIN_FILE).touch()


def workers_idle(control_dir: Path) -> bool:
    """True once every live worker has reported, after the drain began, zero requests in flight."""
    for entry in control_dir.glob("w-*"):
        if entry.name.endswith(".tmp"):
            continue
        pid = int(entry.name[2:])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        try:
            text = entry.read_text()
        except OSError:
            continue
        if text != "0":
            return False
    return True
