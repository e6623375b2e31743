"""What one simulated inference request asks for, checked: ``Plan``, and ``Planner``, the part of
``SimApp`` that reads a request into one (model, prompt size, length, choices, stream options,
timing and fault headers, a Messages tool call, a Messages or Responses stream's frames), refusing
what the kind refuses (``PlanError``)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import orjson

from gateway.sim import responses
from gateway.sim.config import ConfigError, Fault, SimConfig, parse_fault
from gateway.sim.engine import Scheduler, Timing
from gateway.sim.http import Request
from gateway.sim.kinds import ContextError, Wire
from gateway.sim.kv import Engine, block_hashes
from gateway.sim.kv import prompt_text as kv_prompt_text
from gateway.sim.surfaces import MessagesFrames, ResponsesFrames

#: Per-request timing overrides: header -> ``Timing`` field.
_TIMING_HEADERS = {b"x-sim-ttft-ms": "ttft_ms", b"x-sim-itl-ms": "itl_ms", b"x-sim-itl-jitter-ms": "itl_jitter_ms"}


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


def surface_chars(body: dict[str, Any], kind: str) -> int:
    """The characters a Messages request (``system`` and ``messages``) or a Responses request
    (``instructions`` and ``input``) gives the model, unchecked (count_tokens counts any body)."""
    if kind == "messages":
        return responses.prompt_chars([body.get("system"), body.get("messages")])
    return responses.prompt_chars([body.get("instructions"), body.get("input")])


def _prompt_chars(body: dict[str, Any], kind: str) -> int:
    """The length of a chat's ``messages`` or a completion's ``prompt`` (checked)."""
    if kind == "messages":
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise PlanError("messages: Field required")
        return surface_chars(body, kind)
    if kind == "responses":
        if not isinstance(body.get("input"), str | list):
            raise PlanError("`input` must be a string or a list.")
        return surface_chars(body, kind)
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


class Planner:
    """Reads requests into plans; ``SimApp`` provides what it reads them against."""

    config: SimConfig
    wire: Wire
    scheduler: Scheduler
    engine: Engine | None
    _timing: Timing

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
        if wire.choices and kind not in ("messages", "responses"):  # those surfaces have no ``n``
            plan.n = self._choices(body.get("n"))
        plan.stream = body.get("stream") is True
        options = body.get("stream_options")
        plan.include_usage = plan.stream and isinstance(options, dict) and options.get("include_usage") is True
        plan.n_tokens, plan.finish = _length(body, kind, n_default)
        if wire.context_error is not None:
            self._fit_context(plan, wire.context_error)
        if kind in ("messages", "responses"):
            self._surface_plan(plan, body)
        if self.engine is not None:
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
        return responses.estimate_tokens(surface_chars(body, kind))

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
