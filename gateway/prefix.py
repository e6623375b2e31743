"""The prompt's block hashes, for prefix-cache affinity (``GATEWAY_BALANCE=prefix``).

Pure and synchronous. The prompt is read from the request body already in hand: the chat
``messages`` in order, each its role and its content as the client's raw JSON bytes (never decoded
to text: the same client sends the same bytes for the same prefix), the completions ``prompt``, or
the Responses ``input``. That byte stream is cut into fixed blocks of ``BLOCK`` bytes (about 64
tokens), and block ``i``'s hash covers every byte up to its end (a running blake2b, seeded with the
model): two prompts share block ``i``'s hash only if they share the whole prefix up to it, as an
engine's prefix cache reuses a block only if every block before it is cached.

At most ``MAX_BLOCKS`` blocks are hashed: the work and the state per request are bounded whatever
the prompt's length (a prefix longer than the cap is told apart by its first ``MAX_BLOCKS`` blocks
only, which is enough to place it).
"""

from __future__ import annotations

from hashlib import blake2b

import msgspec

#: Bytes per block: about 64 tokens at ~4 characters a token.
BLOCK = 256
#: Blocks hashed at most: 16 KiB of prompt.
MAX_BLOCKS = 64


class _Message(msgspec.Struct):
    role: msgspec.Raw = msgspec.Raw()
    content: msgspec.Raw = msgspec.Raw()


class _Prompt(msgspec.Struct):
    """Only the fields that make the prompt; everything else is skipped, not decoded."""

    messages: list[_Message] | None = None
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()


_decoder = msgspec.json.Decoder(_Prompt)
#: Separates a message's role from its content, and one message from the next: a byte that never
#: appears unescaped in JSON text, so "ab" + "c" never hashes like "a" + "bc".
_SEP = b"\x00"


def prompt_bytes(body: bytes, limit: int = BLOCK * MAX_BLOCKS) -> bytes:
    """The first ``limit`` bytes of the prompt in ``body`` (empty when there is none, or the body
    is not what a chat, completions or responses request looks like: the backend will say so)."""
    try:
        p = _decoder.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return b""
    if p.messages is not None:
        out = bytearray()
        for m in p.messages:
            out += m.role
            out += _SEP
            out += m.content
            out += _SEP
            if len(out) >= limit:
                break
        return bytes(out[:limit])
    raw = p.prompt if len(p.prompt) else p.input
    return bytes(memoryview(raw)[:limit])


def block_hashes(prompt: bytes, model: str) -> list[int]:
    """Chained hashes of ``prompt``'s blocks (the last one may be partial), at most
    ``MAX_BLOCKS``, each a 64-bit int covering the model and every byte up to its block's end."""
    h = blake2b(model.encode(), digest_size=8)
    out: list[int] = []
    view = memoryview(prompt)
    end = min(len(prompt), BLOCK * MAX_BLOCKS)
    for start in range(0, end, BLOCK):
        h.update(view[start : start + BLOCK])
        out.append(int.from_bytes(h.digest(), "little"))  # digest() leaves the running state as is
    return out


def blocks_of(body: bytes, model: str) -> list[int]:
    """The block hashes of the prompt in a JSON request ``body`` for ``model``."""
    return block_hashes(prompt_bytes(body), model)
