"""Settings: environment variables and an optional ``.env``, converted by msgspec.

Every field's name, upper-cased, is its environment variable; ``gateway serve`` derives one CLI flag
per field from the same list, so the two can never drift. A bad value raises ``ConfigError`` with one
line naming the variable, the value and what is accepted.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from gateway.profiles import PROFILES, CapabilityError, Profile, Support, apply_overrides

Seconds = Annotated[float, Meta(ge=0, description="a number of seconds >= 0")]
PositiveSeconds = Annotated[float, Meta(gt=0, description="a number of seconds > 0")]
Count = Annotated[int, Meta(ge=1, le=1_000_000, description="an integer from 1 to 1000000")]
Port = Annotated[int, Meta(ge=1, le=65535, description="an integer from 1 to 65535")]
Flag = Annotated[bool, Meta(description="true or false")]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "text"]
#: How a backend with several replicas picks one (see ``gateway.balance``); ``auto`` is ``prefix``
#: for the kinds with a prefix cache (``Profile.prefix_cache``) and ``p2c`` for the others.
Policy = Literal["auto", "p2c", "prefix"]
#: A policy once ``auto`` is resolved for a backend's kind.
Balance = Literal["p2c", "prefix"]


class ConfigError(Exception):
    """A bad setting: the message is the one line shown to the operator."""


class Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The base of every declared configuration: immutable, keyword-only, and strict (a key it
    does not know is an error, never silently ignored)."""


class Settings(Spec, frozen=True, rename="upper"):
    """The gateway's settings. Field ``backend_kind`` is variable ``BACKEND_KIND``, and so on."""

    backend_kind: Annotated[str, Meta(description="one of " + ", ".join(PROFILES))] = "vllm"
    #: The backend's OpenAI base URL (ending in /v1). Empty means the kind's default.
    backend_base_url: Annotated[
        str, Meta(description="an http(s) URL such as http://host:8000/v1, or several replicas separated by commas")
    ] = ""
    backend_api_key: str = ""
    #: Overrides of the kind's capabilities, e.g. ``-embeddings,+tools``.
    backend_capabilities: str = ""
    #: Filled into requests that carry no ``model``.
    model_name: str = ""
    #: Comma-separated client keys; empty turns client auth off (unless GATEWAY_KEYS_FILE is set).
    api_keys: str = ""

    gateway_host: str = "127.0.0.1"
    gateway_port: Port = 4000
    gateway_workers: Annotated[int, Meta(ge=1, le=256, description="an integer from 1 to 256")] = 1
    gateway_connect_timeout: PositiveSeconds = 10.0
    #: Longest silence from the backend, the wait for its response headers included.
    gateway_read_timeout: PositiveSeconds = 600.0
    #: Cap on a whole request; 0 turns it off (long generations are normal).
    gateway_total_timeout: Seconds = 0.0
    #: Refinements of the read timeout; 0 means GATEWAY_READ_TIMEOUT.
    gateway_header_timeout: Seconds = 0.0
    gateway_ttft_timeout: Seconds = 0.0
    gateway_idle_timeout: Seconds = 0.0
    #: A routes file declaring several backends (the BACKEND_* variables are then not used).
    gateway_routes: Annotated[str, Meta(description="the path of a routes.toml file")] = ""
    #: Retries on another replica while nothing was sent to the client.
    gateway_retries: Annotated[int, Meta(ge=0, le=10, description="an integer from 0 to 10")] = 2
    #: Active health probes of each replica (several replicas or backends only).
    gateway_probe_interval: PositiveSeconds = 5.0
    #: Passive ejection after this many consecutive connect failures or 5xx answers ...
    gateway_eject_after: Annotated[int, Meta(ge=1, le=1000, description="an integer from 1 to 1000")] = 3
    #: ... for this long, then one trial request.
    gateway_eject_seconds: PositiveSeconds = 10.0
    #: Admission: requests in flight per backend (0: no cap), and the bounded wait beyond it.
    gateway_max_inflight: Annotated[int, Meta(ge=0, le=1_000_000, description="an integer >= 0")] = 0
    gateway_queue_size: Annotated[int, Meta(ge=0, le=1_000_000, description="an integer >= 0")] = 1000
    gateway_queue_timeout: PositiveSeconds = 30.0
    #: Client keys with per-minute limits (names shown in logs instead of the keys).
    gateway_keys_file: Annotated[str, Meta(description="the path of a keys.toml file")] = ""
    #: Share the keys file's limits across workers and replicas through Redis (redis://host:6379/0).
    redis_url: Annotated[str, Meta(description="a redis:// or rediss:// URL")] = ""
    #: When Redis cannot be reached: refuse limited keys' requests (503) instead of limiting locally.
    gateway_limits_fail_closed: Flag = False
    #: Optional stickiness across replicas, for prefix-cache reuse: ``key`` (the client key) or
    #: ``header:NAME`` (e.g. header:x-session-id). Empty: off.
    gateway_sticky: Annotated[str, Meta(description="empty, key, or header:NAME")] = ""
    #: Balancing among a backend's replicas: ``p2c`` (power of two choices on load), ``prefix``
    #: (prefix-cache affinity bounded by load) or ``auto`` (``prefix`` for the kinds with a prefix
    #: cache, else ``p2c``); a routes file's ``balance`` overrides it per backend.
    gateway_balance: Annotated[Policy, Meta(description="one of " + ", ".join(typing.get_args(Policy)))] = "auto"
    #: Seconds between reads of each replica's engine load from its /metrics (policy ``prefix``,
    #: kinds that expose one); 0 turns them off.
    gateway_engine_metrics_interval: Annotated[
        float, Meta(ge=0, le=3600, description="a number of seconds from 0 to 3600")
    ] = 1.0
    #: Upstream connections per worker.
    gateway_pool_size: Count = 1024
    #: How long a request may wait for a free upstream connection.
    gateway_pool_timeout: PositiveSeconds = 30.0
    #: How long an idle upstream connection is kept.
    gateway_keepalive: PositiveSeconds = 60.0
    #: Longest time a client may take to send its request headers (Granian's header read timeout:
    #: hyper's one HTTP/1 timer, which also closes a connection that never sent a byte and an idle
    #: keep-alive connection between requests).
    gateway_client_header_timeout: Annotated[
        float, Meta(ge=0.001, le=60, description="a number of seconds from 0.001 to 60")
    ] = 30.0
    #: Largest request head (request line and fields) a client may send, answered 431 beyond: it
    #: bounds the read buffer one connection can hold while its head trickles in (hyper's
    #: ``max_buffer_size``; its own minimum is 8 KiB, its default 408 KiB).
    gateway_client_max_header_bytes: Annotated[
        int, Meta(ge=8192, le=1_048_576, description="a number of bytes from 8192 to 1048576")
    ] = 64 * 1024
    #: Once the head is in, longest time a client may take to send its whole body (then 408).
    gateway_client_body_timeout: Seconds = 120.0
    gateway_max_body_bytes: Annotated[int, Meta(ge=1024, description="a number of bytes >= 1024")] = 32 * 1024 * 1024
    #: On SIGTERM, how long in-flight requests may take to finish.
    gateway_drain_seconds: Seconds = 30.0
    gateway_tls_verify: Flag = True
    gateway_ca_bundle: Annotated[str, Meta(description="the path of a PEM file")] = ""
    #: Granian's listen backlog (the kernel caps it at net.core.somaxconn), and the client
    #: connections each worker holds open at once (idle and half-sent ones included, not only
    #: requests in progress); past it the worker stops accepting and new clients queue in the backlog.
    gateway_backlog: Annotated[int, Meta(ge=128, le=65535, description="an integer from 128 to 65535")] = 2048
    gateway_backpressure: Count = 16384
    gateway_log_level: Annotated[LogLevel, Meta(description="one of " + ", ".join(typing.get_args(LogLevel)))] = "info"
    #: ``json`` lines, ``text``, or ``auto``: text on a terminal, JSON otherwise.
    gateway_log_format: Annotated[LogFormat, Meta(description="one of " + ", ".join(typing.get_args(LogFormat)))] = (
        "auto"
    )
    #: One access log line per request on stdout.
    gateway_access_log: Flag = True
    #: Prometheus metrics on /metrics.
    gateway_metrics: Flag = True
    #: Whether /metrics needs a client key (when API_KEYS is set).
    gateway_metrics_require_key: Flag = False

    def __repr__(self) -> str:
        shown = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in _SECRET_FIELDS and value:
                value = "<redacted>"
            shown.append(f"{name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    # Derived values. Settings is immutable, so these are computed on demand by callers that
    # need them once (at start-up), never per request.

    @property
    def profile(self) -> Profile:
        return PROFILES[self.backend_kind]

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The backend's replicas (``BACKEND_BASE_URL`` may list several, comma-separated)."""
        given = tuple(u.strip() for u in self.backend_base_url.split(",") if u.strip())
        return given or ((self.profile.default_base_url,) if self.profile.default_base_url else ())

    @property
    def base_url(self) -> str:
        urls = self.base_urls
        return urls[0] if urls else ""

    @property
    def capabilities(self) -> Mapping[str, Support]:
        return apply_overrides(self.profile.capabilities, self.backend_capabilities)

    @property
    def client_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())


_SECRET_FIELDS = frozenset({"backend_api_key", "api_keys"})

#: Environment variable name -> field name.
ENV_NAMES: Mapping[str, str] = {name.upper(): name for name in Settings.__struct_fields__}


def accepted(env_name: str) -> str:
    """What a variable accepts, from the field's ``Meta(description=...)``."""
    hints = typing.get_type_hints(Settings, include_extras=True)
    hint = hints[ENV_NAMES[env_name]]
    for meta in getattr(hint, "__metadata__", ()):
        if isinstance(meta, Meta) and meta.description:
            return meta.description
    return "a string"


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=VALUE`` lines, ``export`` prefixes, quotes, ``#`` comments."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE, got {raw.strip()!r}")
        value = value.strip()
        if value.startswith("#"):
            value = ""
        elif len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def load_settings(
    environ: Mapping[str, str] | None = None,
    dotenv: Path | None = Path(".env"),
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from ``.env`` (if present), overlaid by the real environment, overlaid by
    ``overrides`` (the command line's flags, by environment name); checked once, merged.

    Keys that are not ours (compose and backend knobs such as ``VLLM_DTYPE``) are ignored.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, str] = {}
    if dotenv is not None:
        merged.update({k: v for k, v in read_dotenv(dotenv).items() if k in ENV_NAMES})
    merged.update({k: v for k, v in env.items() if k in ENV_NAMES})
    merged.update(overrides or {})
    return settings_from_strings(merged)


def settings_from_strings(values: Mapping[str, str]) -> Settings:
    # Empty numeric/boolean values mean "unset" so that a template's `GATEWAY_PORT=` is harmless.
    cleaned = {k: v.strip() for k, v in values.items() if v.strip() != "" or _is_text(k)}
    try:
        settings = msgspec.convert(cleaned, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, cleaned)) from None
    _check(settings)
    return settings


def _is_text(env_name: str) -> bool:
    hints = typing.get_type_hints(Settings, include_extras=True)
    base = typing.get_args(hints[ENV_NAMES[env_name]]) or (hints[ENV_NAMES[env_name]],)
    return base[0] is str


def _describe(exc: msgspec.ValidationError, values: Mapping[str, str]) -> str:
    msg = str(exc)
    marker = "- at `$."
    if marker in msg:
        env_name = msg.split(marker, 1)[1].rstrip("`")
        if env_name in ENV_NAMES:
            return _bad(env_name, values.get(env_name, ""), accepted(env_name))
    return f"invalid settings: {msg}"


def _bad(env_name: str, value: str, what: str) -> str:
    shown = "<redacted>" if ENV_NAMES.get(env_name) in _SECRET_FIELDS else repr(value)
    return f"invalid {env_name}={shown}: expected {what}"


def valid_url(url: str) -> bool:
    """An http(s) URL with a host and a valid port, no query or fragment."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        return False
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return True


def _check(s: Settings) -> None:
    """Checks msgspec's constraints cannot express."""
    if s.backend_kind not in PROFILES:
        raise ConfigError(_bad("BACKEND_KIND", s.backend_kind, accepted("BACKEND_KIND")))
    if not s.base_url:
        raise ConfigError(
            f"BACKEND_BASE_URL must be set for BACKEND_KIND={s.backend_kind} (it has no default): "
            f"expected {accepted('BACKEND_BASE_URL')}"
        )
    for url in s.base_urls:
        if not valid_url(url):
            raise ConfigError(_bad("BACKEND_BASE_URL", s.backend_base_url or url, accepted("BACKEND_BASE_URL")))
    try:
        apply_overrides(s.profile.capabilities, s.backend_capabilities)
    except CapabilityError as exc:
        raise ConfigError(f"invalid BACKEND_CAPABILITIES={s.backend_capabilities!r}: {exc}") from None
    if (
        s.gateway_sticky
        and s.gateway_sticky != "key"
        and not (s.gateway_sticky.startswith("header:") and len(s.gateway_sticky) > len("header:"))
    ):
        raise ConfigError(_bad("GATEWAY_STICKY", s.gateway_sticky, accepted("GATEWAY_STICKY")))
    if s.redis_url and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(_bad("REDIS_URL", s.redis_url, accepted("REDIS_URL")))
    if s.gateway_keys_file and not Path(s.gateway_keys_file).is_file():
        raise ConfigError(_bad("GATEWAY_KEYS_FILE", s.gateway_keys_file, "the path of an existing keys.toml file"))
    if s.gateway_routes and not Path(s.gateway_routes).is_file():
        raise ConfigError(_bad("GATEWAY_ROUTES", s.gateway_routes, "the path of an existing routes.toml file"))
    if s.gateway_ca_bundle and not Path(s.gateway_ca_bundle).is_file():
        raise ConfigError(_bad("GATEWAY_CA_BUNDLE", s.gateway_ca_bundle, "the path of an existing PEM file"))
    if not s.gateway_host:
        raise ConfigError(_bad("GATEWAY_HOST", s.gateway_host, "an address to bind, e.g. 127.0.0.1 or 0.0.0.0"))
    if _has_control_character(s.backend_api_key):
        # It goes out in a header: h11 would refuse it on every request with an error that quotes it,
        # to the client and in /ready. Refuse it here, without showing it.
        raise ConfigError(_bad("BACKEND_API_KEY", s.backend_api_key, "printable characters only (no line break)"))


def _has_control_character(value: str) -> bool:
    return any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value)
