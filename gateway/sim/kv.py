"""The engine model (``--engine``): a prefix cache of KV blocks and one shared prefill lane.

What makes routing matter on a real engine, in the manner of vLLM's automatic prefix caching:

* The prompt, as the engine would see it (chat, Messages and Responses messages in order with
  their roles, or the completions prompt: ``prompt_text``), is cut into blocks of ``block_tokens`` tokens (tokens
  estimated from characters, four to a token, as everywhere in the simulator). Each full block is
  named by a hash chained over every block before it, seeded by the model name
  (``block_hashes``), so a block can be found in the cache only if every block before it can.
  As in vLLM, the last prompt token is always computed, so a prompt of ``n`` tokens looks up at
  most ``(n - 1) // block_tokens`` blocks.
* ``PrefixCache`` holds at most ``kv_blocks`` blocks, least recently used first out. Running
  sequences take room from it: the cache keeps ``kv_blocks`` minus what the running sequences
  hold beyond their cacheable prompt blocks (a sequence holds its prompt and its
  completion, rounded up to whole blocks; prompt blocks that running sequences share are held
  once, as vLLM shares them). Simplified: a held prompt block is not pinned (under pressure the LRU
  may drop it), and KV capacity does not limit admission (no preemption is modelled): past it,
  the usage gauge stays at 1.
  A request's blocks are touched last to first, so its first block is the last to go, as vLLM
  frees a request's blocks in reverse order.
* Prefill is one lane shared by every request (the GPU computes one prefill at a time): a request
  queues for the lane, then takes ``prefill_us_per_token`` per uncached prompt token. Time to
  first token is the wait for a slot (``max_running``), the wait for the lane, the uncached
  prefill and the base ``ttft_ms``; decode gaps then grow with the running batch (``engine.py``).
  Requests waiting for a slot or for the lane count as waiting, the way a loaded vLLM reports
  them; chunked prefill and its interference with decode steps are not modelled.

Counters follow vLLM: prefix-cache queries are the prompt tokens looked up, hits the cached ones.

Defaults (``config.ENGINE``, ``SimConfig.block_tokens``/``kv_blocks``): one Llama-3.1-8B-class
model in BF16 on one H100 SXM 80 GB, served by vLLM with its defaults. They are estimates from
published specifications, not measurements; a benchmark should find the knee with a rate sweep
rather than trust them.

* ``block_tokens`` 16: vLLM's default ``block_size``.
* ``kv_blocks`` 26,000 (416k tokens): KV per token is 2 (K, V) x 32 layers x 8 KV heads x 128
  dims x 2 bytes = 128 KiB (Llama-3.1-8B's config.json); vLLM's ``gpu_memory_utilization`` 0.9 of
  80 GB leaves ~71 GiB, less ~15 GiB of weights (8.03 B parameters x 2 bytes) and ~4 GiB assumed
  for activations and CUDA graphs: ~52 GiB, 26,624 blocks of 16 tokens, rounded down to 26,000.
* ``prefill_us_per_token`` 40 (25k tokens/s): 2 x 8.03 B = 16 GFLOP per token against H100 SXM's
  989 TFLOPS dense BF16 (NVIDIA's datasheet) at an assumed 40% utilisation; attention's share at
  long contexts is ignored.
* ``itl_ms`` 6: a decode step reads the 16 GB of weights at 3.35 TB/s (datasheet): 4.8 ms, plus
  assumed overhead. ``batch_slowdown`` 0.016: the step time assumed to double at 64 running
  sequences (every sequence adds its KV reads and sampling), so ~30 ms at 256.
* ``max_running`` 256: vLLM's long-standing ``max_num_seqs`` default. ``ttft_ms`` 10: one scheduler
  step and the first decode step, assumed. ``itl_jitter_ms`` 0.5.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from typing import Any

#: Characters per token, as ``responses.estimate_tokens`` counts them.
CHARS_PER_TOKEN = 4


def _text(value: object) -> str:
    """The text of a message's content: a string, or the text of its parts in order."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(part) for part in value)
    if isinstance(value, dict):
        text = value.get("text")
        return text if isinstance(text, str) else _text(value.get("content"))
    return ""


def _messages(messages: object, first: object = None) -> str:
    """Each message as its role and its content, in order, after ``first`` (a system prompt or
    instructions, as the system role)."""
    parts = [f"<|system|>{_text(first)}"] if first else []
    if isinstance(messages, str):  # a Responses input given as text
        parts.append(f"<|user|>{messages}")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            role = message.get("role")
            parts.append(f"<|{role if isinstance(role, str) else ''}|>{_text(message.get('content'))}")
    return "\n".join(parts)


def prompt_text(body: dict[str, Any], kind: str) -> str:
    """What the engine's prefix cache sees of a request: each message as its role and its
    content, in order (chat; Messages after its ``system``; Responses' ``input`` after its
    ``instructions``), or the completions prompt (token ids as numbers)."""
    if kind == "chat":
        return _messages(body.get("messages"))
    if kind == "messages":
        return _messages(body.get("messages"), body.get("system"))
    if kind == "responses":
        return _messages(body.get("input"), body.get("instructions"))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return " ".join(str(p) if isinstance(p, int) else _text(p) for p in prompt)
    return _text(prompt)


def block_hashes(text: str, model: str, block_tokens: int, prompt_tokens: int) -> list[int]:
    """The chained hashes of the prompt's full blocks that the engine may look up."""
    block_chars = block_tokens * CHARS_PER_TOKEN
    n = min(len(text) // block_chars, max(0, prompt_tokens - 1) // block_tokens)
    parent = hashlib.blake2b(model.encode(), digest_size=8).digest()
    out: list[int] = []
    for i in range(n):
        parent = hashlib.blake2b(
            parent + text[i * block_chars : (i + 1) * block_chars].encode(), digest_size=8
        ).digest()
        out.append(int.from_bytes(parent, "big"))
    return out


class PrefixCache:
    """Block hash -> present, least recently used first; a prefix hits only block by block from
    the first."""

    __slots__ = ("capacity", "_blocks")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks are cached (stops at the first missing one)."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def store(self, hashes: list[int], room: int) -> None:
        """Add or refresh a request's blocks, then evict the least recently used down to ``room``
        (at most ``capacity``)."""
        blocks = self._blocks
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        limit = max(0, min(room, self.capacity))
        while len(blocks) > limit:
            blocks.popitem(last=False)


class Engine:
    """One simulated replica's engine state: the prefix cache, the prefill lane, KV in use and the
    counters that ``/metrics`` reports."""

    __slots__ = (
        "block_tokens", "kv_blocks", "cache", "private_blocks", "prefill_waiting", "_shared",
        "prefix_queries", "prefix_hits", "_lane_free_at",
    )  # fmt: skip

    def __init__(self, block_tokens: int, kv_blocks: int) -> None:
        self.block_tokens = block_tokens
        self.kv_blocks = kv_blocks
        self.cache = PrefixCache(kv_blocks)
        #: Blocks held by admitted sequences that are no cacheable prompt block (the completion,
        #: the last partial block): room the cache cannot use.
        self.private_blocks = 0
        #: Prompt blocks held by admitted sequences: hash -> how many hold it.
        self._shared: dict[int, int] = {}
        #: Admitted sequences queued for the prefill lane (reported as waiting, not running).
        self.prefill_waiting = 0
        #: Prompt tokens looked up in the prefix cache, and those found there.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._lane_free_at = 0.0

    @property
    def held_blocks(self) -> int:
        """KV blocks held by admitted sequences, a shared prompt block once."""
        return len(self._shared) + self.private_blocks

    @property
    def kv_usage(self) -> float:
        """Share of the KV blocks held by running sequences, 0 to 1."""
        return min(1.0, self.held_blocks / self.kv_blocks)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def lookup(self, hashes: list[int], prompt_tokens: int) -> int:
        """Count one prefix-cache query; the prompt tokens found cached."""
        cached = self.cache.match(hashes) * self.block_tokens
        self.prefix_queries += prompt_tokens
        self.prefix_hits += cached
        return cached

    async def prefill(self, hashes: list[int], prompt_tokens: int, seconds_per_token: float) -> int:
        """Look the prompt up, queue for the lane, compute the uncached tokens and cache the
        blocks. Returns the cached prompt tokens. The caller holds the sequence's blocks."""
        cached = self.lookup(hashes, prompt_tokens)
        duration = (prompt_tokens - cached) * seconds_per_token
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._lane_free_at)
        end = self._lane_free_at = start + duration
        try:
            if start > now:
                self.prefill_waiting += 1
                try:
                    await asyncio.sleep(start - now)
                finally:
                    self.prefill_waiting -= 1
            if duration > 0:
                await asyncio.sleep(duration)
        except asyncio.CancelledError:
            if self._lane_free_at == end:
                # The last reservation gives its lane time back.
                self._lane_free_at = max(loop.time(), start)
            raise
        self.cache.store(hashes, self.kv_blocks - self.private_blocks)
        return cached

    def hold(self, hashes: list[int], blocks: int) -> None:
        """A sequence is admitted with ``blocks`` KV blocks, its prompt's ``hashes`` among them."""
        self.private_blocks += blocks - len(hashes)
        shared = self._shared
        for h in hashes:
            shared[h] = shared.get(h, 0) + 1

    def release(self, hashes: list[int], blocks: int) -> None:
        """The sequence that ``hold`` admitted is done."""
        self.private_blocks -= blocks - len(hashes)
        shared = self._shared
        for h in hashes:
            n = shared[h] - 1
            if n:
                shared[h] = n
            else:
                del shared[h]

    def __repr__(self) -> str:
        return (
            f"<Engine [KV: {self.held_blocks}/{self.kv_blocks} blocks held, {len(self.cache)} cached | "
            f"prefix cache: {self.prefix_hits}/{self.prefix_queries} tokens hit | "
            f"{self.prefill_waiting} waiting for prefill]>"
        )
