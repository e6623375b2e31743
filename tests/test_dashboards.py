"""The Grafana dashboard (deploy/grafana/) and the Prometheus rules (deploy/prometheus/): their
shape, their metric names against what the gateway exports, and every query and rule evaluated by
a real Prometheus (Debian's 2.42, installed by tests/run.sh where it runs as root) scraping a
gateway that served some traffic."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from gateway.metrics import Metrics
from tests.fakes import Conn, FakeBackend, Req, default_handler
from tests.servers import Prometheus, StartGateway, free_port
from tools import dashboard as generator

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / generator.DASHBOARD).read_text(encoding="utf-8"))
RULES_FILE = ROOT / "deploy" / "prometheus" / "gateway-rules.yml"
RULES = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))

PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
#: (panel title, PromQL) of every query of the dashboard.
QUERIES = [(p["title"], t["expr"]) for p in PANELS for t in p["targets"]]
RULE_LIST = [r for group in RULES["groups"] for r in group["rules"]]
RECORDED = {r["record"] for r in RULE_LIST if "record" in r}

#: Panels the test's traffic must fill (the others may rightly be empty: no disconnects, no
#: admission limit, no tracing in this gateway).
TRAFFIC_PANELS = {
    "Requests by route and status",
    "Error ratio (5xx answers)",
    "In flight and queued",
    "Time to first token",
    "Request duration",
    "Gateway overhead",
    "Largest chunk gap per stream",
    "Tokens per second by model",
    "Upstream errors by class",
    "Replica state",
    "Balancing decisions",
    "Backend connections",
    "Limiter decisions",
}
KEY = "team-key-123"


def exported_names() -> set[str]:
    """Every series name the gateway's metrics can show (a counter's ``_total``, a histogram's
    ``_bucket``, ``_sum`` and ``_count``)."""
    names: set[str] = set()
    for family in Metrics("x").registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


_NAME = re.compile(r"\b(gateway_[a-z0-9_]+|[a-z_]+:[a-z0-9_:]+)\b")


def test_the_dashboard_is_a_grafana_model_with_a_prometheus_variable() -> None:
    assert DASHBOARD["uid"] and isinstance(DASHBOARD["schemaVersion"], int)
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in PANELS:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]
    for title in TRAFFIC_PANELS:
        assert title in {p["title"] for p in PANELS}


def test_the_checked_in_dashboard_and_its_overlay_copy_are_what_the_generator_writes() -> None:
    assert generator.main(["--check", "--root", str(ROOT)]) == 0
    assert (ROOT / generator.OVERLAY_COPY).read_bytes() == (ROOT / generator.DASHBOARD).read_bytes()


def test_every_metric_named_by_a_panel_or_rule_is_exported_or_recorded() -> None:
    exported = exported_names()
    assert "gateway_replica_state" in exported and "gateway_requests_total" in exported
    used = [(title, name) for title, expr in QUERIES for name in _NAME.findall(expr)]
    used += [(r.get("alert") or r["record"], name) for r in RULE_LIST for name in _NAME.findall(r["expr"])]
    assert used
    unknown = [(where, name) for where, name in used if name not in exported and name not in RECORDED]
    assert not unknown, f"names the gateway does not export: {unknown}"


def test_every_alert_has_a_runbook_and_a_severity() -> None:
    alerts = [r for r in RULE_LIST if "alert" in r]
    names = {r["alert"] for r in alerts}
    for wanted in (
        "GatewayBackendDown",
        "GatewayReplicaUnreachable",
        "GatewayErrorRatioHigh",
        "GatewayTimeToFirstTokenHigh",
        "GatewayPoolExhausted",
        "GatewayAdmissionRejecting",
        "GatewayLimitStoreUnreachable",
    ):
        assert wanted in names
    for r in alerts:
        assert r["annotations"]["runbook"].strip(), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]


needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="needs Debian's prometheus package (tests/run.sh installs it where it runs as root)",
)


@needs_prometheus
def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(["promtool", "check", "rules", str(RULES_FILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def instant(expr: str) -> str:
    """A panel's query as Grafana would send it, its variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$backend", ".*")


@pytest.mark.slow  # ~6 s: Prometheus applies its scrape targets ~5 s after it starts
@needs_prometheus
def test_prometheus_evaluates_every_panel_and_rule(
    start_gateway: StartGateway, backend: FakeBackend, tmp_path: Path
) -> None:
    async def failing(req: Req, conn: Conn) -> None:
        if b'"fail"' in req.body:
            await conn.json(500, {"error": {"message": "boom", "type": "server_error", "param": None, "code": 500}})
        else:
            await default_handler(req, conn)

    backend.handler = failing
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nname = "team"\nkey_env = "TEAM_KEY"\nrpm = 6\n[[keys]]\nname = "ops"\nkey_env = "OPS_KEY"\n'
    )
    dead = f"http://127.0.0.1:{free_port()}/v1"  # a second replica nobody listens on
    g = start_gateway(
        BACKEND_BASE_URL=f"{backend.url},{dead}",
        GATEWAY_KEYS_FILE=str(keys),
        TEAM_KEY=KEY,
        OPS_KEY="ops-key-456",
        GATEWAY_WORKERS="1",
        GATEWAY_PROBE_INTERVAL="0.5",
    )
    # Prometheus first: it applies its scrape targets ~5 s after it starts, whatever the interval.
    with Prometheus(tmp_path, [f"127.0.0.1:{g.port}"], [RULES_FILE]) as prom:
        g.start()
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
        stream = b'{"model":"fake","stream":true,"stream_options":{"include_usage":true},"max_tokens":4}'
        statuses = [g.request("POST", "/v1/chat/completions", stream, headers).status for _ in range(4)]
        statuses += [g.request("POST", "/v1/chat/completions", b'{"model":"fake"}', headers).status for _ in range(4)]
        statuses.append(g.request("POST", "/v1/chat/completions", b'{"model":"fake","fail":1}', headers).status)
        assert statuses.count(200) == 6 and statuses.count(429) == 3, statuses  # rpm = 6
        ops = {"authorization": "Bearer ops-key-456"}
        assert g.request("POST", "/v1/chat/completions", b'{"model":"fake","fail":1}', ops).status == 500
        # Two scrapes at least after the traffic's figures were written: rate() needs two samples.
        _wait_for(prom, 'count_over_time(gateway_requests_total{status="429"}[1m]) >= 2')
        filled = {title for title, expr in QUERIES if prom.query(instant(expr))}  # an error fails here
        assert TRAFFIC_PANELS <= filled, f"panels without series after traffic: {TRAFFIC_PANELS - filled}"
        for rule in RULE_LIST:
            prom.query(rule["expr"])  # an error fails here
        _wait_for_rules(prom)
        assert prom.query('gateway_replica_state{state="unreachable"} == 1')  # the dead replica, probed
        assert prom.query('backend:gateway_replicas_ready:count{backend="vllm"} == 1')


def _wait_for(prom: Prometheus, expr: str, timeout: float = 15.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        result = prom.query(expr)
        if result or time.monotonic() > deadline:
            assert result, f"{expr}: no series within {timeout:g} s"
            return result
        time.sleep(0.2)


def _wait_for_rules(prom: Prometheus, timeout: float = 10.0) -> None:
    """Every rule evaluated at least once, none with an error."""
    deadline = time.monotonic() + timeout
    while True:
        rules = [r for group in prom.api("rules")["groups"] for r in group["rules"]]
        assert len(rules) == len(RULE_LIST)
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert not bad, bad
        if all(r["health"] == "ok" for r in rules):
            return
        assert time.monotonic() < deadline, [(r["name"], r["health"]) for r in rules]
        time.sleep(0.2)
