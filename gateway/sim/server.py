"""Starting and stopping a simulator: in this event loop (``start_sim``) or in a thread of its own
(``sim_in_thread``, for synchronous tests and benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

from gateway.sim.app import SimApp
from gateway.sim.config import SimConfig
from gateway.sim.engine import Scheduler
from gateway.sim.http import HttpConnection
from gateway.sim.kinds import WIRES, Loading
from gateway.sim.stats import SimStats

BACKLOG = 4096


class SimServer:
    """A running simulator. ``stats`` holds its live counters (the same numbers as ``/metrics``)."""

    def __init__(
        self,
        config: SimConfig,
        server: asyncio.Server,
        sock: socket.socket,
        app: SimApp,
        connections: set[HttpConnection],
    ) -> None:
        self.config = config
        self.app = app
        self.stats = app.stats
        self._server = server
        self._connections = connections
        address = sock.getsockname()
        self.host: str = address[0]
        self.port: int = address[1]
        self._load_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:8001``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``<url>/v1``."""
        return self.url + "/v1"

    @property
    def loaded(self) -> bool:
        return self.app.loaded.is_set()

    async def _open(self) -> None:
        refuse = WIRES[self.config.kind].loading is Loading.REFUSE
        if self.config.load_seconds <= 0:
            self.app.loaded.set()
        else:
            self._load_task = asyncio.get_running_loop().create_task(self._load(refuse))
        if self.loaded or not refuse:
            await self._server.start_serving()

    async def _load(self, refuse: bool) -> None:
        await asyncio.sleep(self.config.load_seconds)
        if refuse:
            await self._server.start_serving()
        self.app.loaded.set()

    async def close(self) -> None:
        """Stop listening, cut every open connection (their generations abort), and wait."""
        if self._load_task is not None:
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        self._server.close()
        tasks = [conn.task for conn in self._connections if conn.task is not None]
        for conn in list(self._connections):
            conn.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        # Let the transports deliver connection_lost before the loop may close.
        await asyncio.sleep(0)

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<SimServer {self.config.kind} {self.url} [Requests: {s.running} running, {s.waiting} waiting | "
            f"Connections: {s.open_connections} open, {s.connections_total} accepted]>"
        )


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_sim(config: SimConfig | None = None) -> SimServer:
    """Start a simulator on the running loop and return once it is bound.

    With ``load_seconds`` the load phase runs in the background, in the kind's manner: for vLLM and
    TGI the port is bound (``port`` is known) but refuses connections until it is over.
    """
    config = config or SimConfig()
    loop = asyncio.get_running_loop()
    stats = SimStats()
    loaded = asyncio.Event()
    app = SimApp(config, stats, Scheduler(config.max_running, stats), loaded)
    connections: set[HttpConnection] = set()
    sock = _bind(config.host, config.port)
    try:
        server = await loop.create_server(
            lambda: HttpConnection(app, stats, connections), sock=sock, backlog=BACKLOG, start_serving=False
        )
    except BaseException:
        sock.close()
        raise
    sim = SimServer(config, server, sock, app, connections)
    await sim._open()
    return sim


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@contextlib.contextmanager
def sim_in_thread(config: SimConfig | None = None, *, timeout: float = 10.0) -> Iterator[SimServer]:
    """Run a simulator on its own event loop in a daemon thread, for synchronous callers.

    ``stats`` may be read from the caller's thread; everything else belongs to the sim's loop.
    """
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-sim", daemon=True)
    thread.start()
    try:
        sim = asyncio.run_coroutine_threadsafe(start_sim(config), loop).result(timeout)
        try:
            yield sim
        finally:
            asyncio.run_coroutine_threadsafe(sim.close(), loop).result(timeout)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()
