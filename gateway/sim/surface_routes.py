"""The simulator's routes for the surfaces beyond chat: Messages (and count_tokens), Responses
(create, and retrieve, delete, input items of the responses it stored), tokenize, detokenize,
rerank and score.

Which a kind serves, and at which path, comes from its profile (``gateway.profiles``: the
capability, and ``Profile.paths`` for the routes whose spelling differs): a capability the kind
does not have is no route (404), one that depends on the launch is served when the simulator
embeds (``SimConfig.embeddings``: a pooling or reranking model). Messages and Responses requests
run through the simulator's one generation path (``SimApp._inference``: timing, faults, client
disconnects); the bytes come from ``surfaces``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson

from gateway import routes
from gateway.profiles import PROFILES, Support
from gateway.sim import responses
from gateway.sim.surfaces import anthropic_error, rerank_body, score_body, text_of, tokens_of

if TYPE_CHECKING:
    from gateway.sim.app import SimApp
    from gateway.sim.http import HttpConnection, Request

Handler = Callable[["HttpConnection", "Request"], Awaitable[None]]
#: Stored responses kept for retrieval, most recent.
STORED = 1024
_BY_ID = "/v1/responses/"


class SurfaceRoutes:
    """The surface routes of one simulated kind, and the responses it stored."""

    def __init__(self, app: SimApp) -> None:
        self.app = app
        self.stored: OrderedDict[str, bytes] = OrderedDict()
        profile = PROFILES.get(app.config.kind)
        self.routes: dict[str, tuple[tuple[str, ...], Handler]] = {}
        self.responses = False
        if profile is None:
            return

        def serves(capability: str) -> bool:
            support = profile.support(capability)
            return support is Support.SUPPORTED or (support is Support.DEPENDS and app.config.embeddings)

        if serves("messages"):
            self.routes["/v1/messages"] = (("POST",), self.messages)
            self.routes["/v1/messages/count_tokens"] = (("POST",), self.count_tokens)
        if serves("responses"):
            self.routes["/v1/responses"] = (("POST",), self.create_response)
            self.responses = True
        mapped: tuple[tuple[routes.Route, Handler], ...] = (
            (routes.TOKENIZE, self.tokenize),
            (routes.DETOKENIZE, self.detokenize),
            (routes.RERANK, self.rerank),
            (routes.SCORE, self.score),
        )
        for route, handler in mapped:
            assert route.capability is not None
            path = profile.path_for(route)
            if path is not None and serves(route.capability):
                self.routes[path] = (("POST",), handler)

    def by_id(self, path: str) -> Handler | None:
        """The handler of a stored response's path, for a kind with the Responses API."""
        return self.stored_response if self.responses and path.startswith(_BY_ID) else None

    # -- generation ---------------------------------------------------------------------------

    async def messages(self, conn: HttpConnection, req: Request) -> None:
        await self.app._inference(conn, req, "messages")

    async def create_response(self, conn: HttpConnection, req: Request) -> None:
        await self.app._inference(conn, req, "responses")

    def store(self, response: dict[str, Any]) -> None:
        stored = self.stored
        stored[response["id"]] = orjson.dumps(response)
        while len(stored) > STORED:
            stored.popitem(last=False)

    async def stored_response(self, conn: HttpConnection, req: Request) -> None:
        rest = req.path[len(_BY_ID) :]
        response_id, _, action = rest.partition("/")
        body = self.stored.get(response_id)
        if body is None:
            self._error(conn, 404, f"Response with id '{response_id}' not found.")
        elif action == "" and req.method == "GET":
            conn.respond(200, self.app._json_headers, body)
        elif action == "" and req.method == "DELETE":
            del self.stored[response_id]
            conn.respond(
                200, self.app._json_headers, orjson.dumps({"id": response_id, "object": "response", "deleted": True})
            )
        elif action == "input_items" and req.method == "GET":
            page: dict[str, Any] = {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
            conn.respond(200, self.app._json_headers, orjson.dumps(page))
        elif action == "cancel" and req.method == "POST":
            self._error(conn, 400, "Cannot cancel a response that is not running in the background.")
        else:
            self._error(conn, 404, "Not Found")

    # -- counting and tokens ------------------------------------------------------------------

    def _body(self, conn: HttpConnection, req: Request) -> dict[str, Any] | None:
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self._error(conn, self.app.wire.invalid_status, "The request body must be a JSON object.")
            return None
        return body

    def _error(self, conn: HttpConnection, status: int, message: str) -> None:
        self.app._error(conn, status, message)

    async def count_tokens(self, conn: HttpConnection, req: Request) -> None:
        body = self._body(conn, req)
        if body is None:
            return
        if not isinstance(body.get("messages"), list):
            conn.respond(
                400, self.app._json_headers, anthropic_error("invalid_request_error", "messages: Field required")
            )
            return
        tokens = self.app.prompt_tokens(body, "messages")
        conn.respond(200, self.app._json_headers, orjson.dumps({"input_tokens": tokens}))

    async def tokenize(self, conn: HttpConnection, req: Request) -> None:
        body = self._body(conn, req)
        if body is None:
            return
        text = next((body[k] for k in ("prompt", "content", "inputs", "text") if isinstance(body.get(k), str)), None)
        if text is None:
            self._error(conn, self.app.wire.invalid_status, "`prompt` must be a string.")
            return
        tokens = tokens_of(text)
        shape = self.app.wire.tokenize_answer
        answer: object
        if shape == "tokens":
            answer = {"tokens": tokens}
        elif shape == "spans":
            answer = [{"id": t, "text": chr(t), "start": i, "stop": i + 1} for i, t in enumerate(tokens)]
        else:
            answer = {"count": len(tokens), "max_model_len": self.app.config.ctx_size, "tokens": tokens}
        conn.respond(200, self.app._json_headers, orjson.dumps(answer))

    async def detokenize(self, conn: HttpConnection, req: Request) -> None:
        body = self._body(conn, req)
        if body is None:
            return
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < 256 for t in tokens):
            self._error(conn, self.app.wire.invalid_status, "`tokens` must be a list of token ids.")
            return
        answer = {self.app.wire.detokenize_key: text_of(tokens)}
        conn.respond(200, self.app._json_headers, orjson.dumps(answer))

    async def rerank(self, conn: HttpConnection, req: Request) -> None:
        body = self._body(conn, req)
        if body is None:
            return
        query, documents, top_n = body.get("query"), body.get("documents"), body.get("top_n")
        if not isinstance(query, str) or not _strings(documents):
            self._error(
                conn, self.app.wire.invalid_status, "`query` must be a string and `documents` a list of strings."
            )
            return
        tokens = responses.estimate_tokens(len(query) + sum(len(d) for d in documents))
        model = body.get("model") if isinstance(body.get("model"), str) else self.app.config.model
        top = top_n if isinstance(top_n, int) and top_n > 0 else None
        conn.respond(200, self.app._json_headers, rerank_body(str(model), query, documents, top, tokens))

    async def score(self, conn: HttpConnection, req: Request) -> None:
        body = self._body(conn, req)
        if body is None:
            return
        query = body.get("text_1", body.get("query"))
        given = body.get("text_2", body.get("items"))
        documents = [given] if isinstance(given, str) else given
        if not isinstance(query, str) or not _strings(documents):
            self._error(conn, self.app.wire.invalid_status, "`text_1` must be a string and `text_2` strings.")
            return
        tokens = responses.estimate_tokens(len(query) + sum(len(d) for d in documents))
        model = body.get("model") if isinstance(body.get("model"), str) else self.app.config.model
        conn.respond(200, self.app._json_headers, score_body(str(model), query, documents, tokens, None))


def _strings(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
