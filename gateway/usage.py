"""Tokens a request used, read once at its end from the last bytes relayed.

OpenAI-compatible servers put ``usage`` at the end: the final usage chunk of a stream, or the end
of a JSON body. Only that tail is looked at; nothing else of the body is parsed, and the request is
never changed to ask for usage. Each route says how its usage reads (``Route.usage``):

- ``openai``: ``prompt_tokens`` and ``completion_tokens`` in the tail; a stream without them is
  estimated from its chunk count;
- ``responses``: ``input_tokens`` and ``output_tokens`` in the tail (``response.completed``, or the
  body's ``usage``);
- ``anthropic``: a body's ``usage`` in its tail; a stream's input tokens from ``message_start`` in
  the pieces before its first token (``Exchange.head``) and its output tokens from the final
  ``message_delta`` in the tail (input counted once, also where an engine repeats it there); input
  tokens include those read from or written to the prompt cache, which Anthropic's usage counts
  apart (llama.cpp's ``message_start`` says 1 input token and 19 read from its cache);
- ``reported`` (rerank, score): ``prompt_tokens`` (or ``input_tokens``) in the tail when the engine
  reports any, completion 0; never estimated;
- ``none`` (count_tokens, tokenize, detokenize, stored responses): nothing.

``read_usage`` gives one ``Usage`` per request, which the metrics
(``Metrics.record``) and the tokens-per-minute limit both take.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from gateway.exchange import Exchange

#: The largest token count taken from a backend's usage (the keys file's tpm bound).
MAX_USAGE = 1_000_000_000

_json_decoder = json.JSONDecoder()


class Usage(NamedTuple):
    """A finished request's tokens."""

    prompt: int
    completion: int
    #: True when the backend sent no usage and ``completion`` was counted from a stream's content
    #: events (``prompt`` is then 0).
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def read_usage(ex: Exchange, fmt: str = "openai") -> Usage | None:
    """The tokens of a finished request: the backend's usage, else for a stream an estimate from
    its chunks; None when it was not a success or neither can be had."""
    if not ex.started or not 200 <= ex.status < 300:
        return None
    if fmt != "openai":
        return _surface_usage(ex, fmt)
    found = exchange_usage(ex)
    if found is not None:
        return Usage(*found)
    if ex.sse:
        # Role chunk, finish chunk and [DONE] carry no content; a cut stream lacks the last two.
        framing = 3 if ex.end == "done" else 1
        return Usage(0, max(ex.chunks - framing, 0), estimated=True)
    return None


def _surface_usage(ex: Exchange, fmt: str) -> Usage | None:
    if fmt == "none":
        return None
    tail = _tail_usage(ex)
    if fmt == "anthropic":
        head = None
        if ex.sse:
            at = ex.head.find(b'"usage"')
            head = _usage_value(ex.head, at) if at >= 0 else None
        prompt = _anthropic_input(head) if head is not None else None
        if prompt is None and tail is not None:
            prompt = _anthropic_input(tail)
        completion = _count(tail, "output_tokens") if tail is not None else None
        if prompt is None and completion is None:
            return None
        return Usage(prompt or 0, completion or 0)
    if tail is None:
        return None
    if fmt == "reported":
        prompt = _count(tail, "prompt_tokens")
        if prompt is None:
            prompt = _count(tail, "input_tokens")
        return None if prompt is None else Usage(prompt, 0)
    prompt, completion = _count(tail, "input_tokens"), _count(tail, "output_tokens")
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion)


def _anthropic_input(usage: dict[str, object]) -> int | None:
    """Anthropic's input tokens: ``input_tokens`` counts only those after the last cache
    breakpoint; those read from or written to the prompt cache are counted beside it."""
    base = _count(usage, "input_tokens")
    if base is None:
        return None
    cached = (_count(usage, key) or 0 for key in ("cache_read_input_tokens", "cache_creation_input_tokens"))
    return min(base + sum(cached), MAX_USAGE)


def _tail_usage(ex: Exchange) -> dict[str, object] | None:
    """The last ``"usage"`` object in the last two pieces relayed, without joining them when the
    last one holds ``"usage"`` (the last occurrence in both is then the last one in it)."""
    last = ex.last
    at = last.rfind(b'"usage"')
    if at >= 0:
        return _usage_value(last, at)
    if not ex.prev:
        return None
    both = ex.prev + last
    at = both.rfind(b'"usage"')
    return _usage_value(both, at) if at >= 0 else None


def _count(usage: dict[str, object], key: str) -> int | None:
    """A token count a backend can mean: an int (not a bool), never negative, and not beyond what
    a float counter holds exactly."""
    value = usage.get(key)
    if type(value) is not int or not 0 <= value <= MAX_USAGE:
        return None
    return value


def find_usage(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last ``"usage":{...}`` in the response's last bytes."""
    at = tail.rfind(b'"usage"')
    return None if at < 0 else _usage_at(tail, at)


def exchange_usage(ex: Exchange) -> tuple[int, int] | None:
    """``find_usage`` over the last two pieces relayed (``_tail_usage``)."""
    value = _tail_usage(ex)
    return None if value is None else _counts(value)


def value_after(data: bytes, key_end: int, end: int | None = None) -> object:
    """The JSON value after the key that ends at ``key_end`` in ``data`` (up to ``end``), read
    without parsing the rest; None when it is cut or not JSON."""
    try:
        text = data[key_end:end].decode("utf-8", "replace")
        start = text.index(":") + 1
        while start < len(text) and text[start] in " \t\r\n":
            start += 1
        value, _ = _json_decoder.raw_decode(text, start)
    except (ValueError, IndexError):
        return None
    return value


def _usage_value(tail: bytes, at: int) -> dict[str, object] | None:
    """The JSON object after the ``"usage"`` key at ``at``; None when it is cut or not an object."""
    value = value_after(tail, at + 7)
    return value if isinstance(value, dict) else None


def _usage_at(tail: bytes, at: int) -> tuple[int, int] | None:
    value = _usage_value(tail, at)
    return None if value is None else _counts(value)


def _counts(usage: dict[str, object]) -> tuple[int, int] | None:
    """The chat/completions usage's (prompt, completion) counts, both as ``_count`` takes them."""
    prompt, completion = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
    return None if prompt is None or completion is None else (prompt, completion)
