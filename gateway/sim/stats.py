"""The simulator's counters, and their Prometheus text for ``GET /metrics``.

vLLM's names are used where vLLM has the same quantity, so a dashboard or a test written against
vLLM reads the simulator unchanged; the rest are ``sim_*``. With the engine model (``--engine``) the
kind's own engine metrics take the place of those two vLLM gauges, under the names in
``gateway.profiles`` (newest spelling), with the kind's labels, beside ``sim_prefix_cache_*`` and
``sim_kv_cache_usage_perc`` (the same figures for every kind, those without engine metrics too).
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.profiles import EngineMetrics


class SimStats:
    """Counters of one simulator. Plain ints: read them from any thread."""

    __slots__ = (
        "requests_total",
        "completed_requests_total",
        "aborted_requests_total",
        "faults_total",
        "http_requests_total",
        "connections_total",
        "open_connections",
        "generated_tokens_total",
        "running",
        "waiting",
    )

    def __init__(self) -> None:
        #: Inference requests received (chat, completions, embeddings), whatever their outcome.
        self.requests_total = 0
        #: Inference requests answered in full.
        self.completed_requests_total = 0
        #: Inference requests whose client went away before the answer was complete.
        self.aborted_requests_total = 0
        #: Inference requests that an injected fault answered or cut.
        self.faults_total = 0
        #: Every HTTP request, health checks and /metrics included.
        self.http_requests_total = 0
        #: TCP connections accepted (keep-alive reuse keeps this low).
        self.connections_total = 0
        self.open_connections = 0
        #: Content tokens written, streamed or not.
        self.generated_tokens_total = 0
        #: Sequences generating now, and sequences queued behind ``max_running``.
        self.running = 0
        self.waiting = 0

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return "SimStats(" + ", ".join(f"{k}={v}" for k, v in self.snapshot().items()) + ")"


# (metric name, type, help, SimStats attribute, labelled with the model like vLLM's)
_METRICS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("vllm:num_requests_running", "gauge", "Requests generating now.", "running", True),
    ("vllm:num_requests_waiting", "gauge", "Requests queued for a generation slot.", "waiting", True),
    ("sim_requests_total", "counter", "Inference requests received.", "requests_total", False),
    (
        "sim_completed_requests_total",
        "counter",
        "Inference requests answered in full.",
        "completed_requests_total",
        False,
    ),
    (
        "sim_aborted_requests_total",
        "counter",
        "Inference requests aborted by a client disconnect.",
        "aborted_requests_total",
        False,
    ),
    ("sim_faults_total", "counter", "Inference requests answered or cut by an injected fault.", "faults_total", False),
    ("sim_http_requests_total", "counter", "HTTP requests of any kind.", "http_requests_total", False),
    ("sim_connections_total", "counter", "TCP connections accepted.", "connections_total", False),
    ("sim_open_connections", "gauge", "TCP connections open now.", "open_connections", False),
    ("sim_generated_tokens_total", "counter", "Completion tokens generated.", "generated_tokens_total", False),
)

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def render_metrics(stats: SimStats, model: str, engine: EngineReport | None = None) -> bytes:
    """Prometheus text exposition format 0.0.4; with ``engine``, the engine model's figures too."""
    label = '{model_name="' + _escape(model) + '"}'
    lines: list[str] = [] if engine is None else _engine_lines(engine)
    for name, kind, help_text, attr, labelled in _METRICS:
        if engine is not None and engine.names is not None and name.startswith("vllm:"):
            continue
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{label if labelled else ''} {getattr(stats, attr)}")
    return ("\n".join(lines) + "\n").encode()


class EngineReport(NamedTuple):
    """The engine model's figures at one moment, and how the kind names and labels them."""

    #: The kind's engine metric names; None: the kind reports none (only ``sim_*`` then).
    names: EngineMetrics | None
    labels: tuple[tuple[str, str], ...]
    running: int
    waiting: int
    kv_usage: float
    prefix_queries: int
    prefix_hits: int


def _label_text(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _engine_lines(report: EngineReport) -> list[str]:
    label = _label_text(report.labels)
    figures: list[tuple[tuple[str, ...], str, str, float | int]] = [
        (() if report.names is None else report.names.running, "gauge", "Requests running.", report.running),
        (() if report.names is None else report.names.waiting, "gauge", "Requests waiting.", report.waiting),
        (() if report.names is None else report.names.kv_usage, "gauge", "KV-cache usage, 1 is 100%.", report.kv_usage),
        (
            () if report.names is None else report.names.prefix_queries,
            "counter",
            "Prefix-cache queries, in prompt tokens.",
            report.prefix_queries,
        ),
        (
            () if report.names is None else report.names.prefix_hits,
            "counter",
            "Prefix-cache hits, in prompt tokens.",
            report.prefix_hits,
        ),
    ]
    lines: list[str] = []
    for names, kind, help_text, value in figures:
        if names:
            lines += _family(names[0], kind, help_text, label, value)
    lines += _family("sim_prefix_cache_queries_total", "counter", "Prompt tokens looked up.", "", report.prefix_queries)
    lines += _family("sim_prefix_cache_hits_total", "counter", "Prompt tokens found cached.", "", report.prefix_hits)
    lines += _family("sim_kv_cache_usage_perc", "gauge", "KV blocks held, 1 is 100%.", "", report.kv_usage)
    return lines


def _family(name: str, kind: str, help_text: str, label: str, value: float | int) -> list[str]:
    # Like prometheus_client, a counter's family is named without the ``_total`` of its sample.
    family = name.removesuffix("_total") if kind == "counter" else name
    return [f"# HELP {family} {help_text}", f"# TYPE {family} {kind}", f"{name}{label} {value}"]
