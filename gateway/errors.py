"""Errors the gateway makes itself, and the one writer of the OpenAI error body.

Upstream errors are never rewritten: they are relayed as the backend sent them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpcore
import orjson

from gateway.pool import PoolClosed, PoolTimeout

if TYPE_CHECKING:
    from gateway.exchange import ErrorClass, Phase

JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]


class GatewayError(Exception):
    """An error answered by the gateway in the OpenAI shape."""

    __slots__ = ("status", "type", "code", "message", "param", "headers")

    def __init__(
        self,
        status: int,
        type: str,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.type!r}, {self.code!r}, {self.message!r})"


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    """``{"error":{"message","type","param","code"}}``, the shape openai-python parses."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def sse_error_event(message: str, type: str, code: str | None, tail: bytes) -> bytes:
    """A final ``data: {"error":...}`` event for a stream cut mid-way (``event_separator(tail)``
    first, so the error is its own event)."""
    return event_separator(tail) + b"data: " + error_body(message, type, code) + b"\n\n"


def event_separator(tail: bytes) -> bytes:
    """What ends the event the bytes already sent left open.

    ``tail`` is the last two bytes already sent: when they do not end an event, a line break is
    added first so the error is its own event. Looking at two bytes is all the framing we need.
    """
    if not tail or tail in (b"\n\n", b"\r\r", b"\n\r"):  # the last line was empty: the event ended
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    if tail.endswith(b"\r"):
        # A lone CR ended the line; a LF after it would only complete a CRLF, so end with a CR.
        return b"\r"
    return b"\n\n"


# Constructors for the errors named in the HTTP surface, so every call site says the same thing.


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request_error", "invalid_request", message, param=param)


def unauthorized() -> GatewayError:
    return GatewayError(
        401,
        "authentication_error",
        "invalid_api_key",
        "Invalid or missing API key. Send it as 'Authorization: Bearer <key>' or as 'x-api-key: <key>'.",
        headers=[(b"www-authenticate", b"Bearer")],
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(404, "not_found_error", "not_found", f"No route for {path!r}.")


def method_not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> GatewayError:
    return GatewayError(
        405,
        "invalid_request_error",
        "method_not_allowed",
        f"Method {method} is not allowed on {path}; use {', '.join(allowed)}.",
        headers=[(b"allow", ", ".join(allowed).encode())],
    )


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "invalid_request_error",
        "request_too_large",
        f"Request body exceeds the gateway's limit of {limit} bytes.",
    )


def not_supported(backend: str, capability: str) -> GatewayError:
    return GatewayError(
        501,
        "not_supported_error",
        "not_supported",
        f"The {backend} backend does not support {capability}.",
    )


def backend_unavailable(detail: str) -> GatewayError:
    return GatewayError(502, "api_error", "backend_unavailable", f"The backend is unavailable: {detail}")


def backend_timeout(detail: str) -> GatewayError:
    return GatewayError(504, "api_error", "backend_timeout", f"The backend timed out: {detail}")


def pool_exhausted(wait: float) -> GatewayError:
    return GatewayError(
        503,
        "api_error",
        "pool_exhausted",
        f"No backend connection became free within {wait:g} s.",
        headers=[(b"retry-after", b"1")],
    )


def draining() -> GatewayError:
    return GatewayError(
        503,
        "api_error",
        "draining",
        "The gateway is shutting down; retry on another instance.",
        headers=[(b"retry-after", b"1"), (b"connection", b"close")],
    )


def overloaded(backend: str) -> GatewayError:
    return GatewayError(
        429,
        "rate_limit_error",
        "overloaded",
        f"The {backend} backend has as many requests in flight and queued as it admits; retry shortly.",
        headers=[(b"retry-after", b"1")],
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404, "invalid_request_error", "model_not_found", f"The model {model!r} is not served here.", param="model"
    )


def missing_model() -> GatewayError:
    return bad_request("The request names no model, and several backends are configured.", param="model")


def request_timeout(seconds: float) -> GatewayError:
    return GatewayError(
        408,
        "invalid_request_error",
        "request_timeout",
        f"The request body did not arrive within {seconds:g} s.",
        headers=[(b"connection", b"close")],
    )


def internal_error() -> GatewayError:
    """A bug in the gateway (its traceback is logged): never blamed on the backend."""
    return GatewayError(500, "api_error", "internal_error", "The gateway failed to handle the request; see its log.")


# -- the upstream boundary: the one place where httpcore's and the OS's errors become the client's


#: Which timeout a read that timed out ran into, by phase (the error's code stays
#: backend_timeout; its message names the setting).
_PHASE_TIMEOUTS = {
    "connect": "no connection within GATEWAY_CONNECT_TIMEOUT",
    "headers": "no response headers within GATEWAY_HEADER_TIMEOUT (default: GATEWAY_READ_TIMEOUT)",
    "first_token": "no first token within GATEWAY_TTFT_TIMEOUT (default: GATEWAY_READ_TIMEOUT)",
    "body": "silent for longer than GATEWAY_IDLE_TIMEOUT (default: GATEWAY_READ_TIMEOUT)",
}


def map_error(exc: Exception, phase: Phase) -> GatewayError:
    """httpcore's exceptions (the pool's included), mapped once at this boundary to the gateway's
    errors; ``phase`` is what the request was waiting for."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, PoolTimeout):
        return pool_exhausted(exc.wait)
    if isinstance(exc, PoolClosed):
        return backend_unavailable("the gateway is shutting down")
    if isinstance(exc, (httpcore.ConnectTimeout, httpcore.PoolTimeout)):
        return backend_timeout(_PHASE_TIMEOUTS["connect"])
    if isinstance(exc, httpcore.TimeoutException):
        return backend_timeout(_PHASE_TIMEOUTS.get(phase, _PHASE_TIMEOUTS["body"]))
    if isinstance(exc, httpcore.ConnectError):
        return backend_unavailable(f"connection failed ({exc or type(exc).__name__})")
    if isinstance(exc, httpcore.LocalProtocolError):
        # h11's message quotes the refused value, which may be a header the gateway adds itself.
        return GatewayError(
            400,
            "invalid_request_error",
            "invalid_request",
            "The request cannot be forwarded: a header or the path holds characters HTTP does not allow.",
        )
    if isinstance(exc, (httpcore.NetworkError, httpcore.RemoteProtocolError)):
        return backend_unavailable(f"connection lost while waiting for {phase} ({exc or type(exc).__name__})")
    return backend_unavailable(f"{type(exc).__name__} while waiting for {phase}")


def error_class(exc: BaseException) -> ErrorClass:
    """connect, timeout or reset: the metrics' class of an upstream failure."""
    if isinstance(exc, httpcore.TimeoutException):
        return "timeout"
    if isinstance(exc, httpcore.ConnectError):
        return "connect"
    return "reset"
