"""The prompt's block hashes, for prefix-cache affinity (``GATEWAY_BALANCE=prefix``).

Pure and synchronous. The prompt is read from the request body already in hand, in the same
decode as the routing fields (``peek_prompt``): the chat (or Anthropic Messages) ``messages`` in
order, after the Messages ``system`` prompt when there is one, each as the client's raw JSON bytes
(its role, content and any other field; never decoded to text: the same client sends the same bytes
for the same prefix), the completions ``prompt``, or the Responses ``input``.
That byte stream is cut into fixed blocks of ``BLOCK`` bytes (about 128 tokens), and block ``i``'s
hash covers every byte up to its end (a running SHA-256, seeded with the model): two prompts share
block ``i``'s hash only if they share the whole prefix up to it, as an engine's prefix cache reuses
a block only if every block before it is cached.

At most ``MAX_BLOCKS`` blocks are hashed: the work and the state per request are bounded whatever
the prompt's length (prompts that share their first ``BLOCK * MAX_BLOCKS`` bytes are placed alike,
which is what their caches have in common anyway).
"""

from __future__ import annotations

from hashlib import sha256

import msgspec

from gateway.payload import Peek, peek

#: Bytes per block: about 128 tokens at ~4 characters a token. Each block costs one digest (about
#: 0.4 us): larger blocks, less work per request; smaller ones, finer affinity.
BLOCK = 512
#: Blocks hashed at most: 16 KiB of prompt.
MAX_BLOCKS = 32


class PromptPeek(Peek):
    """The routing fields and the prompt's: everything else is skipped, not decoded."""

    messages: list[msgspec.Raw] | None = None
    #: The Anthropic Messages API's system prompt, which comes before its ``messages``.
    system: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()


_decoder = msgspec.json.Decoder(PromptPeek)
#: Ends each message: a byte that never appears in JSON text, so ["ab", "c"] never hashes like
#: ["a", "bc"].
_SEP = b"\x00"


def peek_prompt(body: bytes, limit: int = BLOCK * MAX_BLOCKS) -> tuple[Peek, bytes]:
    """``payload.peek(body)`` and the first ``limit`` bytes of its prompt, in one decode. A body
    whose prompt fields have an unexpected shape gets an empty prompt (the backend will say what
    is wrong), and the routing fields as ``peek`` reads them (a 400 where it gives one)."""
    try:
        p = _decoder.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return peek(body), b""
    if p.messages is not None:
        out = bytearray()
        if len(p.system):
            out += p.system
            out += _SEP
        for m in p.messages:
            out += m
            out += _SEP
            if len(out) >= limit:
                break
        return p, bytes(out[:limit])
    raw = p.prompt if len(p.prompt) else p.input
    return p, bytes(memoryview(raw)[:limit])


def block_hashes(prompt: bytes, model: str) -> list[int]:
    """Chained hashes of ``prompt``'s blocks (the last one may be partial), at most
    ``MAX_BLOCKS``, each a 64-bit int covering the model and every byte up to its block's end."""
    h = sha256(model.encode())
    update, digest = h.update, h.digest
    out: list[int] = []
    view = memoryview(prompt)
    end = min(len(prompt), BLOCK * MAX_BLOCKS)
    for start in range(0, end, BLOCK):
        update(view[start : start + BLOCK])
        out.append(int.from_bytes(digest()[:8], "little"))  # digest() leaves the running state as is
    return out


def blocks_of(body: bytes, model: str) -> list[int]:
    """The block hashes of the prompt in a JSON request ``body`` for ``model`` (tests, benchmarks)."""
    return block_hashes(peek_prompt(body)[1], model)
