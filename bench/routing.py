"""``python -m bench --routing`` (``just bench --routing``): the gateway's balancing policies
(``GATEWAY_BALANCE=p2c|prefix``) compared on simulated engine replicas, open loop.

    python -m bench --routing                 # 4 replicas, both policies, every workload
    python -m bench --routing --smoke         # 2 replicas, tiny counts: seconds (the test suite runs it)
    python -m bench --routing --rate 40 --rounds 3 --policies p2c,prefix

For each policy it starts N simulated replicas (``gateway sim --engine`` where the simulator has
the engine model) behind one gateway, fresh for every run so no cache carries over, and sends
open-loop traffic from one seed: a rate sweep on the shared-prefix workload finds the knee (the
highest rate whose TTFT p90 stays under twice the unloaded TTFT), then every workload runs at the
knee of the first policy (or ``--rate``). See bench/README.md for the figures and the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from bench import routing_report, scrape
from bench.loadgen import Connection, Sample, build_request, collector_off, install_uvloop
from bench.procstat import Tree
from bench.runner import _running, add_gateway_env, pin_loadgen, settled_tree, start_gateway
from bench.workloads import WORKLOADS, Request, Shape, arrivals, build
from tests.tools.llama_server import free_port

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("p2c", "prefix")
MODEL = "sim-model"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """What to run, from the flags (``--smoke`` shrinks every count)."""

    replicas: int = 4
    policies: tuple[str, ...] = POLICIES
    workloads: tuple[str, ...] = WORKLOADS
    seed: int = 17
    shape: Shape = field(default_factory=Shape)
    rate: float | None = None  # requests/s for the workloads; None: the sweep's knee
    requests: int = 600  # per workload run
    seconds: float = 30.0  # of arrivals per workload run
    sweep_start: float | None = None  # requests/s; None: 2 per replica
    sweep_factor: float = 1.5
    sweep_steps: int = 10
    sweep_requests: int = 600
    sweep_seconds: float = 10.0
    unloaded_requests: int = 12
    #: Each replica's KV cache in blocks (``gateway sim --kv-blocks``); None: ``kv_blocks_for``.
    kv_blocks: int | None = None
    rounds: int = 1
    sample_s: float = 0.1  # waiting-queue sampling interval


SMOKE = Plan(
    replicas=2,
    shape=Shape(groups=3, users_per_group=2, system_chars=2000, user_chars=200, answer_tokens=8, max_turns=3),
    requests=16,
    seconds=1.5,
    sweep_start=8.0,
    sweep_factor=2.0,
    sweep_steps=2,
    sweep_requests=10,
    sweep_seconds=1.0,
    unloaded_requests=3,
)


#: The simulator's tokens per KV block (vLLM's default block size), and characters per token.
BLOCK_TOKENS = 16
CHARS_PER_TOKEN = 4
#: What one replica's cache holds of the workload's prefixes, in replicas' worth (see kv_blocks_for).
CACHE_REPLICAS = 1.5


def kv_blocks_for(shape: Shape, replicas: int) -> int:
    """A replica's KV cache for the benchmark: ``CACHE_REPLICAS / replicas`` of the blocks that
    every group's system prompt and every user's history (at half its longest) take. The cluster's
    caches hold the whole working set when each prefix lives on one replica, but no replica holds
    it all: the regime of many long prompts, where routing decides whether the caches add up.
    With a cache that holds everything (the simulator's H100 default, ``--kv-blocks 26000``),
    every policy ends up hitting once warm and routing can only save the first misses."""
    history_chars = shape.max_turns / 2 * (shape.user_chars + shape.answer_tokens * CHARS_PER_TOKEN)
    chars = shape.groups * shape.system_chars + shape.groups * shape.users_per_group * history_chars
    blocks = chars / CHARS_PER_TOKEN / BLOCK_TOKENS
    return max(64, int(blocks * CACHE_REPLICAS / replicas))


@dataclass
class Cluster:
    """Replicas behind one gateway, running."""

    policy: str
    replicas: list[int]  # ports
    gateway: int  # port
    gateway_tree: Tree


def sim_has_engine() -> bool:
    """Whether this simulator has the engine model (``gateway sim --engine``)."""
    out = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "gateway.sim", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    return "--engine" in out.stdout


def gateway_knows_balance() -> bool:
    """Whether this gateway reads ``GATEWAY_BALANCE`` (without it every run is today's p2c)."""
    from gateway.config import ENV_NAMES

    return "GATEWAY_BALANCE" in ENV_NAMES


@contextlib.contextmanager
def cluster(
    plan: Plan, policy: str, cpus: tuple[int | None, int | None], logs: Path, engine: bool, env: dict[str, str]
) -> Iterator[Cluster]:
    """``plan.replicas`` simulators (``--engine`` when ``engine``) on the second CPU and one
    gateway in front of all of them on the first, with ``GATEWAY_BALANCE=policy``."""
    with contextlib.ExitStack() as stack:
        ports = []
        for i in range(plan.replicas):
            port = free_port()
            argv = [sys.executable, "-m", "gateway.sim", "--kind", "vllm", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--seed", str(plan.seed + i)]
            if engine:
                argv += ["--engine", "--kv-blocks", str(plan.kv_blocks or kv_blocks_for(plan.shape, plan.replicas))]
            stack.enter_context(_running(argv, port, cpus[1], logs / f"sim-{i}.log"))
            ports.append(port)
        url = ",".join(f"http://127.0.0.1:{p}/v1" for p in ports)
        gw_env = {"GATEWAY_BALANCE": policy, **env}
        gw_log = logs / f"gateway-{policy}.log"
        gw, gw_port = stack.enter_context(start_gateway(cpus[0], gw_log, "vllm", url, None, gw_env))
        yield Cluster(policy, ports, gw_port, settled_tree(gw))


def payload(port: int, r: Request, max_tokens: int | None = None) -> bytes:
    body = {
        "model": MODEL,
        "messages": [{"role": role, "content": content} for role, content in r.messages],
        "max_tokens": r.max_tokens if max_tokens is None else max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return build_request("127.0.0.1", port, "/v1/chat/completions", body, None)


@dataclass
class Load:
    """What one run sent and saw: per request its scheduled start and sample, in order."""

    scheduled: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    waiting_peak: list[float | None] = field(default_factory=list)
    running_peak: list[float | None] = field(default_factory=list)


async def _send(pool: list[Connection], port: int, raw: bytes) -> Sample:
    """One request on an idle keep-alive connection (a new one when none is idle)."""
    conn = pool.pop() if pool else Connection("127.0.0.1", port)
    try:
        s = await conn.request(raw, timeout=60.0)
    except OSError as exc:  # the connect itself failed
        conn.close(abort=True)
        return Sample(start=time.perf_counter(), error=f"{type(exc).__name__}: {exc}")
    if s.ok:
        pool.append(conn)
    else:
        conn.close(abort=True)
    return s


async def open_loop(port: int, raws: Sequence[bytes], times: Sequence[float]) -> Load:
    """Each request started at its offset in ``times`` whatever the others are doing; returns when
    all have ended. Time to first token counts from the scheduled start (a late start is the
    gateway's or the machine's lag, and is counted)."""
    pool: list[Connection] = []
    load = Load()
    t0 = time.perf_counter()
    tasks = []
    for raw, at in zip(raws, times, strict=True):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        load.scheduled.append(t0 + at)
        tasks.append(asyncio.create_task(_send(pool, port, raw)))
    load.samples = list(await asyncio.gather(*tasks))
    load.wall = max([s.end for s in load.samples if s.end is not None] + [time.perf_counter()]) - t0
    for conn in pool:
        conn.close()
    return load


async def closed_loop(port: int, raws: Sequence[bytes]) -> Load:
    """One request at a time (the unloaded reference)."""
    pool: list[Connection] = []
    load = Load()
    t0 = time.perf_counter()
    for raw in raws:
        load.scheduled.append(time.perf_counter())
        load.samples.append(await _send(pool, port, raw))
    load.wall = time.perf_counter() - t0
    for conn in pool:
        conn.close()
    return load


async def _sample_queues(ports: list[int], interval: float, load: Load, stop: asyncio.Event) -> None:
    """The replicas' waiting and running gauges every ``interval`` until ``stop``: their peaks."""
    load.waiting_peak = [None] * len(ports)
    load.running_peak = [None] * len(ports)
    while not stop.is_set():
        texts = await asyncio.gather(*(scrape.afetch("127.0.0.1", p) for p in ports))
        for i, text in enumerate(texts):
            values = scrape.series(text or "")
            for peaks, names in ((load.waiting_peak, scrape.WAITING), (load.running_peak, scrape.RUNNING)):
                v = scrape.first(values, names)
                if v is not None:
                    peaks[i] = max(v, peaks[i] or 0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def measured(cl: Cluster, plan: Plan, raws: Sequence[bytes], times: Sequence[float] | None) -> dict[str, Any]:
    """One run against the cluster (open loop at ``times``, or one at a time when ``None``), with
    the replicas' counters and the gateway's before and after, the queues sampled and the
    gateway's CPU metered: its figures (``routing_report.figures``)."""
    before = await _scrape_all(cl)
    cl.gateway_tree.mark()
    stop = asyncio.Event()
    sampled = Load()
    sampler = asyncio.create_task(_sample_queues(cl.replicas, plan.sample_s, sampled, stop))
    with collector_off():  # the client's own collections would stall the run it measures
        load = await (closed_loop(cl.gateway, raws) if times is None else open_loop(cl.gateway, raws, times))
        cpu, _ = cl.gateway_tree.since_split()
    stop.set()
    await sampler  # (the gateway's /metrics answer is current for its worker: no flush to wait for)
    after = await _scrape_all(cl)
    load.waiting_peak, load.running_peak = sampled.waiting_peak, sampled.running_peak
    return routing_report.figures(load, before, after, cpu, cl.replicas)


async def _scrape_all(cl: Cluster) -> tuple[list[str | None], str | None]:
    texts = await asyncio.gather(*(scrape.afetch("127.0.0.1", p) for p in [*cl.replicas, cl.gateway]))
    return list(texts[:-1]), texts[-1]


@dataclass
class Bench:
    """One benchmark run: the plan, where things run, and what was found so far."""

    plan: Plan
    cpus: tuple[int | None, int | None]
    logs: Path
    engine: bool
    env: dict[str, str]
    progress: Progress
    #: Every run's time-to-first-token values in ms, by (policy, workload), for the plot.
    ttfts: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def cluster(self, policy: str) -> contextlib.AbstractContextManager[Cluster]:
        return cluster(self.plan, policy, self.cpus, self.logs, self.engine, self.env)

    async def step(
        self, policy: str, workload: str, rate: float, count: int, seconds: float, *, unloaded: bool = False
    ) -> dict[str, Any]:
        """One open-loop run of ``workload`` at ``rate`` on a fresh cluster; with ``unloaded``, the
        unloaded reference first (under ``"unloaded"``): other prompts of the same shape (another
        seed, so they leave nothing in the caches that the run could use) one at a time, answers of
        one token."""
        plan = self.plan
        times = arrivals(random.Random(plan.seed), rate, count, seconds)
        reqs = build(workload, plan.seed, len(times), plan.shape)
        reference = None
        with self.cluster(policy) as cl:
            if unloaded:
                alone = build("shared", plan.seed + 1, plan.unloaded_requests, plan.shape)
                reference = await measured(cl, plan, [payload(cl.gateway, r, 1) for r in alone], None)
                reference.pop("ttft_values_ms")
                self.progress(f"{policy} unloaded: ttft p50 {routing_report.fmt(reference['ttft_ms']['p50'])} ms")
            fig = await measured(cl, plan, [payload(cl.gateway, r) for r in reqs], times)
        fig.update(policy=policy, workload=workload, rate_rps=round(rate, 3))
        if reference is not None:
            fig["unloaded"] = reference
        p90, hits = routing_report.fmt(fig["ttft_ms"]["p90"]), routing_report.fmt(fig["prefix_cache_hit_rate"])
        n = fig["requests"]
        self.progress(f"{policy} {workload} at {rate:.2f}/s: {n} requests, ttft p90 {p90} ms, hit rate {hits}")
        return fig

    async def sweep(self, policy: str, threshold_ms: float | None, workload: str = "shared") -> dict[str, Any]:
        """On ``workload``: the unloaded reference, then rates from the start up by the factor until TTFT p90
        reaches the threshold (``threshold_ms``, or twice this policy's unloaded TTFT p50 when
        ``None``) or a request fails: the knee is the highest rate that stayed under."""
        plan = self.plan
        rate = plan.sweep_start or 2.0 * plan.replicas
        steps: list[dict[str, Any]] = []
        knee = unloaded = None
        for i in range(plan.sweep_steps):
            fig = await self.step(policy, workload, rate, plan.sweep_requests, plan.sweep_seconds, unloaded=i == 0)
            fig.pop("ttft_values_ms")
            if i == 0:
                unloaded = fig.pop("unloaded")
                reference = unloaded["ttft_ms"]["p50"]
                if threshold_ms is None and reference is not None:
                    threshold_ms = round(2 * reference, 3)
            p90 = fig["ttft_ms"]["p90"]
            under = threshold_ms is not None and p90 is not None and p90 < threshold_ms and not fig["errors"]
            steps.append({**fig, "under_threshold": under})
            if not under:
                break
            knee = rate
            rate *= plan.sweep_factor
        knee_rps = None if knee is None else round(knee, 3)
        return {"unloaded": unloaded, "threshold_ms": threshold_ms, "steps": steps, "knee_rps": knee_rps}


async def _sweeps(bench: Bench) -> dict[str, Any]:
    """The sweep on ``shared`` per policy (the first policy's unloaded TTFT sets the threshold for
    all), and the first policy's on ``control`` (which runs at its own knee: without a cache hit
    it costs more prefill, so the shared workload's knee would overload it)."""
    plan = bench.plan
    first = plan.policies[0]
    sweeps: dict[str, dict[str, Any]] = {}
    for policy in plan.policies:
        sweeps[policy] = await bench.sweep(policy, sweeps[first]["threshold_ms"] if sweeps else None)
    control = None
    if "control" in plan.workloads and plan.rate is None:
        control = await bench.sweep(first, sweeps[first]["threshold_ms"], "control")
    unloaded = sweeps[first]["unloaded"]
    return {
        "reference_policy": first,
        "unloaded_ttft_p50_ms": None if unloaded is None else unloaded["ttft_ms"]["p50"],
        "threshold_ms": sweeps[first]["threshold_ms"],
        "sweeps": sweeps,
        "control_sweep": control,
    }


def _rates(plan: Plan, knee: dict[str, Any]) -> dict[str, Any]:
    """Each workload's rate: ``--rate``, else the first policy's knee on ``shared`` (for
    ``skewed`` too) or on ``control``; the sweep's start where no step stayed under."""
    start = plan.sweep_start or 2.0 * plan.replicas
    shared = knee["sweeps"][plan.policies[0]]["knee_rps"]
    control = None if knee["control_sweep"] is None else knee["control_sweep"]["knee_rps"]
    rates = {w: plan.rate or (control if w == "control" else shared) or start for w in plan.workloads}
    source = {
        w: "--rate" if plan.rate else ("knee" if (control if w == "control" else shared) else "sweep start")
        for w in plan.workloads
    }
    return {"rates_rps": {w: round(r, 3) for w, r in rates.items()}, "rate_source": source}


async def run(bench: Bench) -> dict[str, Any]:
    """The sweeps, then every workload per policy and round at its rate: the JSON document's
    figures."""
    plan = bench.plan
    knee = await _sweeps(bench)
    rates = _rates(plan, knee)
    runs = []
    for rnd in range(plan.rounds):
        order = plan.policies if rnd % 2 == 0 else tuple(reversed(plan.policies))
        for policy in order:
            for workload in plan.workloads:
                rate = rates["rates_rps"][workload]
                fig = await bench.step(policy, workload, rate, plan.requests, plan.seconds)
                bench.ttfts.setdefault((policy, workload), []).extend(fig.pop("ttft_values_ms"))
                runs.append({**fig, "round": rnd})
    summary = routing_report.summarise(runs, bench.ttfts, plan.policies, plan.workloads)
    return {
        **rates,
        "knee": knee,
        "runs": runs,
        "summary": summary,
        "goals": routing_report.goals(summary, knee["sweeps"]),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench --routing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="2 replicas, tiny counts: seconds in all")
    p.add_argument("--replicas", type=int, help="simulated replicas behind the gateway (default 4; smoke 2)")
    p.add_argument("--policies", default=",".join(POLICIES), help="GATEWAY_BALANCE values to compare, in order")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="a subset of " + ", ".join(WORKLOADS))
    p.add_argument("--seed", type=int, default=17, help="one seed for every workload and every policy")
    p.add_argument("--rate", type=float, help="requests/s for the workloads (default: the first policy's knee)")
    p.add_argument("--requests", type=int, help="requests per workload run (bounded by --seconds too)")
    p.add_argument("--seconds", type=float, help="arrivals per workload run last at most this long")
    p.add_argument("--rounds", type=int, default=1, help="rounds of every workload per policy (order alternates)")
    p.add_argument("--sweep-start", type=float, help="first rate of the sweep (default: 2/s per replica)")
    p.add_argument("--sweep-steps", type=int, help="most rates tried per policy")
    p.add_argument(
        "--kv-blocks",
        type=int,
        help="each replica's KV cache in blocks of 16 tokens (default: 1.5/N of the workload's prefixes; "
        "the simulator's own default, 26000, holds everything)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and PNG (default bench/results)")
    add_gateway_env(p, "extra gateway setting (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def plan_of(args: argparse.Namespace) -> Plan:
    plan = SMOKE if args.smoke else Plan()
    given = {
        "replicas": args.replicas,
        "rate": args.rate,
        "requests": args.requests,
        "seconds": args.seconds,
        "sweep_start": args.sweep_start,
        "sweep_steps": args.sweep_steps,
        "kv_blocks": args.kv_blocks,
    }
    policies = tuple(x for x in args.policies.split(",") if x)
    workloads = tuple(x for x in args.workloads.split(",") if x)
    unknown = set(workloads) - set(WORKLOADS)
    if unknown or not policies or not workloads:
        raise ValueError(f"workloads are some of {WORKLOADS} (got {args.workloads!r}); policies {args.policies!r}")
    return replace(
        plan,
        policies=policies,
        workloads=workloads,
        seed=args.seed,
        rounds=max(1, args.rounds),
        **{k: v for k, v in given.items() if v is not None},
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_of(args)
    except ValueError as exc:
        print(f"bench --routing: {exc}", file=sys.stderr)
        return 2
    loop_name = install_uvloop()
    return asyncio.run(_main(args, plan, loop_name))


async def _main(args: argparse.Namespace, plan: Plan, loop_name: str) -> int:
    # SIGTERM cancels the run, so every replica and gateway is stopped on the way out.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    cpus = pin_loadgen()
    logs = Path(tempfile.mkdtemp(prefix="bench-routing-"))

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    engine, balance = sim_has_engine(), gateway_knows_balance()
    if plan.kv_blocks is None:
        plan = replace(plan, kv_blocks=kv_blocks_for(plan.shape, plan.replicas))
    progress(f"simulator engine model: {'on' if engine else 'absent'}; GATEWAY_BALANCE known: {balance}; logs {logs}")
    bench = Bench(plan, cpus, logs, engine, dict(args.gateway_env), progress)
    figures = await run(bench)
    env = routing_report.environment(args, plan, cpus, loop_name, engine=engine, balance=balance)
    doc = {"environment": env, **figures}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, png_path = args.out / f"routing-{stamp}.json", args.out / f"routing-{stamp}.png"
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    routing_report.plot(doc, bench.ttfts, png_path)
    print(routing_report.table(doc))
    print(f"\nresults: {json_path} and {png_path}")
    errors = sum(r["errors"] for r in doc["runs"])
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
