"""The Kubernetes manifests in deploy/k8s: valid against the Kubernetes schemas, and in agreement
with the gateway (its settings, ports, probes and drain) and with each other.

Offline: kubernetes-validate ships the JSON schemas of every Kubernetes version it supports, and
its validator resolves references from those files alone (a socket guard makes sure of it).
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from kubernetes_validate.utils import SchemaNotFoundError, all_versions

from gateway.config import ENV_NAMES, settings_from_strings
from gateway.server import STOP_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"

#: The oldest Kubernetes the manifests support (the preStop `sleep` action is on by default from
#: 1.30); they are also checked against the newest version kubernetes-validate knows.
MIN_VERSION = "1.30"
#: Longest time ``gateway serve`` gives Granian to stop after the drain before it kills it
#: (``Supervisor._terminate``).
STOP_KILL_AFTER = STOP_TIMEOUT + 5
#: The image the Dockerfile builds (README.md in deploy/k8s says how to tag and push it).
IMAGE = "gateway"
ROUTES_KEY = "routes.toml"
SECRET_KEYS = {"API_KEYS", "BACKEND_API_KEY"}

Doc = dict[str, Any]


def _manifests() -> dict[str, list[Doc]]:
    files = sorted(K8S.glob("*.yaml"))
    assert files, f"no manifests in {K8S}"
    out: dict[str, list[Doc]] = {}
    for path in files:
        with path.open(encoding="utf-8") as fh:
            out[path.name] = [doc for doc in yaml.safe_load_all(fh) if doc is not None]
    return out


MANIFESTS = _manifests()
DOCS = [(name, doc) for name, docs in MANIFESTS.items() for doc in docs]
OBJECTS = [(name, doc) for name, doc in DOCS if doc.get("kind") != "Kustomization"]


def _one(kind: str, name: str) -> Doc:
    found = [doc for _, doc in OBJECTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _container(deployment: Doc, name: str) -> Doc:
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"no container {name!r} in Deployment {deployment['metadata']['name']}"
    return found[0]


def _port(container: Doc, port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container port it reaches."""
    for p in container["ports"]:
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    raise AssertionError(f"port {port!r} is not one of container {container['name']}'s ports")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEMORY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEMORY_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MEMORY_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def _millicpu(quantity: str | int | float) -> int:
    match = _CPU.match(str(quantity))
    assert match, f"unexpected CPU quantity {quantity!r}"
    value = float(match.group(1))
    return round(value if match.group(2) else value * 1000)


def _bytes(quantity: str | int) -> int:
    match = _MEMORY.match(str(quantity))
    assert match, f"unexpected memory quantity {quantity!r}"
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


GATEWAY = _one("Deployment", "gateway")
GATEWAY_POD = GATEWAY["spec"]["template"]
GATEWAY_CONTAINER = _container(GATEWAY, "gateway")
CONFIG = _one("ConfigMap", "gateway-config")["data"]
SECRET = _one("Secret", "gateway-keys")
VLLM = _one("Deployment", "vllm")
VLLM_CONTAINER = _container(VLLM, "vllm")
VLLM_SERVICE = _one("Service", "vllm")
ENV = {e["name"]: e for e in GATEWAY_CONTAINER["env"]}


def _requested_workers() -> int:
    """GATEWAY_WORKERS as the kubelet computes it: requests.cpu / divisor, rounded up."""
    ref = ENV["GATEWAY_WORKERS"]["valueFrom"]["resourceFieldRef"]
    return math.ceil(_millicpu(GATEWAY_CONTAINER["resources"]["requests"]["cpu"]) / _millicpu(ref["divisor"]))


def _gateway_environment() -> dict[str, str]:
    """The environment the gateway container starts with, resolved as the kubelet would."""
    env: dict[str, str] = {}
    for name, entry in ENV.items():
        source = entry.get("valueFrom", {})
        if "value" in entry:
            env[name] = str(entry["value"])
        elif "configMapKeyRef" in source:
            env[name] = CONFIG[source["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in source:
            env[name] = SECRET["stringData"][source["secretKeyRef"]["key"]]
        elif "resourceFieldRef" in source:
            env[name] = str(_requested_workers())
        else:
            raise AssertionError(f"{name}: unexpected env source {entry}")
    return env


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield


# --- Shape and schema ---------------------------------------------------------------------------


def test_every_file_holds_documents_with_a_kind() -> None:
    for name, docs in MANIFESTS.items():
        assert docs, f"{name} holds no document"
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("kind"), f"{name}: a document without a top-level kind"
            assert doc.get("apiVersion"), f"{name}: a {doc['kind']} without apiVersion"


def test_no_namespace_is_hard_coded() -> None:
    # So that `kubectl -n NAME apply -k deploy/k8s` (or kustomize's `namespace:`) places everything.
    for name, doc in OBJECTS:
        assert "namespace" not in doc["metadata"], f"{name}: {doc['kind']} names a namespace"


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", sorted({MIN_VERSION, all_versions()[-1]}))
def test_manifests_validate_strictly(version: str) -> None:
    assert any(v.startswith(MIN_VERSION + ".") for v in all_versions()), (
        f"kubernetes-validate no longer ships Kubernetes {MIN_VERSION}'s schemas"
    )
    errors = []
    for name, doc in OBJECTS:
        where = f"{name}: {doc['kind']} {doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_kustomization_lists_every_manifest_but_the_secret() -> None:
    (kustomization,) = MANIFESTS["kustomization.yaml"]
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    # The Secret holds placeholders: applying it would overwrite the keys created by hand.
    expected = set(MANIFESTS) - {"kustomization.yaml", "gateway-secret.yaml"}
    assert set(listed) == expected
    assert [i["name"] for i in kustomization["images"]] == [IMAGE]


# --- The gateway ----------------------------------------------------------------------------------


def test_gateway_runs_the_projects_image() -> None:
    image = GATEWAY_CONTAINER["image"]
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    assert repository.rsplit("/", 1)[-1] == IMAGE
    assert GATEWAY_CONTAINER.get("args", ["serve"]) == ["serve"]
    assert "command" not in GATEWAY_CONTAINER, "the image's entrypoint is `gateway`"


def test_probes_use_ready_and_health_on_the_container_port() -> None:
    (http,) = GATEWAY_CONTAINER["ports"]
    assert http["containerPort"] == int(CONFIG.get("GATEWAY_PORT", "4000"))
    ready = GATEWAY_CONTAINER["readinessProbe"]["httpGet"]
    live = GATEWAY_CONTAINER["livenessProbe"]["httpGet"]
    assert ready["path"] == "/ready"
    assert live["path"] == "/health"
    assert _port(GATEWAY_CONTAINER, ready["port"]) == http["containerPort"]
    assert _port(GATEWAY_CONTAINER, live["port"]) == http["containerPort"]


def test_grace_period_covers_the_drain() -> None:
    drain = float(CONFIG["GATEWAY_DRAIN_SECONDS"])
    grace = GATEWAY_POD["spec"]["terminationGracePeriodSeconds"]
    pre_stop = GATEWAY_CONTAINER.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert grace > drain
    # SIGTERM comes after preStop; then the drain, then at most STOP_KILL_AFTER for Granian.
    assert grace > pre_stop + drain + STOP_KILL_AFTER, (
        f"terminationGracePeriodSeconds={grace} leaves no margin for preStop ({pre_stop} s), "
        f"GATEWAY_DRAIN_SECONDS={drain:g} and Granian's stop ({STOP_KILL_AFTER:g} s)"
    )


def test_runs_as_non_root_with_a_read_only_root_and_a_writable_tmp() -> None:
    pod = GATEWAY_POD["spec"]
    ctx = GATEWAY_CONTAINER["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert ctx.get("runAsNonRoot", True) is True
    assert ctx.get("runAsUser", 10001) == 10001
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert "add" not in ctx["capabilities"]
    mounts = {m["mountPath"]: m for m in GATEWAY_CONTAINER["volumeMounts"]}
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly", False)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_resources_have_requests_and_limits() -> None:
    resources = GATEWAY_CONTAINER["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"], key
    assert 0 < _millicpu(resources["requests"]["cpu"]) <= _millicpu(resources["limits"]["cpu"])
    assert 0 < _bytes(resources["requests"]["memory"]) <= _bytes(resources["limits"]["memory"])


def test_workers_come_from_the_cpu_request() -> None:
    ref = ENV["GATEWAY_WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "gateway", "resource": "requests.cpu", "divisor": "1"}
    assert "GATEWAY_WORKERS" not in CONFIG
    assert _requested_workers() >= 1


def test_env_names_are_gateway_settings() -> None:
    names = [e["name"] for e in GATEWAY_CONTAINER["env"]]
    assert len(names) == len(set(names)), "an env var is set twice"
    assert "envFrom" not in GATEWAY_CONTAINER, "routes.toml would become a variable: name the keys"
    assert set(names) <= set(ENV_NAMES), f"not gateway settings: {sorted(set(names) - set(ENV_NAMES))}"
    config_keys = set(CONFIG) - {ROUTES_KEY}
    assert config_keys <= set(ENV_NAMES), f"not gateway settings: {sorted(config_keys - set(ENV_NAMES))}"
    # Every ConfigMap key reaches the container under its own name, and only from this ConfigMap.
    from_config = {
        e["name"]: e["valueFrom"]["configMapKeyRef"]
        for e in ENV.values()
        if "configMapKeyRef" in e.get("valueFrom", {})
    }
    assert set(from_config) == config_keys
    for name, ref in from_config.items():
        assert ref == {"name": "gateway-config", "key": name}


def test_the_resolved_environment_is_a_valid_configuration() -> None:
    settings = settings_from_strings(_gateway_environment())
    assert settings.gateway_host == "0.0.0.0"
    assert settings.gateway_port == GATEWAY_CONTAINER["ports"][0]["containerPort"]
    assert settings.gateway_workers == _requested_workers()
    assert settings.client_keys, "client auth must be on"
    assert settings.gateway_metrics and not settings.gateway_metrics_require_key


def test_keys_come_from_the_secret() -> None:
    assert SECRET["type"] == "Opaque"
    assert set(SECRET["stringData"]) == SECRET_KEYS
    for value in SECRET["stringData"].values():
        assert value.startswith("PLACEHOLDER"), "the committed Secret must only hold placeholders"
    for key in SECRET_KEYS:
        assert ENV[key]["valueFrom"]["secretKeyRef"] == {"name": "gateway-keys", "key": key}
        assert key not in CONFIG


def test_routes_file_is_valid_and_mounted(tmp_path: Path) -> None:
    from gateway.backends_file import load_backends

    path = tmp_path / ROUTES_KEY
    path.write_text(CONFIG[ROUTES_KEY])
    spec, keys = load_backends(str(path), environ={"BACKEND_API_KEY": "k"})
    (backend,) = spec.backends
    assert backend.urls == [CONFIG["BACKEND_BASE_URL"]] and backend.models == [CONFIG["MODEL_NAME"]]
    assert backend.api_key_env == "BACKEND_API_KEY" and "BACKEND_API_KEY" in ENV  # set from the Secret
    volumes = [v for v in GATEWAY_POD["spec"]["volumes"] if v.get("configMap", {}).get("name") == "gateway-config"]
    assert len(volumes) == 1
    assert volumes[0]["configMap"]["items"] == [{"key": ROUTES_KEY, "path": ROUTES_KEY}]
    (mount,) = [m for m in GATEWAY_CONTAINER["volumeMounts"] if m["name"] == volumes[0]["name"]]
    assert mount["readOnly"] is True
    assert mount["mountPath"].rstrip("/") == "/etc/gateway"


def test_service_links_are_off() -> None:
    # A Service named gateway would inject GATEWAY_PORT=tcp://..., one named vllm VLLM_PORT=tcp://...
    assert GATEWAY_POD["spec"]["enableServiceLinks"] is False
    assert VLLM["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_service_targets_the_container_port() -> None:
    service = _one("Service", "gateway")
    labels = GATEWAY_POD["metadata"]["labels"]
    assert _selects(service["spec"]["selector"], labels)
    assert not _selects(service["spec"]["selector"], VLLM["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert _port(GATEWAY_CONTAINER, port["targetPort"]) == GATEWAY_CONTAINER["ports"][0]["containerPort"]


def test_deployment_selector_matches_its_pods() -> None:
    for deployment in (GATEWAY, VLLM):
        assert _selects(
            deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]
        )


def test_hpa_scales_the_gateway_on_cpu() -> None:
    hpa = _one("HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "gateway")
    assert _selects(GATEWAY["spec"]["selector"]["matchLabels"], GATEWAY_POD["metadata"]["labels"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The HPA owns the replica count: a fixed one in the Deployment would reset it on every apply.
    assert "replicas" not in GATEWAY["spec"]


def test_pdb_selects_the_gateway_pods() -> None:
    pdb = _one("PodDisruptionBudget", "gateway")
    assert pdb["apiVersion"] == "policy/v1"
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert _selects(selector, GATEWAY_POD["metadata"]["labels"])
    assert not _selects(selector, VLLM["spec"]["template"]["metadata"]["labels"])
    hpa = _one("HorizontalPodAutoscaler", "gateway")
    # A budget of 0 unavailable pods would block every node drain.
    assert "maxUnavailable" in pdb["spec"] and pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_prometheus_annotations() -> None:
    annotations = GATEWAY_POD["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == GATEWAY_CONTAINER["ports"][0]["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert CONFIG.get("GATEWAY_METRICS", "true") == "true"
    assert CONFIG.get("GATEWAY_METRICS_REQUIRE_KEY", "false") == "false", "the scrape carries no key"


# --- The vLLM backend -----------------------------------------------------------------------------


def test_backend_url_is_the_vllm_service() -> None:
    url = urlsplit(CONFIG["BACKEND_BASE_URL"])
    assert CONFIG["BACKEND_KIND"] == "vllm"
    assert url.scheme == "http"
    name = VLLM_SERVICE["metadata"]["name"]
    assert url.hostname == name or (url.hostname or "").startswith(name + "."), url.hostname
    (port,) = VLLM_SERVICE["spec"]["ports"]
    assert url.port == port["port"]
    assert url.path.rstrip("/").endswith("/v1")
    assert _port(VLLM_CONTAINER, port["targetPort"]) == 8000


def test_vllm_service_is_headless_and_selects_vllm() -> None:
    assert VLLM_SERVICE["spec"]["clusterIP"] == "None"
    assert _selects(VLLM_SERVICE["spec"]["selector"], VLLM["spec"]["template"]["metadata"]["labels"])
    assert not _selects(VLLM_SERVICE["spec"]["selector"], GATEWAY_POD["metadata"]["labels"])


def test_vllm_requests_a_gpu_and_mounts_the_model_cache() -> None:
    resources = VLLM_CONTAINER["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) >= 1
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    pvc = _one("PersistentVolumeClaim", "vllm-model-cache")
    volumes = {v["name"]: v for v in VLLM["spec"]["template"]["spec"]["volumes"]}
    (cache,) = [
        n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    ]
    mounts = {m["name"]: m["mountPath"] for m in VLLM_CONTAINER["volumeMounts"]}
    assert mounts[cache] == "/root/.cache/huggingface"
    # A ReadWriteOnce volume and a GPU cannot be held by the old and the new pod at once.
    assert VLLM["spec"]["strategy"]["type"] == "Recreate"


def test_vllm_probes_and_key() -> None:
    assert VLLM_CONTAINER["image"].startswith("vllm/vllm-openai:")
    args = VLLM_CONTAINER["args"]
    assert not args[0].startswith("-"), "the image's entrypoint is `vllm serve`: the model comes first"
    assert args[0] == CONFIG["MODEL_NAME"]
    assert "--port=8000" in args
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = VLLM_CONTAINER[probe]["httpGet"]
        assert get["path"] == "/health" and _port(VLLM_CONTAINER, get["port"]) == 8000, probe
    startup = VLLM_CONTAINER["startupProbe"]
    # Loading (and the first download) takes minutes: at least ten before liveness may restart it.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    env = {e["name"]: e for e in VLLM_CONTAINER["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "gateway-keys", "key": "BACKEND_API_KEY"}
