"""gateway/prefix.py: the prompt's chained block hashes, from the request body."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.prefix import BLOCK, MAX_BLOCKS, block_hashes, blocks_of, peek_prompt

SYSTEM = "You are a careful assistant. " * 80  # ~2.2 KiB: four full blocks and a partial one


def chat(*messages: tuple[str, str], model: str = "m", **extra: object) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": r, "content": c} for r, c in messages], **extra})


def test_the_same_prefix_gives_the_same_leading_hashes() -> None:
    one = blocks_of(chat(("system", SYSTEM), ("user", "first question")), "m")
    two = blocks_of(chat(("system", SYSTEM), ("user", "another question entirely")), "m")
    shared = len(SYSTEM) // BLOCK
    assert len(one) >= shared + 1
    assert one[:shared] == two[:shared]  # the system prompt's full blocks
    assert one[-1] != two[-1]  # chained: the block holding the user turn differs


def test_a_growing_conversation_keeps_its_earlier_blocks() -> None:
    turns = [("system", SYSTEM), ("user", "q1 " * 100), ("assistant", "a1 " * 100)]
    before = blocks_of(chat(*turns), "m")
    after = blocks_of(chat(*turns, ("user", "q2 " * 100)), "m")
    full = len(peek_prompt(chat(*turns))[1]) // BLOCK
    assert after[:full] == before[:full] and len(after) > len(before)


def test_role_and_order_matter() -> None:
    a = blocks_of(chat(("system", SYSTEM), ("user", "hello")), "m")
    assert blocks_of(chat(("user", SYSTEM), ("user", "hello")), "m")[0] != a[0]  # role
    assert blocks_of(chat(("user", "hello"), ("system", SYSTEM)), "m")[0] != a[0]  # order
    # A boundary moved between two messages is another prompt.
    assert blocks_of(chat(("user", "ab"), ("user", "c")), "m") != blocks_of(chat(("user", "a"), ("user", "bc")), "m")


def test_the_model_seeds_the_hashes() -> None:
    body = chat(("system", SYSTEM))
    assert set(blocks_of(body, "m1")).isdisjoint(blocks_of(body, "m2"))


def test_other_fields_do_not_count() -> None:
    plain = blocks_of(chat(("system", SYSTEM), ("user", "hi")), "m")
    assert blocks_of(chat(("system", SYSTEM), ("user", "hi"), stream=True, temperature=0.2, tools=[]), "m") == plain


def test_completions_prompt_and_responses_input() -> None:
    prompt = blocks_of(orjson.dumps({"model": "m", "prompt": SYSTEM + "tail one"}), "m")
    other = blocks_of(orjson.dumps({"model": "m", "prompt": SYSTEM + "tail two"}), "m")
    assert prompt[:4] == other[:4] and prompt[-1] != other[-1]
    assert blocks_of(orjson.dumps({"model": "m", "input": SYSTEM}), "m")[:4] == prompt[:4]
    # Content given as parts is hashed as its raw JSON: the same parts, the same hashes.
    parts = [{"type": "text", "text": SYSTEM}]
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert blocks_of(body, "m") == blocks_of(body, "m") and blocks_of(body, "m")


def test_the_routing_fields_are_read_in_the_same_decode() -> None:
    peeked, prompt = peek_prompt(chat(("user", "hi"), model="x", stream=True, tools=[{"type": "function"}]))
    assert (peeked.model, peeked.stream, peeked.wants_tools) == ("x", True, True)
    assert prompt == b'{"role":"user","content":"hi"}\x00'


def test_no_prompt_or_an_odd_prompt_gives_no_blocks_and_a_bad_body_the_usual_400() -> None:
    assert blocks_of(b'{"model": "m", "input_ids": [1, 2]}', "m") == []
    assert blocks_of(b'{"model": "m", "messages": "not a list"}', "m") == []  # the backend will say
    assert peek_prompt(b'{"model": "m", "messages": "not a list"}')[0].model == "m"
    for bad in (b"[1, 2]", b"{not json", b'{"model": 5, "messages": []}'):
        with pytest.raises(GatewayError) as info:
            peek_prompt(bad)
        assert info.value.status == 400


def test_the_cap_bounds_the_work() -> None:
    """A 1 MiB prompt is cut at MAX_BLOCKS blocks: no more bytes copied or hashed than that."""
    huge = chat(("system", "x" * (1 << 20)), ("user", "y" * (1 << 20)))
    assert len(peek_prompt(huge)[1]) == BLOCK * MAX_BLOCKS
    assert len(blocks_of(huge, "m")) == MAX_BLOCKS
    assert len(block_hashes(b"z" * (1 << 20), "m")) == MAX_BLOCKS
    # Many short messages stop being gathered once the cap is reached.
    many = chat(*(("user", "w" * 100) for _ in range(10_000)))
    assert len(peek_prompt(many)[1]) == BLOCK * MAX_BLOCKS
    assert len(blocks_of(many, "m")) == MAX_BLOCKS


def test_hashes_are_64_bit_and_spread() -> None:
    hashes = {blocks_of(chat(("user", f"prompt number {i}")), "m")[0] for i in range(1000)}
    assert len(hashes) == 1000 and all(0 <= h < 1 << 64 for h in hashes)
    assert sum(h & 3 == 0 for h in hashes) in range(200, 300)  # the low bits are uniform too
