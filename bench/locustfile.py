"""OpenAI chat users for locust: streamed and non-streamed chat completions against the gateway.

Run headless against a gateway (or any OpenAI-compatible server), e.g.::

    locust -f bench/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:4000 \\
        --csv /tmp/load --html /tmp/load.html

Settings come from the environment:

=====================  =======  ==============================================================
``LOAD_STREAM_RATIO``  0.8      share of requests sent with ``"stream": true`` (0 to 1)
``LOAD_PROMPT_TOKENS`` 64       prompt length, roughly in tokens (one short word per token)
``LOAD_MAX_TOKENS``    64       ``max_tokens`` of each request
``LOAD_MODEL``         (none)   ``model`` of each request; empty leaves it out (the gateway's
                                ``MODEL_NAME`` fills it in)
``LOAD_API_KEY``       (none)   sent as ``Authorization: Bearer ...``
``LOAD_UNIQUE``        1        start every prompt with a random tag, so that a backend's prefix
                                cache cannot make TTFT look better than it is
``LOAD_THINK_S``       0        pause between a user's requests (0: back to back, a closed loop)
``LOAD_TIMEOUT_S``     600      per-request timeout (connect and longest silence)
=====================  =======  ==============================================================

What is reported, besides locust's own ``POST`` rows (``chat`` for non-streamed requests,
``chat-stream`` for streamed ones, whose time is the whole stream, up to ``[DONE]``):

- ``TTFT chat-stream``: from sending the request to the first event that carries content;
- ``ITL chat-stream``: each gap between two content events as the client reads them (events
  that arrive in one read count as a gap of 0).

A stream is a failure when the status is not 200, when it carries an ``error`` event, or when it
ends without ``data: [DONE]``. Locust keeps percentiles of times under 100 ms at 1 ms resolution
(averages, minimums and maximums are exact), so sub-millisecond ITLs show as 0 or 1 in the
percentile columns.

The streamed body is read with locust's ``HttpUser`` (requests/urllib3): ``iter_content(None)``
yields each HTTP chunk as it arrives. ``FastHttpUser``'s ``iter_content(n)`` waits for ``n``
bytes, which would merge events and hide the gaps between them.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, constant, task
from requests.exceptions import RequestException

PATH = "/v1/chat/completions"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


STREAM_RATIO = min(max(_env_float("LOAD_STREAM_RATIO", 0.8), 0.0), 1.0)
PROMPT_TOKENS = max(_env_int("LOAD_PROMPT_TOKENS", 64), 1)
MAX_TOKENS = max(_env_int("LOAD_MAX_TOKENS", 64), 1)
MODEL = os.environ.get("LOAD_MODEL", "").strip()
API_KEY = os.environ.get("LOAD_API_KEY", "").strip()
UNIQUE = os.environ.get("LOAD_UNIQUE", "1").strip().lower() not in ("0", "false", "no", "off")
THINK_S = max(_env_float("LOAD_THINK_S", 0.0), 0.0)
TIMEOUT_S = _env_float("LOAD_TIMEOUT_S", 600.0)

_WORDS = ("alpha", "bravo", "delta", "echo", "gamma", "hotel", "india", "kilo", "lima", "mike")


def _prompt() -> str:
    words = " ".join(_WORDS[i % len(_WORDS)] for i in range(PROMPT_TOKENS))
    tag = f"[{random.getrandbits(40):010x}] " if UNIQUE else ""
    return tag + words


def _payload(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": _prompt()}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }
    if MODEL:
        body["model"] = MODEL
    return body


def _has_content(event: dict[str, Any]) -> bool:
    """Whether an SSE chunk carries generated output (not just the role, usage or a finish)."""
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls") or choice.get("text"):
            return True
    return False


class ChatUser(HttpUser):
    """One client sending chat completions back to back, streamed or not by ``LOAD_STREAM_RATIO``."""

    wait_time = constant(THINK_S)

    def on_start(self) -> None:
        self.client.headers["content-type"] = "application/json"
        if API_KEY:
            self.client.headers["authorization"] = f"Bearer {API_KEY}"

    @task
    def chat(self) -> None:
        if random.random() < STREAM_RATIO:
            self._stream()
        else:
            self._plain()

    def _plain(self) -> None:
        with self.client.post(
            PATH, data=json.dumps(_payload(False)), name="chat", timeout=TIMEOUT_S, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                body = resp.json()
            except ValueError:
                resp.failure(f"not JSON: {resp.text[:200]}")
                return
            if not isinstance(body, dict) or "error" in body or not body.get("choices"):
                resp.failure(f"no choices: {resp.text[:200]}")

    def _stream(self) -> None:
        fire = self.environment.events.request.fire
        start = time.perf_counter()
        received = 0
        last_token: float | None = None
        done = False
        problem: str | None = None
        with self.client.post(
            PATH,
            data=json.dumps(_payload(True)),
            name="chat-stream",
            stream=True,
            timeout=TIMEOUT_S,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            buf = b""
            try:
                for chunk in resp.iter_content(chunk_size=None):
                    now = time.perf_counter()
                    received += len(chunk)
                    buf = (buf + chunk).replace(b"\r\n", b"\n")
                    *events, buf = buf.split(b"\n\n")
                    for raw in events:
                        data = b"\n".join(ln[5:].lstrip(b" ") for ln in raw.split(b"\n") if ln.startswith(b"data:"))
                        if not data:
                            continue  # a comment or keep-alive
                        if data == b"[DONE]":
                            done = True
                            continue
                        try:
                            event = json.loads(data)
                        except ValueError:
                            problem = problem or f"bad event: {data[:200]!r}"
                            continue
                        if not isinstance(event, dict):
                            continue
                        if "error" in event:
                            problem = problem or f"error event: {data[:200].decode(errors='replace')}"
                            continue
                        if not _has_content(event):
                            continue
                        if last_token is None:
                            fire(
                                request_type="TTFT",
                                name="chat-stream",
                                response_time=(now - start) * 1000,
                                response_length=0,
                                response=None,
                                context={},
                                exception=None,
                            )
                        else:
                            fire(
                                request_type="ITL",
                                name="chat-stream",
                                response_time=(now - last_token) * 1000,
                                response_length=0,
                                response=None,
                                context={},
                                exception=None,
                            )
                        last_token = now
            except RequestException as exc:
                problem = problem or f"stream broke: {exc!r}"
            # The row's time is the whole stream, not (as locust measures with stream=True) the
            # time to the response headers.
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = received
            if problem is None and not done:
                problem = "stream ended without data: [DONE]"
            if problem is not None:
                resp.failure(problem)
            else:
                resp.success()
