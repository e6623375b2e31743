"""The simulator's request handling: load phase, auth, routing, faults, generation.

``SimApp`` is the handler an ``HttpConnection`` calls with each request. Everything that differs by
backend kind comes from ``kinds.WIRES``; timing comes from ``engine``; bytes from ``responses``.
"""

from __future__ import annotations

import asyncio
import hmac
import random
from collections.abc import Awaitable, Callable

import orjson

from gateway.profiles import PROFILES
from gateway.sim import responses
from gateway.sim.config import Fault, SimConfig
from gateway.sim.emitter import ClientGone, Emitter, Frames
from gateway.sim.engine import Scheduler, Ticker, Timing
from gateway.sim.http import Canned, HttpConnection, Request
from gateway.sim.kinds import WIRES, Loading
from gateway.sim.kv import Engine
from gateway.sim.plan import Plan, PlanError, Planner
from gateway.sim.stats import METRICS_CONTENT_TYPE, EngineReport, SimStats, render_metrics
from gateway.sim.surface_routes import SurfaceRoutes
from gateway.sim.surfaces import ResponsesFrames, anthropic_error, message_body, response_body

RouteHandler = Callable[[HttpConnection, Request], Awaitable[None]]
#: In no-delay mode a stream yields to the loop this often, so one long stream cannot starve others.
_YIELD_EVERY = 32


class SimApp(Planner):
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
        if plan.frames is not None:
            return plan.frames
        wire = self.wire
        return wire.answers.frames(sse_data=wire.sse_data, chat=plan.kind == "chat", model=plan.model, n=plan.n)

    def _stored(self, frames: Frames) -> None:
        """A completed Responses stream's response, kept for retrieval."""
        if isinstance(frames, ResponsesFrames) and frames.final is not None:
            self.surfaces.store(frames.final)

    async def _open(self, conn: HttpConnection, plan: Plan, out: Emitter, frames: Frames) -> bool | None:
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

    async def _roles(self, out: Emitter, frames: Frames, n: int) -> bool:
        """Each choice's first event (chat's role chunk); False if a fault ended the stream."""
        for c in range(n):
            role = frames.role(c)
            if role is not None and not await out.emit(role):
                return False
        return True

    async def _stream(self, conn: HttpConnection, plan: Plan) -> None:
        stats, timing = self.stats, plan.timing
        frames = self._frames(plan)
        out = Emitter(self, conn, plan.fault, frames)
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
