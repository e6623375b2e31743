"""The error shapes of the API surfaces the gateway serves, and what marks a stream's first token.

Each route names its surface (``Route.surface``): ``openai`` (chat, completions, embeddings and
the other OpenAI-style routes), ``anthropic`` (the Messages API) or ``responses``. The gateway's
own errors are written in the shape the surface's official client parses; backend errors are
never rewritten. Nothing here runs per chunk: only on the error path, and once per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from gateway.errors import event_separator, sse_error_event

if TYPE_CHECKING:
    from gateway.errors import GatewayError

#: The closest type Anthropic documents for each status the gateway answers (README, "The HTTP
#: surface"). Anthropic's own list: 400 invalid_request_error, 401 authentication_error, 403
#: permission_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error, 500
#: api_error, 504 timeout_error, 529 overloaded_error. The gateway's 405 and 408 are requests it
#: refuses (invalid_request_error); 501 means this backend cannot serve the surface, which no retry
#: changes (invalid_request_error); 502 is api_error; 503 (no connection free, draining) is
#: overloaded_error; 504 timeout_error. The HTTP status stays the gateway's.
ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    501: "invalid_request_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_body(status: int, message: str) -> bytes:
    """``{"type":"error","error":{"type","message"}}``, what the anthropic client parses."""
    return orjson.dumps({"type": "error", "error": {"type": anthropic_type(status), "message": message}})


def body_for(surface: str, err: GatewayError) -> bytes:
    """The gateway's error answer in the surface's shape."""
    if surface == "anthropic":
        return anthropic_body(err.status, err.message)
    return err.body()


def stream_error(surface: str, err: GatewayError, tail: bytes) -> bytes:
    """The final event for a stream cut mid-way, in the surface's own form, such that its official
    client raises rather than return a cut answer as complete:

    - openai: ``data: {"error":{...}}`` (openai-python raises on a truthy ``error``);
    - anthropic: ``event: error`` with ``{"type":"error","error":{"type","message"}}``, the
      Messages stream's own error event (the anthropic client raises on ``event: error``; it skips
      unnamed events);
    - responses: ``event: error`` with the Responses error event's fields (``type``, ``code``,
      ``message``, ``param``) plus an ``error`` object: openai-python's stream parser raises
      ``APIError`` only on a truthy ``error`` key, with ``responses.create(stream=True)`` and
      ``responses.stream()`` alike, and hands a bare spec-shaped error event to the caller.
    """
    if surface == "openai":
        return sse_error_event(err.message, err.type, err.code, tail)
    sep = event_separator(tail)
    if surface == "anthropic":
        return sep + b"event: error\ndata: " + anthropic_body(err.status, err.message) + b"\n\n"
    inner = {"message": err.message, "type": err.type, "param": None, "code": err.code}
    data = {"type": "error", "code": err.code, "message": err.message, "param": None, "error": inner}
    return sep + b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


#: What the first content event of a stream contains, by surface: there the first events
#: (``message_start``, ``response.created``) come before any token, so time to first token is the
#: first piece holding one of these bytes. ``.delta"`` ends the ``type`` of every Responses delta
#: event (text, function-call arguments, reasoning); inside a JSON string a quote is escaped, so the
#: bytes cannot come from text. None: the first byte is the first token (OpenAI chunks).
TOKEN_MARKERS: dict[str, bytes] = {"anthropic": b"content_block_delta", "responses": b'.delta"'}
