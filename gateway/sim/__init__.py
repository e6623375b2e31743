"""A simulated inference backend: an OpenAI-compatible server that imitates one backend kind.

It serves ``POST /v1/chat/completions`` and ``/v1/completions`` (streamed or not),
``POST /v1/embeddings``, ``GET /v1/models``, the kind's health route and ``GET /metrics``, and, for
the kinds whose profile has them, at the kind's own paths (``surface_routes.py``): the Anthropic
Messages API (streamed or not, text or a forced ``tool_use``, and ``count_tokens``), the Responses
API (streamed or not; the responses it made can be retrieved, deleted, and their input items
listed), tokenize and detokenize (one token per UTF-8 byte, in the kind's answer shape), rerank and
score, with the
kind's wire habits (SSE framing, 401 and error bodies, mid-stream errors, ``[DONE]`` or not, load
phase; see ``kinds.py``), engine-like timing (``engine.py``) and injectable faults. Any model name
is accepted and echoed back (llama.cpp's chat and completions name the served one instead). The
``/metrics`` route is the simulator's own instrument, open for every kind (real llama.cpp answers
501 there unless started with ``--metrics``). It is a raw asyncio ``Protocol`` HTTP/1.1 server
(``http.py``) on uvloop: no framework, so it is never the bottleneck of what it is put behind.

``--engine`` (``SimConfig.engine``; off by default, and then nothing below applies) adds the engine
model of ``kv.py``: a prefix cache of KV blocks (chained block hashes of the prompt, LRU, a block
reused only with every block before it, as vLLM's automatic prefix caching), one prefill lane
shared by all requests (time to first token = slot wait + lane wait + uncached prompt tokens at
the prefill rate + base), and on ``/metrics`` the kind's own engine metrics under the names in
``gateway.profiles`` (vLLM: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total``)
beside ``sim_prefix_cache_*``. Its timing starts from one 8B model on one H100 (``config.ENGINE``;
figures and sources in ``kv.py``); ``--block-tokens`` and ``--kv-blocks`` size the cache.

Use it
    * ``python -m gateway.sim --kind tgi --port 0`` (or ``gateway sim``): prints
      ``gateway sim: tgi serving http://127.0.0.1:PORT/v1 (...)`` and serves until SIGINT/SIGTERM.
      ``--fast`` removes every delay, for throughput runs; ``--engine`` adds the engine model.
    * ``sim = await start_sim(SimConfig(kind="vllm", port=0))`` on a running loop, then
      ``sim.port``, ``sim.base_url``, ``sim.stats`` (live counters), ``await sim.close()``.
    * ``with sim_in_thread(config) as sim:`` from synchronous code (tests, benchmarks).

Faults, on every inference request from the flags, or per request with the ``x-sim-fault``
header (``key=value`` pairs joined by ``;`` or ``,``; the header's keys override the flags'):
``status=503``, ``reset-after=3``, ``stall-before-headers-ms=2000``,
``stall-after=2;stall-ms=5000``, ``error-after=2``. Counts are SSE events written (the role chunk
is the first) or, for a non-streamed request, tokens generated. Per-request timing:
``x-sim-ttft-ms``, ``x-sim-itl-ms``, ``x-sim-itl-jitter-ms``, and ``x-sim-tokens`` (length when the
request has no max_tokens).

Measured throughput (2-core VM, Python 3.11.7, uvloop 0.23; the load client, an asyncio raw-socket
script, ran on the same two cores; the simulator process used one core fully):
    * ``--fast``, non-streamed chat, 16 tokens, keep-alive: ~9,000 req/s over 1 connection,
      ~42,000-45,000 req/s over 16-64 connections.
    * ``--fast``, streamed chat, 1000-token streams: ~250,000 chunks/s (1-64 streams);
      16-token streams: ~9,700 streams/s (~185,000 chunks/s).
    * Paced at ITL 10 ms (no jitter): 1,000 concurrent streams hold ~92,000 chunks/s with ITL
      p50 10.7 ms, p99 12.9 ms; at 2,000 streams the core saturates (~93,000 chunks/s, ITL p50 20 ms).
"""

from __future__ import annotations

from gateway.sim.config import KINDS, ConfigError, Fault, SimConfig, make_config, parse_fault
from gateway.sim.server import SimServer, new_event_loop, sim_in_thread, start_sim
from gateway.sim.stats import SimStats

__all__ = [
    "KINDS",
    "ConfigError",
    "Fault",
    "SimConfig",
    "SimServer",
    "SimStats",
    "make_config",
    "new_event_loop",
    "parse_fault",
    "sim_in_thread",
    "start_sim",
]
