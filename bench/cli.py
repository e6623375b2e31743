"""``python -m bench`` (``just bench``): streaming latency and gateway cost, direct vs gateway.

    python -m bench                                  # built-in simulator (the default)
    python -m bench --smoke                          # a few seconds, for the test suite
    python -m bench --backend-kind vllm --backend-url http://gpu-host:8000/v1 --model Qwen/Qwen2.5-0.5B-Instruct
    python -m bench --routing                        # balancing policies on simulated replicas (bench.routing)

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench import report
from bench.loadgen import Sample, install_uvloop, raise_nofile
from bench.procstat import Tree, rss_bytes
from bench.runner import (
    Endpoint,
    Runner,
    add_gateway_env,
    pin_loadgen,
    settled_tree,
    start_floor,
    start_gateway,
    start_nginx,
    start_sim,
)
from bench.scenarios import FULL, smoke

RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend",
        choices=("sim", "llamacpp"),
        default="sim",
        help="start this backend: the simulator (default) or the real llama.cpp server (built once, tiny model)",
    )
    p.add_argument("--backend-kind", help="use an already running backend of this kind instead (with --backend-url)")
    p.add_argument("--backend-url", help="its OpenAI base URL, e.g. http://gpu-host:8000/v1")
    p.add_argument("--backend-key", help="its API key, if it needs one")
    p.add_argument("--model", default="sim-model", help="model name sent in requests")
    p.add_argument("--scenarios", help="comma-separated subset, e.g. c1-stream,stream-paced-c64")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per target (alternating)")
    p.add_argument("--smoke", action="store_true", help="tiny counts: a few seconds in all")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and PNG (default bench/results)")
    add_gateway_env(p, "extra gateway setting (repeatable)")
    p.add_argument("--client-key", help="the client key to send to the gateway (with API_KEYS or a keys file)")
    p.add_argument(
        "--nginx",
        action="store_true",
        help="then run each scenario through nginx (from PATH) in the gateway's place, one worker on the gateway's "
        "CPU, proxying to the same backend without buffering: the reference proxy's cost for the same load",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="then run each scenario against Granian alone (bench.floor: a trivial app with the gateway's Granian "
        "settings, on the gateway's CPU) to show what the gateway costs above its server (simulator only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--routing",
        action="store_true",
        help="instead, the routing benchmark: GATEWAY_BALANCE policies on simulated replicas, open loop "
        "(its own flags: python -m bench --routing --help)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--routing" in argv:
        from bench import routing

        return routing.main([a for a in argv if a != "--routing"])
    args = build_parser().parse_args(argv)
    if (args.backend_kind is None) != (args.backend_url is None):
        print("bench: --backend-kind and --backend-url go together", file=sys.stderr)
        return 2
    if args.floor and (args.backend_kind or args.backend != "sim"):
        print("bench: --floor answers like the simulator, so it runs with the simulator only", file=sys.stderr)
        return 2
    if args.nginx and (args.backend_url or "").lower().startswith("https:"):
        print("bench: --nginx proxies to a plain-HTTP backend only", file=sys.stderr)
        return 2
    if args.nginx and not shutil.which("nginx"):
        print("bench: --nginx needs nginx on PATH (e.g. apt-get install nginx)", file=sys.stderr)
        return 2
    scenarios = smoke() if args.smoke else FULL
    if args.scenarios:
        wanted = set(args.scenarios.split(","))
        unknown = wanted - {s.name for s in scenarios}
        if unknown:
            print(f"bench: unknown scenarios {sorted(unknown)}; known: {[s.name for s in FULL]}", file=sys.stderr)
            return 2
        scenarios = tuple(s for s in scenarios if s.name in wanted)
    raise_nofile()  # a thousand connections to a target at once (stream-paced-1000); servers inherit it
    loop_name = install_uvloop()
    return asyncio.run(_run(args, scenarios, dict(args.gateway_env), loop_name))


async def _run(args: argparse.Namespace, scenarios: Sequence[Any], extra_env: dict[str, str], loop_name: str) -> int:
    gw_cpu, other_cpu = pin_loadgen()
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        if args.backend_kind:
            url = args.backend_url
            kind, key, backend_tree = args.backend_kind, args.backend_key, None
            progress(f"using the {kind} backend at {url}")
        elif args.backend == "llamacpp":
            from bench.llamacpp import KEY, MODEL, start_llamacpp

            llama, llama_port = stack.enter_context(start_llamacpp(other_cpu, logs / "llama-server.log", progress))
            url, kind, key = f"http://127.0.0.1:{llama_port}/v1", "llamacpp", KEY
            backend_tree = Tree(llama.pid)
            if args.model == build_parser().get_default("model"):
                args.model = MODEL
            progress(f"llama-server on port {llama_port}")
        else:
            sim, sim_port = stack.enter_context(start_sim(other_cpu, logs / "sim.log"))
            url, kind, key = f"http://127.0.0.1:{sim_port}/v1", "vllm", None
            backend_tree = Tree(sim.pid)
            progress(f"simulator on port {sim_port}")
        parts = urlsplit(url)
        direct = Endpoint("direct", parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/"), key)
        gw_stack = stack.enter_context(contextlib.ExitStack())
        gw, gw_port = gw_stack.enter_context(start_gateway(gw_cpu, logs / "gateway.log", kind, url, key, extra_env))
        gateway_tree = settled_tree(gw)
        progress(f"gateway on port {gw_port} (pid {gw.pid}, {len(gateway_tree.pids)} processes)")
        idle_rss = gateway_tree.rss()
        workers = gateway_tree.workers
        worker_rss = rss_bytes(workers) // max(1, len(workers))
        gateway = Endpoint("gateway", "127.0.0.1", gw_port, "/v1", args.client_key)
        runner = Runner(
            direct,
            gateway,
            model=args.model,
            gateway_tree=gateway_tree,
            backend_tree=backend_tree,
            progress=progress,
            rounds=args.rounds,
        )
        results = []
        samples: dict[str, dict[str, list[Sample]]] = {}
        for sc in scenarios:
            progress(f"{sc.name}: {sc.description}")
            d_side, g_side = await runner.run(sc)
            d, g = report.side_figures(d_side, sc), report.side_figures(g_side, sc)
            results.append(
                {
                    "scenario": sc.name,
                    "description": sc.description,
                    "params": {
                        "stream": sc.stream,
                        "concurrency": sc.concurrency,
                        "requests": sc.requests,
                        "tokens": sc.tokens,
                        "ttft_ms": sc.ttft_ms,
                        "itl_ms": sc.itl_ms,
                        "burst": sc.burst,
                        "spread_seconds": sc.spread_seconds,
                        "abort_after": sc.abort_after,
                    },
                    "direct": d,
                    "gateway": g,
                    "added": report.added(d, g),
                    "gateway_cost": report.gateway_cost(g_side, g, sc),
                    "limits": report.limits(d, g),
                }
            )
            samples[sc.name] = {"direct": d_side.samples, "gateway": g_side.samples}
        gw_stack.close()  # what follows gets the gateway's CPU to itself
        # The floor stands in for the backend too; nginx proxies to it, whose CPU is metered then.
        passes: list[Pass] = []
        if args.floor:
            floor = start_floor(gw_cpu, logs / "floor.log", extra_env)
            passes.append(Pass("floor", floor, "/v1", report.against_floor, backend=False))
        if args.nginx:
            nginx = start_nginx(gw_cpu, logs / "nginx.log", direct.host, direct.port)
            passes.append(Pass("nginx", nginx, direct.base_path, report.against_nginx, backend=True))
        failed = [p.name for p in passes if not await _alone_pass(p, runner, scenarios, results, samples, logs)]
    env = report.environment(
        {
            "backend": "external" if args.backend_kind else args.backend,
            "backend_kind": kind,
            "backend_url": url,
            "model": args.model,
            "smoke": args.smoke,
            "rounds": args.rounds,
            "gateway_env": extra_env,
        },
        (gw_cpu, other_cpu),
        loop_name,
    )
    doc = {
        "environment": env,
        "gateway_idle_rss_mib": round(idle_rss / 2**20, 1),
        "gateway_idle_worker_rss_mib": round(worker_rss / 2**20, 1),
        "scenarios": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"bench-{stamp}.json"
    png_path = args.out / f"bench-{stamp}.png"
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    report.plot(results, samples, png_path)
    print(report.table(results))
    print(
        f"\ngateway idle RSS {doc['gateway_idle_rss_mib']} MiB (all its processes; one worker "
        f"{doc['gateway_idle_worker_rss_mib']} MiB); results: {json_path} and {png_path}"
    )
    errors = sum(
        r["direct"]["errors"] + r["gateway"]["errors"] + sum(r.get(k, {}).get("errors", 0) for k in ("floor", "nginx"))
        for r in results
    )
    return 1 if errors or failed else 0


#: What a pass adds to a scenario's results from its figures (and the gateway's).
Compare = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Pass:
    """Another server run in the gateway's place (``--floor``, ``--nginx``)."""

    name: str
    server: Any  # the context manager that runs it: (process, port)
    base_path: str
    compare: Compare
    #: Whether the backend still serves the load (nginx proxies to it; the floor answers itself).
    backend: bool


async def _alone_pass(
    p: Pass,
    runner: Runner,
    scenarios: Sequence[Any],
    results: list[dict[str, Any]],
    samples: dict[str, dict[str, list[Sample]]],
    logs: Path,
) -> bool:
    """Each scenario again, with the pass's server in the gateway's place and its CPU metered the
    same way; the disconnect scenario is left out (it measures the backend's aborts). A pass that
    fails says so in the results rather than losing the run's figures; returns whether it ran."""
    try:
        with p.server as (proc, port):
            tree = settled_tree(proc)
            runner.progress(f"{p.name} on port {port}")
            ep = Endpoint(p.name, "127.0.0.1", port, p.base_path, runner.direct.api_key)
            alone = runner.alone(ep, tree, backend=p.backend)
            for sc, result in zip(scenarios, results, strict=True):
                if sc.abort_after is not None:
                    continue
                side = await alone.run_alone(sc)
                figures = report.side_figures(side, sc)
                result[p.name] = figures
                samples[sc.name][p.name] = side.samples
                result[f"{p.name}_cost"] = report.gateway_cost(side, figures, sc)
                result.update(p.compare(result))
    except (OSError, RuntimeError) as exc:  # TimeoutError is an OSError
        print(f"bench: the {p.name} pass failed ({exc}); its log: {logs / (p.name + '.log')}", file=sys.stderr)
        for result in results:
            result.setdefault(f"{p.name}_error", str(exc))
        return False
    return True
