"""How each backend kind looks on the wire, as a table keyed by kind.

Facts from ../shared/backends.md: SSE framing, health routes, which paths need the key and which
headers carry it, the 401, the error body shape, the mid-stream error event, whether ``[DONE]``
follows it, and how the kind behaves while it loads. The request handlers consult ``WIRES`` and
never branch on a kind's name; the bytes of a kind's answers come from its ``answers``
(``responses.Answers``).

The ``llamacpp`` row was checked byte by byte against llama-server (the build pinned in
``../shared/llamacpp-ci.md``): ``application/json; charset=utf-8`` and ``Connection: close`` on
every error, the key on every path but ``/health``, ``/v1/health`` and ``/``, unknown routes and
wrong methods as 404 "File Not Found", ``n`` choices (one slot each, so at most ``max_running``),
the answer's ``model`` always the served alias, a per-slot context (``--ctx-size``) with its 400
``exceed_context_size_error``, and 64-wide embeddings whatever ``dimensions`` says. Two things
differ on purpose: the simulator's own ``/metrics`` stays open and answers its counters, where
llama-server wants the key and answers 501 ``not_supported_error`` unless started with
``--metrics``; and no prompt cache is simulated (``cached_tokens`` and ``cache_n`` are 0).
"""

from __future__ import annotations

import enum
import http
from collections.abc import Callable, Mapping
from types import MappingProxyType

import msgspec
import orjson

from gateway.sim import responses
from gateway.sim.http import Canned

JSON = (b"content-type", b"application/json")
#: llama-server's JSON type, on every JSON answer.
JSON_UTF8 = (b"content-type", b"application/json; charset=utf-8")
EMPTY_OK = Canned(200)


class Loading(enum.Enum):
    """What a client sees during ``--load-seconds``."""

    #: llama.cpp: every path answers 503 "Loading model".
    EVERY_PATH = "every_path"
    #: SGLang, LocalAI: the health route says "not ready"; inference requests wait for the load.
    HEALTH = "health"
    #: vLLM, TGI: the port is bound but not listening, so connections are refused.
    REFUSE = "refuse"
    #: Ollama, LM Studio, external: always up; the first inference requests wait (a cold start).
    LAZY = "lazy"


ErrorBody = Callable[[int, str], bytes]
NeedsKey = Callable[[str], bool]
#: The body of a refused over-long prompt, from its token count and the context size.
ContextError = Callable[[int, int], bytes]


class Wire(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    #: Prefix of every SSE data line: ``b"data: "``, or ``b"data:"`` for axum (TGI).
    sse_data: bytes = b"data: "
    #: The ``content-type`` of every JSON answer.
    json_type: bytes = JSON[1]
    #: Whether an error answer closes the connection (``Connection: close``; llama.cpp).
    close_on_error: bool = False
    stream_headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"text/event-stream"),)
    #: Whether the stream's head goes out before the first token (llama.cpp and Ollama wait
    #: for the first result, so an early failure is a plain JSON error).
    early_headers: bool = True
    #: The body of an error answer, from status and message.
    error: ErrorBody
    #: The status for a request body the kind rejects (TGI validates with 422).
    invalid_status: int = 400
    #: The whole mid-stream error event, from a message.
    stream_error: Callable[[bytes, str], bytes]
    done_after_error: bool = True
    #: Routes answered without a key or generation, by path.
    health: Mapping[str, Canned] = MappingProxyType({})
    loading: Loading
    #: What a path answers while loading (``Loading.HEALTH``; ``EVERY_PATH`` uses ``loading_any``).
    loading_health: Mapping[str, Canned] = MappingProxyType({})
    loading_any: Canned | None = None
    takes_key: bool = True
    #: Headers whose whole value may be the key, besides ``Authorization: Bearer``.
    key_headers: tuple[bytes, ...] = ()
    #: TGI compares the whole ``Authorization`` value with ``Bearer <key>``, ignoring case.
    bearer_ignores_case: bool = False
    needs_key: NeedsKey
    unauthorized: Canned
    embeddings: bool = True
    #: What ``/v1/embeddings`` answers when the server runs without embeddings.
    embeddings_off: Canned | None = None
    #: Whether ``n`` choices are generated (llama.cpp, up to one per slot); other kinds answer one.
    choices: bool = False
    #: A requested model name mapped to the served one (TGI's "tgi").
    model_alias: str | None = None
    #: Whether chat and text completions name the requested model; llama.cpp always names its own
    #: (its embeddings still echo the request's).
    echoes_model: bool = True
    #: Refuse a prompt of ``ctx_size`` tokens or more with this body (400), and stop a completion
    #: where the context is full; None: no context limit (the prompt is not checked).
    context_error: ContextError | None = None
    #: Embedding width whatever ``dimensions`` asks (llama.cpp: the model's ``n_embd``);
    #: None: ``dimensions``, else ``responses.DEFAULT_DIMENSIONS``.
    embedding_width: int | None = None
    owned_by: str
    not_found_message: str = "Not Found"
    #: Whether a known path asked with another method is a 404 like an unknown path (llama.cpp),
    #: not a 405.
    wrong_method_is_404: bool = False
    #: More paths for a route: alias -> the served path.
    aliases: Mapping[str, str] = MappingProxyType({})
    answers: responses.Answers = responses.OPENAI
    #: The labels on the engine's own metrics (``--engine``): ``model_name`` and vLLM's ``engine``.
    metric_labels: tuple[str, ...] = ()
    #: How ``/tokenize`` answers: ``counted`` (vLLM, SGLang: ``count``, ``max_model_len``,
    #: ``tokens``), ``tokens`` (llama.cpp: ``{"tokens": [...]}``) or ``spans`` (TGI: a list of
    #: ``{"id", "text", "start", "stop"}``).
    tokenize_answer: str = "counted"
    #: The key of ``/detokenize``'s text: ``prompt`` (vLLM, SGLang) or ``content`` (llama.cpp).
    detokenize_key: str = "prompt"


def _phrase_type(status: int) -> str:
    """vLLM and SGLang name error types after the status: 400 -> ``BadRequestError``."""
    try:
        name = http.HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        name = "Unknown"
    return name if name.endswith("Error") else name + "Error"


def _openai_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _sse(prefix: bytes, payload: object) -> bytes:
    return prefix + orjson.dumps(payload) + b"\n\n"


# -- error bodies, one per family ------------------------------------------------------------------


def _vllm_error(status: int, message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": _phrase_type(status), "param": None, "code": status}})


def _sglang_error(status: int, message: str) -> bytes:
    return orjson.dumps(
        {"object": "error", "message": message, "type": _phrase_type(status), "param": None, "code": status}
    )


_TGI_ERROR_TYPES = {422: "validation", 400: "validation", 429: "overloaded", 424: "generation", 503: "unhealthy"}


def _tgi_error(status: int, message: str) -> bytes:
    return orjson.dumps({"error": message, "error_type": _TGI_ERROR_TYPES.get(status, "generation")})


_LLAMACPP_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def _llamacpp_error(status: int, message: str) -> bytes:
    etype = _LLAMACPP_ERROR_TYPES.get(status, "server_error")
    if status == 404:
        # The router's own 404 lists its keys in another order than the handlers' errors.
        return orjson.dumps({"error": {"message": message, "type": etype, "code": status}})
    return orjson.dumps({"error": {"code": status, "message": message, "type": etype}})


def _llamacpp_context_error(n_prompt: int, n_ctx: int) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "code": 400,
                "message": f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), "
                "try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": n_prompt,
                "n_ctx": n_ctx,
            }
        }
    )


def _ollama_error(status: int, message: str) -> bytes:
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": None}})


def _localai_error(status: int, message: str) -> bytes:
    return orjson.dumps({"error": {"code": status, "message": message, "type": _openai_type(status)}})


def _openai_error(status: int, message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": _openai_type(status), "param": None, "code": None}})


# -- mid-stream error events -----------------------------------------------------------------------


def _nested_event(error: ErrorBody) -> Callable[[bytes, str], bytes]:
    def event(prefix: bytes, message: str) -> bytes:
        return prefix + error(500, message) + b"\n\n"

    return event


def _sglang_event(prefix: bytes, message: str) -> bytes:
    return _sse(prefix, {"error": orjson.loads(_sglang_error(500, message))})


def _tgi_event(prefix: bytes, message: str) -> bytes:
    return _sse(prefix, {"error": {"message": message, "http_status_code": 500}})


def _ollama_event(prefix: bytes, message: str) -> bytes:
    # Ollama writes the raw error object into the stream, not as an SSE event.
    return orjson.dumps({"error": message}) + b"\n"


def _localai_event(prefix: bytes, message: str) -> bytes:
    return _sse(prefix, {"error": {"message": message, "type": "server_error", "code": "server_error"}})


def _openai_event(prefix: bytes, message: str) -> bytes:
    return _sse(prefix, {"error": {"message": message, "type": "server_error", "param": None, "code": None}})


# -- which paths need the key ----------------------------------------------------------------------

_VLLM_GUARDED = ("/v1", "/v2", "/inference", "/cohere")
_SGLANG_OPEN = ("/health", "/ready", "/metrics")
_TGI_GUARDED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate", "/generate_stream"})
_LLAMACPP_OPEN = frozenset({"/health", "/v1/health", "/"})
_LOCALAI_OPEN = frozenset({"/healthz", "/readyz"})


def _json(status: int, payload: object, *extra: tuple[bytes, bytes]) -> Canned:
    return Canned(status, (JSON, *extra), orjson.dumps(payload))


def _llamacpp_json(status: int, payload: object) -> Canned:
    return Canned(status, (JSON_UTF8,), orjson.dumps(payload))


_UNAUTHORIZED_STRING = _json(401, {"error": "Unauthorized"})

WIRES: Mapping[str, Wire] = MappingProxyType(
    {
        w.kind: w
        for w in (
            Wire(
                kind="vllm",
                stream_headers=((b"content-type", b"text/event-stream; charset=utf-8"),),
                error=_vllm_error,
                stream_error=_nested_event(_vllm_error),
                health=MappingProxyType({"/health": EMPTY_OK, "/ping": EMPTY_OK}),
                loading=Loading.REFUSE,
                needs_key=lambda path: path.startswith(_VLLM_GUARDED),
                unauthorized=_UNAUTHORIZED_STRING,
                owned_by="vllm",
                metric_labels=("model_name", "engine"),
            ),
            Wire(
                kind="sglang",
                error=_sglang_error,
                stream_error=_sglang_event,
                health=MappingProxyType({"/health": EMPTY_OK, "/health_generate": EMPTY_OK}),
                loading=Loading.HEALTH,
                loading_health=MappingProxyType({"/health": Canned(503), "/health_generate": Canned(503)}),
                key_headers=(b"x-api-key",),
                needs_key=lambda path: not path.startswith(_SGLANG_OPEN),
                unauthorized=_UNAUTHORIZED_STRING,
                owned_by="sglang",
                metric_labels=("model_name",),
            ),
            Wire(
                kind="tgi",
                sse_data=b"data:",
                stream_headers=((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")),
                error=_tgi_error,
                invalid_status=422,
                stream_error=_tgi_event,
                health=MappingProxyType({"/health": EMPTY_OK, "/ping": EMPTY_OK}),
                loading=Loading.REFUSE,
                bearer_ignores_case=True,
                needs_key=_TGI_GUARDED.__contains__,
                unauthorized=Canned(401),
                embeddings=False,
                model_alias="tgi",
                owned_by="tgi",
                tokenize_answer="spans",
            ),
            Wire(
                kind="llamacpp",
                stream_headers=((b"x-accel-buffering", b"no"), (b"content-type", b"text/event-stream")),
                json_type=JSON_UTF8[1],
                close_on_error=True,
                early_headers=False,
                error=_llamacpp_error,
                stream_error=_nested_event(_llamacpp_error),
                done_after_error=False,
                health=MappingProxyType(
                    {
                        "/health": _llamacpp_json(200, {"status": "ok"}),
                        "/v1/health": _llamacpp_json(200, {"status": "ok"}),
                    }
                ),
                loading=Loading.EVERY_PATH,
                loading_any=_llamacpp_json(
                    503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
                ),
                key_headers=(b"x-api-key",),
                needs_key=lambda path: path not in _LLAMACPP_OPEN,
                unauthorized=_llamacpp_json(
                    401, {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}
                ),
                embeddings_off=_llamacpp_json(
                    501,
                    {
                        "error": {
                            "code": 501,
                            "message": "This server does not support embeddings. Start it with `--embeddings`",
                            "type": "not_supported_error",
                        }
                    },
                ),
                choices=True,
                echoes_model=False,
                context_error=_llamacpp_context_error,
                embedding_width=64,
                owned_by="llamacpp",
                not_found_message="File Not Found",
                wrong_method_is_404=True,
                aliases=MappingProxyType({"/models": "/v1/models", "/chat/completions": "/v1/chat/completions"}),
                answers=responses.LLAMACPP,
                tokenize_answer="tokens",
                detokenize_key="content",
            ),
            Wire(
                kind="ollama",
                early_headers=False,
                error=_ollama_error,
                stream_error=_ollama_event,
                done_after_error=False,
                health=MappingProxyType(
                    {
                        "/": Canned(200, ((b"content-type", b"text/plain; charset=utf-8"),), b"Ollama is running"),
                        "/api/version": _json(200, {"version": "0.0.0-sim"}),
                    }
                ),
                loading=Loading.LAZY,
                takes_key=False,
                needs_key=lambda path: False,
                unauthorized=Canned(401),
                owned_by="library",
            ),
            Wire(
                kind="localai",
                stream_headers=((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")),
                error=_localai_error,
                stream_error=_localai_event,
                health=MappingProxyType({"/readyz": EMPTY_OK, "/healthz": EMPTY_OK}),
                loading=Loading.HEALTH,
                loading_health=MappingProxyType(
                    {"/readyz": _json(503, {"status": "starting", "reason": "startup preload in progress"})}
                ),
                key_headers=(b"x-api-key", b"xi-api-key"),
                needs_key=lambda path: path not in _LOCALAI_OPEN,
                unauthorized=_json(
                    401,
                    {
                        "error": {
                            "code": 401,
                            "message": "An authentication key is required",
                            "type": "invalid_request_error",
                        }
                    },
                    (b"www-authenticate", b"Bearer"),
                ),
                owned_by="localai",
            ),
            Wire(
                kind="lmstudio",
                error=_openai_error,
                stream_error=_openai_event,
                loading=Loading.LAZY,
                needs_key=lambda path: True,
                unauthorized=_json(
                    401,
                    {
                        "error": {
                            "message": "Invalid or missing API token.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                ),
                owned_by="organization_owner",
            ),
            Wire(
                kind="openai",
                error=_openai_error,
                stream_error=_openai_event,
                loading=Loading.LAZY,
                needs_key=lambda path: True,
                unauthorized=_json(
                    401,
                    {
                        "error": {
                            "message": "Incorrect API key provided.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                ),
                owned_by="system",
            ),
        )
    }
)
