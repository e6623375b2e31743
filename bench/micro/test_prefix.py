"""Micro-benchmarks of the ``prefix`` balancing policy's per-request work: the prompt's block hashes
from the request body (1 KiB, 16 KiB and 128 KiB prompts), and a pick with them against a p2c pick.

Run: ``just bench-micro -k prefix`` (or ``.venv/bin/pytest bench/micro/test_prefix.py --benchmark-only``).
Only backends whose policy is ``prefix`` with several replicas pay for these; a ``p2c`` or
single-replica backend computes no hashes.
"""

from __future__ import annotations

from typing import cast

import orjson
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from gateway.balance import Backend, Replica
from gateway.payload import peek
from gateway.pool import Pool
from gateway.prefix import MAX_BLOCKS, block_hashes, blocks_of, peek_prompt
from gateway.profiles import PROFILES
from gateway.target import Target

VLLM = PROFILES["vllm"]
SIZES = {"1k": 1 << 10, "16k": 16 << 10, "128k": 128 << 10}


def _body(size: int) -> bytes:
    """A chat body whose prompt is ``size`` bytes: a system prompt, then turns of ~2 KiB."""
    turn = ("The quick brown fox jumps over the lazy dog, again and again. " * 40)[:2048]
    text = "You are a helpful assistant. " * 8
    messages = [{"role": "system", "content": text}]
    total = len(text)
    while total < size:
        chunk = turn[: size - total]
        messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": chunk})
        total += len(chunk)
    return orjson.dumps({"model": "m", "messages": messages, "stream": True, "max_tokens": 256})


@pytest.mark.parametrize("size", list(SIZES))
def test_prefix_peek_alone(benchmark: BenchmarkFixture, size: str) -> None:
    """The baseline: the routing stage's decode under ``p2c``."""
    assert benchmark(peek, _body(SIZES[size])).model == "m"


@pytest.mark.parametrize("size", list(SIZES))
def test_prefix_peek_and_block_hashes(benchmark: BenchmarkFixture, size: str) -> None:
    """What the routing stage does under ``prefix`` instead: the routing fields and the prompt in
    one decode, then the block hashes."""
    body = _body(SIZES[size])

    def both() -> list[int]:
        peeked, prompt = peek_prompt(body)
        return block_hashes(prompt, "m")

    blocks = benchmark(both)
    assert 1 <= len(blocks) <= MAX_BLOCKS


def _backend(policy: str) -> Backend:
    rs = [Replica(Target(f"http://10.0.0.{i}:8000/v1", VLLM, ""), cast(Pool, None), None, 1) for i in range(4)]
    return Backend("b", VLLM, VLLM.capabilities, rs, policy="prefix" if policy == "prefix" else "p2c")


def test_pick_p2c(benchmark: BenchmarkFixture) -> None:
    b = _backend("p2c")
    assert benchmark(b.pick, None, None) in b.replicas


def test_pick_prefix_32_blocks(benchmark: BenchmarkFixture) -> None:
    """A remembered prefix of the full 32 blocks (the cap): the longest-first walk finds it at once, and the
    replica chosen is remembered for each of them again."""
    b = _backend("prefix")
    blocks = blocks_of(_body(SIZES["16k"]), "m")
    assert len(blocks) == MAX_BLOCKS
    first = b.pick(None, None, blocks)
    assert benchmark(b.pick, None, None, blocks) is first
