"""Prometheus text from the replicas' and the gateway's ``/metrics``, read the simple way: the
routing benchmark needs a few sums of series by name (or by one label), before and after a run.

A series that is not there reads as ``None`` (shown as "n/a"): the simulator without ``--engine``
has no prefix-cache counters, and a gateway without the routing policy has no decisions counter.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request

#: vLLM's names (v1 engine), and the spellings before the rename (``gpu_`` prefixed), in order.
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
WAITING = ("vllm:num_requests_waiting",)
RUNNING = ("vllm:num_requests_running",)
#: Requests a replica received, and the tokens it generated: the simulator's own counters, then vLLM's.
REQUESTS = ("sim_requests_total", "vllm:request_success_total")
GENERATED = ("sim_generated_tokens_total", "vllm:generation_tokens_total")
DECISIONS = "gateway_balance_decisions_total"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def series(text: str) -> dict[str, float]:
    """Every sample's value summed by metric name (labels dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def by_label(text: str, name: str, label: str) -> dict[str, float] | None:
    """The samples of ``name`` summed by the value of ``label``; ``None`` when there are none."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, _, rest = line[len(name) + 1 :].rpartition("}")
        values = dict(_LABEL.findall(labels))
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        key = values.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out or None


def first(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    """The first of ``names`` that is present."""
    for name in names:
        if name in values:
            return values[name]
    return None


def delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def fetch(host: str, port: int, timeout: float = 2.0) -> str | None:
    """``GET /metrics``'s text, or ``None`` when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:  # noqa: S310 - loopback
            body: bytes = r.read()
    except OSError:
        return None
    return body.decode(errors="replace")


async def afetch(host: str, port: int) -> str | None:
    """``fetch`` off the event loop."""
    return await asyncio.to_thread(fetch, host, port)
