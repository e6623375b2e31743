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
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

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
WORDS_JSON: tuple[bytes, ...] = tuple(orjson.dumps(w) for w in WORDS)

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


class Elapsed(NamedTuple):
    """How long one generation took, as measured by the simulator: prefill (admission to the first
    token) and decoding (first token to the end). llama.cpp reports them as ``timings``."""

    prompt_ms: float
    predicted_ms: float


class StreamFrames:
    """The SSE events of one streamed chat completion or text completion, in the OpenAI shape.

    Every choice ``index`` below ``n`` has its own token head; the kinds that ignore ``n`` use one.
    """

    __slots__ = ("chat", "_data", "_envelope", "_heads", "_tail", "done")

    def __init__(self, *, sse_data: bytes, chat: bool, model: str, n: int = 1) -> None:
        self.chat = chat
        self._data = sse_data
        obj = "chat.completion.chunk" if chat else "text_completion"
        rid = new_id("chatcmpl" if chat else "cmpl")
        self._envelope: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model}
        env = orjson.dumps(self._envelope)[:-1]  # without the closing brace
        field = b'"delta":{"content":' if chat else b'"text":'
        self._heads = [sse_data + env + b',"choices":[{"index":%d,' % k + field for k in range(n)]
        self._tail = (b"}" if chat else b"") + b',"logprobs":null,"finish_reason":null}]}\n\n'
        self.done = sse_data + b"[DONE]\n\n"

    def _event(self, **fields: object) -> bytes:
        return self._data + orjson.dumps({**self._envelope, **fields}) + b"\n\n"

    def role(self, index: int) -> bytes | None:
        """The first event of a chat choice (text completions have none)."""
        if not self.chat:
            return None
        return self._event(
            choices=[
                {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ]
        )

    def token(self, i: int, index: int) -> bytes:
        return self._heads[index] + WORDS_JSON[i % len(WORDS_JSON)] + self._tail

    def ends(
        self, index: int, reason: str, prompt_tokens: int, n_tokens: int, include_usage: bool, elapsed: Elapsed
    ) -> tuple[bytes, ...]:
        """The events that close one choice: its finish chunk."""
        choice: dict[str, object] = {"index": index}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        choice["logprobs"] = None
        choice["finish_reason"] = reason
        return (self._event(choices=[choice]),)

    def trailer(self, prompt_tokens: int, n_tokens: int, include_usage: bool) -> bytes | None:
        """The event after every choice has ended: the usage chunk, when asked for."""
        if not include_usage:
            return None
        return self._event(choices=[], usage=usage(prompt_tokens, n_tokens))


class Answers:
    """The bytes of one kind's answers. This base is the OpenAI shape that most kinds share;
    a kind with its own (``LlamaCppAnswers``) overrides what differs."""

    def frames(self, *, sse_data: bytes, chat: bool, model: str, n: int) -> StreamFrames:
        return StreamFrames(sse_data=sse_data, chat=chat, model=model, n=n)

    def chat_completion(
        self, model: str, n_tokens: int, finish: str, prompt_tokens: int, n: int, elapsed: Elapsed
    ) -> bytes:
        return orjson.dumps(
            {
                "id": new_id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": k,
                        "message": {"role": "assistant", "content": completion_text(n_tokens)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for k in range(n)
                ],
                "usage": usage(prompt_tokens, n_tokens * n),
            }
        )

    def text_completion(
        self, model: str, n_tokens: int, finish: str, prompt_tokens: int, n: int, elapsed: Elapsed
    ) -> bytes:
        text = completion_text(n_tokens)
        return orjson.dumps(
            {
                "id": new_id("cmpl"),
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": k, "text": text, "logprobs": None, "finish_reason": finish} for k in range(n)],
                "usage": usage(prompt_tokens, n_tokens * n),
            }
        )

    def embeddings(
        self, model: str, inputs: Sequence[object], dimensions: int, as_base64: bool, prompt_tokens: int
    ) -> bytes:
        data = []
        for i, item in enumerate(inputs):
            vector = embedding_vector(item, dimensions)
            embedding = _base64_floats(vector) if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )

    def model_list(self, model: str, owned_by: str, n_ctx: int, n_embd: int) -> bytes:
        return orjson.dumps(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": int(time.time()), "owned_by": owned_by}],
            }
        )


OPENAI = Answers()

# -- llama.cpp -------------------------------------------------------------------------------------

#: What llama-server reports as ``system_fingerprint`` when built without a git revision (the
#: pinned test build answers this).
LLAMACPP_FINGERPRINT = "b0-unknown"
#: The training context the simulated model's ``meta`` reports.
LLAMACPP_N_CTX_TRAIN = 131072


def _llamacpp_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # No prompt cache is simulated.
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _rates(n: int, ms: float) -> tuple[float, float]:
    """Milliseconds per token and tokens per second, as llama.cpp derives them."""
    return (ms / n if n else 0.0), (n * 1000.0 / ms if ms > 0 else 0.0)


def llamacpp_timings(prompt_tokens: int, completion_tokens: int, elapsed: Elapsed) -> dict[str, object]:
    """llama.cpp's ``timings`` object, from the simulator's own measurements."""
    # Milliseconds to three places, as llama.cpp prints them; at least 0.001 even without delays.
    prompt_ms, predicted_ms = (max(round(ms, 3), 0.001) for ms in elapsed)
    prompt_per_token, prompt_per_second = _rates(prompt_tokens, prompt_ms)
    predicted_per_token, predicted_per_second = _rates(completion_tokens, predicted_ms)
    return {
        "cache_n": 0,
        "prompt_n": prompt_tokens,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_per_token,
        "prompt_per_second": prompt_per_second,
        "predicted_n": completion_tokens,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_per_token,
        "predicted_per_second": predicted_per_second,
    }


class LlamaCppFrames(StreamFrames):
    """llama-server's stream: its key order, ``system_fingerprint``, no ``logprobs`` in chat chunks,
    ``content: null`` in the role chunk, ``timings`` on the last chunk of each choice, and usage on
    the finish chunk of a text completion whether asked for or not. Each choice ends on its own
    (with its own usage chunk); nothing follows the last one but ``[DONE]``."""

    __slots__ = ("_after", "_tails")

    def __init__(self, *, sse_data: bytes, chat: bool, model: str, n: int = 1) -> None:
        self.chat = chat
        self._data = sse_data
        created = int(time.time())
        rid = new_id("chatcmpl")  # text completions too
        if chat:
            self._envelope = {
                "created": created,
                "id": rid,
                "model": model,
                "system_fingerprint": LLAMACPP_FINGERPRINT,
                "object": "chat.completion.chunk",
            }
            self._after = {}
        else:
            self._envelope = {
                "created": created,
                "model": model,
                "system_fingerprint": LLAMACPP_FINGERPRINT,
                "object": "text_completion",
            }
            self._after = {"id": rid}
        env = orjson.dumps({**self._envelope, **self._after})[1:]  # without the opening brace
        if chat:
            self._heads = [
                sse_data + b'{"choices":[{"finish_reason":null,"index":%d,"delta":{"content":' % k for k in range(n)
            ]
            self._tails = [b"}}]," + env + b"\n\n"] * n
        else:
            self._heads = [sse_data + b'{"choices":[{"text":'] * n
            self._tails = [b',"index":%d,"logprobs":null,"finish_reason":null}],' % k + env + b"\n\n" for k in range(n)]
        self._tail = b""
        self.done = sse_data + b"[DONE]\n\n"

    def _chunk(self, choices: list[dict[str, object]], *extra: Mapping[str, object]) -> bytes:
        doc: dict[str, object] = {"choices": choices, **self._envelope}
        for fields in extra:
            doc.update(fields)
        return self._data + orjson.dumps(doc) + b"\n\n"

    def role(self, index: int) -> bytes | None:
        if not self.chat:
            return None
        choice: dict[str, object] = {
            "finish_reason": None,
            "index": index,
            "delta": {"role": "assistant", "content": None},
        }
        return self._chunk([choice], self._after)

    def token(self, i: int, index: int) -> bytes:
        return self._heads[index] + WORDS_JSON[i % len(WORDS_JSON)] + self._tails[index]

    def ends(
        self, index: int, reason: str, prompt_tokens: int, n_tokens: int, include_usage: bool, elapsed: Elapsed
    ) -> tuple[bytes, ...]:
        timings = {"timings": llamacpp_timings(prompt_tokens, n_tokens, elapsed)}
        used = {"usage": _llamacpp_usage(prompt_tokens, n_tokens)}
        if not self.chat:
            choice: dict[str, object] = {"text": "", "index": index, "logprobs": None, "finish_reason": reason}
            return (self._chunk([choice], used, self._after, timings),)
        choice = {"finish_reason": reason, "index": index, "delta": {}}
        if not include_usage:
            return (self._chunk([choice], self._after, timings),)
        return self._chunk([choice], self._after), self._chunk([], self._after, used, timings)

    def trailer(self, prompt_tokens: int, n_tokens: int, include_usage: bool) -> bytes | None:
        return None


class LlamaCppAnswers(Answers):
    """llama-server's answers. Its usage counts the tokens of one choice, even with ``n`` > 1."""

    def frames(self, *, sse_data: bytes, chat: bool, model: str, n: int) -> StreamFrames:
        return LlamaCppFrames(sse_data=sse_data, chat=chat, model=model, n=n)

    def _whole(self, choices: list[dict[str, object]], obj: str, model: str, **tail: object) -> bytes:
        return orjson.dumps(
            {
                "choices": choices,
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": LLAMACPP_FINGERPRINT,
                "object": obj,
                **tail,
            }
        )

    def chat_completion(
        self, model: str, n_tokens: int, finish: str, prompt_tokens: int, n: int, elapsed: Elapsed
    ) -> bytes:
        text = completion_text(n_tokens)
        choices: list[dict[str, object]] = [
            {"finish_reason": finish, "index": k, "message": {"role": "assistant", "content": text}} for k in range(n)
        ]
        return self._whole(
            choices,
            "chat.completion",
            model,
            usage=_llamacpp_usage(prompt_tokens, n_tokens),
            id=new_id("chatcmpl"),
            timings=llamacpp_timings(prompt_tokens, n_tokens, elapsed),
        )

    def text_completion(
        self, model: str, n_tokens: int, finish: str, prompt_tokens: int, n: int, elapsed: Elapsed
    ) -> bytes:
        text = completion_text(n_tokens)
        choices: list[dict[str, object]] = [
            {"text": text, "index": k, "logprobs": None, "finish_reason": finish} for k in range(n)
        ]
        return self._whole(
            choices,
            "text_completion",
            model,
            usage=_llamacpp_usage(prompt_tokens, n_tokens),
            id=new_id("chatcmpl"),
            timings=llamacpp_timings(prompt_tokens, n_tokens, elapsed),
        )

    def embeddings(
        self, model: str, inputs: Sequence[object], dimensions: int, as_base64: bool, prompt_tokens: int
    ) -> bytes:
        data: list[dict[str, object]] = []
        for i, item in enumerate(inputs):
            vector = embedding_vector(item, dimensions)
            if as_base64:
                data.append(
                    {
                        "embedding": _base64_floats(vector),
                        "index": i,
                        "object": "embedding",
                        "encoding_format": "base64",
                    }
                )
            else:
                data.append({"embedding": vector, "index": i, "object": "embedding"})
        return orjson.dumps(
            {
                "model": model,
                "object": "list",
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                "data": data,
            }
        )

    def model_list(self, model: str, owned_by: str, n_ctx: int, n_embd: int) -> bytes:
        # The "models" list is llama-server's Ollama-style listing, next to the OpenAI one.
        ollama_style = {
            "name": model,
            "model": model,
            "modified_at": "",
            "size": "",
            "digest": "",
            "type": "model",
            "description": "",
            "tags": [""],
            "capabilities": ["completion"],
            "parameters": "",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "",
                "families": [""],
                "parameter_size": "",
                "quantization_level": "",
            },
        }
        openai_style = {
            "id": model,
            "aliases": [model],
            "tags": [],
            "object": "model",
            "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
            "created": int(time.time()),
            "owned_by": owned_by,
            "meta": {
                "vocab_type": 2,
                "n_vocab": len(WORDS),
                "n_ctx": n_ctx,
                "n_ctx_train": max(n_ctx, LLAMACPP_N_CTX_TRAIN),
                "n_embd": n_embd,
                "n_params": 0,
                "size": 0,
                "ftype": "all F32",
            },
        }
        return orjson.dumps({"models": [ollama_style], "object": "list", "data": [openai_style]})


LLAMACPP = LlamaCppAnswers()


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
