"""Shared pieces of the reliability tests and the soak tool (issue #9).

* ``SimProc``: the simulator as a subprocess on a free port, with its ``/metrics`` counters.
* ``fetch``: one HTTP/1.1 exchange on a raw asyncio socket, with hooks to abort or stall reading;
  ``check_stream`` says whether a simulated chat stream arrived whole, byte for byte.
* ``Meter``: the gateway's Granian worker processes (found below ``gateway serve`` in ``/proc``),
  their resident memory and their open file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.procstat import descendants
from gateway.sim.responses import completion_text

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(rb"serving (http://[^ ]+?)/v1 ")
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? (\S+)$", re.M)


class SimProc:
    """``python -m gateway.sim --port 0 ARGS`` in its own process (its own core for load)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "gateway.sim", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 15
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                found = _LISTENING.search(line)
                if found:
                    self.url = found.group(1).decode()
                    self.port = int(self.url.rsplit(":", 1)[1])
                    return
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"the simulator did not start: {line!r}")

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:  # noqa: S310 - loopback
            text = r.read().decode()
        return {name: float(value) for name, value in _SERIES.findall(text)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> SimProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the gateway's processes ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    return [p for p in descendants(pid) if p != pid and _ppid(p) == pid]


def _ppid(pid: int) -> int:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(raw[raw.rindex(")") + 2 :].split()[1])


def worker_pids(serve_pid: int) -> list[int]:
    """Granian's workers: ``gateway serve`` -> Granian main -> workers."""
    return [w for main in _children(serve_pid) for w in _children(main)]


def rss_bytes(pid: int) -> int:
    """VmRSS from /proc/<pid>/status (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Meter:
    """Memory and descriptors of one gateway's workers, sampled on demand (peak kept)."""

    serve_pid: int
    pids: list[int] = field(default_factory=list)
    peak_rss: int = 0

    def __post_init__(self) -> None:
        deadline = time.monotonic() + 10
        while not self.pids and time.monotonic() < deadline:
            self.pids = worker_pids(self.serve_pid)
            if not self.pids:
                time.sleep(0.05)
        assert self.pids, "no Granian worker found below gateway serve"

    def rss(self) -> int:
        value = sum(rss_bytes(p) for p in self.pids)
        self.peak_rss = max(self.peak_rss, value)
        return value

    def fds(self) -> int:
        return sum(open_fds(p) for p in self.pids)


@contextlib.contextmanager
def sampling(meter: Meter, every: float = 0.05) -> Iterator[Meter]:
    """Sample ``meter.rss()`` in a thread while the block runs (for the peak)."""

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            meter.rss()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield meter
    finally:
        stop.set()
        t.join(5)


# -- a raw asyncio HTTP/1.1 client -----------------------------------------------------------------


@dataclass
class Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Why the exchange did not end normally: None, "aborted", "eof" (cut), "timeout", or an error.
    error: str | None = None
    #: Seconds from sending to the response head, and to the end.
    t_head: float = 0.0
    t_end: float = 0.0

    def json(self) -> object:
        return orjson.loads(self.body)


def chat(stream: bool = True, max_tokens: int = 8, model: str = "sim-model") -> bytes:
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": max_tokens}
    )


def request_bytes(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, *, close: bool = True
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: gateway"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"content-length: {len(body)}")
        lines.append("content-type: application/json")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def fetch(
    port: int,
    raw: bytes,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - one deadline for the whole exchange
    abort_after: bytes | None = None,
    on_head: asyncio.Event | None = None,
) -> Result:
    """Send ``raw`` on a new connection and read one response.

    ``abort_after``: reset the connection (RST) as soon as the body holds these bytes.
    ``on_head``: set when the response head has arrived (to act while the body streams).
    """
    out = Result()
    t0 = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            writer.write(raw)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            out.t_head = time.monotonic() - t0
            first, *lines = head.decode("latin-1").split("\r\n")
            out.status = int(first.split(" ", 2)[1])
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    out.headers[name.strip().lower()] = value.strip()
            if on_head is not None:
                on_head.set()
            body = bytearray()
            if out.headers.get("transfer-encoding") == "chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    body += (await reader.readexactly(size + 2))[:-2]
                    if abort_after is not None and abort_after in body:
                        out.error = "aborted"
                        break
            elif "content-length" in out.headers:
                body += await reader.readexactly(int(out.headers["content-length"]))
            else:
                body += await reader.read()
            out.body = bytes(body)
    except asyncio.IncompleteReadError as exc:
        out.body += exc.partial
        out.error = "eof"
    except TimeoutError:
        out.error = "timeout"
    except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.t_end = time.monotonic() - t0
        if writer is not None:
            if out.error == "aborted":
                abort(writer)
            else:
                writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
    return out


def abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a client that crashed or was killed would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


def check_stream(body: bytes, n_tokens: int) -> str | None:
    """None when ``body`` is the simulator's whole chat stream of ``n_tokens`` tokens, else what is
    wrong. Every event must parse, share one id, the content must be exactly the simulator's text
    (so a lost, doubled or changed byte shows), and the stream must end with ``[DONE]``."""
    if not body.endswith(b"\n\n"):
        return f"does not end an event: {body[-40:]!r}"
    events = body[:-2].split(b"\n\n")
    if events[-1] != b"data: [DONE]":
        return f"last event is {events[-1][:80]!r}"
    if len(events) != n_tokens + 3:  # role, tokens, finish, [DONE]
        return f"{len(events)} events for {n_tokens} tokens"
    ids, text, finish = set(), [], None
    for raw in events[:-1]:
        if not raw.startswith(b"data: "):
            return f"not a data event: {raw[:80]!r}"
        try:
            event = orjson.loads(raw[6:])
        except orjson.JSONDecodeError:
            return f"bad JSON: {raw[:120]!r}"
        ids.add(event["id"])
        choice = event["choices"][0]
        text.append(choice["delta"].get("content") or "")
        finish = choice["finish_reason"] or finish
    if len(ids) != 1:
        return f"{len(ids)} ids in one stream"
    if "".join(text) != completion_text(n_tokens):
        return "content differs from what the simulator generated"
    if finish != "length":
        return f"finish_reason {finish!r}"
    return None


def sse_error(body: bytes) -> dict[str, object] | None:
    """The ``error`` object of a stream's final ``data: {"error":...}`` event, if it has one."""
    last = body.rstrip(b"\r\n").rsplit(b"\n\n", 1)[-1]
    if not last.startswith(b"data: "):
        return None
    try:
        obj = orjson.loads(last[6:])
    except orjson.JSONDecodeError:
        return None
    err = obj.get("error") if isinstance(obj, dict) else None
    return err if isinstance(err, dict) else None


def openai_error(body: bytes) -> dict[str, object]:
    """The ``error`` object of an OpenAI-shaped error body (asserts the shape)."""
    obj = orjson.loads(body)
    assert isinstance(obj, dict) and set(obj) == {"error"}, body[:200]
    err = obj["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, body[:200]
    assert isinstance(err["message"], str) and err["message"]
    return err
