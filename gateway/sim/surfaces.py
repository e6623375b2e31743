"""The bytes of the surfaces beyond chat and completions: the Anthropic Messages API and the
Responses API (streamed as typed events, or whole), count_tokens, tokenize and detokenize, rerank
and score.

The event names, their order and where usage goes follow Anthropic's and OpenAI's references, as
vLLM and llama.cpp send them: a Messages stream is ``message_start`` (input tokens), then per block
``content_block_start``, ``content_block_delta``..., ``content_block_stop``, then ``message_delta``
(stop reason, output tokens) and ``message_stop``; a Responses stream is ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., the ``.done`` events, and ``response.completed`` with the usage.
Each frames class has ``StreamFrames``' interface, so the simulator's one stream loop (timing,
faults, disconnects) serves them all.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.sim.responses import WORDS, WORDS_JSON, Elapsed, completion_text, new_id


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def anthropic_error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


# -- Anthropic Messages ---------------------------------------------------------------------------


def stop_reason(finish: str, tool: str | None) -> str:
    if tool is not None:
        return "tool_use"
    return "max_tokens" if finish == "length" else "end_turn"


def _delta(delta: dict[str, Any]) -> bytes:
    return _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})


#: The Messages stream's token events, one per word: a text block's, and a tool call's input as
#: ``input_json_delta`` pieces of ``{"text": "<the words>"}`` (the first piece opens the object).
_TEXT_DELTAS = tuple(_delta({"type": "text_delta", "text": w}) for w in WORDS)
_JSON_DELTAS = tuple(_delta({"type": "input_json_delta", "partial_json": w[1:-1].decode()}) for w in WORDS_JSON)
_FIRST_JSON_DELTA = _delta({"type": "input_json_delta", "partial_json": '{"text": "' + WORDS_JSON[0][1:-1].decode()})


class MessagesFrames:
    """One streamed Messages answer: a text block, or a ``tool_use`` block calling ``tool`` with
    ``{"text": <the words>}`` as its input, sent as ``input_json_delta`` pieces."""

    __slots__ = ("model", "tool", "prompt_tokens", "message_id", "tool_id", "done")

    def __init__(self, model: str, tool: str | None, prompt_tokens: int) -> None:
        self.model = model
        self.tool = tool
        self.prompt_tokens = prompt_tokens
        self.message_id = new_id("msg")
        self.tool_id = new_id("toolu")
        self.done = b""

    def role(self, index: int) -> bytes:
        """``message_start``, the block's ``content_block_start`` and a ``ping``: one write."""
        prompt_tokens = self.prompt_tokens
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 1},
        }
        if self.tool is not None:
            block: dict[str, Any] = {"type": "tool_use", "id": self.tool_id, "name": self.tool, "input": {}}
        else:
            block = {"type": "text", "text": ""}
        return (
            _event("message_start", {"type": "message_start", "message": message})
            + _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
            + _event("ping", {"type": "ping"})
        )

    def token(self, i: int, index: int) -> bytes:
        """One word's ``content_block_delta`` (built once per word, at import)."""
        if self.tool is None:
            return _TEXT_DELTAS[i % len(_TEXT_DELTAS)]
        return _FIRST_JSON_DELTA if i == 0 else _JSON_DELTAS[i % len(_JSON_DELTAS)]

    def ends(
        self, index: int, finish: str, prompt_tokens: int, n_tokens: int, include_usage: bool, elapsed: Elapsed
    ) -> tuple[bytes, ...]:
        out = b""
        if self.tool is not None:
            closing = '{"text": ""}' if n_tokens == 0 else '"}'
            delta = {"type": "input_json_delta", "partial_json": closing}
            out += _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        out += _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        out += _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason(finish, self.tool), "stop_sequence": None},
                "usage": {"output_tokens": n_tokens},
            },
        )
        return (out + _event("message_stop", {"type": "message_stop"}),)

    def trailer(self, prompt_tokens: int, n_tokens: int, include_usage: bool) -> bytes | None:
        return None

    def stream_error(self, message: str) -> bytes:
        return b"event: error\ndata: " + anthropic_error("api_error", message) + b"\n\n"


def message_body(model: str, n_tokens: int, finish: str, prompt_tokens: int, tool: str | None) -> bytes:
    text = completion_text(n_tokens)
    if tool is not None:
        content: list[dict[str, Any]] = [
            {"type": "tool_use", "id": new_id("toolu"), "name": tool, "input": {"text": text}}
        ]
    else:
        content = [{"type": "text", "text": text}]
    return orjson.dumps(
        {
            "id": new_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason(finish, tool),
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": n_tokens},
        }
    )


# -- Responses ------------------------------------------------------------------------------------


def response_object(
    rid: str, model: str, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def response_usage(prompt_tokens: int, n_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + n_tokens,
    }


def _message_item(item_id: str, text: str | None) -> dict[str, Any]:
    done = text is not None
    content: list[dict[str, Any]] = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []
    )
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": content,
    }


#: A ``response.output_text.delta`` event's bytes around its sequence number, item id and word.
_DELTA_TAIL = b',"logprobs":[]}\n\n'
_DELTA_HEAD = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'


class ResponsesFrames:
    """One streamed Responses answer with one message of text; ``final`` is the completed
    response object (what the simulator stores for retrieval)."""

    __slots__ = (
        "model",
        "prompt_tokens",
        "response_id",
        "item_id",
        "seq",
        "done",
        "final",
        "_delta_mid",
    )

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.response_id = new_id("resp")
        self.item_id = new_id("msg")
        self.seq = 0
        self.done = b""
        self.final: dict[str, Any] | None = None
        self._delta_mid = b',"item_id":' + orjson.dumps(self.item_id) + b',"output_index":0,"content_index":0,"delta":'

    def _ev(self, name: str, **fields: Any) -> bytes:
        payload = {"type": name, "sequence_number": self.seq, **fields}
        self.seq += 1
        return _event(name, payload)

    def role(self, index: int) -> bytes:
        """The events before the first token, in one write."""
        pending = response_object(self.response_id, self.model, "in_progress", [], None)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return (
            self._ev("response.created", response=pending)
            + self._ev("response.in_progress", response=pending)
            + self._ev("response.output_item.added", output_index=0, item=_message_item(self.item_id, None))
            + self._ev(
                "response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []}
            )
        )

    def token(self, i: int, index: int) -> bytes:
        """One word's ``response.output_text.delta``: the bytes ``_ev`` would write, with the
        parts around the sequence number and the word built once per response."""
        seq = self.seq
        self.seq = seq + 1
        return _DELTA_HEAD + b"%d" % seq + self._delta_mid + WORDS_JSON[i % len(WORDS_JSON)] + _DELTA_TAIL

    def ends(
        self, index: int, finish: str, prompt_tokens: int, n_tokens: int, include_usage: bool, elapsed: Elapsed
    ) -> tuple[bytes, ...]:
        text = completion_text(n_tokens)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        item = _message_item(self.item_id, text)
        self.final = response_object(
            self.response_id, self.model, "completed", [item], response_usage(prompt_tokens, n_tokens)
        )
        return (
            self._ev("response.output_text.done", **where, text=text, logprobs=[])
            + self._ev("response.content_part.done", **where, part=item["content"][0])
            + self._ev("response.output_item.done", output_index=0, item=item),
            self._ev("response.completed", response=self.final),
        )

    def trailer(self, prompt_tokens: int, n_tokens: int, include_usage: bool) -> bytes | None:
        return None

    def stream_error(self, message: str) -> bytes:
        return self._ev("error", code="server_error", message=message, param=None)


def response_body(model: str, n_tokens: int, prompt_tokens: int) -> dict[str, Any]:
    item = _message_item(new_id("msg"), completion_text(n_tokens))
    return response_object(new_id("resp"), model, "completed", [item], response_usage(prompt_tokens, n_tokens))


# -- tokenize, rerank, score -----------------------------------------------------------------------
# The simulated tokenizer: one token per UTF-8 byte, so detokenize(tokenize(text)) == text.


def tokens_of(text: str) -> list[int]:
    return list(text.encode())


def text_of(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8", "replace")


def relevance(query: str, document: str) -> float:
    """A score in [0, 1]: the share of the document's words that the query has."""
    q = set(query.lower().split())
    words = document.lower().split()
    return round(sum(w in q for w in words) / len(words), 6) if words else 0.0


def rerank_body(model: str, query: str, documents: list[str], top_n: int | None, prompt_tokens: int) -> bytes:
    scores = [relevance(query, d) for d in documents]
    order = sorted(range(len(documents)), key=lambda i: -scores[i])
    scored = [{"index": i, "relevance_score": scores[i], "document": {"text": documents[i]}} for i in order]
    return orjson.dumps(
        {
            "id": new_id("rerank"),
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            "results": scored[:top_n] if top_n else scored,
        }
    )


def score_body(model: str, query: str, documents: list[str], prompt_tokens: int, elapsed: Elapsed | None) -> bytes:
    return orjson.dumps(
        {
            "id": new_id("score"),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": [{"index": i, "object": "score", "score": relevance(query, d)} for i, d in enumerate(documents)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
