"""Bad input (issue #9): property-based tests of the request path, and a raw-socket pass through a
real Granian server for what only a server sees.

In process, the app is driven with hand-written receive/send in front of an in-memory backend that
parses every byte the gateway writes with h11 in the server role (as strict as a real server) and
keeps it. The property, for every input: a 4xx in the OpenAI shape and nothing forwarded, or a
forwarded request that is exactly what a correct proxy sends (method, target, headers, body); never
a 500, never an exception out of the app, never a new metric series per input.

Through Granian: malformed request heads (CR/LF/NUL in values, obs-fold, huge and numerous
headers, bad methods and versions, very long paths): Granian answers them itself (400, 414, 431,
with an empty body) before the app runs; whatever reaches the app is answered by it; nothing is
ever forwarded with a line break in it, and the worker never dies.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import h11
import httpcore
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import Gateway
from gateway.config import settings_from_strings
from gateway.netio import SocketOption
from tests import servers
from tests.asgi import Result, call
from tests.fakes import Conn, FakeBackend, Req
from tests.reliability import worker_pids
from tests.servers import StartGateway

CLIENT_KEY = "ck-fuzz-client-0123"
BACKEND_KEY = "sk-fuzz-backend-4567"
HOST = b"backend.test:8000"
#: What a correct proxy never forwards: hop-by-hop fields (RFC 9110 7.6.1), and the fields the
#: gateway sets itself or must not pass on (the client's credentials).
HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
}  # fmt: skip
GATEWAY_OWN = {b"host", b"content-length", b"authorization", b"x-api-key", b"x-request-id", b"expect"}
NO_BODY_METHODS = {"GET", "HEAD", "DELETE", "OPTIONS"}
_RID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
EXAMPLES: collections.Counter[str] = collections.Counter()
# The suite is a gate, so its examples are the same on every run; FUZZ_EXPLORE=1 draws new ones each run.
DERANDOMIZE = os.environ.get("FUZZ_EXPLORE") != "1"
FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
    derandomize=DERANDOMIZE,
)


# -- an in-memory backend that parses what it gets as strictly as a real server -------------------


@dataclass
class Seen:
    raw: bytes
    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    #: Set when h11 (server role) refused the bytes: the gateway sent something malformed.
    error: str | None = None


class MemoryStream(httpcore.AsyncNetworkStream):
    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 24)
        self._raw = bytearray()
        self._body = bytearray()
        self._request: h11.Request | None = None
        self._out = bytearray()
        self.closed = False

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self.closed:
            raise httpcore.WriteError("closed")
        if not buffer:  # h11 would take an empty read for the end of the connection
            return
        self._raw += buffer
        try:
            self._h11.receive_data(bytes(buffer))
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    self._request = event
                elif isinstance(event, h11.Data):
                    self._body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self._answer()
        except h11.RemoteProtocolError as exc:
            self._backend.seen.append(Seen(bytes(self._raw), error=str(exc)))
            self._out += b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"

    def _answer(self) -> None:
        req = self._request
        assert req is not None
        seen = Seen(bytes(self._raw), req.method, req.target, list(req.headers.raw_items()), bytes(self._body))
        self._backend.seen.append(seen)
        status, body = self._backend.respond(seen)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        self._out += self._h11.send(h11.Response(status_code=status, headers=headers))
        if body and req.method != b"HEAD":
            self._out += self._h11.send(h11.Data(data=body))
        self._out += self._h11.send(h11.EndOfMessage())
        try:
            self._h11.start_next_cycle()
        except h11.LocalProtocolError:  # e.g. a CONNECT answered 2xx: no next cycle on this one
            self.closed = True
        self._raw, self._body, self._request = bytearray(), bytearray(), None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        out = bytes(self._out[:max_bytes])
        del self._out[:max_bytes]
        return out  # b"" when nothing is left: a peer that closed

    async def aclose(self) -> None:
        self.closed = True

    async def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return self

    def get_extra_info(self, info: str) -> Any:
        return None


class MemoryBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.connections = 0

    def respond(self, seen: Seen) -> tuple[int, bytes]:
        if seen.target.endswith(b"/models"):
            return 200, b'{"object":"list","data":[{"id":"known-model","object":"model"}]}'
        return 200, b'{"ok":true}'

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connections += 1
        return MemoryStream(self)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[SocketOption] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets here")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass
class Harness:
    app: Gateway
    backend: MemoryBackend
    loop: asyncio.AbstractEventLoop

    def send(
        self, method: str, raw_path: bytes, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
        query: bytes = b"",
    ) -> tuple[Result, Seen | None]:  # fmt: skip
        """One request through the app; the request the backend got from it, if any."""
        before = len(self.backend.seen)
        path = unquote(raw_path.decode("latin-1"), errors="replace") if raw_path.isascii() else raw_path.decode()
        coro = call(self.app, method, path, body, headers or [], query, raw_path=raw_path)
        result = self.loop.run_until_complete(asyncio.wait_for(coro, 10))
        seen = self.backend.seen[before:]
        assert len(seen) <= 1, "one client request became several upstream"
        return result, (seen[0] if seen else None)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    backend = MemoryBackend()
    s = settings_from_strings(
        {
            "BACKEND_BASE_URL": f"http://{HOST.decode()}/v1",
            "BACKEND_API_KEY": BACKEND_KEY,
            "API_KEYS": CLIENT_KEY,
            "GATEWAY_ACCESS_LOG": "false",
            "GATEWAY_MAX_BODY_BYTES": "65536",
            "GATEWAY_LOG_LEVEL": "error",
        }
    )
    app = Gateway(s, network=backend)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(app.startup())
    loop.run_until_complete(asyncio.sleep(0.05))  # the model listing (the metrics' label bound)
    try:
        yield Harness(app, backend, loop)
    finally:
        loop.run_until_complete(app.shutdown())
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


@pytest.fixture(scope="module", autouse=True)
def _report_examples() -> Iterator[None]:
    yield
    if EXAMPLES:
        total = sum(EXAMPLES.values())
        print(
            f"\nRELIABILITY fuzz: {total} inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(EXAMPLES.items()))
        )


def auth() -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + CLIENT_KEY.encode())]


def assert_openai_error(r: Result, status: int) -> dict[str, Any]:
    assert r.status == status, (r.status, r.body[:300])
    assert r.finished
    obj = orjson.loads(r.body)
    assert set(obj) == {"error"} and set(obj["error"]) == {"message", "type", "param", "code"}, obj
    assert BACKEND_KEY not in r.body.decode() and CLIENT_KEY not in r.body.decode()
    return obj["error"]  # type: ignore[no-any-return]


def expected_headers(
    client: list[tuple[bytes, bytes]], rid: bytes, method: str, body_len: int
) -> list[tuple[bytes, bytes]]:
    """The header list a correct proxy sends for ``client``'s headers (in order)."""
    out = [(b"host", HOST), (b"authorization", b"Bearer " + BACKEND_KEY.encode())]
    out += [(n, v) for n, v in client if n not in HOP_BY_HOP and n not in GATEWAY_OWN]
    out.append((b"x-request-id", rid))
    if body_len or method not in NO_BODY_METHODS:
        out.append((b"content-length", str(body_len).encode()))
    return out


def assert_forwarded_exactly(
    r: Result, seen: Seen | None, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    assert seen is not None, (r.status, r.body[:300])
    assert seen.error is None, f"the gateway sent a malformed request: {seen.error}: {seen.raw[:300]!r}"
    assert r.status == 200 and r.body == (b"" if method == "HEAD" else b'{"ok":true}') and r.finished
    rid = r.header(b"x-request-id")
    assert rid is not None and _RID.fullmatch(rid)
    given_ids = [v for n, v in headers if n == b"x-request-id"]
    if given_ids and _RID.fullmatch(given_ids[-1]):  # the last one given, when valid
        assert rid == given_ids[-1]
    assert seen.method == method.encode()
    assert seen.target == target
    assert seen.headers == expected_headers(headers, rid, method, len(body))
    assert seen.body == body


# -- strategies --------------------------------------------------------------------------------------

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+.^_`|~-", min_size=1, max_size=20)
SPECIAL_NAMES = st.sampled_from(
    # A server validates Content-Length before the app runs; the gateway parses it (400/413).
    sorted(HOP_BY_HOP | GATEWAY_OWN - {b"authorization", b"content-length"})
    + [b"x-forwarded-for", b"forwarded", b"via", b"x-real-ip", b"cookie", b"user-agent", b"traceparent"]
)
#: Field values as a server hands them over: no CR, LF or NUL, no surrounding blanks; obs-text allowed.
_VCHAR = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in (0x80, 0xA0, 0xE9, 0xFF)]
VALUE = st.builds(
    lambda a, mid, b: (a + mid + b if mid else a).encode("latin-1"),
    st.sampled_from(_VCHAR),
    st.text(alphabet=[*_VCHAR, " ", "\t"], max_size=40),
    st.sampled_from(_VCHAR),
)
HEADER = st.tuples(st.one_of(TOKEN.map(str.encode), SPECIAL_NAMES), VALUE)
HEADERS = st.lists(HEADER, max_size=12)
REQUEST_ID = st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True), st.text(max_size=140)).map(
    lambda s: s.encode("utf-8")
)

INT64 = st.integers(-(2**63), 2**63 - 1)
JSON_LEAF = st.one_of(st.none(), st.booleans(), INT64, st.floats(allow_nan=False), st.text(max_size=20))
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
PEEKED = frozenset({"model", "stream", "tools"})
GOOD_BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.none(), st.text(max_size=60), st.sampled_from(["known-model", "other"])),
        "stream": st.one_of(st.none(), st.booleans()),
        "tools": JSON_VALUE,
        "messages": JSON_VALUE,
        "max_tokens": JSON_VALUE,
    },
).flatmap(
    # extra fields never use a peeked name: an extra "stream": [] would make the body invalid, not good
    lambda d: st.dictionaries(st.text(max_size=10).filter(lambda k: k not in PEEKED), JSON_VALUE, max_size=3).map(
        lambda extra: {**extra, **d}
    )
)
WRONG_TYPE_BODY = st.one_of(
    st.fixed_dictionaries(
        {"model": st.one_of(INT64, st.booleans(), st.lists(JSON_LEAF), st.dictionaries(st.text(), JSON_LEAF))}
    ),
    st.fixed_dictionaries({"stream": st.one_of(INT64, st.text(), st.lists(JSON_LEAF))}),
    st.one_of(st.lists(JSON_VALUE), JSON_LEAF),  # not an object
)
JSON_ROUTES = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])


# -- JSON bodies ----------------------------------------------------------------------------------------


@pytest.mark.slow
@FUZZ
@given(route=JSON_ROUTES, obj=GOOD_BODY, indent=st.booleans())
def test_valid_bodies_are_forwarded_unchanged(harness: Harness, route: str, obj: dict[str, Any], indent: bool) -> None:
    EXAMPLES["valid JSON bodies"] += 1
    body = orjson.dumps(obj, option=orjson.OPT_INDENT_2 if indent else None)
    r, seen = harness.send("POST", route.encode(), body, auth())
    assert_forwarded_exactly(r, seen, "POST", route.encode(), auth(), body)


@FUZZ
@given(route=JSON_ROUTES, obj=WRONG_TYPE_BODY)
def test_wrong_types_are_400(harness: Harness, route: str, obj: Any) -> None:
    EXAMPLES["wrong-type bodies"] += 1
    r, seen = harness.send("POST", route.encode(), orjson.dumps(obj), auth())
    assert seen is None
    assert assert_openai_error(r, 400)["type"] == "invalid_request_error"


def _overwrite(body: bytes) -> st.SearchStrategy[bytes]:
    """``body`` with a few bytes overwritten somewhere (invalid UTF-8, cut strings, broken syntax)."""
    return st.tuples(st.integers(0, len(body)), st.binary(max_size=4)).map(
        lambda t: body[: t[0]] + t[1] + body[t[0] + len(t[1]) :]
    )


@pytest.mark.slow
@FUZZ
@given(route=JSON_ROUTES, body=st.one_of(st.binary(max_size=300), GOOD_BODY.map(orjson.dumps).flatmap(_overwrite)))
def test_arbitrary_bytes_are_400_or_forwarded_unchanged(harness: Harness, route: str, body: bytes) -> None:
    """Random bytes, and valid bodies with a few bytes overwritten (invalid UTF-8, cut strings...)."""
    EXAMPLES["arbitrary body bytes"] += 1
    r, seen = harness.send("POST", route.encode(), body, auth())
    if seen is None:
        assert_openai_error(r, 400)
    else:
        assert_forwarded_exactly(r, seen, "POST", route.encode(), auth(), body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"tools":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"x":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}",
        b'{"model":"\xff\xfe"}',
        b'{"model":"caf\xc3"}',
        b'{"model":"\\ud800"}',
        b"\xef\xbb\xbf{}",
    ],
    ids=["deep-array", "deep-tools", "deep-object", "invalid-utf8-model", "cut-utf8-model", "lone-surrogate", "bom"],
)
def test_deep_nesting_and_invalid_utf8(harness: Harness, body: bytes) -> None:
    EXAMPLES["nesting and UTF-8 cases"] += 1
    r, seen = harness.send("POST", b"/v1/chat/completions", body, auth())
    if seen is None:
        assert_openai_error(r, 400)
    else:
        assert_forwarded_exactly(r, seen, "POST", b"/v1/chat/completions", auth(), body)


def test_model_filled_in_only_when_missing(harness: Harness) -> None:
    env = {
        "BACKEND_BASE_URL": f"http://{HOST.decode()}/v1",
        "BACKEND_API_KEY": BACKEND_KEY,
        "API_KEYS": CLIENT_KEY,
        "GATEWAY_ACCESS_LOG": "false",
        "GATEWAY_METRICS": "false",
        "MODEL_NAME": "known-model",
        "GATEWAY_LOG_LEVEL": "error",
    }
    filled = Gateway(settings_from_strings(env), network=harness.backend)

    async def go() -> tuple[Result, Result]:
        await filled.startup()
        try:
            a = await call(filled, "POST", "/v1/chat/completions", b'{"model": null, "x": [1, {"y": 2}]}', auth())
            b = await call(filled, "POST", "/v1/chat/completions", b'{"model":"mine"}', auth())
            return a, b
        finally:
            await filled.shutdown()

    a, b = harness.loop.run_until_complete(go())
    assert a.status == b.status == 200
    assert orjson.loads(harness.backend.seen[-2].body) == {"model": "known-model", "x": [1, {"y": 2}]}
    assert harness.backend.seen[-1].body == b'{"model":"mine"}'


# -- headers ------------------------------------------------------------------------------------------


@pytest.mark.slow
@FUZZ
@given(
    headers=HEADERS,
    rid=st.one_of(st.none(), REQUEST_ID),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    body=st.binary(max_size=64),
)
def test_headers_forwarded_as_a_correct_proxy_does(
    harness: Harness, headers: list[tuple[bytes, bytes]], rid: bytes | None, method: str, body: bytes
) -> None:
    EXAMPLES["header sets"] += 1
    # Connection options that name other fields are tested on their own (see below); a second
    # Authorization is a 401 (tested below), and so is an x-api-key with another key or a second one
    # (tests/test_surfaces.py): a generated x-api-key becomes one carrying the client's own key, which
    # is accepted and, like Authorization, never forwarded.
    api_key = any(n == b"x-api-key" for n, _ in headers)
    headers = [
        (n, v) for n, v in headers if n not in (b"connection", b"authorization", b"content-length", b"x-api-key")
    ]
    if api_key:
        headers.append((b"x-api-key", CLIENT_KEY.encode()))
    sent = [*auth(), *headers, *([(b"x-request-id", rid)] if rid is not None else [])]
    r, seen = harness.send(method, b"/v1/files/abc", body, sent)
    assert_forwarded_exactly(r, seen, method, b"/v1/files/abc", sent, body)


def test_connection_options_are_removed(harness: Harness) -> None:
    """Fields the client's Connection header names are hop-by-hop (RFC 9110 7.6.1). (Found by this
    campaign: they were forwarded.)"""
    sent = [*auth(), (b"connection", b"keep-alive, x-hop-secret"), (b"x-hop-secret", b"for the next hop only")]
    r, seen = harness.send("GET", b"/v1/models", b"", sent)
    assert r.status == 200 and seen is not None
    assert b"x-hop-secret" not in [n for n, _ in seen.headers]


@FUZZ
@given(
    values=st.lists(
        st.one_of(
            st.just(b"Bearer " + CLIENT_KEY.encode()),
            st.just(b"bearer " + CLIENT_KEY.encode()),
            st.just(CLIENT_KEY.encode()),
            st.just(b"Basic " + CLIENT_KEY.encode()),
            st.binary(max_size=40).map(lambda b: b"Bearer " + b),
            st.integers(1, 200_000).map(lambda n: b"Bearer " + b"k" * n),  # oversized
            VALUE,
        ),
        max_size=3,
    )
)
def test_authorization_needs_exactly_one_valid_key(harness: Harness, values: list[bytes]) -> None:
    EXAMPLES["Authorization headers"] += 1
    headers = [(b"authorization", v) for v in values]
    r, seen = harness.send("GET", b"/v1/models", b"", headers)
    valid = len(values) == 1 and values[0][:7].lower() == b"bearer " and values[0][7:].strip() == CLIENT_KEY.encode()
    if valid:
        assert r.status == 200 and seen is not None
        assert (b"authorization", b"Bearer " + BACKEND_KEY.encode()) in seen.headers
    else:
        assert seen is None
        assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        assert r.header(b"www-authenticate") == b"Bearer"


@pytest.mark.slow
@FUZZ
@given(
    where=st.sampled_from(["value", "query", "path"]),
    payload=st.sampled_from(
        [b"\r\nx-injected: 1", b"\nx-injected: 1", b"\r", b"\x00", b"\r\n\r\nGET /smuggled HTTP/1.1"]
    ),
    prefix=VALUE,
)
def test_line_breaks_never_reach_the_backend(harness: Harness, where: str, payload: bytes, prefix: bytes) -> None:
    """A server never hands the app such bytes (Granian refuses them: see the raw-socket pass), but
    the app must not pass them on if one did."""
    EXAMPLES["CR/LF/NUL injections (in process)"] += 1
    headers, path, query = auth(), b"/v1/models", b""
    if where == "value":
        headers = [*headers, (b"x-note", prefix + payload)]
    elif where == "query":
        query = b"q=" + payload
    else:
        path = b"/v1/models" + payload
    r, seen = harness.send("GET", path, b"", headers, query)
    assert r.status < 500, r.body
    assert seen is None or seen.error is None
    assert not any(s.target.endswith(b"/smuggled") or b"x-injected" in s.raw for s in harness.backend.seen)
    if seen is None:
        assert_openai_error(r, r.status)
    r, seen = harness.send("GET", b"/v1/models", b"", auth())  # the pool is not poisoned
    assert r.status == 200 and seen is not None and seen.error is None


# -- paths and methods ------------------------------------------------------------------------------

SEGMENT = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~:@!$&'()*+,;=", max_size=12),
    st.sampled_from([".", "..", "%2e", "%2E%2e", ".%2e", "%2F", "a%2Fb", "%2f..%2f", "%00", "%ff", "%C3%A9", "", "v1"]),
)
RAW_PATH = st.tuples(
    st.sampled_from(["/v1/", "/v1", "/", "//v1/", "/v2/", "/V1/", "/v1/chat/", "/health/", "/v1/%2e/"]),
    st.lists(SEGMENT, max_size=6),
).map(lambda t: (t[0] + "/".join(t[1])).encode())
METHOD = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "get", "M-SEARCH"]),
    TOKEN.map(str.upper),
)


@pytest.mark.slow
@FUZZ
@given(raw_path=RAW_PATH, method=METHOD, query=st.text(alphabet="abc=&%20._-", max_size=20).map(str.encode))
def test_paths_never_escape_v1(harness: Harness, raw_path: bytes, method: str, query: bytes) -> None:
    EXAMPLES["paths and methods"] += 1
    if method in ("CONNECT", "TRACE"):
        return  # their own test below
    path = unquote(raw_path.decode(), errors="replace")
    r, seen = harness.send(method, raw_path, b"", auth(), query)
    segments = path.split("/")
    if path in ("/health", "/ready", "/metrics"):
        assert seen is None and r.status in (200, 405)
        return
    if not path.startswith("/v1/") or "." in segments or ".." in segments:
        assert seen is None  # nothing outside /v1, no dot segment, ever goes upstream
        assert_openai_error(r, 404)
        return
    if seen is None:  # a known route with a method it does not take, or an empty JSON body
        assert r.status in (400, 405)
        assert_openai_error(r, r.status)
        return
    if raw_path.startswith(b"/v1/"):  # the client's bytes, unchanged
        target = raw_path + (b"?" + query if query else b"")
        assert_forwarded_exactly(r, seen, method, target, auth(), b"")
    else:  # an encoded prefix: the path the gateway routed, re-encoded
        upstream_path, _, upstream_query = seen.target.partition(b"?")
        assert upstream_path.startswith(b"/v1/") and upstream_query == query
        assert unquote(upstream_path.decode(), errors="replace") == path
        assert_forwarded_exactly(r, seen, method, seen.target, auth(), b"")


def test_encoded_v1_prefix_is_not_garbled(harness: Harness) -> None:
    """Routed by its decoded form, a path must not go upstream cut at the wrong place. (Found by
    this campaign: /%76%31/models went out as /v16%31/models.)"""
    r, seen = harness.send("GET", b"/%76%31/models", b"", auth())
    if seen is not None:
        assert seen.target == b"/v1/models"
    else:
        assert_openai_error(r, 404)


def test_trace_is_refused(harness: Harness) -> None:
    """A backend that echoes TRACE (its purpose) would hand the client the backend's key. (Found by
    this campaign: TRACE was forwarded.)"""
    r, seen = harness.send("TRACE", b"/v1/anything", b"", auth())
    assert seen is None
    assert_openai_error(r, 405)


def test_model_label_stays_bounded(harness: Harness) -> None:
    """After every input above (thousands of model names among them): a handful of series."""
    names = [f"junk-{i}-{'x' * (i % 50)}" for i in range(500)]
    for name in names:
        harness.send("POST", b"/v1/chat/completions", orjson.dumps({"model": name}), auth())
    assert harness.app.metrics is not None
    text = harness.app.metrics.exposition()[0].decode()
    models = set(re.findall(r'model="([^"]*)"', text))
    assert models <= {"none", "other", "known-model"}, models
    series = [ln for ln in text.splitlines() if ln.startswith("gateway_requests_total{")]
    assert len(series) < 60, len(series)
    assert BACKEND_KEY not in text and CLIENT_KEY not in text
    EXAMPLES["model names"] += len(names)


# -- through a real Granian server ----------------------------------------------------------------------


class Served:
    """``gateway serve`` in front of a backend that echoes what it got (its own key left out).
    A plain class: hypothesis prints it in one line when a case fails."""

    def __init__(self, gateway: servers.Gateway, backend: FakeBackend) -> None:
        self.gateway = gateway
        self.backend = backend
        self.port = gateway.port


@pytest.fixture(scope="module")
def served(module_tmp: Path) -> Iterator[Served]:
    async def echo(req: Req, conn: Conn) -> None:
        headers = [(k, "<the backend's key>" if k.lower() == "authorization" else v) for k, v in req.headers]
        body = orjson.dumps({"method": req.method, "target": req.target, "headers": headers})
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        await conn.send(head if req.method == "HEAD" else head + body)  # a HEAD answer has no body

    with FakeBackend(handler=echo) as fb:
        g = servers.Gateway(
            module_tmp, BACKEND_BASE_URL=fb.url, BACKEND_API_KEY=BACKEND_KEY, GATEWAY_ACCESS_LOG="false"
        )
        g.start()
        try:
            yield Served(g, fb)
        finally:
            assert g.stop() == 0
        assert BACKEND_KEY not in g.output()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send raw bytes, read until the server closes (or the answer is whole): (status, bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # a server may close before reading everything: its answer is still there
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
                head, sep, rest = got.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                if sep and length and len(rest) >= int(length.group(1)):
                    break
        except ConnectionResetError:
            pass
    status = re.match(rb"HTTP/1\.[01] (\d{3}) ", got)
    return (int(status.group(1)) if status else 0), got


LINE = st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00", b"", b" ", b"\t"])
RAW_HEADER = st.tuples(
    st.one_of(TOKEN.map(str.encode), st.sampled_from([b"x y", b"x:y", b"", b" x", b"x\x00", b"\xff"])),
    st.one_of(VALUE, st.binary(max_size=30)),
    LINE,
).map(lambda t: t[0] + b": " + t[1] + t[2] + b"\r\n")
RAW_METHOD = st.one_of(
    METHOD.map(str.encode), st.sampled_from([b"", b"G ET", b"GET\x00", b"\xff", b"TRACE", b"CONNECT"])
)
RAW_TARGET = st.one_of(
    RAW_PATH,
    st.sampled_from([b"*", b"http://evil.test/v1/models", b"evil.test:443", b"v1/models", b"/v1/\xff", b"/v1/a b"]),
    st.sampled_from([b"/v1/LONG", b"LONG"]),  # a target of ``long`` bytes, built in the test
)
RAW_VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b"", b"http/1.1"])


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=DERANDOMIZE,
)
@given(
    method=RAW_METHOD,
    target=RAW_TARGET,
    version=RAW_VERSION,
    headers=st.lists(RAW_HEADER, max_size=6),
    many=st.sampled_from([0, 0, 0, 99, 101, 150]),
    huge=st.sampled_from([0, 0, 0, 64 * 1024, 300 * 1024, 600 * 1024]),
    long=st.sampled_from([1000, 8000, 60_000, 65_534, 65_535, 70_000]),
)
def test_malformed_heads_through_granian(
    served: Served, method: bytes, target: bytes, version: bytes,
    headers: list[bytes], many: int, huge: int, long: int,
) -> None:  # fmt: skip
    EXAMPLES["raw request heads through Granian"] += 1
    target = target.replace(b"LONG", b"p" * long)
    echo_backend = served.backend
    before = len(echo_backend.requests)
    extra = b"".join(b"x-n%d: v\r\n" % i for i in range(many)) + (b"x-huge: " + b"h" * huge + b"\r\n" if huge else b"")
    head = method + b" " + target + b" " + version + b"\r\nhost: gw\r\nconnection: close\r\n" + b"".join(headers)
    status, got = raw_exchange(served.port, head + extra + b"\r\n")
    assert status != 0 or got == b"", got[:200]  # an HTTP answer, or a closed connection
    assert status < 500, got[:300]
    body = got.partition(b"\r\n\r\n")[2]
    if status >= 400 and body:  # the app answered: the OpenAI shape (Granian's own have no body)
        assert orjson.loads(body)["error"]["message"]
    for req in echo_backend.requests[before:]:
        for name, value in req.headers:
            assert "\r" not in value and "\n" not in value and "\x00" not in value, (name, value, head[:300])
            assert name.lower() != "authorization" or value == f"Bearer {BACKEND_KEY}"
        assert "\r" not in req.target and "\n" not in req.target
    assert BACKEND_KEY.encode() not in got
    new = echo_backend.requests[before:]
    assert len(new) <= 1, ([(r.method, r.target[:60], r.headers[2:]) for r in new], head[:300], got[:300])


def test_granian_limits_on_heads(served: Served) -> None:
    """The bounds Granian 2.8 enforces before the app runs (all answered with an empty body and
    ``connection: close``): the head's size (GATEWAY_CLIENT_MAX_HEADER_BYTES, 64 KiB, plus whatever
    the read that crossed it brought in), the number of fields, the target's length, and the bytes
    allowed in a field value."""
    port, echo_backend = served.port, served.backend
    base = b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n"
    cases = {
        "head of 600 KiB": (base + b"x-big: " + b"a" * (600 * 1024) + b"\r\n\r\n", 431),
        "head of 300 KiB": (base + b"x-big: " + b"a" * (300 * 1024) + b"\r\n\r\n", 431),
        "head of 128 KiB": (base + b"x-big: " + b"a" * (128 * 1024) + b"\r\n\r\n", 431),
        "101 fields": (base + b"".join(b"x-%d: v\r\n" % i for i in range(100)) + b"\r\n", 431),
        "absurd Content-Length": (b"POST /v1/x HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n", 400),
        "target of 65535 bytes": (b"GET /v1/" + b"p" * 65_531 + b" HTTP/1.1\r\nhost: gw\r\n\r\n", 414),
        "CR in a value": (base + b"x-a: 1\r2\r\n\r\n", 400),
        "NUL in a value": (base + b"x-a: 1\x002\r\n\r\n", 400),
        "obs-fold": (base + b"x-a: 1\r\n 2\r\n\r\n", 400),
        "bad method": (b"G(T /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n", 400),
        "two Content-Lengths": (b"POST /v1/x HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n{}", 400),
        "raw non-ASCII in the target": (b"GET /v1/\xff HTTP/1.1\r\nhost: gw\r\n\r\n", 400),
    }
    # CONNECT's authority-form target reaches the app as an empty path: 404, never forwarded.
    status, got = raw_exchange(port, b"CONNECT evil.test:443 HTTP/1.1\r\nhost: evil.test:443\r\n\r\n")
    assert status == 404
    before = len(echo_backend.requests)
    for name, (raw, want) in cases.items():
        status, got = raw_exchange(port, raw)
        assert status == want, (name, got[:200])
        assert got.endswith(b"\r\n\r\n") and b"content-length: 0" in got.lower(), (name, got[:200])
    assert len(echo_backend.requests) == before
    # Just inside the bounds, the request reaches the app and is forwarded.
    inside = {
        "head of 63 KiB": base + b"x-big: " + b"a" * (63 * 1024) + b"\r\n\r\n",
        "100 fields": base + b"".join(b"x-%d: v\r\n" % i for i in range(99)) + b"\r\n",
        "target of 65534 bytes": b"GET /v1/" + b"p" * 65_530 + b" HTTP/1.1\r\nhost: gw\r\n\r\n",
    }
    for name, raw in inside.items():
        status, got = raw_exchange(port, raw)
        assert status == 200, (name, got[:200])
    # A bare LF ends a field line (RFC 9112 2.2 lets a recipient accept it): the "injected" line is
    # a field of the client's own request, forwarded as such, never a new request line.
    status, got = raw_exchange(port, base + b"x-a: 1\nx-second: 2\r\n\r\n")
    assert status == 200
    echoed = dict((k.lower(), v) for k, v in orjson.loads(got.split(b"\r\n\r\n", 1)[1])["headers"])
    assert echoed["x-a"] == "1" and echoed["x-second"] == "2"
    assert served.gateway.proc is not None and len(worker_pids(served.gateway.proc.pid)) == 1


def test_worker_survived_the_fuzz(served: Served) -> None:
    start = time.monotonic()
    status, _ = raw_exchange(served.port, b"GET /health HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
    assert status == 200 and time.monotonic() - start < 1


# -- security: keys ------------------------------------------------------------------------------------


def test_client_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever is presented (a valid key, the first or the last one, a wrong key of any length),
    the same work is done: one SHA-256, then one ``hmac.compare_digest`` of two 32-byte digests per
    configured key, with no early exit."""
    from gateway import auth

    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    ring = auth.KeyRing(["key-one", "key-two", "key-three"])
    presented = [
        b"Bearer key-one",
        b"Bearer key-three",
        b"Bearer key-thref",
        b"Bearer x",
        b"Bearer " + b"k" * 1_000_000,
    ]
    counts = []
    for value in presented:
        calls.clear()
        ring.identify(value)
        counts.append(len(calls))
        assert set(calls) == {(32, 32)}
    assert counts == [3] * len(presented)


@pytest.fixture
def leaky_backend() -> Iterator[FakeBackend]:
    """A backend that fails in every way on request, and says 'loading' on /health when asked."""

    async def handler(req: Req, conn: Conn) -> None:
        how = req.header("x-fail") or ""
        if req.target.endswith("/health"):
            await conn.json(503 if LOADING else 200, {"status": "loading" if LOADING else "ok"})
        elif how == "reset":
            conn.reset()
        elif how == "stall":
            await asyncio.sleep(30)
        elif how == "cut-stream":
            await conn.start_chunked()
            await conn.chunk(b'data: {"a":1}\n\n')
            await asyncio.sleep(0.05)
            conn.reset()
        else:
            await conn.json(200, {"ok": True})

    with FakeBackend(handler=handler) as fb:
        yield fb


LOADING = False


def test_keys_never_reach_clients_or_logs(start_gateway: StartGateway, leaky_backend: FakeBackend) -> None:
    """Every kind of answer (success, each gateway error, each upstream failure, /ready in every
    state, /metrics) is free of both keys, and the log holds no key, not even a wrong one tried."""
    global LOADING
    wrong = ["sk-attempt-" + "9" * 20, BACKEND_KEY, CLIENT_KEY[:-1], CLIENT_KEY + "x"]
    g = start_gateway(
        BACKEND_BASE_URL=leaky_backend.url,
        BACKEND_API_KEY=BACKEND_KEY,
        API_KEYS=CLIENT_KEY,
        GATEWAY_READ_TIMEOUT="0.5",
        GATEWAY_MAX_BODY_BYTES="2048",
    ).start()
    key = {"authorization": f"Bearer {CLIENT_KEY}"}
    exchanges = [
        ("POST", "/v1/chat/completions", b"{}", key),
        ("GET", "/v1/models", b"", {"x-fail": "reset", **key}),  # 502
        ("POST", "/v1/chat/completions", b"{}", {"x-fail": "stall", **key}),  # 504
        ("POST", "/v1/chat/completions", b"{}", {"x-fail": "cut-stream", **key}),  # error event
        ("POST", "/v1/chat/completions", b"{bad", key),  # 400
        ("POST", "/v1/chat/completions", b"x" * 4096, key),  # 413
        ("GET", "/v1/chat/completions", b"", key),  # 405
        ("GET", "/nope", b"", key),  # 404
        ("GET", "/metrics", b"", {}),
        ("GET", "/ready", b"", {}),
        *[("GET", "/v1/models", b"", {"authorization": f"Bearer {w}"}) for w in wrong],  # 401
        ("GET", "/v1/models", b"", {"authorization": f"Basic {CLIENT_KEY}"}),
        ("GET", "/v1/models", b"", {"x-api-key": CLIENT_KEY}),
    ]
    seen_statuses = set()
    for method, path, body, headers in exchanges:
        raw = method.encode() + b" " + path.encode() + b" HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
        raw += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        raw += b"content-length: %d\r\n\r\n" % len(body) + body if body or method == "POST" else b"\r\n"
        status, got = raw_exchange(g.port, raw)
        seen_statuses.add(status)
        assert BACKEND_KEY.encode() not in got and CLIENT_KEY.encode() not in got, (path, got[:300])
    LOADING = True
    try:
        status, got = raw_exchange(g.port, b"GET /ready HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
        assert status == 503 and b'"loading"' in got and BACKEND_KEY.encode() not in got
    finally:
        LOADING = False
    assert {200, 400, 401, 404, 405, 413, 502, 504} <= seen_statuses, seen_statuses
    assert g.stop() == 0
    log = g.output()
    for secret in (BACKEND_KEY, CLIENT_KEY, *wrong):
        assert secret not in log, secret


def test_backend_key_that_cannot_be_a_header_is_refused_at_start(tmp_path: Path) -> None:
    """A key with a line break inside (a secret file pasted whole) would make every request fail
    with an error quoting the header, key included, to clients and in /ready: start-up refuses it,
    without printing it."""
    import subprocess
    import sys

    from tests.servers import clean_env

    secret = "sk-first-line\nsk-second-line"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=clean_env(BACKEND_API_KEY=secret, GATEWAY_PORT="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "BACKEND_API_KEY" in proc.stderr and "sk-first-line" not in proc.stderr + proc.stdout
