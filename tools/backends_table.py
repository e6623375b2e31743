"""The README's backends section, generated from the code and the deployment kit.

Nothing in it is typed twice. Per kind, ``PROFILES`` gives the display name, what the kind is best
suited for and its capabilities; its env template in ``deploy/env/`` gives the internal base URL;
the compose service that URL names gives the compose profile. ``python -m tools.backends_table`` rewrites the
block between the markers in README.md; ``python -m tools.backends_table --check`` exits 1 when it is stale.

Run from the repository's root. Needs PyYAML (a dev dependency) to read ``docker-compose.yml``,
which is why it lives in ``tools/``, outside the package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from gateway.config import ConfigError, read_dotenv
from gateway.profiles import CAPABILITIES, PROFILES, Profile, Support

START = "<!-- backends-table:start -->"
END = "<!-- backends-table:end -->"

COMPOSE_FILE = "docker-compose.yml"
ENV_DIR = "deploy/env"
GATEWAY_SERVICE = "gateway"
#: The template of every kind that has none of its own: the backend runs outside compose.
EXTERNAL = "external"
#: ``just up none`` starts the gateway alone.
GATEWAY_ONLY = "none"
#: How the gateway container reaches the Docker host (its ``extra_hosts``).
HOST_ALIAS = "host.docker.internal"

_SUPPORT_LABELS = {Support.DEPENDS: "depends", Support.UNSUPPORTED: "no (501)"}


class KitError(Exception):
    """The kit's files are missing or malformed: the message names the file."""


class Template(msgspec.Struct, frozen=True, kw_only=True):
    """One ``deploy/env/<name>.env``."""

    name: str
    #: Its first comment line, without the ``#`` and the final full stop.
    title: str
    values: Mapping[str, str]

    @property
    def kind(self) -> str:
        return self.values.get("BACKEND_KIND", "")

    @property
    def url(self) -> str:
        return self.values.get("BACKEND_BASE_URL", "")


class Kit(msgspec.Struct, frozen=True, kw_only=True):
    """``docker-compose.yml``'s services and the env templates, as read from disk."""

    services: Mapping[str, Mapping[str, Any]]
    templates: Mapping[str, Template]

    def template_for(self, kind: str) -> Template:
        """The kind's own template, else the external one (LM Studio, any OpenAI-compatible URL)."""
        name = kind if kind in self.templates else EXTERNAL
        if name not in self.templates:
            raise KitError(f"{ENV_DIR}/{kind}.env and {ENV_DIR}/{EXTERNAL}.env are both missing")
        return self.templates[name]

    def service_for(self, template: Template) -> str | None:
        """The compose service the template's ``BACKEND_BASE_URL`` names, if it names one."""
        host = urlsplit(template.url).hostname
        return host if host in self.services and host != GATEWAY_SERVICE else None

    def profile_for(self, template: Template) -> str | None:
        service = self.service_for(template)
        if service is None:
            return None
        profiles = self.services[service].get("profiles") or []
        return str(profiles[0]) if profiles else None

    def gateway_port(self) -> str:
        """The host port the gateway is published on (``HOST:CONTAINER`` or ``IP:HOST:CONTAINER``)."""
        ports = self.services[GATEWAY_SERVICE].get("ports") or []
        if not ports:
            raise KitError(f"{COMPOSE_FILE}: the {GATEWAY_SERVICE} service publishes no port")
        parts = str(ports[0]).split(":")
        return parts[-2] if len(parts) > 1 else parts[0]


def load(root: Path) -> Kit:
    """Read ``docker-compose.yml`` and ``deploy/env/*.env`` under ``root``."""
    import yaml  # type: ignore[import-untyped,unused-ignore]

    path = root / COMPOSE_FILE
    try:
        compose: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KitError(f"cannot read {path}: {exc}") from None
    services = compose.get("services") if isinstance(compose, dict) else None
    if not isinstance(services, dict) or GATEWAY_SERVICE not in services:
        raise KitError(f"{path}: no services, or no {GATEWAY_SERVICE!r} service")
    templates = {}
    for env in sorted((root / ENV_DIR).glob("*.env")):
        templates[env.stem] = Template(name=env.stem, title=_title(env), values=read_dotenv(env))
    if not templates:
        raise KitError(f"no env templates in {root / ENV_DIR}")
    return Kit(services=services, templates=templates)


def _title(path: Path) -> str:
    first = path.read_text(encoding="utf-8").partition("\n")[0]
    if not first.startswith("#"):
        raise KitError(f"{path}: the first line must be a comment saying what the template is for")
    return first.lstrip("#").strip().rstrip(".")


def capabilities_cell(profile: Profile) -> str:
    """``chat, completions; depends: embeddings; no (501): responses``."""
    groups: dict[Support, list[str]] = {s: [] for s in Support}
    for name in CAPABILITIES:
        groups[profile.support(name)].append(name)
    parts = [", ".join(groups[Support.SUPPORTED])]
    parts += [f"{label}: {', '.join(groups[s])}" for s, label in _SUPPORT_LABELS.items() if groups[s]]
    return "; ".join(p for p in parts if p)


def _compose_cell(kit: Kit, kind: str, template: Template) -> str:
    profile = kit.profile_for(template) if template.kind == kind else None
    if profile:
        return f"`{profile}`"
    if template.kind == kind and urlsplit(template.url).hostname == HOST_ALIAS:
        return "none: runs on the host"
    return "none: any external URL"


def table(kit: Kit) -> list[str]:
    lines = [
        "| Kind | Backend | Compose profile | Internal base URL | Best suited for | Capabilities |",
        "|---|---|---|---|---|---|",
    ]
    for kind, profile in PROFILES.items():
        template = kit.template_for(kind)
        url = f"`{template.url}`" if template.kind == kind else "the `BACKEND_BASE_URL` you set"
        cells = [
            f"`{kind}`",
            profile.display_name,
            _compose_cell(kit, kind, template),
            url,
            profile.best_for,
            capabilities_cell(profile),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def launch_steps(kit: Kit) -> list[str]:
    """One line per kind, then one per template that belongs to no kind (the simulator)."""
    lines = []
    used = set()
    for kind, profile in PROFILES.items():
        template = kit.template_for(kind)
        used.add(template.name)
        env = f"just env-{template.name}"
        compose_profile = kit.profile_for(template) if template.kind == kind else None
        if compose_profile:
            lines.append(f"- {profile.display_name}: `{env} && just up {compose_profile}`")
        elif template.kind == kind:
            port = urlsplit(template.url).port
            start = (profile.host_start or "its server on port {port}").format(port=port)
            lines.append(f"- {profile.display_name}: on the host, `{start}`; then `{env} && just up {GATEWAY_ONLY}`")
        else:
            lines.append(
                f"- {profile.display_name}: `{env}`, then in `.env` set `BACKEND_KIND={kind}`, `BACKEND_BASE_URL` "
                f"and `BACKEND_API_KEY`; then `just up {GATEWAY_ONLY}`"
            )
    for template in kit.templates.values():
        if template.name not in used:
            compose_profile = kit.profile_for(template) or GATEWAY_ONLY
            lines.append(f"- {template.title}: `just env-{template.name} && just up {compose_profile}`")
    return lines


def render(kit: Kit) -> str:
    """The block between the markers, markers included."""
    port = kit.gateway_port()
    parts = [
        START,
        "<!-- Generated by `python -m tools.backends_table` from gateway/profiles.py, docker-compose.yml and "
        "deploy/env/*.env: edit those, then run it again. -->",
        "",
        "### Backends at a glance",
        "",
        *table(kit),
        "",
        "Capabilities: the gateway forwards those listed; *depends*: it forwards them too, and the answer "
        "depends on how the backend was launched; *no (501)*: it answers 501 itself without calling the "
        "backend. `BACKEND_CAPABILITIES` overrides them, e.g. `-embeddings,+tools`.",
        "",
        "### Launch with Docker Compose",
        "",
        "`just env-NAME` copies `deploy/env/NAME.env` to `.env` (an existing `.env` is kept unless you add "
        "`force`). Edit it (at least `API_KEYS` and the model), then `just up PROFILE` builds the gateway "
        "image and starts it with that backend. The gateway starts once the backend's healthcheck passes "
        "(the first start downloads the model) and answers on "
        f"http://localhost:{port}/v1; no backend publishes a port (Prometheus and Grafana do, in the "
        "`observability` profile: see Observability). "
        "`just logs` follows the logs, `just down` stops everything and keeps the model volumes. "
        "The GPU services need the NVIDIA Container Toolkit.",
        "",
        *launch_steps(kit),
        "",
        "### Adding a new backend",
        "",
        "1. One `Profile` entry in `PROFILES` in `gateway/profiles.py`: display name, default URL, health "
        "path, whether it takes a key, capabilities, what it is best suited for (and, for a kind that "
        "runs on the host rather than in compose, the command that starts it).",
        "2. One service in `docker-compose.yml`, named after the kind and under its own profile: the "
        "official image listening on a port inside the compose network, `env_file: .env`, the backend's "
        "key from `BACKEND_API_KEY`, a healthcheck that works inside that image, a named volume for its "
        "model cache and an NVIDIA GPU reservation; and an entry in the gateway's `depends_on` with "
        "`required: false`.",
        "3. One env template, `deploy/env/KIND.env`: a first comment line saying what it is for, "
        "`BACKEND_KIND`, `BACKEND_BASE_URL` (the service's internal URL), `MODEL_NAME`, `API_KEYS`, "
        "`BACKEND_API_KEY` and the backend's own knobs; and its `env-KIND` recipe in the `justfile`.",
        "4. Its tests: the profile's facts in `tests/test_profiles.py`; `tests/test_kit.py` then checks "
        "the service, the template and this section on its own.",
        "5. Run `python -m tools.backends_table` to regenerate this section.",
        END,
    ]
    return "\n".join(parts)


def splice(readme: str, block: str, start_marker: str = START, end_marker: str = END) -> str:
    """``readme`` with the text from ``start_marker`` to ``end_marker`` replaced by ``block``."""
    start = readme.find(start_marker)
    end = readme.find(end_marker, start + 1)
    if start < 0 or end < 0:
        raise KitError(f"README.md needs the markers {start_marker} and {end_marker}, in that order")
    return readme[:start] + block + readme[end + len(end_marker) :]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.backends_table", description="Regenerate the backends section of README.md."
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's block is out of date")
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parent.parent, help="the repository's root"
    )
    args = parser.parse_args(argv)
    readme_path: Path = args.root / "README.md"
    try:
        readme = readme_path.read_text(encoding="utf-8")
        updated = splice(readme, render(load(args.root)))
    except (OSError, KitError, ConfigError) as exc:
        print(f"backends_table: {exc}", file=sys.stderr)
        return 2
    if updated == readme:
        return 0
    if args.check:
        print(
            "backends_table: README.md's backends section is out of date: run python -m tools.backends_table",
            file=sys.stderr,
        )
        return 1
    readme_path.write_text(updated, encoding="utf-8")
    print(f"backends_table: updated {readme_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
