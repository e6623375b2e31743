"""The deployment kit: docker-compose.yml, deploy/env/*.env, the justfile, the Dockerfile and the
README section generated from them agree with each other and with gateway/profiles.py.

No container runs here: the compose file is checked structurally, and the justfile's recipes run
against a stand-in ``docker`` that records its arguments.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from gateway.config import ENV_NAMES, settings_from_strings
from gateway.profiles import PROFILES
from tools import backends_table as kit

ROOT = Path(__file__).resolve().parent.parent

#: Backend services without a GPU reservation: the simulator is plain Python.
NO_GPU = {"sim"}
#: The program each service's healthcheck runs, known to exist in its image (../shared/backends.md
#: and the images' Dockerfiles): Ollama's image has no curl; vLLM's and SGLang's have python3; the
#: TGI, llama.cpp and LocalAI images install curl; ours has python.
HEALTH_TOOL = {
    "gateway": "python",
    "sim": "python",
    "vllm": "python3",
    "sglang": "python3",
    "tgi": "curl",
    "llamacpp": "curl",
    "localai": "curl",
    "ollama": "ollama",
}
#: Where a backend is told its listening port when it takes no --port flag.
LISTEN_ENV = ("OLLAMA_HOST", "LOCALAI_ADDRESS")
RECIPES = {
    "up", "down", "logs", "serve", "sim", "demo", "test", "test-fast", "coverage", "lint", "bench", "bench-micro",
    "load", "soak",
}  # fmt: skip
_INTERPOLATION = re.compile(r"\$\{(\w+):-([^}]*)\}")


@pytest.fixture(scope="module")
def the_kit() -> kit.Kit:
    return kit.load(ROOT)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


#: The compose profile `observability` (tests/test_monitoring_kit.py): not backends.
MONITORING = {"prometheus", "grafana"}


@pytest.fixture(scope="module")
def backends(services: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in services.items() if name != kit.GATEWAY_SERVICE and name not in MONITORING}


def readme_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = text.index(kit.START), text.index(kit.END)
    return text[start:end]


def own_template_kinds(the_kit: kit.Kit) -> list[str]:
    return [kind for kind in PROFILES if kind in the_kit.templates]


def listen_port(service: dict[str, Any]) -> str:
    command = service.get("command") or []
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if "--port" in args:
        return args[args.index("--port") + 1]
    environment = service.get("environment") or {}
    for name in LISTEN_ENV:
        if name in environment:
            return str(environment[name]).rsplit(":", 1)[1]
    raise AssertionError(f"no --port flag and none of {LISTEN_ENV} in {service}")


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def volume_source(entry: str) -> str:
    source = entry.split(":", 1)[0] if not entry.startswith("${") else entry[: entry.index("}") + 1]
    match = _INTERPOLATION.fullmatch(source)
    return match.group(2) if match else source


# --- Every kind: a template, a README row; containerised kinds: a service -------------------------


def test_every_kind_has_a_template_and_a_readme_row(the_kit: kit.Kit) -> None:
    block = readme_block()
    external = (ROOT / kit.ENV_DIR / f"{kit.EXTERNAL}.env").read_text(encoding="utf-8")
    for kind in PROFILES:
        template = the_kit.template_for(kind)
        if template.name == kit.EXTERNAL:
            # Active or commented out: the file says how to use it for this kind.
            assert re.search(rf"^#? ?BACKEND_KIND={kind}$", external, re.M), f"external.env never names {kind}"
        else:
            assert template.name == kind and template.kind == kind
        assert f"| `{kind}` | {PROFILES[kind].display_name} |" in block, f"no README row for {kind}"


def test_only_lmstudio_and_openai_run_outside_compose(the_kit: kit.Kit, backends: dict[str, Any]) -> None:
    outside = {kind for kind in PROFILES if the_kit.template_for(kind).name == kit.EXTERNAL}
    assert outside == {"lmstudio", "openai"}
    # LM Studio is external.env's default, on the Docker host; openai is its commented alternative.
    assert the_kit.templates[kit.EXTERNAL].kind == "lmstudio"
    assert urlsplit(the_kit.templates[kit.EXTERNAL].url).hostname == kit.HOST_ALIAS
    assert outside.isdisjoint(backends)
    containerised = set(own_template_kinds(the_kit))
    assert containerised == {"vllm", "sglang", "tgi", "llamacpp", "ollama", "localai"}
    assert containerised <= set(backends)


def test_templates_name_only_kinds_the_code_has(the_kit: kit.Kit) -> None:
    for template in the_kit.templates.values():
        assert template.kind in PROFILES, f"{template.name}.env: BACKEND_KIND={template.kind!r}"
        for name in ("BACKEND_KIND", "BACKEND_BASE_URL", "MODEL_NAME", "API_KEYS", "BACKEND_API_KEY"):
            assert name in template.values, f"{template.name}.env lacks {name}"
        # The gateway accepts the template as it is.
        settings_from_strings({k: v for k, v in template.values.items() if k in ENV_NAMES})
    assert the_kit.templates["sim"].kind == "vllm"
    assert the_kit.templates["sim"].url == "http://sim:8001/v1"


def test_internal_urls(the_kit: kit.Kit) -> None:
    urls = {name: t.url for name, t in the_kit.templates.items()}
    assert urls == {
        "vllm": "http://vllm:8001/v1",
        "ollama": "http://ollama:11434/v1",
        "llamacpp": "http://llamacpp:8001/v1",
        "tgi": "http://tgi:8001/v1",
        "sglang": "http://sglang:8001/v1",
        "localai": "http://localai:8001/v1",
        "sim": "http://sim:8001/v1",
        "external": "http://host.docker.internal:1234/v1",
    }


def test_each_service_listens_where_its_template_says(the_kit: kit.Kit, backends: dict[str, Any]) -> None:
    served = {}
    for template in the_kit.templates.values():
        host = urlsplit(template.url).hostname
        if host == kit.HOST_ALIAS:
            continue
        assert host in backends, f"{template.name}.env points at {host!r}, which is no compose service"
        served[host] = template
        service = backends[host]
        port = str(urlsplit(template.url).port)
        assert service["profiles"] == [host], f"{host}: its own profile, named after it"
        assert listen_port(service) == port, f"{host} listens elsewhere than {template.url}"
        assert [str(p) for p in service["expose"]] == [port]
        check = healthcheck_text(service)
        if "http://" in check:
            assert f"127.0.0.1:{port}/" in check, f"{host}'s healthcheck probes another port"
    assert set(served) == set(backends), "a backend service without an env template"
    for kind in own_template_kinds(the_kit):
        if kind in backends:
            assert served[kind].name == kind


def test_compose_defaults_match_the_templates(the_kit: kit.Kit, backends: dict[str, Any]) -> None:
    for template in the_kit.templates.values():
        service = backends.get(urlsplit(template.url).hostname or "")
        if service is None:
            continue
        for name, default in _INTERPOLATION.findall(yaml.safe_dump(service)):
            if default and name in template.values:
                assert template.values[name] == default, f"{template.name}.env {name} vs compose's default"


def test_templates_say_how_to_start_them(the_kit: kit.Kit) -> None:
    for template in the_kit.templates.values():
        profile = the_kit.profile_for(template) or kit.GATEWAY_ONLY
        text = (ROOT / kit.ENV_DIR / f"{template.name}.env").read_text(encoding="utf-8")
        assert f"just env-{template.name} && just up {profile}" in text, template.name
        assert template.title, template.name


def test_backend_keys_are_passed_the_backends_way(the_kit: kit.Kit, backends: dict[str, Any]) -> None:
    for kind in own_template_kinds(the_kit):
        if kind not in backends:
            continue
        service = backends[kind]
        wiring = yaml.safe_dump({k: service.get(k) for k in ("entrypoint", "environment")})
        if PROFILES[kind].takes_key:
            assert "BACKEND_API_KEY" in wiring, f"{kind} never gets BACKEND_API_KEY"
        else:
            assert "BACKEND_API_KEY" not in wiring
            assert the_kit.templates[kind].values["BACKEND_API_KEY"] == ""


# --- docker-compose.yml's structure ---------------------------------------------------------------


def test_gateway_service(services: dict[str, Any], backends: dict[str, Any]) -> None:
    gateway = services[kit.GATEWAY_SERVICE]
    assert "profiles" not in gateway
    assert gateway["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert (ROOT / gateway["build"]["dockerfile"]).is_file()
    assert gateway["command"] in (["serve"], "serve")
    assert gateway["env_file"] == ".env"
    assert gateway["environment"]["GATEWAY_HOST"] == "0.0.0.0"
    assert str(gateway["environment"]["GATEWAY_PORT"]) == "4000"
    assert "4000:4000" in gateway["ports"]
    assert "host.docker.internal:host-gateway" in gateway["extra_hosts"]
    check = healthcheck_text(gateway)
    assert gateway["healthcheck"]["test"][:2] == ["CMD", "python"]
    assert "urllib" in check and "curl" not in check
    assert "http://127.0.0.1:4000/health" in check
    assert set(gateway["depends_on"]) == set(backends)
    for dependency in gateway["depends_on"].values():
        assert dependency == {"condition": "service_healthy", "required": False}


def test_backend_services(compose: dict[str, Any], backends: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    assert set(HEALTH_TOOL) == set(backends) | {kit.GATEWAY_SERVICE}
    for name, service in backends.items():
        assert service["profiles"] == [name]
        assert service["env_file"] == ".env"
        assert service.get("restart") == "unless-stopped"
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL")
        tool = test[1] if test[0] == "CMD" else shlex.split(test[1])[0]
        assert tool == HEALTH_TOOL[name], f"{name}'s healthcheck runs {tool}"
        devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        if name in NO_GPU:
            assert devices is None and "volumes" not in service
            assert "build" in service and service["command"][:2] == ["sim", "--kind"]
            continue
        assert devices, f"{name} reserves no GPU"
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert "image" in service and "build" not in service
        sources = [volume_source(str(v)) for v in service.get("volumes") or []]
        assert sources, f"{name} has no model cache volume"
        assert all(s in declared for s in sources), f"{name}: undeclared volume in {sources}"


def test_sim_uses_the_gateway_image(services: dict[str, Any]) -> None:
    sim = services["sim"]
    assert sim["build"] == services[kit.GATEWAY_SERVICE]["build"]
    assert sim["command"] == ["sim", "--kind", "vllm", "--host", "0.0.0.0", "--port", "8001"]


# --- The README section -------------------------------------------------------------------------


def test_readme_section_is_up_to_date(the_kit: kit.Kit) -> None:
    assert kit.render(the_kit) in (ROOT / "README.md").read_text(encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "tools.backends_table", "--check", "--root", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_check_notices_a_stale_section_and_a_rewrite_fixes_it(tmp_path: Path) -> None:
    shutil.copy(ROOT / "docker-compose.yml", tmp_path)
    shutil.copytree(ROOT / kit.ENV_DIR, tmp_path / kit.ENV_DIR)
    outside = "# Title\n\nText before.\n\n{block}\n\nText after.\n"
    readme = tmp_path / "README.md"
    readme.write_text(outside.format(block=f"{kit.START}\nold\n{kit.END}"), encoding="utf-8")
    assert kit.main(["--check", "--root", str(tmp_path)]) == 1
    assert "old" in readme.read_text(encoding="utf-8")
    assert kit.main(["--root", str(tmp_path)]) == 0
    assert readme.read_text(encoding="utf-8") == outside.format(block=kit.render(kit.load(tmp_path)))
    assert kit.main(["--check", "--root", str(tmp_path)]) == 0
    # A fact changed in the kit (vLLM's port) makes the section stale again.
    compose = tmp_path / "docker-compose.yml"
    env = tmp_path / kit.ENV_DIR / "vllm.env"
    env.write_text(env.read_text(encoding="utf-8").replace("vllm:8001", "vllm:8002"), encoding="utf-8")
    assert kit.main(["--check", "--root", str(tmp_path)]) == 1
    readme.write_text("no markers\n", encoding="utf-8")
    assert kit.main(["--check", "--root", str(tmp_path)]) == 2
    compose.unlink()
    assert kit.main(["--check", "--root", str(tmp_path)]) == 2


def test_kit_imports_without_yaml() -> None:
    code = "import sys; sys.modules['yaml'] = None; import tools.backends_table"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- justfile -----------------------------------------------------------------------------------


def just_exe() -> str:
    found = shutil.which("just") or shutil.which("just", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("`just` is not installed: .venv/bin/pip install -e '.[dev]' (rust-just)")
    return found


def run_just(cwd: Path, *args: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = os.environ.get("PATH", "/usr/bin:/bin")
    env = {**os.environ, "PATH": f"{path_prefix}{os.pathsep}{path}" if path_prefix else path}
    return subprocess.run(
        [just_exe(), "--justfile", str(cwd / "justfile"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_justfile_lists_every_recipe(the_kit: kit.Kit) -> None:
    listing = run_just(ROOT, "--list", "--unsorted")
    assert listing.returncode == 0, listing.stderr
    recipes = {}
    for line in listing.stdout.splitlines()[1:]:
        name, _, comment = line.strip().partition("#")
        recipes[name.split()[0]] = comment.strip()
    expected = RECIPES | {f"env-{name}" for name in the_kit.templates}
    assert expected <= set(recipes), expected - set(recipes)
    assert {name for name in recipes if name.startswith("env-")} == {f"env-{n}" for n in the_kit.templates}
    assert all(recipes[name] for name in expected), "every recipe says what it does"
    text = (ROOT / "justfile").read_text(encoding="utf-8")
    assert 'set shell := ["bash", "-uc"]' in text


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "justfile", tmp_path)
    shutil.copy(ROOT / "docker-compose.yml", tmp_path)
    shutil.copytree(ROOT / kit.ENV_DIR, tmp_path / kit.ENV_DIR)
    return tmp_path


def test_env_recipes_copy_and_never_overwrite_unless_forced(workdir: Path) -> None:
    env = workdir / ".env"
    sim, vllm = (workdir / kit.ENV_DIR / f"{n}.env" for n in ("sim", "vllm"))
    assert run_just(workdir, "env-sim").returncode == 0
    assert env.read_text() == sim.read_text()
    refused = run_just(workdir, "env-vllm")
    assert refused.returncode != 0 and "force" in refused.stderr
    assert env.read_text() == sim.read_text()
    assert run_just(workdir, "env-vllm", "forse").returncode != 0
    assert env.read_text() == sim.read_text()
    assert run_just(workdir, "env-vllm", "force").returncode == 0
    assert env.read_text() == vllm.read_text()


def test_up_starts_the_profile_or_the_gateway_alone(workdir: Path) -> None:
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(
        f"#!{sys.executable}\n"
        "import sys, yaml\n"
        "args = sys.argv[1:]\n"
        "if args[:3] == ['compose', 'config', '--profiles']:\n"
        "    services = yaml.safe_load(open('docker-compose.yml'))['services']\n"
        "    print('\\n'.join(sorted({p for s in services.values() for p in s.get('profiles', [])})))\n"
        "else:\n"
        "    open('docker.log', 'a').write(' '.join(args) + '\\n')\n",
        encoding="utf-8",
    )
    docker.chmod(0o755)
    log = workdir / "docker.log"

    assert run_just(workdir, "up", "vllm", path_prefix=bin_dir).returncode != 0, "no .env yet"
    assert not log.exists()
    assert run_just(workdir, "env-vllm").returncode == 0
    for kind in ("vllm", "sim", "none"):
        assert run_just(workdir, "up", kind, path_prefix=bin_dir).returncode == 0
    unknown = run_just(workdir, "up", "nope", path_prefix=bin_dir)
    assert unknown.returncode != 0 and "vllm" in unknown.stderr
    assert run_just(workdir, "down", path_prefix=bin_dir).returncode == 0
    assert log.read_text().splitlines() == [
        "compose --profile vllm up -d --build",
        "compose --profile sim up -d --build",
        "compose up -d --build",
        "compose --profile * down",
    ]


# --- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_not_root() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    # One instruction per logical line: join the backslash continuations.
    instructions = [ln.strip() for ln in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if ln.strip()]
    stages = [ln for ln in instructions if ln.startswith("FROM ")]
    assert len(stages) >= 2 and all("python:3.12-slim" in s for s in stages)
    assert any(ln.startswith("COPY --from=") for ln in instructions)
    users = [ln.split()[1] for ln in instructions if ln.startswith("USER ")]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert "EXPOSE 4000" in instructions
    assert any(ln.startswith("ENV ") and "GATEWAY_HOST=0.0.0.0" in ln.split() for ln in instructions)
    assert 'ENTRYPOINT ["gateway"]' in instructions
    assert 'CMD ["serve"]' in instructions
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".venv", ".git", ".env", "bench/results", ".pytest_cache"} <= ignored
