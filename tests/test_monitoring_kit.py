"""The monitoring kit: the compose profile `observability` (Prometheus scraping the gateway, Grafana
with the dashboard provisioned) and the Kubernetes overlay deploy/k8s/monitoring (a ServiceMonitor,
a PrometheusRule and the dashboard as a ConfigMap). No Docker daemon and no cluster here: their
structure is checked against each other, the gateway's manifests and what the tools read.
The dashboard and rules themselves: tests/test_dashboards.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from tools import dashboard as generator

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAY = K8S / "monitoring"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]
PROFILE = "observability"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts of repository files: container path -> path in the repository."""
    out = {}
    for entry in service.get("volumes") or []:
        source, target = str(entry).split(":")[:2]
        if source.startswith("./"):
            out[target] = source[2:]
    return out


# --- Compose -----------------------------------------------------------------------------------------


def test_the_profile_runs_prometheus_and_grafana_and_nothing_else() -> None:
    in_profile = {name for name, s in SERVICES.items() if PROFILE in (s.get("profiles") or [])}
    assert in_profile == {"prometheus", "grafana"}
    declared = set(COMPOSE["volumes"])
    for name in in_profile:
        service = SERVICES[name]
        assert service["profiles"] == [PROFILE]
        assert service["image"].startswith("${") and service["restart"] == "unless-stopped"
        for source in mounts(service).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
        named = [str(v).split(":")[0] for v in service["volumes"] if not str(v).startswith("./")]
        assert set(named) <= declared


def test_prometheus_scrapes_the_gateway_and_loads_the_rules(tmp_path: Path) -> None:
    service = SERVICES["prometheus"]
    files = mounts(service)
    config_path = next(arg.split("=", 1)[1] for arg in service["command"] if arg.startswith("--config.file="))
    config = load(ROOT / files[config_path])
    gateway = SERVICES["gateway"]
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"gateway:{gateway['environment']['GATEWAY_PORT']}"]}]
    assert job["metrics_path"] == "/metrics"
    assert [files[p] for p in config["rule_files"]] == ["deploy/prometheus/gateway-rules.yml"]
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (tests/run.sh installs prometheus where it runs as root)")
    # promtool reads the rule files too: point it at the repository's.
    config["rule_files"] = [str(ROOT / files[p]) for p in config["rule_files"]]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    done = subprocess.run(["promtool", "check", "config", str(local)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_gets_the_prometheus_data_source_and_the_dashboard() -> None:
    service = SERVICES["grafana"]
    files = mounts(service)
    provisioning = ROOT / files["/etc/grafana/provisioning"]
    (source,) = load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"  # the service, on Prometheus's own port
    assert "9090:9090" in SERVICES["prometheus"]["ports"]
    (provider,) = load(provisioning / "dashboards" / "gateway.yml")["providers"]
    dashboards = {target: src for target, src in files.items() if src.endswith(".json")}
    assert dashboards == {f"{provider['options']['path']}/gateway.json": str(generator.DASHBOARD)}
    assert service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in dashboards
    assert service["depends_on"] == ["prometheus"]


# --- Kubernetes overlay --------------------------------------------------------------------------------


KUSTOMIZATION = load(OVERLAY / "kustomization.yaml")
SERVICE_MONITOR = load(OVERLAY / "gateway-servicemonitor.yaml")
PROMETHEUS_RULE = load(OVERLAY / "gateway-prometheusrule.yaml")


def test_the_overlay_adds_to_the_plain_manifests_which_do_not_depend_on_it() -> None:
    assert KUSTOMIZATION["resources"] == ["..", "gateway-servicemonitor.yaml", "gateway-prometheusrule.yaml"]
    base = load(K8S / "kustomization.yaml")
    assert not [r for r in base["resources"] if "monitoring" in r]
    for path in K8S.glob("*.yaml"):
        assert "monitoring.coreos.com" not in path.read_text(encoding="utf-8"), path.name


def test_the_service_monitor_selects_the_gateway_service_and_its_port() -> None:
    service = load(K8S / "gateway-service.yaml")
    assert SERVICE_MONITOR["apiVersion"] == "monitoring.coreos.com/v1" and SERVICE_MONITOR["kind"] == "ServiceMonitor"
    selector = SERVICE_MONITOR["spec"]["selector"]["matchLabels"]
    assert selector and all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())
    vllm = load(K8S / "vllm-service.yaml")
    assert not all(vllm["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
    (endpoint,) = SERVICE_MONITOR["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_the_prometheus_rule_holds_the_rules_file() -> None:
    assert PROMETHEUS_RULE["kind"] == "PrometheusRule"
    assert PROMETHEUS_RULE["spec"]["groups"] == load(ROOT / generator.RULES)["groups"]
    assert generator.main(["--check", "--root", str(ROOT)]) == 0


def test_the_dashboard_config_map_is_the_dashboard_and_a_valid_config_map() -> None:
    (generated,) = KUSTOMIZATION["configMapGenerator"]
    assert generated["files"] == ["gateway.json"]
    text = (OVERLAY / "gateway.json").read_text(encoding="utf-8")
    assert text == (ROOT / generator.DASHBOARD).read_text(encoding="utf-8")
    assert generated["options"]["labels"]["grafana_dashboard"] == "1"
    # What kustomize makes of it, validated as the Kubernetes schema says (1 MiB at most).
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generated["name"], "labels": generated["options"]["labels"]},
        "data": {"gateway.json": text},
    }
    kubernetes_validate.validate(config_map, "1.30", strict=True)
    assert len(text.encode()) < 256 * 1024  # kubectl apply's last-applied annotation keeps it whole
    assert json.loads(text)["uid"] == generator.UID
