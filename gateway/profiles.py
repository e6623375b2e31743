"""What differs between backend kinds, as data.

One frozen Struct per kind; the request path consults it and never branches on a kind's name.
Adding a kind is one entry in ``PROFILES`` (plus its compose service, env template and test).
Facts come from ../shared/backends.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from gateway.routes import Route


class Support(enum.Enum):
    """How a backend kind handles one capability."""

    SUPPORTED = "supported"
    #: The gateway answers 501 itself and never contacts the backend.
    UNSUPPORTED = "unsupported"
    #: Depends on how the backend was launched: forward and relay whatever it answers.
    DEPENDS = "depends"


#: Every capability the gateway knows, in display order. A capability gates a route
#: (``chat``, ``completions``, ``embeddings``, ``responses``, ``messages`` (Anthropic Messages and
#: its count_tokens), ``tokenize`` (and detokenize), ``rerank``, ``score``) or a request feature
#: (``tools``).
CAPABILITIES: tuple[str, ...] = (
    "chat",
    "completions",
    "embeddings",
    "responses",
    "messages",
    "tokenize",
    "rerank",
    "score",
    "tools",
)

S, U, D = Support.SUPPORTED, Support.UNSUPPORTED, Support.DEPENDS


class EngineMetrics(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a kind's engine reports its own load on its Prometheus ``/metrics``: for each figure,
    the metric names accepted, newest spelling first (engines renamed some). An empty tuple: the
    engine does not report that figure."""

    #: Sequences being decoded now (a gauge).
    running: tuple[str, ...] = ()
    #: Requests queued for a batch slot (a gauge).
    waiting: tuple[str, ...] = ()
    #: Share of the KV cache in use, 0 to 1 (a gauge).
    kv_usage: tuple[str, ...] = ()
    #: Prefix-cache lookups and hits, in tokens (counters).
    prefix_queries: tuple[str, ...] = ()
    prefix_hits: tuple[str, ...] = ()
    #: What the engine must be started with to serve them, if anything (for the README).
    needs: str = ""


# Each engine's load metrics as its /metrics names them (exposition names: counters carry ``_total``).
# Looked up in the engines' own sources; newest spelling first where an engine renamed one.

#: vLLM V1, vllm/v1/metrics/loggers.py (PrometheusStatLogger.__init__) at commit 005a810bc40f:
#: ``vllm:num_requests_running``/``_waiting`` gauges; ``vllm:kv_cache_usage_perc`` replaced
#: ``vllm:gpu_cache_usage_perc`` and the counters ``vllm:prefix_cache_queries``/``_hits`` (tokens)
#: replaced ``vllm:gpu_prefix_cache_queries``/``_hits`` in 0.9 (the old names are still served
#: there, marked deprecated, due to be hidden behind ``show_hidden_metrics``). Served by default, open.
VLLM_METRICS = EngineMetrics(
    running=("vllm:num_requests_running",),
    waiting=("vllm:num_requests_waiting",),
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    prefix_queries=("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    prefix_hits=("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
)
#: SGLang, python/sglang/srt/metrics/collector.py at commit 00ae9c1590d2:
#: SchedulerMetricsCollector's gauges ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
#: ``sglang:token_usage`` (KV pool in use, 0-1); TokenizerMetricsCollector's counters
#: ``sglang:prompt_tokens_total`` and ``sglang:cached_tokens_total`` (both counted when a request
#: finishes, so they lag by one request; its ``sglang:cache_hit_rate`` gauge is not a counter).
#: Collectors that rewrite the colon re-export them as ``sglang_...``, so both prefixes are
#: accepted (issue #17). Needs ``--enable-metrics``.
SGLANG_METRICS = EngineMetrics(
    running=("sglang:num_running_reqs", "sglang_num_running_reqs"),
    waiting=("sglang:num_queue_reqs", "sglang_num_queue_reqs"),
    kv_usage=("sglang:token_usage", "sglang_token_usage"),
    prefix_queries=("sglang:prompt_tokens_total", "sglang_prompt_tokens_total"),
    prefix_hits=("sglang:cached_tokens_total", "sglang_cached_tokens_total"),
    needs="--enable-metrics",
)
#: TGI, backends/v3/src/backend.rs and backends/v3/src/queue.rs at v3.3.7 (db931fcf42da):
#: gauges ``tgi_batch_current_size`` (sequences in the running batch) and ``tgi_queue_size``.
#: No KV-usage gauge (only ``tgi_batch_current_max_tokens`` against ``tgi_batch_max_total_tokens``)
#: and no prefix-cache counters. Served on the main port (and ``--prometheus-port``), open.
TGI_METRICS = EngineMetrics(running=("tgi_batch_current_size",), waiting=("tgi_queue_size",))
#: llama.cpp, llama-server's /metrics handler (tools/server/server-context.cpp at fb4026604c67;
#: names as in commit a2df2787, PR #11512): gauges ``llamacpp:requests_processing`` (busy slots)
#: and ``llamacpp:requests_deferred`` (tasks waiting for a slot). No KV-cache or prefix-hit metrics.
#: Needs ``--metrics``; with ``--api-key`` the key is required on /metrics too.
LLAMACPP_METRICS = EngineMetrics(
    running=("llamacpp:requests_processing",),
    waiting=("llamacpp:requests_deferred",),
    needs="--metrics (and the API key on /metrics when --api-key is set)",
)
# Ollama, LM Studio: no Prometheus /metrics. LocalAI: /metrics has an OpenTelemetry ``api_call``
# histogram only (and needs admin auth). A generic OpenAI endpoint: unknown. None for all four.


# Where each kind serves the surfaces beyond chat and completions, from the engines' own sources.
# Paths are relative to the server root (the base URL without its /v1); the body goes unchanged.

#: vLLM: ``POST /tokenize`` and ``/detokenize`` (vllm/entrypoints/serve/tokenize/api_router.py at
#: 045d7575500e, open without a key); ``/rerank`` canonical with ``/v1/rerank`` (deprecated, logs a
#: warning) and ``/v2/rerank``, ``/score`` canonical with ``/v1/score`` deprecated
#: (vllm/entrypoints/pooling/score/api_router.py at 4159f5ba771c), registered for pooling models
#: only (``build_app``: POOLING_TASKS), so rerank and score depend on the model served;
#: ``/v1/messages`` and ``/v1/messages/count_tokens`` (vllm/entrypoints/anthropic/api_router.py at
#: 01540b75e3b1); ``/v1/responses``, ``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``
#: (vllm/entrypoints/openai/responses/api_router.py at f6e93254b870; no delete or input_items).
VLLM_PATHS = MappingProxyType(
    {"tokenize": "/tokenize", "detokenize": "/detokenize", "rerank": "/rerank", "score": "/score"}
)
#: SGLang, python/sglang/srt/entrypoints/http_server.py at 0025436eab05: ``/v1/tokenize`` and
#: ``/v1/detokenize`` (also without ``/v1``), ``/v1/rerank`` (cross-encoder models, served with
#: ``--is-embedding``), ``/v1/score`` (its decoder-only scoring API: another body than vLLM's),
#: ``/v1/responses`` with retrieve and cancel. ``/v1/messages`` is not in that commit; newer ones
#: serve it and ``count_tokens`` by converting to chat (``AnthropicServing.handle_messages``,
#: python/sglang/srt/entrypoints/anthropic/serving.py at 50e143a67729), so it depends on the version.
SGLANG_PATHS = MappingProxyType(
    {"tokenize": "/v1/tokenize", "detokenize": "/v1/detokenize", "rerank": "/v1/rerank", "score": "/v1/score"}
)
#: TGI, router/src/server.rs at v3.3.7 (db931fcf42da): ``POST /tokenize`` with its own body
#: (``{"inputs": ...}``), no detokenize, no rerank or score (that is TEI), no Messages, no Responses.
TGI_PATHS = MappingProxyType({"tokenize": "/tokenize", "detokenize": None})
#: llama.cpp, tools/server/server.cpp at 00dd0816129a: ``/tokenize``, ``/detokenize``;
#: ``/rerank``, ``/reranking``, ``/v1/rerank`` and ``/v1/reranking`` (one handler, which answers 501
#: unless the server runs with ``--reranking``, and needs a reranking model); ``/v1/messages`` and
#: ``/v1/messages/count_tokens``; ``/v1/responses`` (create only); no score.
LLAMACPP_PATHS = MappingProxyType({"tokenize": "/tokenize", "detokenize": "/detokenize", "rerank": "/v1/rerank"})
#: LocalAI serves ``/v1/messages`` and ``/v1/responses`` (../shared/backends.md); its Jina-style
#: ``POST /v1/rerank`` (core/http/routes/jina.go at db1159b6511e) needs a reranker model, and its
#: ``POST /v1/tokenize`` (core/http/routes/localai.go at d055a518dfb0, a model with the tokenize
#: use case; no detokenize) a backend that tokenizes: both depend on the models installed.
LOCALAI_PATHS = MappingProxyType({"tokenize": "/v1/tokenize", "detokenize": None, "rerank": "/v1/rerank"})
# Ollama and LM Studio: ``/v1/messages`` and ``/v1/responses`` (../shared/backends.md), none of
# tokenize, rerank or score. A generic OpenAI-compatible endpoint: unknown, so every surface
# depends on it and goes to the route's default spelling.


class Profile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One backend kind."""

    kind: str
    display_name: str
    #: The kind's native local OpenAI base URL; None when there is no sensible default.
    default_base_url: str | None
    #: Probed by /ready, relative to the server root (the base URL without its trailing /v1).
    health_path: str
    #: Whether the backend takes an API key at all (Ollama ignores them).
    takes_key: bool
    capabilities: Mapping[str, Support]
    #: What the kind is best suited for, shown in the README's backends table.
    best_for: str
    #: Multiplies the active probe interval (SGLang's /health runs a one-token generation).
    probe_factor: float = 1.0
    #: For a kind run on the Docker host rather than in compose: the command that starts it
    #: (README's launch steps; ``{port}`` is the port of its env template's URL).
    host_start: str | None = None
    #: The engine's own load metrics, for load-aware balancing; None: it serves none (balancing
    #: then relies on the gateway's own in-flight counts).
    engine_metrics: EngineMetrics | None = None
    #: Where the kind serves the routes outside ``/v1`` whose spelling differs between engines
    #: (the routes with a ``Route.default_path``: tokenize, detokenize, rerank, score), relative to
    #: the server root; None:
    #: the kind does not serve it (the gateway answers 501). A route not named here goes to the
    #: route's own default spelling (``Route.default_path``).
    paths: Mapping[str, str | None] = MappingProxyType({})

    def path_for(self, route: Route) -> str | None:
        """Where the kind serves ``route`` (``paths``, else the route's ``default_path``),
        relative to the server root; None: it does not serve it."""
        return self.paths.get(route.name, route.default_path)

    def support(self, capability: str) -> Support:
        return self.capabilities.get(capability, Support.SUPPORTED)

    @property
    def prefix_cache(self) -> bool:
        """Whether the engine keeps a prefix (KV) cache across requests, on by default, that
        balancing by prefix can count on: the kinds whose metrics count its hits (vLLM's automatic
        prefix caching, SGLang's radix cache). ``GATEWAY_BALANCE=auto`` balances those by prefix."""
        m = self.engine_metrics
        return m is not None and bool(m.prefix_hits)


def _caps(**given: Support) -> Mapping[str, Support]:
    unknown = set(given) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}")
    return MappingProxyType({name: given.get(name, S) for name in CAPABILITIES})


PROFILES: Mapping[str, Profile] = MappingProxyType(
    {
        p.kind: p
        for p in (
            Profile(
                kind="vllm",
                display_name="vLLM",
                default_base_url="http://127.0.0.1:8000/v1",
                health_path="/health",
                takes_key=True,
                capabilities=_caps(embeddings=D, rerank=D, score=D, tools=D),
                best_for="production serving on NVIDIA GPUs, high concurrency",
                engine_metrics=VLLM_METRICS,
                paths=VLLM_PATHS,
            ),
            Profile(
                kind="sglang",
                display_name="SGLang",
                default_base_url="http://127.0.0.1:30000/v1",
                health_path="/health",
                takes_key=True,
                capabilities=_caps(embeddings=D, messages=D, rerank=D, tools=D),
                best_for="high-throughput serving with prefix caching",
                probe_factor=4.0,
                engine_metrics=SGLANG_METRICS,
                paths=SGLANG_PATHS,
            ),
            Profile(
                kind="tgi",
                display_name="Text Generation Inference",
                default_base_url="http://127.0.0.1:3000/v1",
                health_path="/health",
                takes_key=True,
                capabilities=_caps(embeddings=U, responses=U, messages=U, rerank=U, score=U, tools=D),
                best_for="existing Hugging Face TGI deployments (maintenance mode upstream)",
                engine_metrics=TGI_METRICS,
                paths=TGI_PATHS,
            ),
            Profile(
                kind="llamacpp",
                display_name="llama.cpp server",
                default_base_url="http://127.0.0.1:8080/v1",
                health_path="/health",
                takes_key=True,
                capabilities=_caps(embeddings=D, rerank=D, score=U, tools=D),
                best_for="GGUF models on small GPUs or CPU",
                engine_metrics=LLAMACPP_METRICS,
                paths=LLAMACPP_PATHS,
            ),
            Profile(
                kind="ollama",
                display_name="Ollama",
                default_base_url="http://127.0.0.1:11434/v1",
                health_path="/",
                takes_key=False,
                capabilities=_caps(tokenize=U, rerank=U, score=U, tools=D),
                best_for="easy local model management, workstations",
            ),
            Profile(
                kind="localai",
                display_name="LocalAI",
                default_base_url="http://127.0.0.1:8080/v1",
                health_path="/readyz",
                takes_key=True,
                capabilities=_caps(tokenize=D, rerank=D, score=U, tools=D),
                best_for="many model families and modalities behind one API",
                paths=LOCALAI_PATHS,
            ),
            Profile(
                kind="lmstudio",
                display_name="LM Studio",
                default_base_url="http://127.0.0.1:1234/v1",
                health_path="/v1/models",
                takes_key=True,
                capabilities=_caps(tokenize=U, rerank=U, score=U, tools=D),
                best_for="desktop use; runs on the host, not in compose",
                host_start="lms server start --port {port}",
            ),
            Profile(
                kind="openai",
                display_name="OpenAI-compatible endpoint",
                default_base_url=None,
                health_path="/v1/models",
                takes_key=True,
                capabilities=_caps(embeddings=D, responses=D, messages=D, tokenize=D, rerank=D, score=D, tools=D),
                best_for="any external OpenAI-compatible URL",
            ),
        )
    }
)


class CapabilityError(ValueError):
    pass


def apply_overrides(base: Mapping[str, Support], spec: str) -> Mapping[str, Support]:
    """Apply a ``BACKEND_CAPABILITIES`` spec such as ``-embeddings,+tools,~responses``.

    ``+name`` declares it supported, ``-name`` unsupported (the gateway answers 501),
    ``~name`` depends on the backend (forward and relay its answer).
    """
    signs = {"+": S, "-": U, "~": D}
    out = dict(base)
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        sign, name = item[0], item[1:].strip()
        if sign not in signs or name not in CAPABILITIES:
            raise CapabilityError(
                f"{item!r} is not a capability override; use +NAME, -NAME or ~NAME "
                f"with NAME one of {', '.join(CAPABILITIES)}"
            )
        out[name] = signs[sign]
    return MappingProxyType(out)
