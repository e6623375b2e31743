from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path
from typing import Annotated, Literal

import pytest

from gateway.cli import flag_for
from gateway.config import ENV_NAMES, ConfigError, Settings, load_settings, read_dotenv, settings_from_strings
from tests.servers import clean_env


def test_defaults() -> None:
    s = load_settings(environ={}, dotenv=None)
    assert s.backend_kind == "vllm"
    assert s.base_url == "http://127.0.0.1:8000/v1"
    assert (s.gateway_host, s.gateway_port, s.gateway_workers) == ("127.0.0.1", 4000, 1)
    assert s.gateway_read_timeout == 600 and s.gateway_total_timeout == 0
    assert s.gateway_max_body_bytes == 32 * 1024 * 1024
    assert s.gateway_pool_size >= 1000
    assert s.client_keys == ()


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("ollama", "http://127.0.0.1:11434/v1"),
        ("llamacpp", "http://127.0.0.1:8080/v1"),
        ("tgi", "http://127.0.0.1:3000/v1"),
        ("sglang", "http://127.0.0.1:30000/v1"),
        ("localai", "http://127.0.0.1:8080/v1"),
        ("lmstudio", "http://127.0.0.1:1234/v1"),
    ],
)
def test_default_url_per_kind(kind: str, url: str) -> None:
    assert settings_from_strings({"BACKEND_KIND": kind}).base_url == url


def test_dotenv_and_environment(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\n"
        "export BACKEND_KIND=ollama\n"
        "GATEWAY_PORT=5000\n"
        "API_KEYS='a, b ,,c'\n"
        'MODEL_NAME="llama 3" \n'
        "VLLM_DTYPE=half\n"  # not ours: ignored
        "GATEWAY_WORKERS=  # empty means default\n"
    )
    s = load_settings(environ={"GATEWAY_PORT": "6000", "UNRELATED": "x"}, dotenv=env_file)
    assert s.backend_kind == "ollama"
    assert s.gateway_port == 6000  # the real environment wins
    assert s.client_keys == ("a", "b", "c")
    assert s.model_name == "llama 3"
    assert s.gateway_workers == 1


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path / "nope.env") == {}


def test_bad_dotenv_line(tmp_path: Path) -> None:
    f = tmp_path / ".env"
    f.write_text("JUST SOME TEXT\n")
    with pytest.raises(ConfigError, match=r"\.env:1: expected KEY=VALUE"):
        read_dotenv(f)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"GATEWAY_PORT": "abc"}, "invalid GATEWAY_PORT='abc': expected an integer from 1 to 65535"),
        ({"GATEWAY_PORT": "70000"}, "invalid GATEWAY_PORT='70000'"),
        ({"GATEWAY_WORKERS": "0"}, "invalid GATEWAY_WORKERS='0'"),
        ({"GATEWAY_READ_TIMEOUT": "-1"}, "invalid GATEWAY_READ_TIMEOUT='-1': expected a number of seconds > 0"),
        ({"GATEWAY_TLS_VERIFY": "maybe"}, "invalid GATEWAY_TLS_VERIFY='maybe': expected true or false"),
        ({"BACKEND_KIND": "foo"}, "invalid BACKEND_KIND='foo': expected one of vllm"),
        ({"BACKEND_KIND": "openai"}, "BACKEND_BASE_URL must be set for BACKEND_KIND=openai"),
        ({"BACKEND_BASE_URL": "ftp://x/v1"}, "invalid BACKEND_BASE_URL='ftp://x/v1'"),
        ({"BACKEND_BASE_URL": "http://:80/v1"}, "invalid BACKEND_BASE_URL"),
        ({"BACKEND_BASE_URL": "http://h:99999/v1"}, "invalid BACKEND_BASE_URL"),
        ({"BACKEND_CAPABILITIES": "+flying"}, "invalid BACKEND_CAPABILITIES='+flying'"),
        ({"GATEWAY_LOG_LEVEL": "loud"}, "invalid GATEWAY_LOG_LEVEL='loud': expected one of debug"),
        ({"GATEWAY_CA_BUNDLE": "/nope.pem"}, "invalid GATEWAY_CA_BUNDLE='/nope.pem'"),
        ({"GATEWAY_MAX_BODY_BYTES": "12"}, "invalid GATEWAY_MAX_BODY_BYTES='12'"),
    ],
)
def test_bad_values_name_variable_value_and_accepted(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_strings(env)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


def _literal_settings() -> list[tuple[str, tuple[str, ...]]]:
    """(variable, accepted values) of every ``Settings`` field whose annotation is a ``Literal``."""
    hints = typing.get_type_hints(Settings, include_extras=True)
    found = []
    for name in Settings.__struct_fields__:
        hint = hints[name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        if typing.get_origin(base) is Literal:
            found.append((name.upper(), typing.get_args(base)))
    return found


LITERAL_SETTINGS = _literal_settings()


def test_the_literal_settings_are_found() -> None:
    assert {"GATEWAY_LOG_LEVEL", "GATEWAY_LOG_FORMAT"} <= {name for name, _ in LITERAL_SETTINGS}


@pytest.mark.parametrize(("env_name", "accepted"), LITERAL_SETTINGS, ids=[name for name, _ in LITERAL_SETTINGS])
def test_literal_settings_refuse_values_outside_them(env_name: str, accepted: tuple[str, ...]) -> None:
    """One line naming the variable, the value and every accepted value (e.g. GATEWAY_LOG_LEVEL=loud)."""
    for value in accepted:
        assert getattr(settings_from_strings({env_name: value}), env_name.lower()) == value
    assert "loud" not in accepted
    with pytest.raises(ConfigError) as info:
        settings_from_strings({env_name: "loud"})
    assert str(info.value) == f"invalid {env_name}='loud': expected one of {', '.join(accepted)}"


def test_secrets_redacted() -> None:
    s = settings_from_strings({"BACKEND_API_KEY": "sk-very-secret", "API_KEYS": "client-secret"})
    assert "sk-very-secret" not in repr(s) and "client-secret" not in str(s)
    assert "<redacted>" in repr(s)


def test_every_setting_has_a_flag_named_like_its_variable() -> None:
    assert set(ENV_NAMES) == {n.upper() for n in Settings.__struct_fields__}
    flags = {flag_for(n) for n in ENV_NAMES}
    assert len(flags) == len(ENV_NAMES)
    assert flag_for("GATEWAY_PORT") == "--port" and flag_for("BACKEND_KIND") == "--backend-kind"
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    ).stdout
    for env_name in ENV_NAMES:
        assert flag_for(env_name) in out and env_name in out


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--port", "nope"], {}, "invalid GATEWAY_PORT='nope'"),
        ([], {"GATEWAY_WORKERS": "many"}, "invalid GATEWAY_WORKERS='many'"),
        ([], {"BACKEND_KIND": "openai"}, "BACKEND_BASE_URL must be set"),
    ],
)
def test_cli_bad_value_exit_2_one_line(tmp_path: Path, args: list[str], env: dict[str, str], fragment: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        cwd=tmp_path,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_reads_dotenv_in_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GATEWAY_PORT=bad-from-dotenv\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=30,
    )
    assert proc.returncode == 2 and "bad-from-dotenv" in proc.stderr


def test_a_flag_replaces_a_bad_or_missing_environment_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import build_parser, settings_from_args

    monkeypatch.chdir(tmp_path)  # no developer .env
    monkeypatch.setenv("GATEWAY_PORT", "abc")
    monkeypatch.setenv("BACKEND_KIND", "openai")  # has no default URL: the flag supplies it
    monkeypatch.delenv("BACKEND_BASE_URL", raising=False)
    args = build_parser().parse_args(["serve", "--port", "5000", "--backend-base-url", "http://h:1/v1"])
    s = settings_from_args(args)
    assert s.gateway_port == 5000 and s.base_url == "http://h:1/v1" and s.backend_kind == "openai"
    with pytest.raises(ConfigError, match="GATEWAY_PORT"):
        settings_from_args(build_parser().parse_args(["serve"]))  # without the flag the bad value stands
