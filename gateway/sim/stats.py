"""The simulator's counters, and their Prometheus text for ``GET /metrics``.

vLLM's names are used where vLLM has the same quantity, so a dashboard or a test written against
vLLM reads the simulator unchanged; the rest are ``sim_*``.
"""

from __future__ import annotations


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


def render_metrics(stats: SimStats, model: str) -> bytes:
    """Prometheus text exposition format 0.0.4."""
    label = '{model_name="' + model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"}'
    lines: list[str] = []
    for name, kind, help_text, attr, labelled in _METRICS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{label if labelled else ''} {getattr(stats, attr)}")
    return ("\n".join(lines) + "\n").encode()
