"""What the simulator is told: the server settings, the timing knobs and the faults.

``SimConfig`` is built once (by the CLI or by a test) and never changes. ``Fault`` is the set of
failures to inject into one request: the server-wide one from the flags, merged key by key with the
``x-sim-fault`` request header.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Kind = Literal["vllm", "sglang", "tgi", "llamacpp", "ollama", "localai", "lmstudio", "openai"]
KINDS: tuple[str, ...] = ("vllm", "sglang", "tgi", "llamacpp", "ollama", "localai", "lmstudio", "openai")

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Status = Annotated[int, msgspec.Meta(ge=100, le=599)]


class ConfigError(ValueError):
    """A setting or a fault spec that cannot be used."""


class Fault(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Failures to inject into a request. ``None`` means "not injected".

    Counts are SSE events written for a stream (the role chunk is the first), and generated tokens
    for a non-streamed answer.
    """

    #: Answer this status at once, in the kind's error shape, instead of generating.
    status: Status | None = None
    #: Reset the TCP connection (RST) after N events; 0 resets before any byte of the answer.
    reset_after: NonNegInt | None = None
    #: Sleep this long before anything of the answer is written.
    stall_before_headers_ms: NonNegFloat | None = None
    #: After N events, go silent for ``stall_ms``, then carry on.
    stall_after: NonNegInt | None = None
    stall_ms: NonNegFloat | None = None
    #: After N events, send the kind's mid-stream error event and end the stream
    #: (a non-streamed request answers 500 instead).
    error_after: NonNegInt | None = None

    def merged(self, over: Fault) -> Fault:
        """These faults, with every field that ``over`` sets taking precedence."""
        fields = {f: getattr(over, f) for f in self.__struct_fields__ if getattr(over, f) is not None}
        return msgspec.structs.replace(self, **fields) if fields else self

    @property
    def any(self) -> bool:
        return any(getattr(self, f) is not None for f in self.__struct_fields__)


NO_FAULT = Fault()

_FAULT_INT_KEYS = frozenset({"status", "reset_after", "stall_after", "error_after"})


def parse_fault(spec: str) -> Fault:
    """Parse ``x-sim-fault``: ``key=value`` pairs separated by ``;`` or ``,``.

    Keys are the ``Fault`` fields with ``-`` or ``_``: ``status=503``, ``reset-after=3``,
    ``stall-before-headers-ms=2000``, ``stall-after=2;stall-ms=5000``, ``error-after=2``.
    """
    given: dict[str, int | float] = {}
    for raw in spec.replace(",", ";").split(";"):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        name = key.strip().lower().replace("-", "_")
        if not sep or name not in Fault.__struct_fields__:
            raise ConfigError(
                f"bad fault {item!r}: use key=value with key one of "
                + ", ".join(f.replace("_", "-") for f in Fault.__struct_fields__)
            )
        try:
            given[name] = int(value) if name in _FAULT_INT_KEYS else float(value)
        except ValueError:
            raise ConfigError(f"bad fault {item!r}: {value.strip()!r} is not a number") from None
    if "stall_after" in given and "stall_ms" not in given:
        raise ConfigError(f"bad fault {spec!r}: stall-after needs stall-ms")
    try:
        return msgspec.convert(given, Fault)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad fault {spec!r}: {exc}") from None


class SimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the simulator is started with. Defaults resemble a small model on one GPU."""

    kind: Kind = "vllm"
    host: str = "127.0.0.1"
    #: 0 picks a free port (``SimServer.port`` tells which).
    port: Port = 8001
    #: Backend key; empty means no auth. Ignored by kinds that take no key (Ollama).
    api_key: str = ""
    #: The id listed by /v1/models. Requests may name any model: it is echoed back (llama.cpp's chat
    #: and text completions answer with this one instead, as llama-server answers with its alias).
    model: str = "sim-model"
    #: Context of one slot, in tokens (llama.cpp's ``-c`` divided by its slots). Only kinds that
    #: enforce a context use it: llama.cpp refuses a prompt of this many tokens or more with 400
    #: ``exceed_context_size_error`` and stops a completion where the context is full.
    ctx_size: PositiveInt = 131072
    #: Serve /v1/embeddings (TGI never does). Off gives the kind's answer for a server that
    #: does not embed: llama.cpp's 501 ``not_supported_error``, a 404 elsewhere.
    embeddings: bool = True

    #: Base time to first token, before prefill and queueing.
    ttft_ms: NonNegFloat = 30.0
    #: Base inter-token latency.
    itl_ms: NonNegFloat = 10.0
    #: Each gap is ``itl_ms`` plus a uniform draw in [-jitter, +jitter], never below 0.
    itl_jitter_ms: NonNegFloat = 2.0
    #: Completion length when the request gives no max_tokens.
    tokens: NonNegInt = 32
    #: Sequences generated at once; more wait in a FIFO queue (their TTFT grows).
    max_running: PositiveInt = 256
    #: TTFT growth per prompt token (prefill).
    prefill_us_per_token: NonNegFloat = 20.0
    #: ITL growth per other running sequence, as a fraction (0.01: +1% each).
    batch_slowdown: NonNegFloat = 0.01
    #: Start-up phase in the kind's own manner (see ``kinds.Loading``); 0 is off.
    load_seconds: NonNegFloat = 0.0

    #: The engine model (``kv.py``): a prefix cache of KV blocks, one shared prefill lane, and the
    #: kind's own engine metrics on /metrics. Off: timing as above, nothing cached.
    engine: bool = False
    #: Tokens per KV block (vLLM's default ``block_size``).
    block_tokens: PositiveInt = 16
    #: KV-cache capacity in blocks (one 8B model on one H100: see ``ENGINE``).
    kv_blocks: PositiveInt = 26000

    #: Faults injected into every inference request (the x-sim-fault header adds to them).
    fault: Fault = NO_FAULT
    #: Seed for the jitter, for reproducible runs; None draws one.
    seed: int | None = None

    @property
    def fast(self) -> bool:
        """No delay anywhere: the throughput-benchmark mode."""
        return self.ttft_ms == 0 and self.itl_ms == 0 and self.itl_jitter_ms == 0 and self.prefill_us_per_token == 0

    def __repr__(self) -> str:
        shown = {f: getattr(self, f) for f in self.__struct_fields__}
        if shown["api_key"]:
            shown["api_key"] = "***"
        return "SimConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


#: The timing ``--engine`` starts from (flags given still win): one 8B model in BF16 on one H100
#: SXM, as vLLM serves it. Figures and their sources are in ``kv.py``'s docstring.
ENGINE: dict[str, float] = {
    "ttft_ms": 10.0,
    "itl_ms": 6.0,
    "itl_jitter_ms": 0.5,
    "prefill_us_per_token": 40.0,
    "batch_slowdown": 0.016,
    "max_running": 256,
}

#: Delays that make ``SimConfig.fast`` true; ``--fast`` applies them.
FAST: dict[str, float] = {"ttft_ms": 0.0, "itl_ms": 0.0, "itl_jitter_ms": 0.0, "prefill_us_per_token": 0.0}


def make_config(**given: object) -> SimConfig:
    """Build a validated ``SimConfig`` from plain values (raises ``ConfigError``)."""
    try:
        return msgspec.convert(given, SimConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
