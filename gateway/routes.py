"""A static table from path to route: one dict lookup per request, no pattern scan.

Besides the OpenAI routes: the Anthropic Messages API (its errors in Anthropic's shape), the
Responses API (a create routed by model, a stored response's paths by its id), and tokenize,
detokenize, rerank and score, whose path the gateway spells as each kind does (``default_path``,
``Profile.paths``). Only ``/v1/responses/{id}...`` is matched by prefix, after the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import msgspec


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway does for one path."""

    name: str
    #: Allowed methods; None means any (forwarded unchanged).
    methods: tuple[str, ...] | None
    #: Capability the route needs from the backend (see profiles.CAPABILITIES).
    capability: str | None = None
    #: A JSON body the gateway peeks at (model fill-in, tools, JSON check).
    json_body: bool = False
    #: Whether the route is forwarded to the backend (else the gateway answers itself).
    upstream: bool = True
    #: The error shape its clients parse (``surfaces``): ``openai``, ``anthropic`` or ``responses``.
    surface: str = "openai"
    #: How its tokens are read at the end (``usage.read_usage``): ``openai`` (chat, completions,
    #: embeddings), ``anthropic``, ``responses``, ``reported`` (rerank, score: only what the engine
    #: reports) or ``none``.
    usage: str = "openai"
    #: For a route whose path differs between engines: the path sent when the kind's profile names
    #: none (``Profile.paths``, keyed by the route's name), relative to the server root.
    default_path: str | None = None
    #: For Responses: what the route does with the response id map (``responses_map``):
    #: ``create`` fills it, ``by_id`` routes by it.
    stateful: str | None = None


HEALTH = Route(name="health", methods=("GET", "HEAD"), upstream=False)
READY = Route(name="ready", methods=("GET", "HEAD"), upstream=False)
METRICS = Route(name="metrics", methods=("GET",), upstream=False)
CHAT = Route(name="chat", methods=("POST",), capability="chat", json_body=True)
COMPLETIONS = Route(name="completions", methods=("POST",), capability="completions", json_body=True)
EMBEDDINGS = Route(name="embeddings", methods=("POST",), capability="embeddings", json_body=True)
MODELS = Route(name="models", methods=("GET",))
RESPONSES = Route(
    name="responses", methods=("POST",), capability="responses", json_body=True, surface="responses",
    usage="responses", stateful="create",
)  # fmt: skip
#: ``/v1/responses/{id}`` (retrieve, delete), ``.../cancel``, ``.../input_items``: no model in them.
RESPONSE_BY_ID = Route(
    name="responses", methods=None, capability="responses", surface="responses", usage="none", stateful="by_id"
)
MESSAGES = Route(name="messages", methods=("POST",), capability="messages", json_body=True, surface="anthropic",
                 usage="anthropic")  # fmt: skip
COUNT_TOKENS = Route(name="count_tokens", methods=("POST",), capability="messages", json_body=True,
                     surface="anthropic", usage="none")  # fmt: skip
TOKENIZE = Route(name="tokenize", methods=("POST",), capability="tokenize", json_body=True, usage="none",
                 default_path="/tokenize")  # fmt: skip
DETOKENIZE = Route(name="detokenize", methods=("POST",), capability="tokenize", json_body=True, usage="none",
                   default_path="/detokenize")  # fmt: skip
RERANK = Route(name="rerank", methods=("POST",), capability="rerank", json_body=True, usage="reported",
               default_path="/v1/rerank")  # fmt: skip
SCORE = Route(name="score", methods=("POST",), capability="score", json_body=True, usage="reported",
              default_path="/v1/score")  # fmt: skip
#: Any other /v1/... path: forwarded unchanged, body and content-type included.
PASSTHROUGH = Route(name="v1", methods=None)

TABLE: Mapping[str, Route] = MappingProxyType(
    {
        "/health": HEALTH,
        "/ready": READY,
        "/metrics": METRICS,
        "/v1/chat/completions": CHAT,
        "/v1/completions": COMPLETIONS,
        "/v1/embeddings": EMBEDDINGS,
        "/v1/models": MODELS,
        "/v1/responses": RESPONSES,
        "/v1/messages": MESSAGES,
        "/v1/messages/count_tokens": COUNT_TOKENS,
        "/tokenize": TOKENIZE,
        "/detokenize": DETOKENIZE,
        # vLLM's canonical spellings are outside /v1, Cohere's v2 client calls /v2/rerank: every
        # spelling reaches the kind's own one (Profile.paths).
        "/v1/rerank": RERANK,
        "/v2/rerank": RERANK,
        "/rerank": RERANK,
        "/v1/score": SCORE,
        "/score": SCORE,
    }
)


#: Never forwarded: TRACE would echo the backend key the gateway adds; CONNECT opens a tunnel.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})


def resolve(path: str) -> Route | None:
    """The route for a decoded request path, or None (404).

    Dot segments are refused rather than forwarded: ``/v1/../load`` must not reach a backend's
    admin routes outside ``/v1``.
    """
    route = TABLE.get(path)
    if route is not None:
        return route
    if not path.startswith("/v1/") or ("/." in path and _has_dot_segment(path)):
        return None
    if path.startswith("/v1/responses/"):
        return RESPONSE_BY_ID
    return PASSTHROUGH


def response_id(path: str) -> str:
    """The id in ``/v1/responses/{id}[/...]``."""
    return path[len("/v1/responses/") :].split("/", 1)[0]


def _has_dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in path.split("/"))
