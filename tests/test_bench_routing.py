"""The routing benchmark's pieces that need no server: its workloads, its reading of /metrics and
its goals (``bench --routing`` end to end: tests/test_bench_smoke.py)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bench import routing_report, scrape
from bench.workloads import Shape, arrivals, build, control, shared

SHAPE = Shape(groups=4, users_per_group=3, system_chars=1000, user_chars=100, answer_tokens=8, max_turns=3)


def test_a_conversation_grows_by_the_previous_answer_and_a_new_message() -> None:
    reqs = shared(1, 200, SHAPE)
    systems = {r.group: r.messages[0] for r in reqs}
    assert len(systems) == SHAPE.groups and all(role == "system" for role, _ in systems.values())
    assert all(r.messages[0] == systems[r.group] for r in reqs)  # a group shares its system prompt
    assert all(len(systems[g][1]) >= SHAPE.system_chars for g in systems)
    turns = [len(r.messages) for r in reqs]
    assert min(turns) == 2 and max(turns) == 2 * SHAPE.max_turns  # system + user ... up to the last turn
    # Some request's messages are an earlier one's, followed by an answer and a new user message.
    grown = [
        (a, b)
        for a in reqs
        for b in reqs
        if len(b.messages) == len(a.messages) + 2 and b.messages[: len(a.messages)] == a.messages
    ]
    assert grown and all(b.messages[-2][0] == "assistant" and b.messages[-1][0] == "user" for _, b in grown)


def test_the_control_has_the_same_lengths_and_no_shared_prefix() -> None:
    prefixed, plain = shared(3, 100, SHAPE), control(3, 100, SHAPE)
    assert [r.prompt_chars for r in prefixed] == [r.prompt_chars for r in plain]
    assert [len(r.messages) for r in prefixed] == [len(r.messages) for r in plain]
    assert len({r.messages[0][1][:64] for r in plain}) == len(plain)
    assert all(r.group is None for r in plain)


def test_one_seed_one_workload() -> None:
    for name in ("shared", "control", "skewed"):
        assert build(name, 5, 50, SHAPE) == build(name, 5, 50, SHAPE)
    assert build("shared", 5, 50, SHAPE) != build("shared", 6, 50, SHAPE)
    with pytest.raises(ValueError, match="unknown workload"):
        build("nope", 5, 5, SHAPE)


def test_skewed_sends_half_the_traffic_to_one_group() -> None:
    reqs = build("skewed", 9, 4000, SHAPE)
    hot = sum(r.group == 0 for r in reqs) / len(reqs)
    assert 0.47 < hot < 0.53
    others = [sum(r.group == g for r in reqs) / len(reqs) for g in range(1, SHAPE.groups)]
    assert all(0.13 < share < 0.20 for share in others)


def test_arrivals_are_poisson_and_bounded() -> None:
    times = arrivals(random.Random(2), 50.0, 100_000, 200.0)
    assert times == sorted(times) and times[-1] < 200.0
    assert 9_500 < len(times) < 10_500  # about rate x seconds
    assert len(arrivals(random.Random(2), 50.0, 30, 200.0)) == 30
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 0.019 < sum(gaps) / len(gaps) < 0.021


# What vLLM (v1) exposes, two engines' worth of labels.
VLLM = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9
"""
OLD_VLLM = 'vllm:gpu_prefix_cache_hits_total{model_name="m"} 7\nvllm:gpu_prefix_cache_queries_total{model_name="m"} 9\n'


def test_series_are_summed_by_name_under_either_spelling() -> None:
    values = scrape.series(VLLM)
    assert scrape.first(values, scrape.WAITING) == 5.0
    assert scrape.first(values, scrape.PREFIX_HITS) == 250.0
    assert scrape.first(values, scrape.PREFIX_QUERIES) == 1000.0
    old = scrape.series(OLD_VLLM)
    assert (scrape.first(old, scrape.PREFIX_HITS), scrape.first(old, scrape.PREFIX_QUERIES)) == (7.0, 9.0)
    assert scrape.first(scrape.series("sim_requests_total 4\n"), scrape.PREFIX_HITS) is None
    assert scrape.delta(None, 3.0) is None and scrape.delta(1.0, 3.0) == 2.0


def test_decisions_by_reason_are_the_run_s_own() -> None:
    before = 'gateway_balance_decisions_total{backend="default",reason="prefix"} 10.0\n'
    after = (
        'gateway_balance_decisions_total{backend="default",reason="prefix"} 25.0\n'
        'gateway_balance_decisions_total{backend="default",reason="load"} 2.0\n'
        'gateway_balance_decisions_total{backend="other",reason="load"} 1.0\n'
    )
    assert routing_report.decisions(before, after) == {"load": 3, "prefix": 15}
    assert routing_report.decisions(None, "gateway_requests_total 3\n") is None


def _fig(shares: list[float], waiting: list[float | None]) -> dict[str, Any]:
    return {"replicas": [{"share": s, "waiting_peak": w} for s, w in zip(shares, waiting, strict=True)]}


def test_hot_spot_guard() -> None:
    assert routing_report.hot_spot(_fig([0.3, 0.25, 0.25, 0.2], [0, 0, 0, 0]))["met"] is True
    # Over 1.5x the mean while another replica never queued: a hot spot.
    assert routing_report.hot_spot(_fig([0.55, 0.15, 0.15, 0.15], [9, 0, 2, 2]))["met"] is False
    # Over, but every other replica queued too: load had nowhere better to go.
    assert routing_report.hot_spot(_fig([0.55, 0.15, 0.15, 0.15], [9, 1, 2, 2]))["met"] is True
    assert routing_report.hot_spot(_fig([0.55, 0.15, 0.15, 0.15], [9, None, 2, 2]))["met"] is None
