"""Shared pieces of the reliability tests and the soak tool (issue #9).

* ``check_stream`` says whether a simulated chat stream arrived whole, byte for byte;
  ``sse_error`` and ``openai_error`` take the error out of a stream or an answer.
* ``Meter``: the gateway's Granian worker processes (found below ``gateway serve`` in ``/proc``),
  their resident memory and their open file descriptors.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.procstat import descendants
from gateway.sim.responses import completion_text

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


# -- checking what arrived ----------------------------------------------------------------------


def chat(stream: bool = True, max_tokens: int = 8, model: str = "sim-model") -> bytes:
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": max_tokens}
    )


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
