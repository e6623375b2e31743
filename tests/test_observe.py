"""Metrics across workers, access log lines, request ids; no key ever in logs or metrics."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway import observe
from gateway.observe import LATENCY_BUCKETS, AccessLog, Metrics, exchange_usage, find_usage, request_id
from tests.conftest import GatewayProc, free_port
from tests.conftest import http_request as req
from tests.fakes import Conn, FakeBackend, Req, default_handler, sse_events

CLIENT_KEY = "client-secret-key-123"
BACKEND_KEY = "backend-secret-key-456"


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return 0.0


def scrape_when(g: GatewayProc, name: str, value: float, **labels: str) -> str:
    """Scrape until one series shows ``value``: a request's metrics are recorded just after its
    response went out and written out by its worker within a second (``observe.FLUSH_INTERVAL``),
    possibly another worker than the one answering the scrape."""
    return scrape_until(g, [(name, value, labels)])


def scrape_until(g: GatewayProc, expected: list[tuple[str, float, dict[str, str]]]) -> str:
    """Scrape until every (name, value, labels) series holds, or 5 s passed."""
    deadline = time.monotonic() + 5
    while True:
        text = req(g, "GET", "/metrics")[2].decode()
        if all(metric(text, n, **lb) == v for n, v, lb in expected) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def series_count(text: str, name: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(name + "{"))


def access_lines(g: GatewayProc) -> list[dict[str, object]]:
    out = []
    for line in g.output().splitlines():
        if line.startswith('{"time"') and '"request_id"' in line:
            out.append(orjson.loads(line))
    return out


def wait_for(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


AMOUNT = st.one_of(
    st.sampled_from([0.0, *LATENCY_BUCKETS, 1e9]),  # exactly on a bound falls in that bound's bucket
    st.floats(min_value=-1.0, max_value=1e4, allow_nan=False),
)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("observe"), st.sampled_from(["a", "b"]), AMOUNT),
            st.tuples(st.just("inc"), st.sampled_from(["a", "b"]), st.integers(0, 5).map(float)),
            st.tuples(st.just("gauge"), st.sampled_from(["a", "b"]), st.sampled_from([1.0, -1.0])),
            st.tuples(st.just("flush"), st.just(""), st.just(0.0)),
        ),
        max_size=60,
    )
)
def test_added_up_figures_flush_to_what_direct_updates_give(steps: list[tuple[str, str, float]]) -> None:
    """The accumulators write to prometheus-client exactly what calling it directly writes."""

    def families(registry: CollectorRegistry) -> tuple[Histogram, Counter, Gauge]:
        return (
            Histogram("h_seconds", "h", ["l"], buckets=LATENCY_BUCKETS, registry=registry),
            Counter("c", "c", ["l"], registry=registry),
            Gauge("g", "g", ["l"], registry=registry),
        )

    direct_reg, summed_reg = CollectorRegistry(), CollectorRegistry()
    h, c, g = families(direct_reg)
    sh, sc, sg = families(summed_reg)
    acc: dict[tuple[str, str], observe._Count | observe._Observe] = {}

    def child(kind: str, family: Histogram | Counter | Gauge, label: str) -> observe._Count | observe._Observe:
        key = (kind, label)
        if key not in acc:
            metric = family.labels(label)
            acc[key] = observe._Observe(metric) if kind == "observe" else observe._Count(metric)
        return acc[key]

    for kind, label, amount in steps:
        if kind == "observe":
            h.labels(label).observe(amount)
            child(kind, sh, label).observe(amount)  # type: ignore[union-attr]
        elif kind == "inc":
            c.labels(label).inc(amount)
            child(kind, sc, label).inc(amount)
        elif kind == "gauge":
            g.labels(label).inc(amount)
            child(kind, sg, label).inc(amount)
        else:
            for a in acc.values():
                a.flush()
    for a in acc.values():
        a.flush()
    got, want = _series(summed_reg), _series(direct_reg)
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, a), (_, b) in zip(got, want, strict=True):
        # a _sum is added up in another order: equal to within float rounding; all else exactly
        assert a == b or ("_sum" in name and abs(a - b) <= 1e-9 * max(1.0, abs(b))), (name, a, b)


def _series(registry: CollectorRegistry) -> list[tuple[str, float]]:
    out = []
    for line in generate_latest(registry).decode().splitlines():
        if not line.startswith("#") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out.append((name, float(value)))
    return out


def test_a_scrape_shows_this_workers_requests_at_once_and_the_timer_flushes() -> None:
    from gateway.relay import Exchange

    async def run() -> tuple[str, str, str]:
        m = Metrics("vllm")
        ex = Exchange(1.0)
        ex.status, ex.started, ex.t_upstream, ex.t_first, ex.t_end = 200, True, 1.001, 1.01, 1.02
        m.record(ex, "chat", "m")
        untouched = generate_latest(m.registry).decode()  # nothing written yet: added up only
        scraped = m.exposition()[0].decode()  # the scrape flushes first
        m.start(asyncio.get_running_loop())
        m.record(ex, "chat", "m")
        timed = await _registry_when(m, 2)  # the timer's flush (no scrape in between)
        m.stop()
        return untouched, scraped, timed

    untouched, scraped, timed = asyncio.run(run())
    assert metric(untouched, "gateway_requests_total", route="chat", status="200") == 0
    assert metric(scraped, "gateway_requests_total", route="chat", status="200") == 1
    assert metric(scraped, "gateway_request_duration_seconds_bucket", route="chat", le="0.025") == 1
    assert metric(scraped, "gateway_request_duration_seconds_bucket", route="chat", le="0.01") == 0
    assert metric(timed, "gateway_requests_total", route="chat", status="200") == 2


def test_access_log_lines_go_out_in_whole_line_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.observe import LOG_BATCH, LOG_FLUSH_DELAY, AccessLog
    from gateway.relay import Exchange

    writes: list[bytes] = []
    monkeypatch.setattr(observe, "_write_out", writes.append)
    log = AccessLog("json")
    ex = Exchange(1.0)
    ex.status, ex.t_end, ex.request_id = 200, 1.01, b"r" * 100

    async def run() -> tuple[int, int]:
        for _ in range(40):
            log.write(ex, "POST", "/v1/chat/completions", "chat", "m")
        full = len(writes)  # the batches that filled up went out at once
        for _ in range(100):  # the rest within the delay (polled: a loaded machine runs late)
            await asyncio.sleep(LOG_FLUSH_DELAY)
            if len(writes) > full:
                break
        return full, len(writes)

    full, after = asyncio.run(run())
    assert full >= 2 and after == full + 1  # the rest followed within the delay
    lines = b"".join(writes).splitlines()
    assert len(lines) == 40 and all(orjson.loads(line)["status"] == 200 for line in lines)
    assert all(len(w) <= LOG_BATCH and w.endswith(b"\n") for w in writes)
    log.write(ex, "GET", "/v1/models", "models", "none")  # no event loop: written at once
    assert len(writes) == after + 1

    async def leave_a_line() -> None:
        log.write(ex, "GET", "/v1/models", "models", "none")  # its timer dies with this loop

    asyncio.run(leave_a_line())
    log.write(ex, "GET", "/v1/models", "models", "none")  # no loop now: out at once, with it
    assert len(writes) == after + 2 and writes[-1].count(b"\n") == 2


def test_access_log_text_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal: one plain line per request, with the same facts as the JSON one."""
    from gateway.relay import Exchange

    writes: list[bytes] = []
    monkeypatch.setattr(observe, "_write_out", writes.append)
    log = AccessLog("text")
    ex = Exchange(1.0)
    ex.status, ex.t_first, ex.t_end, ex.request_id, ex.key_id = 200, 1.0125, 1.5, b"abc", "2b4144f5"
    ex.backend, ex.nbytes, ex.chunks, ex.end = "vllm", 42, 3, "done"
    log.write(ex, "POST", "/v1/chat/completions", "chat", "m")  # no event loop: out at once
    (line,) = writes
    clock, rest = line.decode().split(" ", 1)
    assert len(clock) == 8 and clock[2] == clock[5] == ":"
    assert rest == (
        "200 POST /v1/chat/completions backend=vllm model=m ttft=12.5ms duration=500.0ms chunks=3 "
        "bytes=42 end=done key=2b4144f5 id=abc\n"
    )


def test_access_log_time_is_that_of_each_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timestamp is formatted once per millisecond and its seconds once per second: each line
    still carries its own millisecond."""
    log = AccessLog("json")
    clock = [1733370000.1234]
    monkeypatch.setattr("gateway.observe.time.time", lambda: clock[0])
    stamps = [
        log._at(t)
        for t in (1733370000.1234, 1733370000.1236, 1733370000.1249, 1733370000.9991, 1733370001.0004, 1733370061.5)
    ]
    assert stamps == [
        "2024-12-05T03:40:00.123Z",
        "2024-12-05T03:40:00.123Z",
        "2024-12-05T03:40:00.124Z",
        "2024-12-05T03:40:00.999Z",
        "2024-12-05T03:40:01.000Z",
        "2024-12-05T03:41:01.500Z",
    ]

    # A line is formatted later, with its batch, and keeps the time its request ended.
    from gateway.relay import Exchange

    writes: list[bytes] = []
    monkeypatch.setattr(observe, "_write_out", writes.append)
    ex = Exchange(1.0)
    ex.status, ex.t_end = 200, 1.5

    async def two_lines() -> None:
        for t in (1733370002.25, 1733370003.75):
            clock[0] = t
            log.write(ex, "GET", "/v1/models", "models", "none")
        assert not writes  # waiting for their batch
        clock[0] = 1733370009.0
        log.flush()

    asyncio.run(two_lines())
    assert [orjson.loads(line)["time"] for line in b"".join(writes).splitlines()] == [
        "2024-12-05T03:40:02.250Z",
        "2024-12-05T03:40:03.750Z",
    ]


def test_usage_from_the_tail_only() -> None:
    assert find_usage(b'..."usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}') == (7, 3)
    tail = b'data: {"choices":[],"usage": {"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    assert find_usage(tail) == (1, 2)
    assert find_usage(b'"usage":null}') is None
    assert find_usage(b"data: [DONE]\n\n") is None
    assert find_usage(b'"usage":{"prompt_tokens":1,"completion') is None  # cut: no guess
    # Not counts: negative, beyond any real request, booleans, floats.
    for prompt, completion in ((b"-5", b"1"), (b"1", b"1" + b"0" * 30), (b"true", b"1"), (b"1.5", b"2")):
        assert find_usage(b'"usage":{"prompt_tokens":%s,"completion_tokens":%s}' % (prompt, completion)) is None


def test_usage_read_past_the_usual_shape() -> None:
    """Usage that is not a flat object right after the colon is still read, as the json module
    reads it; what it refuses gives nothing."""
    nested = b'"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1},"completion_tokens":4}}'
    assert find_usage(nested) == (3, 4)
    assert find_usage(b'"usage":{"note":"}{","prompt_tokens":5,"completion_tokens":6}') == (5, 6)
    assert find_usage(b'"usage" \r\n:\t{"prompt_tokens":7,"completion_tokens":8}') == (7, 8)
    assert find_usage(b'"usage" x:{"prompt_tokens":1,"completion_tokens":2}') == (1, 2)  # as json reads it
    assert find_usage(b'"usage":{"prompt_tokens":NaN,"completion_tokens":2}') is None
    assert find_usage(b'"usage":{"prompt_tokens":1,"completion_tokens":2,"x":"\xff"}') == (1, 2)
    assert find_usage(b'"usage":{"prompt_tokens":1,"prompt_tokens":9,"completion_tokens":2}') == (9, 2)


def test_usage_of_the_last_two_pieces_is_that_of_both_joined() -> None:
    """``exchange_usage`` reads the last piece alone when it holds ``"usage"``: at every split of
    these tails (usage whole in the last piece, cut across both, cut twice, absent) it finds what
    ``find_usage`` finds in the two pieces joined."""
    from gateway.relay import Exchange

    tails = [
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n',
        b'{"usage":{"prompt_tokens":9,"completion_tokens":9}},"usage": {"prompt_tokens":3,"completion_tokens":4}}',
        b'"usage":{"prompt_tokens":5,"completion_tokens":6}} "usage":null',
        b"data: [DONE]\n\n",
    ]
    found = 0
    for tail in tails:
        for cut in range(len(tail) + 1):
            ex = Exchange()
            ex.prev, ex.last = tail[:cut], tail[cut:]
            assert exchange_usage(ex) == find_usage(tail), (tail, cut)
            found += exchange_usage(ex) is not None
    assert found > 0


def test_a_value_prometheus_refuses_does_not_stop_the_flushes() -> None:
    from gateway.relay import Exchange

    async def run() -> str:
        m = Metrics("vllm")
        m.start(asyncio.get_running_loop())
        m.child(m.tokens, "vllm", "m", "input").inc(-1)  # a counter refuses to go down
        ex = Exchange(1.0)
        ex.status, ex.started, ex.t_end = 200, True, 1.01
        m.record(ex, "chat", "m")
        await _registry_when(m, 1)  # the first tick wrote the request despite the refused value
        m.record(ex, "chat", "m")
        text = await _registry_when(m, 2)  # and a later tick came: the timer kept going
        m.stop()
        return text

    text = asyncio.run(run())
    assert metric(text, "gateway_requests_total", route="chat", status="200") == 2


async def _registry_when(m: Metrics, requests: int) -> str:
    """The registry's text once it counts ``requests`` chat requests (the timer flushed), or
    after a few flush intervals."""
    deadline = asyncio.get_running_loop().time() + observe.FLUSH_INTERVAL * 5
    while True:
        text = generate_latest(m.registry).decode()
        if metric(text, "gateway_requests_total", route="chat", status="200") == requests:
            return text
        if asyncio.get_running_loop().time() > deadline:
            return text
        await asyncio.sleep(0.05)


def test_request_id_rules() -> None:
    assert request_id(b"abc-DEF_1.2") == b"abc-DEF_1.2"
    for bad in (b"", b"x" * 129, b"a b", b"a\r\nb", "é".encode(), b"a/b"):
        rid = request_id(bad)
        assert rid != bad and len(rid) == 24 and int(rid, 16) >= 0
    assert request_id(None) != request_id(None)


def test_request_ids_of_forked_workers_differ() -> None:
    """Granian forks its workers from one process: each must make its own ids, not the same
    sequence as its siblings."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=lambda: writer.send([request_id(None) for _ in range(3)]))
    child.start()
    theirs = reader.recv()
    child.join(10)
    ours = [request_id(None) for _ in range(3)]
    assert len(set(ours) | set(theirs)) == 6


def test_metrics_sum_across_workers_and_stay_bounded(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(
        BACKEND_BASE_URL=backend.url, BACKEND_API_KEY=BACKEND_KEY, API_KEYS=CLIENT_KEY, GATEWAY_WORKERS="2"
    ).start()
    # Both workers up and each has listed the backend's models (the label bound).
    wait_for(lambda: len(backend.internal) >= 2)
    for _ in range(20):
        assert req(g, "POST", "/v1/chat/completions", b'{"model":"fake"}', auth())[0] == 200
    for _ in range(6):
        body = b'{"model":"fake","stream":true,"stream_options":{"include_usage":true},"max_tokens":4}'
        assert req(g, "POST", "/v1/chat/completions", body, auth())[0] == 200
    for i in range(40):  # client-chosen model names must not become series
        assert req(g, "POST", "/v1/chat/completions", b'{"model":"junk-%d"}' % i, auth())[0] == 200
    for _ in range(3):
        assert req(g, "GET", "/nope", headers=auth())[0] == 404
    assert req(g, "GET", "/v1/models", headers={"authorization": "Bearer wrong"})[0] == 401
    status, headers, _ = req(g, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    # Both workers' figures: each writes all of its own at once, within a second.
    text = scrape_until(
        g,
        [
            ("gateway_requests_total", 26, {"route": "chat", "model": "fake", "status": "200"}),
            ("gateway_requests_total", 40, {"route": "chat", "model": "other", "status": "200"}),
            ("gateway_requests_total", 3, {"route": "unknown", "status": "404"}),
            ("gateway_requests_total", 1, {"route": "models", "status": "401"}),
            ("gateway_tokens_total", 20 * 1 + 6 * 4, {"model": "fake", "type": "output"}),
            ("gateway_stream_max_chunk_gap_seconds_count", 6, {"route": "chat"}),
        ],
    )
    assert metric(text, "gateway_requests_total", route="chat", model="fake", status="200") == 26
    assert metric(text, "gateway_requests_total", route="chat", model="other", status="200") == 40
    assert metric(text, "gateway_requests_total", route="unknown", status="404") == 3
    assert metric(text, "gateway_requests_total", route="models", status="401") == 1
    assert series_count(text, "gateway_requests_total") <= 6
    # usage: non-streamed bodies say 3 in / 1 out; the streams' final usage chunks 3 in / 4 out.
    assert metric(text, "gateway_tokens_total", model="fake", type="input") == 26 * 3
    assert metric(text, "gateway_tokens_total", model="fake", type="output") == 20 * 1 + 6 * 4
    assert metric(text, "gateway_time_to_first_token_seconds_count", route="chat") == 66
    assert metric(text, "gateway_request_duration_seconds_count", route="chat") == 66
    assert metric(text, "gateway_overhead_seconds_count", route="chat") == 66
    assert metric(text, "gateway_stream_max_chunk_gap_seconds_count", route="chat") == 6
    assert metric(text, "gateway_requests_in_flight", backend="vllm") == 0
    # Both workers recorded traffic: the scrape summed their files.
    assert g.proc is not None
    granian = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == g.proc.pid]
    assert granian
    env = Path(f"/proc/{granian[0]}/environ").read_bytes().split(b"\0")
    mdir = next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    assert len(list(Path(mdir).glob("counter_*.db"))) >= 2
    # No key, client's or backend's, in the metrics or the logs.
    assert CLIENT_KEY not in text and BACKEND_KEY not in text
    out = g.output()
    assert CLIENT_KEY not in out and BACKEND_KEY not in out


def _ppid(pid: int) -> int:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(raw[raw.rindex(")") + 2 :].split()[1])


def test_access_log_completed_disconnected_failed(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, API_KEYS=CLIENT_KEY, GATEWAY_READ_TIMEOUT="1").start()
    # Completed stream.
    h = {**auth(), "x-request-id": "req-done-1"}
    status, headers, _ = req(g, "POST", "/v1/chat/completions", b'{"model":"fake","stream":true,"max_tokens":3}', h)
    assert status == 200 and headers["x-request-id"] == "req-done-1"
    assert backend.requests[-1].header("x-request-id") == "req-done-1"

    # Disconnected mid-stream.
    async def slow(r: Req, c: Conn) -> None:
        await c.start_chunked()
        for ev in sse_events(500):
            await c.chunk(ev)
            await asyncio.sleep(0.01)
        await c.end_chunked()

    backend.handler = slow
    s = socket.create_connection(("127.0.0.1", g.port))
    body = b"{}"
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: req-gone-2\r\n"
        b"authorization: Bearer " + CLIENT_KEY.encode() + b"\r\ncontent-length: 2\r\n\r\n" + body
    )
    got = b""
    while got.count(b"data:") < 3:
        got += s.recv(65536)
    s.close()
    assert backend.wait_disconnects(1, 2.0)

    # Failed: the backend resets mid-stream.
    async def resets(r: Req, c: Conn) -> None:
        await c.start_chunked()
        await c.chunk(sse_events(1)[0])
        await asyncio.sleep(0.05)
        c.reset()

    backend.handler = resets
    status, _, body_out = req(g, "POST", "/v1/chat/completions", b"{}", {**auth(), "x-request-id": "req-fail-3"})
    assert status == 200 and b'"backend_unavailable"' in body_out

    # Timed out before headers.
    async def silent(r: Req, c: Conn) -> None:
        await asyncio.sleep(30)

    backend.handler = silent
    status, headers, _ = req(g, "POST", "/v1/chat/completions", b"{}", {**auth(), "x-request-id": "bad id!"})
    assert status == 504
    generated = headers["x-request-id"]
    assert generated != "bad id!" and len(generated) == 24

    backend.handler = default_handler
    wanted = {"req-done-1", "req-gone-2", "req-fail-3", generated}
    wait_for(lambda: wanted <= {str(line["request_id"]) for line in access_lines(g)})
    lines = {str(line["request_id"]): line for line in access_lines(g)}
    done, gone, failed, timed = lines["req-done-1"], lines["req-gone-2"], lines["req-fail-3"], lines[generated]
    for line in (done, gone, failed, timed):
        assert set(line) >= {
            "time", "request_id", "key_id", "route", "model", "backend", "status", "bytes",
            "ttft_ms", "duration_ms", "chunks", "end",
        }  # fmt: skip
        assert isinstance(line["status"], int)
        assert line["key_id"] == __import__("hashlib").sha256(CLIENT_KEY.encode()).hexdigest()[:8]
        assert line["route"] == "chat" and line["backend"] == "vllm"
    assert (done["status"], done["end"], done["chunks"]) == (200, "done", 5)  # 3 tokens, usage, [DONE]
    assert isinstance(done["ttft_ms"], float) and done["bytes"] > 0
    assert (gone["status"], gone["end"]) == (200, "client_gone")
    assert isinstance(gone["chunks"], int) and gone["chunks"] >= 3
    assert (failed["status"], failed["end"]) == (200, "upstream_error")
    assert (timed["status"], timed["end"], timed["ttft_ms"]) == (504, "timeout", None)

    text = scrape_when(g, "gateway_upstream_errors_total", 1, **{"class": "timeout"})
    assert metric(text, "gateway_client_disconnects_total", route="chat") == 1
    assert metric(text, "gateway_upstream_errors_total", **{"class": "reset"}) == 1
    assert metric(text, "gateway_upstream_errors_total", **{"class": "timeout"}) == 1
    assert CLIENT_KEY not in g.output()


def test_streams_without_usage_are_estimated(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_WORKERS="1").start()
    wait_for(lambda: len(backend.internal) >= 1)

    async def no_usage(r: Req, c: Conn) -> None:
        events = sse_events(6)
        await c.start_chunked()
        await c.chunk(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n')
        for ev in events[:6]:
            await c.chunk(ev)
        await c.chunk(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n')
        await c.chunk(b"data: [DONE]\n\n")
        await c.end_chunked()

    backend.handler = no_usage
    assert req(g, "POST", "/v1/chat/completions", b'{"model":"fake","stream":true}')[0] == 200
    text = scrape_when(g, "gateway_tokens_estimated_total", 6, model="fake", type="output")
    assert metric(text, "gateway_tokens_estimated_total", model="fake", type="output") == 6
    assert metric(text, "gateway_tokens_total", model="fake", type="output") == 0


def test_not_supported_and_connect_errors_counted(start_gateway: type[GatewayProc]) -> None:
    g = start_gateway(BACKEND_KIND="tgi", BACKEND_BASE_URL=f"http://127.0.0.1:{free_port()}/v1").start()
    assert req(g, "POST", "/v1/embeddings", b"{}")[0] == 501
    assert req(g, "POST", "/v1/chat/completions", b"{}")[0] == 502
    text = scrape_when(g, "gateway_requests_total", 1, route="chat", status="502")
    assert metric(text, "gateway_not_supported_total", route="embeddings", backend="tgi") == 1
    assert metric(text, "gateway_upstream_errors_total", backend="tgi", **{"class": "connect"}) == 1
    assert metric(text, "gateway_requests_total", route="chat", status="502") == 1


@pytest.mark.parametrize("require", ["true", "false"])
def test_metrics_behind_a_key_when_configured(
    start_gateway: type[GatewayProc], backend: FakeBackend, require: str
) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, API_KEYS=CLIENT_KEY, GATEWAY_METRICS_REQUIRE_KEY=require).start()
    assert req(g, "GET", "/metrics")[0] == (401 if require == "true" else 200)
    assert req(g, "GET", "/metrics", headers=auth())[0] == 200


def test_metrics_and_access_log_can_be_off(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_METRICS="false", GATEWAY_ACCESS_LOG="false").start()
    assert req(g, "POST", "/v1/chat/completions", b"{}")[0] == 200
    assert req(g, "GET", "/metrics")[0] == 404
    assert access_lines(g) == []
    assert backend.internal == []  # no model listing either


def test_traceparent_passes_through(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert req(g, "POST", "/v1/chat/completions", b"{}", {"traceparent": tp})[0] == 200
    sent = backend.requests[-1]
    assert sent.header("traceparent") == tp
    assert sent.header("x-request-id") is not None
