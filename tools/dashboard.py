"""The Grafana dashboard, generated: ``deploy/grafana/gateway.json`` and its copy in the Kubernetes
monitoring overlay (``deploy/k8s/monitoring/``, where kustomize's configMapGenerator turns it into
a ConfigMap; kustomize reads no file outside the overlay's directory, hence the copy); and the
overlay's PrometheusRule, whose groups are those of ``deploy/prometheus/gateway-rules.yml``.

``python -m tools.dashboard`` writes the three; ``--check`` exits 1 when one differs from what this
file generates. Each panel reads the gateway's own metrics (``gateway_*``) through a data-source
variable of type prometheus, so the dashboard imports into any Grafana without editing a uid.
``tests/test_dashboards.py`` holds every query to the metrics the gateway exports, and runs them
against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = Path("deploy/grafana/gateway.json")
OVERLAY_COPY = Path("deploy/k8s/monitoring/gateway.json")
RULES = Path("deploy/prometheus/gateway-rules.yml")
OVERLAY_RULES = Path("deploy/k8s/monitoring/gateway-prometheusrule.yaml")
UID = "llm-gateway"

DS = {"type": "prometheus", "uid": "${datasource}"}
#: Every query is limited to the backends chosen in the ``backend`` variable.
SEL = 'backend=~"$backend"'
RATE = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def quantiles(metric: str, by: str) -> list[dict[str, Any]]:
    """p50, p90 and p99 of a histogram, by ``by``."""
    return [
        target(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
            chr(ord("A") + i),
        )
        for i, q in enumerate((0.5, 0.9, 0.99))
    ]


def timeseries(title: str, unit: str, targets: list[dict[str, Any]], description: str, stack: bool = False) -> Panel:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"stacking": {"mode": "normal" if stack else "none"}, "fillOpacity": 10 if stack else 0},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": targets,
    }


def rate(metric: str, by: str, extra: str = "") -> str:
    sel = f"{SEL},{extra}" if extra else SEL
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{RATE}]))"


ERRORS = rate("gateway_requests_total", "backend", 'status=~"5.."')
ALL = rate("gateway_requests_total", "backend")

ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Traffic",
        [
            timeseries(
                "Requests by route and status",
                "reqps",
                [target(rate("gateway_requests_total", "route, status"), "{{route}} {{status}}")],
                "Requests answered per second (status 499: the client left before any answer).",
                stack=True,
            ),
            timeseries(
                "Error ratio (5xx answers)",
                "percentunit",
                [
                    target(
                        f"({ERRORS} or {ALL} * 0) / {ALL}",  # 0, not no data, while nothing failed
                        "{{backend}}",
                    )
                ],
                "Share of requests answered 5xx, by backend (the backend's own and the gateway's 502/503/504).",
            ),
            timeseries(
                "In flight and queued",
                "short",
                [
                    target(f"sum by (backend) (gateway_requests_in_flight{{{SEL}}})", "in flight {{backend}}"),
                    target(f"sum by (backend) (gateway_admission_queue_length{{{SEL}}})", "queued {{backend}}", "B"),
                ],
                "Requests being answered, and those waiting for admission (GATEWAY_MAX_INFLIGHT).",
            ),
        ],
    ),
    (
        "Latency",
        [
            timeseries(
                "Time to first token",
                "s",
                quantiles("gateway_time_to_first_token_seconds", "route"),
                "From the request's arrival to the first body byte from the backend, as the client sees it.",
            ),
            timeseries(
                "Request duration",
                "s",
                quantiles("gateway_request_duration_seconds", "route"),
                "From the request's arrival to the end of its response.",
            ),
            timeseries(
                "Gateway overhead",
                "s",
                quantiles("gateway_overhead_seconds", "route"),
                "The gateway's own time before a request goes upstream (auth, body, routing, admission wait).",
            ),
            timeseries(
                "Largest chunk gap per stream",
                "s",
                quantiles("gateway_stream_max_chunk_gap_seconds", "route"),
                "Each stream's largest gap between two chunks from the backend (stalls).",
            ),
        ],
    ),
    (
        "Tokens",
        [
            timeseries(
                "Tokens per second by model",
                "short",
                [
                    target(rate("gateway_tokens_total", "model, type"), "{{model}} {{type}}"),
                    target(rate("gateway_tokens_estimated_total", "model"), "{{model}} output (estimated)", "B"),
                ],
                "Tokens from the backends' usage; streams without a usage chunk are estimated.",
                stack=True,
            ),
        ],
    ),
    (
        "Errors",
        [
            timeseries(
                "Upstream errors by class",
                "reqps",
                [target(rate("gateway_upstream_errors_total", "backend, class"), "{{backend}} {{class}}")],
                "connect, timeout, reset (connection lost), status_5xx (the backend answered 5xx).",
                stack=True,
            ),
            timeseries(
                "Client disconnects",
                "reqps",
                [target(rate("gateway_client_disconnects_total", "route"), "{{route}}")],
                "Clients that left before their response was complete (the backend's work was cancelled).",
            ),
        ],
    ),
    (
        "Replicas",
        [
            timeseries(
                "Replica state",
                "short",
                [
                    target(
                        f"sum by (backend, replica, state) (gateway_replica_state{{{SEL}}}) > 0",
                        "{{replica}} {{state}}",
                    )
                ],
                "Workers that see each replica in each state: ready, ejected, loading, unreachable.",
            ),
            timeseries(
                "Ejections",
                "short",
                [
                    target(
                        "sum by (backend, replica, reason)"
                        f" (increase(gateway_replica_ejections_total{{{SEL}}}[{RATE}]))",
                        "{{replica}} {{reason}}",
                    )
                ],
                "Replicas taken out of the rotation: after consecutive failures, or for a 429's Retry-After.",
            ),
            timeseries(
                "Balancing decisions",
                "reqps",
                [target(rate("gateway_balance_decisions_total", "backend, reason"), "{{backend}} {{reason}}")],
                "Why each replica was picked: single, p2c, sticky, prefix, new_prefix, load, trial, fail_open.",
                stack=True,
            ),
        ],
    ),
    (
        "Admission and pools",
        [
            timeseries(
                "Admission rejections",
                "reqps",
                [target(rate("gateway_admission_rejections_total", "backend, reason"), "{{backend}} {{reason}}")],
                "Requests refused by admission: queue_full, queue_timeout (429 overloaded), draining (503).",
                stack=True,
            ),
            timeseries(
                "Backend connections",
                "short",
                [
                    target(
                        f"sum by (backend, replica, state) (gateway_pool_connections{{{SEL}}})", "{{replica}} {{state}}"
                    )
                ],
                "Connections to each replica, active or idle, over all workers.",
                stack=True,
            ),
            timeseries(
                "Pool waits",
                "reqps",
                [
                    target(rate("gateway_pool_waits_total", "backend, replica"), "waited {{replica}}"),
                    target(rate("gateway_pool_wait_timeouts_total", "backend, replica"), "timed out {{replica}}", "B"),
                ],
                "Requests that found every connection busy and waited, and those that gave up (503).",
            ),
        ],
    ),
    (
        "Limits and tracing",
        [
            timeseries(
                "Limiter decisions",
                "reqps",
                [
                    target("sum by (decision) (rate(gateway_limit_decisions_total[$__rate_interval]))", "{{decision}}"),
                    target("sum (rate(gateway_limit_store_errors_total[$__rate_interval]))", "store errors", "B"),
                ],
                "Per-key limit checks: allowed, rejected (429), unavailable (503); and shared-store (Redis) errors.",
                stack=True,
            ),
            timeseries(
                "Trace spans dropped",
                "short",
                [target("sum by (reason) (rate(gateway_trace_spans_dropped_total[$__rate_interval]))", "{{reason}}")],
                "Spans not exported: the export queue was full, or the collector failed.",
            ),
        ],
    ),
]


def layout() -> list[Panel]:
    """Rows of panels, three to a row (8 of 24 columns each), with unique ids."""
    panels: list[Panel] = []
    y = 0
    next_id = 1
    for title, row in ROWS:
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False, "panels": []})
        panels[-1]["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
        next_id += 1
        y += 1
        width = 24 // min(len(row), 3)
        for i, panel in enumerate(row):
            panels.append({"id": next_id, "gridPos": {"h": 8, "w": width, "x": (i % 3) * width, "y": y}, **panel})
            next_id += 1
            if i % 3 == 2 or i == len(row) - 1:
                y += 8
    return panels


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": "LLM gateway",
        "description": "The gateway's own metrics: traffic, latency, tokens, errors, replicas, admission, limits.",
        "tags": ["llm", "gateway"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "backend",
                    "label": "Backend",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(gateway_requests_total, backend)", "refId": "backends"},
                    "definition": "label_values(gateway_requests_total, backend)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "panels": layout(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def render_rules(root: Path) -> str:
    """The PrometheusRule holding the rules file's groups, as the Prometheus operator takes them."""
    import yaml  # type: ignore[import-untyped,unused-ignore]

    groups = yaml.safe_load((root / RULES).read_text(encoding="utf-8"))["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "gateway",
            "labels": {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/part-of": "gateway"},
        },
        "spec": {"groups": groups},
    }
    head = (
        f"# Generated from {RULES} by `python -m tools.dashboard`: edit that file, then rerun.\n"
        "# Many installs select PrometheusRules by a `release` label: add the one yours uses.\n"
    )
    body: str = yaml.safe_dump(rule, sort_keys=False, width=120, allow_unicode=True)
    return head + body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.dashboard", description="Regenerate the Grafana dashboard.")
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository's root")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in ((DASHBOARD, render()), (OVERLAY_COPY, render()), (OVERLAY_RULES, render_rules(args.root))):
        path: Path = args.root / rel
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(rel))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {rel}")
    if stale:
        print(f"dashboard: out of date: {', '.join(stale)} (python -m tools.dashboard)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
