"""Fixtures and helpers for the tests against the real llama.cpp server.

The binary comes from ``tests/tools/build_llama_server.py`` (``tests/run.sh`` builds it once per
machine); the model is generated once per session by ``tests/tools/tiny_gguf.py``.
``tests/conftest.py`` registers this module as a plugin; a test module that uses its fixtures
first skips itself when ``unavailable_reason()`` says the server cannot run here.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests import rawhttp
from tests.servers import Gateway
from tests.tools import build_llama_server
from tests.tools.llama_server import ALIAS, CTX, LlamaServer

SERVER_KEY = "llama-server-key-1"
CLIENT_KEY = "gateway-client-key-1"

__all__ = [
    "ALIAS",
    "CLIENT_KEY",
    "SERVER_KEY",
    "LlamaServer",
    "StartServer",
    "gateway_for",
    "read_markers",
    "request",
    "send_keeping_open",
    "sse_events",
    "stable",
    "task_started",
    "unavailable_reason",
]


def unavailable_reason() -> str | None:
    """Why the real llama.cpp server cannot run here (one line for the skip), or None."""
    reason = build_llama_server.unavailable_reason()
    if reason is not None:
        return reason
    try:
        import gguf  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as e:
        return f"cannot generate the test model: {e} (install the dev extra: pip install -e '.[dev]')"
    return None


# -- models and servers ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llamacpp")


@pytest.fixture(scope="session")
def tiny_model(llama_dir: Path) -> Path:
    """387 KB, about 10,000 tokens/s on one thread."""
    from tests.tools.tiny_gguf import TINY, write_model

    return write_model(llama_dir / "tiny.gguf", replace(TINY, ctx=CTX))


@pytest.fixture(scope="session")
def paced_model(llama_dir: Path) -> Path:
    """135 MB, about 7-10 ms per token on one thread: long enough to leave mid-stream."""
    from tests.tools.tiny_gguf import PACED, write_model

    return write_model(llama_dir / "paced.gguf", replace(PACED, ctx=CTX))


StartServer = Callable[..., LlamaServer]
_serial = itertools.count(1)


@pytest.fixture
def start_llama(llama_dir: Path, tiny_model: Path) -> Iterator[StartServer]:
    """Start llama-servers (``start_llama(model=..., embeddings=..., port=..., start=...)``);
    every one is stopped at the end of the test."""
    started: list[LlamaServer] = []

    def start(model: Path | None = None, *, start: bool = True, **kw: Any) -> LlamaServer:
        kw.setdefault("api_key", SERVER_KEY)
        srv = LlamaServer(model or tiny_model, llama_dir / f"llama-{next(_serial)}.log", **kw)
        started.append(srv)
        return srv.start() if start else srv

    yield start
    for srv in started:
        srv.stop()


def _module_server(llama_dir: Path, model: Path, name: str, embeddings: bool) -> Iterator[LlamaServer]:
    srv = LlamaServer(model, llama_dir / f"{name}.log", api_key=SERVER_KEY, embeddings=embeddings).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def llama(llama_dir: Path, tiny_model: Path) -> Iterator[LlamaServer]:
    """The tiny model, without embeddings."""
    yield from _module_server(llama_dir, tiny_model, "llama", embeddings=False)


@pytest.fixture(scope="module")
def llama_embed(llama_dir: Path, tiny_model: Path) -> Iterator[LlamaServer]:
    """The tiny model with ``--embeddings --pooling mean``."""
    yield from _module_server(llama_dir, tiny_model, "llama-embed", embeddings=True)


# -- raw HTTP ---------------------------------------------------------------------------------------


def request(
    port: int, method: str, path: str, body: Any = None, key: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection: status, lower-cased headers, the whole (de-chunked) body."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    r = rawhttp.request(port, method, path, body, headers, timeout=30)
    return r.status, r.headers, r.body


def send_keeping_open(port: int, path: str, body: dict[str, object]) -> rawhttp.Connection:
    """A client's POST with the client key, on a connection left open (to leave mid-answer)."""
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    return rawhttp.connect(port, rawhttp.request_bytes("POST", path, body, headers, close=False))


def read_markers(conn: rawhttp.Connection, marker: bytes, count: int) -> bytes:
    """What the answer brought until ``marker`` was seen ``count`` times (the stream is going)."""
    seen = b""
    while seen.count(marker) < count:
        chunk = conn.read_until(marker)
        assert chunk, seen
        seen += chunk
    return seen


def sse_events(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an event stream, in order (``b"[DONE]"`` included)."""
    assert body.endswith(b"\n\n"), body[-200:]
    events = []
    for frame in body[:-2].split(b"\n\n"):
        assert frame.startswith(b"data: "), frame
        events.append(frame[len(b"data: ") :])
    return events


#: What differs between two otherwise identical answers: ids, clocks, timings, prompt-cache hits.
_VOLATILE = ("id", "created", "timings")


def stable(doc: Any) -> Any:
    """A parsed answer or chunk without the fields that differ from one identical request to the next."""
    if isinstance(doc, dict):
        out = {k: stable(v) for k, v in doc.items() if k not in _VOLATILE}
        if isinstance(out.get("usage"), dict):
            out["usage"].pop("prompt_tokens_details", None)
        return out
    if isinstance(doc, list):
        return [stable(v) for v in doc]
    return doc


def gateway_for(tmp: Path, server: LlamaServer, **env: str) -> Gateway:
    """A gateway (not started) in front of ``server``, with the client and server keys."""
    settings = {
        "BACKEND_KIND": "llamacpp",
        "BACKEND_BASE_URL": server.base_url,
        "BACKEND_API_KEY": SERVER_KEY,
        "API_KEYS": CLIENT_KEY,
        **env,
    }
    return Gateway(tmp, **settings)


#: The server's log line when a slot starts a task (``tools/server``'s ``launch_slot_``).
_LAUNCH = re.compile(r"launch_slot_: id +\d+ \| task (\d+) \| processing task")


def task_started(server: LlamaServer, since: int, timeout: float = 5.0) -> str:
    """The id of the first task the server's log says a slot started after offset ``since``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _LAUNCH.search(server.output()[since:])
        if m:
            return m.group(1)
        time.sleep(0.01)
    raise AssertionError(f"no task started in the server's log:\n{server.output()[since:]}")
