"""gateway/engine_load.py: the engines' load read from their /metrics exposition text.

The exposition below is written from vLLM's metric definitions (vllm/v1/metrics/loggers.py,
``PrometheusStatLogger``: gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before its rename), counters
``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total``, each labelled with
``model_name`` and ``engine``). The names the gateway accepts per kind come from
``Profile.engine_metrics``; here an ``EngineMetrics`` is built directly."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest

from gateway import engine_load
from gateway.balance import Backend, Replica
from gateway.engine_load import parse, poll_forever, scrape
from gateway.netio import AsyncioBackend
from gateway.pool import Pool
from gateway.profiles import PROFILES, EngineMetrics
from gateway.target import Target
from tests.fakes import Conn, FakeBackend, Req

VLLM_NAMES = EngineMetrics(
    running=("vllm:num_requests_running",),
    waiting=("vllm:num_requests_waiting",),
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    prefix_queries=("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    prefix_hits=("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
)

VLLM_TEXT = b"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4375
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 123456.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 65432.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:num_requests_running_extra{engine="0"} 999.0
"""


def test_vllm_exposition() -> None:
    load = parse(VLLM_TEXT, VLLM_NAMES)
    assert (load.running, load.waiting, load.kv_usage) == (12.0, 3.0, 0.4375)


def test_several_engines_add_up_and_kv_usage_is_the_highest() -> None:
    text = b"""\
vllm:num_requests_running{engine="0",model_name="m"} 4
vllm:num_requests_running{engine="1",model_name="m"} 5
vllm:num_requests_waiting{engine="0",model_name="m"} 1
vllm:num_requests_waiting{engine="1",model_name="m"} 2 1733370000000
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
"""
    load = parse(text, VLLM_NAMES)
    assert (load.running, load.waiting, load.kv_usage) == (9.0, 3.0, 0.75)


def test_old_spellings_and_preference_for_the_newest() -> None:
    old = b'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    assert parse(old, VLLM_NAMES).kv_usage == 0.5
    both = old + b'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
    assert parse(both, VLLM_NAMES).kv_usage == 0.25  # never counted twice across a rename
    # SGLang's two prefixes, and metrics with no labels at all.
    sglang = EngineMetrics(running=("sglang:num_running_reqs", "sglang_num_running_reqs"))
    assert parse(b"sglang_num_running_reqs 7\n", sglang).running == 7.0


def test_odd_lines_are_skipped_not_fatal() -> None:
    text = b"""\
vllm:num_requests_running{model_name="a model } with spaces"} 2
vllm:num_requests_waiting{model_name="m"} NaN
vllm:kv_cache_usage_perc{model_name="m"} not-a-number
vllm:num_requests_running
\r
"""
    load = parse(text, VLLM_NAMES)
    assert (load.running, load.waiting, load.kv_usage) == (2.0, None, None)
    assert repr(parse(b"", VLLM_NAMES)) == "EngineLoad(running=None, waiting=None, kv_usage=None)"


async def metrics_handler(req: Req, conn: Conn) -> None:
    if req.target != "/metrics":
        await conn.json(404, {})
        return
    await conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(VLLM_TEXT))
    await conn.send(VLLM_TEXT)


def make_replica(url: str) -> Replica:
    return Replica(Target(url, PROFILES["vllm"], ""), cast(Pool, None), None, 1)


def test_scrape_reads_the_server_root_metrics_and_poll_keeps_them_fresh() -> None:
    with FakeBackend(handler=metrics_handler) as fb:
        r = make_replica(fb.url)
        down = make_replica("http://127.0.0.1:1/v1")  # refused: no reading, never "saturated"
        b = Backend("main", PROFILES["vllm"], PROFILES["vllm"].capabilities, [r, down], policy="prefix")

        async def run() -> None:
            got = await scrape(r, VLLM_NAMES, AsyncioBackend(), 2.0)
            assert got is not None and got.waiting == 3.0
            task = asyncio.get_running_loop().create_task(poll_forever(b, VLLM_NAMES, AsyncioBackend(), 0.05, 1.0))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if r.engine_until:
                    break
            task.cancel()

        asyncio.run(run())
        assert fb.requests[0].target == "/metrics"
        assert (r.engine_running, r.engine_waiting, r.engine_kv) == (12.0, 3.0, 0.4375)
        assert time.monotonic() < r.engine_until <= time.monotonic() + 3 * 0.05
        assert down.engine_until == 0.0


def test_an_oversized_or_failed_answer_gives_no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeBackend(handler=metrics_handler) as fb:
        r = make_replica(fb.url)
        monkeypatch.setattr(engine_load, "MAX_BYTES", 100)
        assert asyncio.run(scrape(r, VLLM_NAMES, AsyncioBackend(), 2.0)) is None
        monkeypatch.setattr(engine_load, "MAX_BYTES", 1 << 20)
        r404 = make_replica(fb.url.replace("/v1", "/sub/v1"))  # its /metrics is /sub/metrics: a 404
        assert asyncio.run(scrape(r404, VLLM_NAMES, AsyncioBackend(), 2.0)) is None


def test_the_app_polls_engine_load_and_avoids_a_queued_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wired in the lifespan for a prefix backend whose kind lists engine metrics: the engine
    that reports a long waiting queue is not the one a new prefix is sent to, though it is its
    home by the hash; with the interval at 0 nothing polls."""
    import msgspec

    from gateway import worker
    from gateway.affinity import rendezvous
    from gateway.app import Gateway
    from gateway.config import settings_from_strings
    from gateway.prefix import blocks_of
    from tests.asgi import call
    from tests.fakes import Handler, default_handler

    vllm = msgspec.structs.replace(PROFILES["vllm"], engine_metrics=VLLM_NAMES)
    monkeypatch.setattr(worker, "PROFILES", {**PROFILES, "vllm": vllm})
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'

    def queued(waiting: float) -> Handler:
        text = b"vllm:num_requests_running 8\nvllm:num_requests_waiting %d\n" % waiting

        async def handler(req: Req, conn: Conn) -> None:
            if req.target == "/metrics":
                await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text))
            else:
                await default_handler(req, conn)

        return handler

    with FakeBackend() as one, FakeBackend() as two:
        urls = f"{one.url},{two.url}"
        home = rendezvous([make_replica(one.url), make_replica(two.url)], blocks_of(body, "m")[0].to_bytes(8, "little"))
        busy, idle = (one, two) if home.target.base_url == one.url else (two, one)
        busy.handler, idle.handler = queued(40), queued(0)

        async def go(interval: str) -> Gateway:
            env = {"BACKEND_BASE_URL": urls, "GATEWAY_BALANCE": "prefix", "GATEWAY_ENGINE_METRICS_INTERVAL": interval}
            app = Gateway(settings_from_strings(env))
            await app.startup()
            try:
                if interval != "0":
                    for _ in range(300):
                        if all(r.engine_until for r in app.backends[0].replicas):
                            break
                        await asyncio.sleep(0.01)
                assert (await call(app, "POST", "/v1/chat/completions", body)).status == 200
            finally:
                await app.shutdown()
            return app

        app = asyncio.run(go("0.05"))
        assert [r.engine_waiting for r in app.backends[0].replicas] == [
            40.0 if r.target.base_url == busy.url else 0.0 for r in app.backends[0].replicas
        ]
        assert sum(r.method == "POST" for r in idle.requests) == 1  # relieved: its home was queued
        app = asyncio.run(go("0"))
        assert all(r.engine_until == 0.0 for r in app.backends[0].replicas)  # never polled
        assert sum(r.method == "POST" for r in busy.requests) == 1  # and so the home took it


@pytest.mark.parametrize("kind", ["vllm", "sglang", "tgi", "llamacpp"])
def test_the_simulated_engines_metrics_read_with_each_kinds_names(kind: str) -> None:
    """The simulator's engine model serves each kind's metrics under the names of its profile."""
    from tests.servers import NO_DELAY, sim

    names = PROFILES[kind].engine_metrics
    assert names is not None
    with sim(**{**NO_DELAY, "engine": True, "kind": kind}) as server:
        got = asyncio.run(scrape(make_replica(server.base_url), names, AsyncioBackend(), 5.0))
    assert got is not None and (got.running, got.waiting) == (0.0, 0.0)
    assert (got.kv_usage is not None) is bool(names.kv_usage)
