"""The simulator's request handling: load phase, auth, routing, faults, generation.

``SimApp`` is the handler an ``HttpConnection`` calls with each request. Everything that differs by
backend kind comes from ``kinds.WIRES``; timing comes from ``engine``; bytes from ``responses``.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson

from gateway.profiles import PROFILES
from gateway.sim import responses
from gateway.sim.config import ConfigError, Fault, SimConfig, parse_fault
from gateway.sim.engine import Scheduler, Ticker, Timing
from gateway.sim.http import Canned, HttpConnection, Request
from gateway.sim.kinds import WIRES, ContextError, Loading
from gateway.sim.kv import Engine, block_hashes
from gateway.sim.kv import prompt_text as kv_prompt_text
from gateway.sim.stats import METRICS_CONTENT_TYPE, EngineReport, SimStats, render_metrics
from gateway.sim.surface_routes import SurfaceRoutes, prompt_text
from gateway.sim.surfaces import MessagesFrames, ResponsesFrames, anthropic_error, message_body, response_body

RouteHandler = Callable[[HttpConnection, Request], Awaitable[None]]
#: The events of one stream: the kind's OpenAI chunks, or a Messages or Responses stream.
Frames = responses.StreamFrames | MessagesFrames | ResponsesFrames
#: In no-delay mode a stream yields to the loop this often, so one long stream cannot starve others.
_YIELD_EVERY = 32
#: Per-request timing overrides: header -> ``Timing`` field.
_TIMING_HEADERS = {b"x-sim-ttft-ms": "ttft_ms", b"x-sim-itl-ms": "itl_ms", b"x-sim-itl-jitter-ms": "itl_jitter_ms"}


class ClientGone(Exception):
    """The connection closed under a generation (seen before the cancellation arrived)."""


class PlanError(Exception):
    """A request the kind refuses: its message in the kind's error shape, or a whole body."""

    def __init__(self, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.body = body


class Plan:
    """What one inference request asks for, checked, with its timing and faults resolved."""

    __slots__ = (
        "kind", "model", "stream", "include_usage", "n_tokens", "finish", "prompt_tokens", "timing", "fault",
        "n", "inputs", "dimensions", "as_base64", "hashes", "cached_tokens", "frames", "tool",
    )  # fmt: skip

    def __init__(self, kind: str, model: str, prompt_tokens: int, timing: Timing, fault: Fault) -> None:
        #: "chat", "completion", "embedding", "messages" or "responses".
        self.kind = kind
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.timing = timing
        self.fault = fault
        self.stream = False
        self.include_usage = False
        self.n_tokens = 0
        self.finish = "stop"
        #: Choices to generate (1 unless the kind honours ``n``).
        self.n = 1
        self.inputs: list[object] = []
        self.dimensions = responses.DEFAULT_DIMENSIONS
        self.as_base64 = False
        #: The engine model's chained hashes of the prompt's full blocks (``kv.block_hashes``).
        self.hashes: list[int] = []
        self.cached_tokens = 0
        #: A Messages or Responses stream's events (``surfaces``); None: the kind's OpenAI chunks.
        self.frames: MessagesFrames | ResponsesFrames | None = None
        #: A Messages answer that calls this tool instead of writing text.
        self.tool: str | None = None


def _non_negative(name: bytes, raw: bytes) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise PlanError(f"header {name.decode()} must be a number >= 0, not {raw.decode(errors='replace')!r}")
    return value


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise PlanError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise PlanError("The request body must be a JSON object.")
    return body


def _prompt_chars(body: dict[str, Any], kind: str) -> int:
    """The length of a chat's ``messages`` or a completion's ``prompt`` (checked)."""
    if kind == "messages":
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise PlanError("messages: Field required")
        return len(prompt_text(body, kind))
    if kind == "responses":
        if not isinstance(body.get("input"), str | list):
            raise PlanError("`input` must be a string or a list.")
        return len(prompt_text(body, kind))
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise PlanError("`messages` must be a non-empty list.")
        return responses.prompt_chars(messages)
    prompt = body.get("prompt")
    if not isinstance(prompt, str | list):
        raise PlanError("`prompt` must be a string or a list.")
    return responses.prompt_chars(prompt)


def _length(body: dict[str, Any], kind: str, n_default: int) -> tuple[int, str]:
    """Tokens to generate and the finish reason: the request's limit, or ``n_default`` and "stop"."""
    limit = body.get("max_completion_tokens") if kind == "chat" else None
    if kind == "responses":
        limit = body.get("max_output_tokens")
    elif limit is None:
        limit = body.get("max_tokens")
    if limit is None:
        return n_default, "stop"
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        return limit, "length"
    raise PlanError("`max_tokens` must be an integer >= 1.")


class SimApp:
    """Answers one request on one connection, in the manner of ``config.kind``."""

    def __init__(self, config: SimConfig, stats: SimStats, scheduler: Scheduler, loaded: asyncio.Event) -> None:
        self.config = config
        self.wire = wire = WIRES[config.kind]
        self.stats = stats
        self.scheduler = scheduler
        self.loaded = loaded
        self._rng = random.Random(config.seed)  # noqa: S311 - jitter, not security
        self.engine = Engine(config.block_tokens, config.kv_blocks) if config.engine else None
        profile = PROFILES.get(config.kind)
        self._engine_names = None if profile is None else profile.engine_metrics
        label_values = {"model_name": config.model, "engine": "0"}
        self._engine_labels = tuple((name, label_values[name]) for name in wire.metric_labels)
        self._key = config.api_key.encode() if config.api_key and wire.takes_key else b""
        self._timing = Timing(
            ttft_ms=config.ttft_ms,
            itl_ms=config.itl_ms,
            itl_jitter_ms=config.itl_jitter_ms,
            prefill_us_per_token=config.prefill_us_per_token,
            batch_slowdown=config.batch_slowdown,
        )
        self._json_headers = ((b"content-type", wire.json_type),)
        width = wire.embedding_width or responses.DEFAULT_DIMENSIONS
        self._models = Canned(
            200, self._json_headers, wire.answers.model_list(config.model, wire.owned_by, config.ctx_size, width)
        )
        routes: dict[str, tuple[tuple[str, ...], RouteHandler]] = {
            "/v1/chat/completions": (("POST",), self._chat),
            "/v1/completions": (("POST",), self._completions),
            "/v1/models": (("GET", "HEAD"), self._list_models),
        }
        if wire.embeddings and (config.embeddings or wire.embeddings_off is not None):
            routes["/v1/embeddings"] = (("POST",), self._embeddings)
        for path in wire.health:
            routes[path] = (("GET", "HEAD"), self._health)
        self.surfaces = SurfaceRoutes(self)
        routes.update(self.surfaces.routes)
        for alias, path in wire.aliases.items():
            if path in routes:
                routes[alias] = routes[path]
        self._routes = routes

    # -- dispatch -----------------------------------------------------------------------------------

    async def __call__(self, conn: HttpConnection, req: Request) -> None:
        self.stats.http_requests_total += 1
        wire, path = self.wire, req.path
        head_only = req.method == "HEAD"
        if not self.loaded.is_set():
            if wire.loading is Loading.EVERY_PATH and wire.loading_any is not None:
                self._send_canned(conn, wire.loading_any, head_only=head_only)
                return
            canned = wire.loading_health.get(path)
            if canned is not None:
                self._send_canned(conn, canned, head_only=head_only)
                return
        if path == "/metrics" and req.method in ("GET", "HEAD"):
            body = render_metrics(self.stats, self.config.model, self._engine_report())
            conn.respond(200, ((b"content-type", METRICS_CONTENT_TYPE),), body, head_only=head_only)
            return
        if self._key and wire.needs_key(path) and not self._authorized(req.headers):
            self._send_canned(conn, wire.unauthorized, head_only=head_only)
            return
        route = self._routes.get(path)
        if route is None:
            stored = self.surfaces.by_id(path)
            if stored is not None:
                await stored(conn, req)
                return
        if route is None or (wire.wrong_method_is_404 and req.method not in route[0]):
            self._error(conn, 404, wire.not_found_message, head_only=head_only)
            return
        methods, handler = route
        if req.method not in methods:
            self._error(conn, 405, "Method Not Allowed", head_only=head_only)
            return
        await handler(conn, req)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        key, wire = self._key, self.wire
        auth = headers.get(b"authorization")
        if auth is not None:
            if wire.bearer_ignores_case:
                if hmac.compare_digest(auth.lower(), b"bearer " + key.lower()):
                    return True
            else:
                scheme, _, token = auth.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key):
                    return True
        for name in wire.key_headers:
            value = headers.get(name)
            if value is not None and hmac.compare_digest(value, key):
                return True
        return False

    def _error(self, conn: HttpConnection, status: int, message: str, *, head_only: bool = False) -> None:
        self._send_json(conn, status, self.wire.error(status, message), head_only=head_only)

    def _send_json(self, conn: HttpConnection, status: int, body: bytes, *, head_only: bool = False) -> None:
        close = status >= 400 and self.wire.close_on_error
        conn.respond(status, self._json_headers, body, head_only=head_only, close=close)

    def _send_canned(self, conn: HttpConnection, canned: Canned, *, head_only: bool = False) -> None:
        close = canned.status >= 400 and self.wire.close_on_error
        conn.respond_canned(canned, head_only=head_only, close=close)

    # -- simple routes ------------------------------------------------------------------------------

    async def _health(self, conn: HttpConnection, req: Request) -> None:
        self._send_canned(conn, self.wire.health[req.path], head_only=req.method == "HEAD")

    async def _list_models(self, conn: HttpConnection, req: Request) -> None:
        self._send_canned(conn, self._models, head_only=req.method == "HEAD")

    # -- inference ----------------------------------------------------------------------------------

    async def _chat(self, conn: HttpConnection, req: Request) -> None:
        await self._inference(conn, req, "chat")

    async def _completions(self, conn: HttpConnection, req: Request) -> None:
        await self._inference(conn, req, "completion")

    async def _embeddings(self, conn: HttpConnection, req: Request) -> None:
        if not self.config.embeddings and self.wire.embeddings_off is not None:
            self._send_canned(conn, self.wire.embeddings_off)
            return
        await self._inference(conn, req, "embedding")

    async def _inference(self, conn: HttpConnection, req: Request, kind: str) -> None:
        stats = self.stats
        stats.requests_total += 1
        try:
            plan = self._plan(req, kind)
        except PlanError as exc:
            if kind == "messages":  # every kind answers the Messages API in Anthropic's shape
                self._send_json(conn, 400, anthropic_error("invalid_request_error", exc.message))
            elif exc.body is not None:
                self._send_json(conn, 400, exc.body)
            else:
                self._error(conn, self.wire.invalid_status, exc.message)
            return
        try:
            await self._serve(conn, plan)
        except ClientGone:
            stats.aborted_requests_total += 1
        except asyncio.CancelledError:
            stats.aborted_requests_total += 1
            raise

    async def _serve(self, conn: HttpConnection, plan: Plan) -> None:
        fault, stats = plan.fault, self.stats
        if fault.stall_before_headers_ms:
            await asyncio.sleep(fault.stall_before_headers_ms / 1000.0)
        if fault.status is not None:
            stats.faults_total += 1
            self._error(conn, fault.status, f"simulated fault: status {fault.status}")
            return
        if fault.reset_after == 0:
            stats.faults_total += 1
            conn.reset()
            return
        if not self.loaded.is_set():
            await self.loaded.wait()
        engine = self.engine if plan.kind != "embedding" else None
        blocks = 0 if engine is None else engine.blocks_for(plan.prompt_tokens + plan.n_tokens * plan.n)
        await self.scheduler.acquire()
        if engine is not None:
            engine.hold(plan.hashes, blocks)
        try:
            if plan.kind == "embedding":
                await self._embed(conn, plan)
            elif plan.stream:
                await self._stream(conn, plan)
            else:
                await self._whole(conn, plan)
        finally:
            if engine is not None:
                engine.release(plan.hashes, blocks)
            self.scheduler.release()

    async def _first_token(self, plan: Plan, ticker: Ticker) -> None:
        """Wait until the first token is due: base plus prefill, or with the engine model, the
        prefill lane's queue and the uncached part of the prompt, then the base."""
        timing, engine = plan.timing, self.engine
        if engine is None:
            await ticker.wait(timing.first_token_s(plan.prompt_tokens))
            return
        seconds_per_token = timing.prefill_us_per_token / 1_000_000.0
        plan.cached_tokens = await engine.prefill(plan.hashes, plan.prompt_tokens, seconds_per_token)
        await ticker.wait(timing.ttft_ms / 1000.0)

    def _batch(self) -> int:
        """Sequences decoding now: those holding a slot, less any still queued for prefill."""
        engine = self.engine
        return self.stats.running - (0 if engine is None else engine.prefill_waiting)

    def _engine_report(self) -> EngineReport | None:
        engine, stats = self.engine, self.stats
        if engine is None:
            return None
        # A sequence that holds a slot but waits for the prefill lane is waiting, as vLLM says.
        return EngineReport(
            names=self._engine_names,
            labels=self._engine_labels,
            running=stats.running - engine.prefill_waiting,
            waiting=stats.waiting + engine.prefill_waiting,
            kv_usage=engine.kv_usage,
            prefix_queries=engine.prefix_queries,
            prefix_hits=engine.prefix_hits,
        )

    def _frames(self, plan: Plan) -> Frames:
        wire = self.wire
        if plan.frames is not None:
            return plan.frames
        return wire.answers.frames(sse_data=wire.sse_data, chat=plan.kind == "chat", model=plan.model, n=plan.n)

    def _stored(self, frames: Frames) -> None:
        """A completed Responses stream's response, kept for retrieval."""
        if isinstance(frames, ResponsesFrames) and frames.final is not None:
            self.surfaces.store(frames.final)

    async def _open(self, conn: HttpConnection, plan: Plan, out: _Emitter, frames: Frames) -> bool | None:
        """The stream's head where the kind sends it at once, and a Messages or Responses
        stream's opening events (``message_start``, ``response.created``) with it, before the
        first token: True if they were sent, None if a fault ended the stream."""
        wire = self.wire
        if not wire.early_headers:
            return False
        conn.start_stream(200, wire.stream_headers)
        if plan.frames is None:
            return False
        opening = frames.role(0)
        return True if opening is None or await out.emit(opening) else None

    async def _roles(self, out: _Emitter, frames: Frames, n: int) -> bool:
        """Each choice's first event (chat's role chunk); False if a fault ended the stream."""
        for c in range(n):
            role = frames.role(c)
            if role is not None and not await out.emit(role):
                return False
        return True

    async def _stream(self, conn: HttpConnection, plan: Plan) -> None:
        stats, timing = self.stats, plan.timing
        frames = self._frames(plan)
        out = _Emitter(self, conn, plan.fault, frames)
        ticker = Ticker()
        admitted = ticker.now()
        opened = await self._open(conn, plan, out, frames)
        if opened is None:
            return
        await self._first_token(plan, ticker)
        first = ticker.now()
        if not await out.check():
            return
        choices = range(plan.n)
        if not opened and not await self._roles(out, frames, plan.n):
            return
        for i in range(plan.n_tokens):
            if i:
                gap = timing.gap_s(self._batch(), self._rng)
                if gap > 0:
                    await ticker.wait(gap)
                elif i % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            for c in choices:
                stats.generated_tokens_total += 1
                if not await out.emit(frames.token(i, c)):
                    return
        elapsed = responses.Elapsed((first - admitted) * 1000.0, (ticker.now() - first) * 1000.0)
        for c in choices:
            for event in frames.ends(c, plan.finish, plan.prompt_tokens, plan.n_tokens, plan.include_usage, elapsed):
                if not await out.emit(event):
                    return
        trailer = frames.trailer(plan.prompt_tokens, plan.n_tokens, plan.include_usage)
        if trailer is not None and not await out.emit(trailer):
            return
        conn.send_chunk(frames.done)
        conn.end_stream()
        self._stored(frames)
        stats.completed_requests_total += 1

    async def _whole(self, conn: HttpConnection, plan: Plan) -> None:
        timing, fault, stats = plan.timing, plan.fault, self.stats
        ticker = Ticker()
        admitted = ticker.now()
        await self._first_token(plan, ticker)
        first = ticker.now()
        if fault.any and not await self._whole_check(conn, fault, 0):
            return
        if fault.any or not timing.zero:
            for i in range(1, plan.n_tokens + 1):
                if i > 1:
                    await ticker.wait(timing.gap_s(self._batch(), self._rng))
                if fault.any and not await self._whole_check(conn, fault, i):
                    return
        if conn.lost:
            raise ClientGone
        answers = self.wire.answers
        elapsed = responses.Elapsed((first - admitted) * 1000.0, (ticker.now() - first) * 1000.0)
        if plan.kind == "messages":
            body = message_body(plan.model, plan.n_tokens, plan.finish, plan.prompt_tokens, plan.tool)
        elif plan.kind == "responses":
            created = response_body(plan.model, plan.n_tokens, plan.prompt_tokens)
            self.surfaces.store(created)
            body = orjson.dumps(created)
        else:
            build = answers.chat_completion if plan.kind == "chat" else answers.text_completion
            body = build(plan.model, plan.n_tokens, plan.finish, plan.prompt_tokens, plan.n, elapsed)
        self._send_json(conn, 200, body)
        stats.generated_tokens_total += plan.n_tokens * plan.n
        stats.completed_requests_total += 1

    async def _whole_check(self, conn: HttpConnection, fault: Fault, n: int | None) -> bool:
        """Faults of a non-streamed answer, counted in generated tokens (``None``: any count fires,
        for embeddings, which have no tokens to count)."""

        def due(at: int | None) -> bool:
            return at is not None and (n is None or at == n)

        if due(fault.reset_after):
            self.stats.faults_total += 1
            conn.reset()
            return False
        if due(fault.stall_after) and fault.stall_ms:
            await asyncio.sleep(fault.stall_ms / 1000.0)
        if due(fault.error_after):
            self.stats.faults_total += 1
            self._error(conn, 500, "simulated fault: generation error")
            return False
        return True

    async def _embed(self, conn: HttpConnection, plan: Plan) -> None:
        await Ticker().wait(plan.timing.first_token_s(plan.prompt_tokens))
        if plan.fault.any and not await self._whole_check(conn, plan.fault, None):
            return
        if conn.lost:
            raise ClientGone
        body = self.wire.answers.embeddings(
            plan.model, plan.inputs, plan.dimensions, plan.as_base64, plan.prompt_tokens
        )
        self._send_json(conn, 200, body)
        self.stats.completed_requests_total += 1

    # -- request checking ---------------------------------------------------------------------------

    def _plan(self, req: Request, kind: str) -> Plan:
        body = _json_object(req.body)
        wire = self.wire
        model = body.get("model")
        if not isinstance(model, str) or not model or model == wire.model_alias:
            model = self.config.model
        timing, n_default = self._timing_for(req.headers)
        fault = self._fault_for(req.headers)
        if kind == "embedding":
            return self._embedding_plan(body, model, timing, fault)
        if not wire.echoes_model:
            model = self.config.model
        plan = Plan(kind, model, responses.estimate_tokens(_prompt_chars(body, kind)), timing, fault)
        if wire.choices:
            plan.n = self._choices(body.get("n"))
        plan.stream = body.get("stream") is True
        options = body.get("stream_options")
        plan.include_usage = plan.stream and isinstance(options, dict) and options.get("include_usage") is True
        plan.n_tokens, plan.finish = _length(body, kind, n_default)
        if wire.context_error is not None:
            self._fit_context(plan, wire.context_error)
        if kind in ("messages", "responses"):
            self._surface_plan(plan, body)
        elif self.engine is not None:
            text = kv_prompt_text(body, kind)
            plan.hashes = block_hashes(text, model, self.engine.block_tokens, plan.prompt_tokens)
        return plan

    def _surface_plan(self, plan: Plan, body: dict[str, Any]) -> None:
        """A Messages request's tool call (when it forces one), and the stream's frames."""
        if plan.kind == "messages":
            plan.tool = _forced_tool(body)
            if plan.stream:
                plan.frames = MessagesFrames(plan.model, plan.tool, plan.prompt_tokens)
        elif plan.stream:
            plan.frames = ResponsesFrames(plan.model, plan.prompt_tokens)

    def prompt_tokens(self, body: dict[str, Any], kind: str) -> int:
        """What a request's prompt counts in the simulated tokens (count_tokens)."""
        return responses.estimate_tokens(len(prompt_text(body, kind)))

    def _fit_context(self, plan: Plan, context_error: ContextError) -> None:
        """The kind's context window (llama.cpp): a prompt that fills it is refused, a generation
        stops where it is full."""
        n_ctx = self.config.ctx_size
        if plan.prompt_tokens >= n_ctx:
            raise PlanError("context exceeded", context_error(plan.prompt_tokens, n_ctx))
        if plan.n_tokens > n_ctx - plan.prompt_tokens:
            # The sequence runs until its context is full.
            plan.n_tokens, plan.finish = n_ctx - plan.prompt_tokens, "length"

    def _choices(self, n: object) -> int:
        """``n`` as llama.cpp checks it: one choice per slot at most."""
        if n is None:
            return 1
        if not isinstance(n, int | float) or isinstance(n, bool):
            raise PlanError("Field 'n': type must be number")
        most = self.scheduler.max_running
        if not 1 <= n <= most:
            raise PlanError(f"Field 'n': Value must be between 1 <= value <= {most}, but got {n}")
        return int(n)

    def _embedding_plan(self, body: dict[str, Any], model: str, timing: Timing, fault: Fault) -> Plan:
        given = body.get("input")
        if isinstance(given, str) or (isinstance(given, list) and given and all(isinstance(t, int) for t in given)):
            inputs: list[object] = [given]
        elif isinstance(given, list) and given and all(isinstance(item, str | list) for item in given):
            inputs = list(given)
        else:
            raise PlanError("`input` must be a string, a list of strings, or token ids.")
        dims = body.get("dimensions")
        plan = Plan("embedding", model, responses.estimate_tokens(responses.prompt_chars(inputs)), timing, fault)
        if self.wire.embedding_width is not None:
            plan.dimensions = self.wire.embedding_width
        elif dims is not None:
            if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 65536:
                raise PlanError("`dimensions` must be an integer between 1 and 65536.")
            plan.dimensions = dims
        plan.as_base64 = body.get("encoding_format") == "base64"
        plan.inputs = inputs
        return plan

    def _timing_for(self, headers: dict[bytes, bytes]) -> tuple[Timing, int]:
        timing, n_default = self._timing, self.config.tokens
        changed: dict[str, float] = {}
        for name, field in _TIMING_HEADERS.items():
            raw = headers.get(name)
            if raw is not None:
                changed[field] = _non_negative(name, raw)
        if changed:
            timing = msgspec.structs.replace(timing, **changed)
        raw = headers.get(b"x-sim-tokens")
        if raw is not None:
            if not raw.isdigit():
                raise PlanError("header x-sim-tokens must be an integer >= 0")
            n_default = int(raw)
        return timing, n_default

    def _fault_for(self, headers: dict[bytes, bytes]) -> Fault:
        raw = headers.get(b"x-sim-fault")
        if raw is None:
            return self.config.fault
        try:
            return self.config.fault.merged(parse_fault(raw.decode("latin-1")))
        except ConfigError as exc:
            raise PlanError(str(exc)) from None


class _Emitter:
    """Writes a stream's events, counts them, and fires the faults due after each."""

    __slots__ = ("_app", "_conn", "_fault", "_frames", "sent")

    def __init__(
        self,
        app: SimApp,
        conn: HttpConnection,
        fault: Fault,
        frames: responses.StreamFrames | MessagesFrames | ResponsesFrames,
    ) -> None:
        self._app = app
        self._conn = conn
        self._fault = fault
        self._frames = frames
        self.sent = 0

    async def emit(self, event: bytes) -> bool:
        """Send one event; False when a fault ended the stream."""
        conn = self._conn
        if conn.lost:
            raise ClientGone
        if not conn.started:
            conn.start_stream(200, self._app.wire.stream_headers)
        conn.send_chunk(event)
        self.sent += 1
        if conn.write_blocked:
            await conn.drain()
            if conn.lost:
                raise ClientGone
        return await self.check() if self._fault.any else True

    async def check(self) -> bool:
        fault, conn, app, n = self._fault, self._conn, self._app, self.sent
        if fault.reset_after == n:
            app.stats.faults_total += 1
            conn.reset()
            return False
        if fault.stall_after == n and fault.stall_ms:
            await asyncio.sleep(fault.stall_ms / 1000.0)
        if fault.error_after == n:
            app.stats.faults_total += 1
            message = "simulated fault: generation error"
            if not conn.started:
                # Nothing sent yet: the kind answers a plain error (llama.cpp, Ollama).
                app._error(conn, 500, message)
                return False
            wire = app.wire
            own = getattr(self._frames, "stream_error", None)
            conn.send_chunk(own(message) if own is not None else wire.stream_error(wire.sse_data, message))
            if wire.done_after_error:
                conn.send_chunk(self._frames.done)
            conn.end_stream()
            return False
        return True


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The tool a Messages request makes the model call: ``tool_choice`` ``{"type":"tool","name"}``,
    or ``{"type":"any"}`` (the first tool); None otherwise (the simulated model writes text)."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    if not isinstance(choice, dict) or not isinstance(tools, list) or not tools:
        return None
    if choice.get("type") == "tool" and isinstance(choice.get("name"), str):
        return str(choice["name"])
    first = tools[0]
    if choice.get("type") == "any" and isinstance(first, dict) and isinstance(first.get("name"), str):
        return str(first["name"])
    return None
