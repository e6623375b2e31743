"""``gateway sim`` / ``python -m gateway.sim``: flags, the config they make, and serving until a signal.

Every flag has an environment variable of the same name, ``SIM_`` in front (``--itl-ms`` is
``SIM_ITL_MS``); a flag wins over the environment, which wins over the built-in default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gateway import heap
from gateway.sim.config import ENGINE, FAST, KINDS, ConfigError, SimConfig, make_config
from gateway.sim.server import new_event_loop, start_sim

_TRUE = frozenset({"1", "true", "yes", "on"})


def _env_name(flag: str) -> str:
    return "SIM_" + flag.removeprefix("--").upper().replace("-", "_")


def _default(field: str) -> object:
    return SimConfig.__struct_defaults__[SimConfig.__struct_fields__.index(field)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags to ``parser`` (the ``gateway sim`` subparser, or a plain one)."""
    group = parser.add_argument_group("server")

    def add(flag: str, kind: Callable[[str], object], help: str, field: str | None = None, **kw: Any) -> None:
        env = _env_name(flag)
        default = None if field is None else _default(field)
        shown = f" (default {default})" if default not in (None, "") else ""
        group.add_argument(flag, type=kind, default=os.environ.get(env), help=f"{help}{shown} [env {env}]", **kw)

    def switch(flag: str, help: str) -> None:
        env = _env_name(flag)
        default = os.environ.get(env, "").strip().lower() in _TRUE
        group.add_argument(flag, action="store_true", default=default, help=f"{help} [env {env}]")

    add("--kind", str, "backend kind to imitate", "kind", choices=KINDS)
    add("--host", str, "address to bind", "host")
    add("--port", int, "port to bind; 0 picks a free one (printed at start)", "port")
    add("--api-key", str, "backend key clients must send; ignored by kinds without auth (ollama)")
    add(
        "--model",
        str,
        "model id listed by /v1/models (requested names are echoed back; llamacpp answers with this one)",
        "model",
    )
    add("--seed", int, "seed for the ITL jitter")
    add("--ctx-size", int, "context per slot in tokens; longer prompts get llama.cpp's 400 (llamacpp only)", "ctx_size")
    switch("--no-embeddings", "serve no embeddings (llama.cpp answers 501, other kinds 404)")

    group = parser.add_argument_group("timing")
    add("--ttft-ms", float, "base time to first token", "ttft_ms")
    add("--itl-ms", float, "base inter-token latency", "itl_ms")
    add("--itl-jitter-ms", float, "each gap is itl +/- a uniform draw of up to this", "itl_jitter_ms")
    add("--tokens", int, "completion length when a request gives no max_tokens", "tokens")
    add("--max-running", int, "sequences generated at once before requests queue", "max_running")
    add("--prefill-us-per-token", float, "TTFT added per prompt token", "prefill_us_per_token")
    add("--batch-slowdown", float, "ITL growth per other running sequence (fraction)", "batch_slowdown")
    add("--load-seconds", float, "start with a load phase in the kind's manner; 0 is off", "load_seconds")
    switch("--fast", "no delays at all (ttft, itl, jitter, prefill, batch slowdown = 0): for throughput runs")

    group = parser.add_argument_group(
        "engine model (off unless --engine; see gateway/sim/kv.py)",
        "A prefix cache of KV blocks (LRU, chained block hashes as vLLM's automatic prefix caching), one "
        "prefill lane shared by all requests, and the kind's own engine metrics on /metrics. --engine "
        "starts the timing knobs above from one 8B model on one H100 ("
        + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in ENGINE.items())
        + "); flags given still win.",
    )
    switch("--engine", "turn the engine model on")
    add("--block-tokens", int, "tokens per KV block (engine model)", "block_tokens")
    add("--kv-blocks", int, "KV-cache capacity in blocks (engine model)", "kv_blocks")

    group = parser.add_argument_group("faults, on every inference request (per request: header x-sim-fault)")
    add("--fail-status", int, "answer this HTTP status in the kind's error shape")
    add("--reset-after", int, "reset the TCP connection after N stream events (0: before the answer)")
    add("--stall-before-headers-ms", float, "wait this long before the answer starts")
    add("--stall-after", int, "go silent after N stream events (with --stall-ms)")
    add("--stall-ms", float, "how long --stall-after stalls")
    add("--error-after", int, "send the kind's mid-stream error event after N stream events")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The ``SimConfig`` for parsed flags (raises ``ConfigError``)."""
    fields = set(SimConfig.__struct_fields__)
    given: dict[str, object] = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if given.get("engine"):
        given = {**ENGINE, **given}
    if getattr(args, "no_embeddings", False):
        given["embeddings"] = False
    if getattr(args, "fast", False):
        given.update(FAST, batch_slowdown=0.0)
    fault = {
        "status": getattr(args, "fail_status", None),
        "reset_after": getattr(args, "reset_after", None),
        "stall_before_headers_ms": getattr(args, "stall_before_headers_ms", None),
        "stall_after": getattr(args, "stall_after", None),
        "stall_ms": getattr(args, "stall_ms", None),
        "error_after": getattr(args, "error_after", None),
    }
    if fault["stall_after"] is not None and fault["stall_ms"] is None:
        raise ConfigError("--stall-after needs --stall-ms")
    return make_config(**given, fault={k: v for k, v in fault.items() if v is not None})


def describe(config: SimConfig, url: str) -> str:
    timing = (
        "no delays"
        if config.fast
        else f"ttft {config.ttft_ms:g} ms, itl {config.itl_ms:g}±{config.itl_jitter_ms:g} ms, "
        f"{config.max_running} running max"
    )
    auth = "key required" if config.api_key else "no key"
    load = f", loading {config.load_seconds:g} s" if config.load_seconds else ""
    engine = (
        f"; engine model: {config.kv_blocks} KV blocks of {config.block_tokens} tokens, "
        f"prefill {config.prefill_us_per_token:g} us/token"
        if config.engine
        else ""
    )
    return f"gateway sim: {config.kind} serving {url}/v1 (model {config.model}; {timing}{engine}; {auth}{load})"


async def _serve(config: SimConfig) -> int:
    try:
        sim = await start_sim(config)
    except OSError as exc:
        print(f"gateway sim: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(describe(config, sim.url), flush=True)
    heap.settle()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        heap.restore()
        await sim.close()
    return 0


def serve(config: SimConfig) -> int:
    """Serve until SIGINT or SIGTERM (uvloop when installed); 0 on a clean stop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_serve(config))


def run(args: argparse.Namespace) -> int:
    """Run the simulator the parsed flags describe until SIGINT/SIGTERM; the process exit code."""
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"gateway sim: {exc}", file=sys.stderr)
        return 2
    return serve(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.sim", description="Simulated inference backend.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
