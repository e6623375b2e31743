"""The simulator's engine model (``--engine``): chained block hashes, the LRU prefix cache, the
prefill lane, the queue behind the running cap, and the kind's own engine metrics."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time
from typing import Any

import pytest

from gateway.profiles import PROFILES
from gateway.sim.cli import add_arguments, config_from_args, describe
from gateway.sim.config import ENGINE, SimConfig
from gateway.sim.kv import Engine, PrefixCache, block_hashes, prompt_text
from tests import servers
from tests.rawhttp import Connection, request
from tests.servers import NO_DELAY, SimProc

BT = 16
BLOCK_CHARS = BT * 4


def chat(system: str, user: str = "hi", max_tokens: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        **extra,
    }


def metric_values(text: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r"^([a-zA-Z_:]+)(?:\{[^}]*\})? (\S+)$", text, re.M)}


# -- hashing --------------------------------------------------------------------------------------


def test_prompt_text_keeps_roles_and_order() -> None:
    body = {
        "messages": [{"role": "system", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]}]
    }
    text = prompt_text(body, "chat")
    assert text.index("system") < text.index("a") < text.index("user") < text.index("b")
    swapped = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}
    assert prompt_text(swapped, "chat") != text
    assert prompt_text({"prompt": "hello"}, "completion") == "hello"
    assert prompt_text({"prompt": [1, 2, 3]}, "completion") == "1 2 3"


def test_messages_and_responses_prompts_are_cached_like_chats() -> None:
    """The Anthropic Messages API's ``system`` and the Responses API's ``instructions`` come first,
    as a chat's system message would: the same conversation on either surface is the same prefix."""
    chat = prompt_text({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]}, "chat")
    messages = prompt_text({"system": "S", "messages": [{"role": "user", "content": "hi"}]}, "messages")
    responses = prompt_text({"instructions": "S", "input": [{"role": "user", "content": "hi"}]}, "responses")
    assert chat == messages == responses
    assert prompt_text({"input": "hi"}, "responses") == prompt_text(
        {"messages": [{"role": "user", "content": "hi"}]}, "chat"
    )
    assert prompt_text({"system": [{"type": "text", "text": "S"}], "messages": []}, "messages") == "<|system|>S"


def test_block_hashes_are_chained_and_seeded_by_the_model() -> None:
    a = "a" * BLOCK_CHARS
    b = "b" * BLOCK_CHARS
    text = a + b + a
    hashes = block_hashes(text, "m", BT, prompt_tokens=10_000)
    assert len(hashes) == 3
    # The same block content after a different prefix hashes differently.
    assert hashes[0] != hashes[2]
    assert block_hashes(a + a, "m", BT, 10_000)[1] != hashes[1]
    # A longer prompt shares the hashes of its prefix; another model shares none.
    assert block_hashes(text + b, "m", BT, 10_000)[:3] == hashes
    assert not set(block_hashes(text, "other", BT, 10_000)) & set(hashes)
    # Partial blocks are not hashed, and the last prompt token is always computed.
    assert len(block_hashes(text + "x" * (BLOCK_CHARS - 1), "m", BT, 10_000)) == 3
    assert len(block_hashes(text, "m", BT, prompt_tokens=3 * BT)) == 2
    assert block_hashes("", "m", BT, 0) == []


# -- the prefix cache ----------------------------------------------------------------------------


def test_block_reused_only_with_every_earlier_block() -> None:
    cache = PrefixCache(100)
    h = block_hashes("".join(chr(97 + i) * BLOCK_CHARS for i in range(4)), "m", BT, 10_000)
    cache.store(h[1:], room=100)  # every block but the first
    assert cache.match(h) == 0
    cache.store(h[:1], room=100)
    assert cache.match(h) == 4
    assert cache.match(h[:2]) == 2


def test_lru_eviction_at_capacity() -> None:
    cache = PrefixCache(4)
    first = block_hashes("a" * 2 * BLOCK_CHARS, "m", BT, 10_000)
    second = block_hashes("b" * 2 * BLOCK_CHARS, "m", BT, 10_000)
    third = block_hashes("c" * 2 * BLOCK_CHARS, "m", BT, 10_000)
    cache.store(first, room=4)
    cache.store(second, room=4)
    assert cache.match(first) == 2  # a lookup does not refresh: only a use does
    cache.store(first, room=4)  # used again: now the most recent
    cache.store(third, room=4)
    assert len(cache) == 4
    assert cache.match(first) == 2 and cache.match(third) == 2 and cache.match(second) == 0


def test_eviction_takes_a_prompts_last_blocks_first() -> None:
    cache = PrefixCache(3)
    long = block_hashes("".join(chr(97 + i) * BLOCK_CHARS for i in range(3)), "m", BT, 10_000)
    other = block_hashes("z" * BLOCK_CHARS, "m", BT, 10_000)
    cache.store(long, room=3)
    cache.store(other, room=3)
    # The oldest of the long prompt's blocks is its last one: its first two still hit.
    assert cache.match(long) == 2


def test_running_sequences_shrink_the_cache() -> None:
    engine = Engine(BT, kv_blocks=10)
    h = block_hashes("".join(chr(97 + i) * BLOCK_CHARS for i in range(6)), "m", BT, 10_000)
    engine.hold([], 8)  # another sequence's completion: not cacheable
    asyncio.run(engine.prefill(h, prompt_tokens=6 * BT + 1, seconds_per_token=0))
    assert len(engine.cache) == 2  # 10 blocks, 8 held privately
    assert engine.kv_usage == pytest.approx(0.8)
    engine.release([], 8)
    assert engine.kv_usage == 0


def test_sequences_sharing_a_prefix_hold_its_blocks_once() -> None:
    engine = Engine(BT, kv_blocks=100)
    h = block_hashes("p" * 4 * BLOCK_CHARS, "m", BT, 10_000)
    engine.hold(h, 6)  # 4 prompt blocks, 2 of its own
    engine.hold(h[:3], 5)  # shares 3 of them, 2 of its own
    assert engine.held_blocks == 4 + 2 + 2
    engine.release(h, 6)
    assert engine.held_blocks == 3 + 2
    engine.release(h[:3], 5)
    assert engine.held_blocks == 0 and engine.kv_usage == 0


def test_engine_counts_queries_and_hits_in_tokens() -> None:
    engine = Engine(BT, kv_blocks=100)
    h = block_hashes("q" * 4 * BLOCK_CHARS, "m", BT, 10_000)
    assert asyncio.run(engine.prefill(h, 4 * BT + 5, 0)) == 0
    assert asyncio.run(engine.prefill(h, 4 * BT + 5, 0)) == 4 * BT
    assert (engine.prefix_queries, engine.prefix_hits) == (2 * (4 * BT + 5), 4 * BT)


def test_prefill_lane_is_shared_and_gives_back_a_cancelled_reservation() -> None:
    async def go() -> tuple[list[float], float]:
        engine = Engine(BT, kv_blocks=100)
        loop = asyncio.get_running_loop()
        start = loop.time()
        done: list[float] = []

        async def one(tokens: int) -> None:
            await engine.prefill([], tokens, 0.0001)
            done.append(loop.time() - start)

        await asyncio.gather(one(500), one(500))  # 50 ms each, one after the other
        victim = asyncio.create_task(engine.prefill([], 10_000, 0.0001))  # 1 s
        await asyncio.sleep(0.01)
        victim.cancel()
        await asyncio.gather(victim, return_exceptions=True)
        t = loop.time()
        await engine.prefill([], 100, 0.0001)
        return done, loop.time() - t

    done, after_cancel = asyncio.run(go())
    assert 0.045 <= done[0] < 0.09 and done[1] >= 0.095
    assert after_cancel < 0.1


# -- through the server --------------------------------------------------------------------------


def engine_sim(**given: Any) -> Any:
    return servers.sim(**{**NO_DELAY, "engine": True, **given})


def timed(port: int, body: dict[str, Any]) -> float:
    start = time.monotonic()
    answer = request(port, "POST", "/v1/chat/completions", body)
    assert answer.status == 200, answer.body
    return time.monotonic() - start


def test_ttft_shrinks_with_a_cached_prefix() -> None:
    system = "You are a careful assistant. " * 400  # ~11,600 chars, ~2,900 tokens
    with engine_sim(prefill_us_per_token=100) as sim:  # ~0.29 s for the whole prompt
        cold = timed(sim.port, chat(system, "first question"))
        warm = timed(sim.port, chat(system, "second question"))
        other = timed(sim.port, chat("Another system prompt entirely. " * 360, "first question"))
    assert cold >= 0.25
    assert warm < cold / 4
    assert other >= 0.25


def test_queueing_when_the_running_cap_is_reached() -> None:
    with engine_sim(max_running=1, itl_ms=50) as sim:
        one, two = Connection(sim.port), Connection(sim.port)
        with one, two:
            one.send("POST", "/v1/chat/completions", chat("a", max_tokens=6))
            assert servers.wait_until(lambda: sim.stats.running == 1)
            two.send("POST", "/v1/chat/completions", chat("b", max_tokens=6))
            assert servers.wait_until(lambda: sim.stats.waiting == 1)
            values = metric_values(request(sim.port, "GET", "/metrics").body.decode())
            assert values["vllm:num_requests_running"] == 1
            assert values["vllm:num_requests_waiting"] == 1
            assert values["vllm:kv_cache_usage_perc"] > 0
            assert one.read_response().status == 200
            assert two.read_response().status == 200
        values = metric_values(request(sim.port, "GET", "/metrics").body.decode())
        assert values["vllm:num_requests_waiting"] == 0 and values["vllm:kv_cache_usage_perc"] == 0


def test_a_request_waiting_for_the_prefill_lane_counts_as_waiting() -> None:
    long = "z" * 40_000  # 10,000 tokens at 50 us: 0.5 s of prefill
    with engine_sim(prefill_us_per_token=50) as sim:
        one, two = Connection(sim.port), Connection(sim.port)
        with one, two:
            one.send("POST", "/v1/chat/completions", chat(long))
            two.send("POST", "/v1/chat/completions", chat(long + "!"))
            assert servers.wait_until(lambda: sim.stats.running == 2)
            values = metric_values(request(sim.port, "GET", "/metrics").body.decode())
            assert (values["vllm:num_requests_running"], values["vllm:num_requests_waiting"]) == (1, 1)
            assert one.read_response().status == two.read_response().status == 200


@pytest.mark.parametrize("kind", ["vllm", "sglang", "tgi", "llamacpp", "ollama"])
def test_metrics_names_and_values_per_kind(kind: str) -> None:
    system = "s" * (10 * BLOCK_CHARS)
    with engine_sim(kind=kind) as sim:
        for _ in range(2):
            timed(sim.port, chat(system))
        text = request(sim.port, "GET", "/metrics").body.decode()
    values = metric_values(text)
    first = sum(len(m["content"]) for m in chat(system)["messages"])
    prompt_tokens = (first + 3) // 4
    assert values["sim_prefix_cache_queries_total"] == 2 * prompt_tokens
    assert values["sim_prefix_cache_hits_total"] == 10 * BT
    assert values["sim_requests_total"] == 2
    names = PROFILES[kind].engine_metrics
    if names is None:
        assert "vllm:num_requests_running" in values  # the simulator's own gauges stay
        return
    assert "sim_open_connections" in values
    assert values[names.running[0]] == 0 and values[names.waiting[0]] == 0
    if names.prefix_queries:
        assert values[names.prefix_queries[0]] == 2 * prompt_tokens
        assert values[names.prefix_hits[0]] == 10 * BT
    if names.kv_usage:
        assert values[names.kv_usage[0]] == 0
    for group in (names.running, names.waiting, names.kv_usage, names.prefix_queries, names.prefix_hits):
        for old in group[1:]:
            assert old not in values  # only the newest spelling is served
    if kind != "vllm":
        assert not any(name.startswith("vllm:") for name in values)
    # Counters' families drop _total, like prometheus_client.
    if names.prefix_hits:
        family = names.prefix_hits[0].removesuffix("_total")
        assert f"# TYPE {family} counter" in text


def test_vllm_labels_and_kinds_without_labels() -> None:
    with engine_sim(kind="vllm", model="org/x") as sim:
        text = request(sim.port, "GET", "/metrics").body.decode()
    assert 'vllm:num_requests_running{model_name="org/x",engine="0"} 0' in text
    with engine_sim(kind="llamacpp") as sim:
        text = request(sim.port, "GET", "/metrics").body.decode()
    assert "\nllamacpp:requests_processing 0\n" in text


def test_without_engine_nothing_changes() -> None:
    with servers.sim(**NO_DELAY) as sim:
        assert sim.app.engine is None
        request(sim.port, "POST", "/v1/chat/completions", chat("x" * 1000))
        text = request(sim.port, "GET", "/metrics").body.decode()
    assert "prefix_cache" not in text and "kv_cache" not in text
    assert 'vllm:num_requests_running{model_name="sim-model"} 0' in text


def test_cli_engine_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    plain = config_from_args(parser.parse_args([]))
    assert not plain.engine and plain.itl_ms == SimConfig().itl_ms
    config = config_from_args(parser.parse_args(["--engine", "--kv-blocks", "64", "--itl-ms", "3"]))
    assert config.engine and config.kv_blocks == 64 and config.block_tokens == 16
    assert config.itl_ms == 3  # a flag given wins over the engine's figure
    assert config.prefill_us_per_token == ENGINE["prefill_us_per_token"]
    assert config.max_running == ENGINE["max_running"]
    assert "engine model: 64 KV blocks of 16 tokens" in describe(config, "http://h:1")
    fast = config_from_args(parser.parse_args(["--engine", "--fast"]))
    assert fast.engine and fast.fast
    help_text = parser.format_help()
    for flag in ("--engine", "--block-tokens", "--kv-blocks"):
        assert flag in help_text


def test_end_to_end_repeated_prompt_hits_and_gets_faster() -> None:
    """In its own process, as the routing benchmark runs it: the second asking of a long prompt
    is a prefix-cache hit and its first token comes sooner."""
    system = "The rules of the house, at length. " * 600  # ~21,000 chars
    with SimProc("--engine", "--kind", "vllm", "--seed", "1") as sim:
        assert "engine model" in sim.output()
        before = sim.metrics()
        cold = timed(sim.port, chat(system, stream=False))
        middle = sim.metrics()
        warm = timed(sim.port, chat(system, "a follow-up"))
        after = sim.metrics()
        assert sim.stop(signal.SIGTERM, timeout=5) == 0
    assert before["vllm:prefix_cache_hits_total"] == 0
    assert middle["vllm:prefix_cache_hits_total"] == 0
    assert after["vllm:prefix_cache_hits_total"] > 5000
    assert after["vllm:prefix_cache_queries_total"] > middle["vllm:prefix_cache_queries_total"] > 5000
    assert warm < cold


def test_readme_and_docstring_describe_the_engine_model() -> None:
    from pathlib import Path

    import gateway.sim

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## The simulator", 1)[1].split("\n## ", 1)[0]
    defaults = SimConfig()
    for text in (section, gateway.sim.__doc__ or ""):
        assert "--engine" in text and "--block-tokens" in text and "--kv-blocks" in text
        for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total"):
            assert name in text
    assert f"default {defaults.block_tokens}" in section and f"default {defaults.kv_blocks:,}" in section
    assert f"{ENGINE['prefill_us_per_token']:g} µs/token" in section
    assert f"inter-token {ENGINE['itl_ms']:g} ms" in section and f"{ENGINE['max_running']:g} running" in section
