"""Per-key limits: ``GATEWAY_KEYS_FILE=keys.toml`` declares client keys with requests and tokens
per minute, enforced here in process (one fixed one-minute window per key; the whole allowance may
be used at once).

Keys are held only as SHA-256 digests. A bad file stops start-up with one line (exit 2).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from gateway.config import ConfigError, Spec
from gateway.errors import GatewayError

log = logging.getLogger("gateway")

PerMinute = Annotated[int, Meta(ge=1, le=1_000_000_000)]
_HEX64 = re.compile(r"[0-9a-f]{64}")


class KeySpec(Spec, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    key_env: str = ""
    key_sha256: str = ""
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None


class KeysSpec(Spec, frozen=True):
    keys: Annotated[list[KeySpec], Meta(min_length=1)]


class KeyLimits(msgspec.Struct, frozen=True):
    """One declared key: its name (shown instead of the key) and limits."""

    name: str
    rpm: int | None
    tpm: int | None


def load_keys(path: str, environ: Mapping[str, str] | None = None) -> dict[bytes, KeyLimits]:
    """SHA-256 digest -> limits, from a keys file."""
    env = os.environ if environ is None else environ
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"GATEWAY_KEYS_FILE={path!r}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as TOML: {exc}") from None
    try:
        spec = msgspec.convert(data, KeysSpec)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        where = msg.rsplit(" - at `$.", 1)[1].rstrip("`") if " - at `$." in msg else "the file"
        raise ConfigError(f"{path}: {where}: {msg.split(' - at ')[0]}") from None
    out: dict[bytes, KeyLimits] = {}
    names: set[str] = set()
    for i, k in enumerate(spec.keys):
        at = f"keys[{i}]"
        if k.name in names:
            raise ConfigError(f"{path}: {at}.name = {k.name!r}: expected a name no other key has")
        names.add(k.name)
        if bool(k.key_env) == bool(k.key_sha256):
            raise ConfigError(f"{path}: {at}: expected exactly one of key_env or key_sha256")
        if k.key_env:
            value = env.get(k.key_env, "")
            if not value:
                raise ConfigError(f"{path}: {at}.key_env = {k.key_env!r}: expected a variable that holds the key")
            digest = hashlib.sha256(value.encode()).digest()
        else:
            if not _HEX64.fullmatch(k.key_sha256):
                raise ConfigError(f"{path}: {at}.key_sha256 = {k.key_sha256!r}: expected 64 lowercase hex digits")
            digest = bytes.fromhex(k.key_sha256)
        if digest in out:
            raise ConfigError(f"{path}: {at}: the same key as {out[digest].name!r}")
        out[digest] = KeyLimits(k.name, k.rpm, k.tpm)
    return out


class Limiter:
    """Fixed one-minute windows per key name: requests counted at admission, tokens at the end."""

    __slots__ = ("_window", "_requests", "_tokens", "_clock")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._window = -1
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def _roll(self) -> tuple[int, float]:
        now = self._clock()
        window = int(now // 60)
        if window != self._window:
            self._window = window
            self._requests.clear()
            self._tokens.clear()
        return window, now

    def admit(self, limits: KeyLimits) -> list[tuple[bytes, bytes]]:
        """Count one request, or raise 429; returns the ``x-ratelimit-*`` headers to send."""
        window, now = self._roll()
        used_requests = self._requests.get(limits.name, 0)
        used_tokens = self._tokens.get(limits.name, 0)
        ok = not (
            (limits.rpm is not None and used_requests >= limits.rpm)
            or (limits.tpm is not None and used_tokens >= limits.tpm)
        )
        headers = _decide(limits, used_requests, used_tokens, ok, window, now)
        self._requests[limits.name] = used_requests + 1
        return headers

    def spend(self, limits: KeyLimits, tokens: int) -> None:
        """Count the tokens a finished request used (from usage, or the estimate)."""
        if limits.tpm is not None and tokens > 0:
            self._roll()
            self._tokens[limits.name] = self._tokens.get(limits.name, 0) + tokens


#: One round trip per request: refuse when over a limit, else count the request. Tokens are
#: counted by ``spend`` after the request. Keys expire with their minute.
_ADMIT = """
local r = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(redis.call('GET', KEYS[2]) or '0')
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
if (rpm > 0 and r >= rpm) or (tpm > 0 and t >= tpm) then
  return {r, t, 0}
end
r = redis.call('INCR', KEYS[1])
if r == 1 then redis.call('EXPIRE', KEYS[1], 61) end
return {r - 1, t, 1}
"""
_SPEND = """
local t = redis.call('INCRBY', KEYS[1], ARGV[1])
if t == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], 61) end
return t
"""


class SharedLimiter:
    """The same limits, shared by every worker and replica through Redis (``REDIS_URL``).

    If Redis cannot be reached, requests are limited by the local ``Limiter`` instead (logged
    once per outage, counted in ``failures``), or refused with 503 when ``fail_closed``.
    """

    def __init__(
        self, url: str, *, fail_closed: bool, local: Limiter | None = None, on_failure: Callable[[], None] | None = None
    ) -> None:
        import redis.asyncio as aioredis

        self._on_failure = on_failure
        self._redis = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._admit = self._redis.register_script(_ADMIT)
        self._spend = self._redis.register_script(_SPEND)
        self.local = local or Limiter()
        self.fail_closed = fail_closed
        self.failures = 0
        self._down = False
        self._pending: set[object] = set()

    async def admit(self, limits: KeyLimits) -> list[tuple[bytes, bytes]]:
        import redis.exceptions

        now = time.time()
        window = int(now // 60)
        prefix = f"gateway:limits:{limits.name}:{window}"
        try:
            used_requests, used_tokens, ok = await self._admit(
                keys=[prefix + ":r", prefix + ":t"], args=[limits.rpm or 0, limits.tpm or 0]
            )
        except (redis.exceptions.RedisError, OSError) as exc:
            return self._unavailable(limits, exc)
        if self._down:
            self._down = False
            log.warning("the limits' Redis is reachable again")
        return _decide(limits, int(used_requests), int(used_tokens), bool(ok), window, now)

    def _unavailable(self, limits: KeyLimits, exc: BaseException) -> list[tuple[bytes, bytes]]:
        self.failures += 1
        if self._on_failure is not None:
            self._on_failure()
        if not self._down:
            self._down = True
            log.warning(
                "the limits' Redis is unreachable (%s): %s", exc, "refusing" if self.fail_closed else "limiting locally"
            )
        if self.fail_closed:
            raise GatewayError(
                503,
                "api_error",
                "limits_unavailable",
                "Rate limits cannot be checked right now; retry shortly.",
                headers=[(b"retry-after", b"1")],
            )
        return self.local.admit(limits)

    def spend(self, limits: KeyLimits, tokens: int) -> None:
        if limits.tpm is None or tokens <= 0:
            return
        self.local.spend(limits, tokens)
        import asyncio

        window = int(time.time() // 60)
        task = asyncio.get_running_loop().create_task(
            self._spend_remote(f"gateway:limits:{limits.name}:{window}:t", tokens)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _spend_remote(self, key: str, tokens: int) -> None:
        import redis.exceptions

        try:
            await self._spend(keys=[key], args=[tokens])
        except (redis.exceptions.RedisError, OSError):
            self.failures += 1

    async def aclose(self) -> None:
        await self._redis.aclose()


def _decide(
    limits: KeyLimits, used_requests: int, used_tokens: int, ok: bool, window: int, now: float
) -> list[tuple[bytes, bytes]]:
    reset = max(1, int((window + 1) * 60 - now + 0.999))
    headers: list[tuple[bytes, bytes]] = []
    if limits.rpm is not None:
        headers += [
            (b"x-ratelimit-limit-requests", str(limits.rpm).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, limits.rpm - used_requests - 1)).encode()),
            (b"x-ratelimit-reset-requests", f"{reset}s".encode()),
        ]
    if limits.tpm is not None:
        headers += [
            (b"x-ratelimit-limit-tokens", str(limits.tpm).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, limits.tpm - used_tokens)).encode()),
            (b"x-ratelimit-reset-tokens", f"{reset}s".encode()),
        ]
    if not ok:
        what = "requests" if limits.rpm is not None and used_requests >= limits.rpm else "tokens"
        raise GatewayError(
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
            f"Rate limit of {what} per minute reached for key {limits.name!r}; retry in {reset} s.",
            headers=[(b"retry-after", str(reset).encode()), *headers],
        )
    return headers
