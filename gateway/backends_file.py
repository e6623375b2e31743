"""The backends file (``GATEWAY_ROUTES=routes.toml``): the backends, their replicas and their
models, read with tomllib into msgspec Structs.

Every mistake stops start-up with one line naming the file, the key path, the bad value and what
is accepted (``ConfigError``, exit 2 from the CLI).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from gateway.config import ConfigError, Policy, Spec, valid_url
from gateway.profiles import PROFILES, CapabilityError, Support, apply_overrides

Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Weight = Annotated[int, Meta(ge=1, le=1000)]

_ACCEPTED = {
    "name": "a unique name of letters, digits, '.', '_' or '-'",
    "kind": "one of " + ", ".join(PROFILES),
    "urls": "a non-empty list of http(s) URLs such as http://host:8000/v1",
    "api_key_env": "the name of an environment variable that holds the key",
    "models": "a list of model names",
    "aliases": 'a table of alias = "model" with models of this backend',
    "capabilities": "overrides such as -embeddings,+tools",
    "weights": "a list of integers 1-1000, one per url",
    "balance": "auto, p2c or prefix",
}


class BackendSpec(Spec, frozen=True):
    name: Name
    kind: str
    urls: Annotated[list[str], Meta(min_length=1)]
    api_key_env: str = ""
    models: list[str] = msgspec.field(default_factory=list)
    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    capabilities: str = ""
    weights: list[Weight] | None = None
    #: Balancing among the replicas; None: GATEWAY_BALANCE.
    balance: Policy | None = None

    def resolved_capabilities(self) -> Mapping[str, Support]:
        """The kind's capabilities with this backend's overrides (checked when the file is read)."""
        return apply_overrides(PROFILES[self.kind].capabilities, self.capabilities)


class BackendsFile(Spec, frozen=True):
    backends: Annotated[list[BackendSpec], Meta(min_length=1)]


def load_backends(path: str, environ: Mapping[str, str] | None = None) -> tuple[BackendsFile, dict[str, str]]:
    """The routes file, checked, and each backend's key (read from its ``api_key_env``)."""
    env = os.environ if environ is None else environ
    data = _read_toml(path)
    try:
        spec = msgspec.convert(data, BackendsFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(path, data, exc)) from None
    keys: dict[str, str] = {}
    seen_names: set[str] = set()
    owner: dict[str, str] = {}
    for i, b in enumerate(spec.backends):
        at = f"backends[{i}]"
        if b.name in seen_names:
            raise ConfigError(_bad(path, f"{at}.name", b.name, "a name no other backend has"))
        seen_names.add(b.name)
        _check_backend(path, at, b)
        if b.api_key_env:
            keys[b.name] = _api_key(path, at, b.api_key_env, env)
        _claim_models(path, at, b, owner)
    _claim_aliases(path, spec.backends, owner)
    return spec, keys


def _read_toml(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"GATEWAY_ROUTES={path!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"GATEWAY_ROUTES={path!r}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _check_backend(path: str, at: str, b: BackendSpec) -> None:
    """One backend's kind, urls, weights and capability overrides."""
    if b.kind not in PROFILES:
        raise ConfigError(_bad(path, f"{at}.kind", b.kind, _ACCEPTED["kind"]))
    for j, url in enumerate(b.urls):
        if not valid_url(url):
            raise ConfigError(_bad(path, f"{at}.urls[{j}]", url, "an http(s) URL such as http://host:8000/v1"))
    if b.weights is not None and len(b.weights) != len(b.urls):
        raise ConfigError(_bad(path, f"{at}.weights", b.weights, f"{len(b.urls)} weights, one per url"))
    try:
        apply_overrides(PROFILES[b.kind].capabilities, b.capabilities)
    except CapabilityError as exc:
        raise ConfigError(_bad(path, f"{at}.capabilities", b.capabilities, str(exc))) from None


def _api_key(path: str, at: str, api_key_env: str, env: Mapping[str, str]) -> str:
    if api_key_env not in env:
        raise ConfigError(_bad(path, f"{at}.api_key_env", api_key_env, "a variable that is set in the environment"))
    return env[api_key_env]


def _claim_models(path: str, at: str, b: BackendSpec, owner: dict[str, str]) -> None:
    """Record ``b`` as the owner of its models (each served by one backend only), and check that
    its aliases name them."""
    for j, model in enumerate(b.models):
        if not model:
            raise ConfigError(_bad(path, f"{at}.models[{j}]", model, "a non-empty model name"))
        if model in owner:
            raise ConfigError(_bad(path, f"{at}.models[{j}]", model, f"a model not already served by {owner[model]!r}"))
        owner[model] = b.name
    for alias, model in b.aliases.items():
        if model not in b.models:
            raise ConfigError(_bad(path, f"{at}.aliases.{alias}", model, f"one of this backend's models {b.models}"))


def _claim_aliases(path: str, backends: list[BackendSpec], owner: dict[str, str]) -> None:
    """Record each alias's backend, once every model is known: an alias is never also a model."""
    for i, b in enumerate(backends):
        for alias in b.aliases:
            if alias in owner:
                raise ConfigError(
                    _bad(path, f"backends[{i}].aliases", alias, "an alias that is not also a served model")
                )
            owner[alias] = b.name


def _bad(path: str, key: str, value: Any, what: str) -> str:
    return f"{path}: {key} = {value!r}: expected {what}"


def _describe(path: str, data: Any, exc: msgspec.ValidationError) -> str:
    msg = str(exc)
    if " - at `$." not in msg:
        return f"{path}: {msg}"
    where = msg.rsplit(" - at `$.", 1)[1].rstrip("`")
    value: Any = data
    for part in where.replace("[", ".[").split("."):
        if not part:
            continue
        try:
            value = value[int(part[1:-1])] if part.startswith("[") else value[part]
        except (KeyError, IndexError, TypeError, ValueError):
            value = None
            break
    if msg.startswith("Object contains unknown field"):
        field = msg.split("`")[1]
        return f"{path}: {where} has an unknown key {field!r}: expected one of {', '.join(_ACCEPTED)}"
    if msg.startswith("Object missing required field"):
        field = msg.split("`")[1]
        return f"{path}: {where}: the required key {field!r} is missing"
    leaf = where.rsplit(".", 1)[-1].split("[", 1)[0]
    what = _ACCEPTED.get(leaf, msg.split(" - at ")[0])
    return f"{path}: {where} = {value!r}: expected {what}"
