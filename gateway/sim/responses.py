"""The bytes of every answer: SSE chunks, whole completions, embeddings, the model list.

A stream's chunks share everything but the token, so each ``StreamFrames`` builds the constant head
and tail of its chunks once and a token chunk is one concatenation. The JSON matches openai-python's
``ChatCompletionChunk`` / ``Completion`` / ``CreateEmbeddingResponse`` models.
"""

from __future__ import annotations

import array
import base64
import hashlib
import itertools
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

#: What the model "says": plain words, one token each.
WORDS: tuple[str, ...] = tuple(
    (" " + w)
    for w in (
        "the quick brown fox jumps over the lazy dog while a small model keeps talking about "
        "nothing in particular and every word is one token so counting them is easy for tests "
        "that check usage against the number of content chunks in a stream of simulated text"
    ).split()
)
_WORDS_JSON: tuple[bytes, ...] = tuple(orjson.dumps(w) for w in WORDS)

_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)

DEFAULT_DIMENSIONS = 32


def new_id(prefix: str) -> str:
    return f"{prefix}-sim{_ID_PREFIX}{next(_ids):x}"


def completion_text(n_tokens: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(n_tokens))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def estimate_tokens(chars: int) -> int:
    """About four characters per token, at least one."""
    return max(1, (chars + 3) // 4)


def prompt_chars(value: object) -> int:
    """Characters of text in a prompt, a message list, or content parts, however nested.

    A token id (a prompt given as ids) counts as four characters: one token.
    """
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(prompt_chars(value.get(key)) for key in ("content", "text") if key in value)
    if isinstance(value, list):
        return sum(4 if isinstance(v, int) else prompt_chars(v) for v in value)
    return 0


class StreamFrames:
    """The SSE events of one streamed chat completion or text completion."""

    __slots__ = ("chat", "_data", "_envelope", "_head", "_tail", "done")

    def __init__(self, *, sse_data: bytes, chat: bool, model: str) -> None:
        self.chat = chat
        self._data = sse_data
        obj = "chat.completion.chunk" if chat else "text_completion"
        rid = new_id("chatcmpl" if chat else "cmpl")
        self._envelope: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model}
        env = orjson.dumps(self._envelope)[:-1]  # without the closing brace
        if chat:
            self._head = sse_data + env + b',"choices":[{"index":0,"delta":{"content":'
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._head = sse_data + env + b',"choices":[{"index":0,"text":'
            self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'
        self.done = sse_data + b"[DONE]\n\n"

    def _event(self, **fields: object) -> bytes:
        return self._data + orjson.dumps({**self._envelope, **fields}) + b"\n\n"

    def role(self) -> bytes:
        return self._event(
            choices=[
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ]
        )

    def token(self, i: int) -> bytes:
        return self._head + _WORDS_JSON[i % len(_WORDS_JSON)] + self._tail

    def finish(self, reason: str) -> bytes:
        choice: dict[str, object] = {"index": 0}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        choice["logprobs"] = None
        choice["finish_reason"] = reason
        return self._event(choices=[choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._event(choices=[], usage=usage(prompt_tokens, completion_tokens))


def chat_completion(model: str, n_tokens: int, finish: str, prompt_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion_text(n_tokens)},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage(prompt_tokens, n_tokens),
        }
    )


def text_completion(model: str, n_tokens: int, finish: str, prompt_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": completion_text(n_tokens), "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, n_tokens),
        }
    )


def embedding_vector(item: object, dimensions: int) -> list[float]:
    """A deterministic unit vector for an input, so equal inputs embed equally."""
    seed = orjson.dumps(item)
    raw = bytearray()
    for block in range((dimensions * 2 + 63) // 64):
        raw += hashlib.blake2b(seed, digest_size=64, salt=block.to_bytes(16, "little")).digest()
    values = [(int.from_bytes(raw[2 * i : 2 * i + 2], "little") - 32768) / 32768.0 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _base64_floats(values: list[float]) -> str:
    packed = array.array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embeddings(model: str, inputs: Sequence[object], dimensions: int, as_base64: bool, prompt_tokens: int) -> bytes:
    data = []
    for i, item in enumerate(inputs):
        vector = embedding_vector(item, dimensions)
        data.append({"object": "embedding", "index": i, "embedding": _base64_floats(vector) if as_base64 else vector})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def model_list(model: str, owned_by: str) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": int(time.time()), "owned_by": owned_by}],
        }
    )
