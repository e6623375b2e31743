"""Tokens a request used, read once at its end from the last bytes relayed.

OpenAI-compatible servers put ``usage`` at the end: the final usage chunk of a stream, or the end
of a JSON body. Only that tail is looked at; nothing else of the body is parsed, and the request is
never changed to ask for usage. ``read_usage`` gives one ``Usage`` per request, which the metrics
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


def read_usage(ex: Exchange) -> Usage | None:
    """The tokens of a finished request: the backend's usage, else for a stream an estimate from
    its chunks; None when it was not a success or neither can be had."""
    if not ex.started or not 200 <= ex.status < 300:
        return None
    found = exchange_usage(ex)
    if found is not None:
        return Usage(found[0], found[1])
    if ex.sse:
        # Role chunk, finish chunk and [DONE] carry no content; a cut stream lacks the last two.
        framing = 3 if ex.end == "done" else 1
        return Usage(0, max(ex.chunks - framing, 0), estimated=True)
    return None


def find_usage(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last ``"usage":{...}`` in the response's last bytes."""
    at = tail.rfind(b'"usage"')
    return None if at < 0 else _usage_at(tail, at)


def exchange_usage(ex: Exchange) -> tuple[int, int] | None:
    """``find_usage`` over the last two pieces relayed, without joining them when the last one
    holds ``"usage"`` (the last occurrence in both is then the last one in it)."""
    last = ex.last
    at = last.rfind(b'"usage"')
    if at >= 0:
        return _usage_at(last, at)
    return find_usage(ex.prev + last) if ex.prev else None


def _usage_at(tail: bytes, at: int) -> tuple[int, int] | None:
    try:
        text = tail[at + 7 :].decode("utf-8", "replace")
        colon = text.index(":")
        start = colon + 1
        while start < len(text) and text[start] in " \t\r\n":
            start += 1
        value, _ = _json_decoder.raw_decode(text, start)
    except (ValueError, IndexError):
        return None
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    # Counts a backend can mean: ints (not bools), never negative (a counter cannot go down),
    # and not beyond what a float counter holds exactly.
    if type(prompt) is not int or type(completion) is not int:
        return None
    if not (0 <= prompt <= MAX_USAGE and 0 <= completion <= MAX_USAGE):
        return None
    return prompt, completion
