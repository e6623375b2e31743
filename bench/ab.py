"""``python -m bench.ab`` (``just bench-ab``): the gateway's CPU, this tree against a git revision.

    python -m bench.ab                                # the working tree against HEAD
    python -m bench.ab --base HEAD~3 --scenario stream-fast-c16 --pairs 12

Two gateways, one from the working tree and one from ``--base`` (its ``gateway/`` package, taken
with ``git archive``), both pinned to the gateway's CPU in front of one simulator, answer the same
scenario in alternating rounds. Each round's CPU (from ``/proc``) per request is paired with the
other side's next to it, so a slow stretch of the machine touches both sides of a pair: the median
of the paired differences resolves a few microseconds where whole ``just bench`` runs, minutes
apart, differ by more. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path

from bench import report
from bench.loadgen import install_uvloop
from bench.runner import (
    Endpoint,
    Runner,
    Side,
    add_gateway_env,
    pin_loadgen,
    settled_tree,
    start_gateway,
    start_sim,
)
from bench.scenarios import FULL, Scenario

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Gateway:
    """One of the two gateways, and its rounds' figures (``report.gateway_cost`` and the
    round's median time to first byte)."""

    label: str
    runner: Runner
    rounds: list[dict[str, float | None]] = field(default_factory=list)
    errors: int = 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", default="HEAD", help="the git revision to compare with (default HEAD)")
    p.add_argument("--scenario", default="nonstream-c16", choices=[s.name for s in FULL if s.abort_after is None])
    p.add_argument("--pairs", type=int, default=10, help="rounds per side, alternating (default 10)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one round (default 2)")
    add_gateway_env(p, "extra setting for both gateways")
    add_gateway_env(
        p, "extra setting for this tree's gateway only (with --base HEAD: what a setting costs)", "--this-env"
    )
    return p


def base_tree(rev: str, into: Path) -> str:
    """The ``gateway`` package of ``rev``, unpacked under ``into``; returns the commit's short id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev + "^{commit}"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if commit.returncode != 0:
        raise SystemExit(f"bench.ab: {rev!r} is not a revision of this repository: {commit.stderr.strip()}")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "gateway"], cwd=ROOT, capture_output=True, check=True
    )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python before 3.11.4: no filters (our own repository's files)
            tar.extractall(into)  # noqa: S202
    return commit.stdout.strip()


def check_imports(tree_root: Path, env: dict[str, str]) -> None:
    """Refuse to measure a gateway that would not run from ``tree_root``."""
    probe = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        env={**os.environ, **env},
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise SystemExit(f"bench.ab: the gateway does not import from {tree_root}: {probe.stderr.strip()}")
    found = Path(probe.stdout.strip()).resolve()
    if not found.is_relative_to(tree_root.resolve()):
        raise SystemExit(f"bench.ab: the gateway would be imported from {found}, not {tree_root}")


async def measure(gateways: list[Gateway], sc: Scenario, pairs: int) -> None:
    """Alternating rounds, each metered as ``just bench`` meters a gateway's rounds."""
    warm = replace(sc, round_seconds=min(1.0, sc.round_seconds))
    for gw in gateways:
        await gw.runner._round(gw.runner.gateway, warm, 10**9)
    for i in range(pairs):
        for gw in gateways if i % 2 == 0 else reversed(gateways):
            side = Side()
            await gw.runner._measure(side, gw.runner.gateway, sc, 10**9)
            figures = report.side_figures(side, sc)
            cost = report.gateway_cost(side, figures, sc)
            gw.errors += figures["errors"]
            gw.rounds.append(
                {
                    "all": cost["cpu_per_request_us"],
                    "main": cost["main_thread_cpu_per_request_us"],
                    "event": cost["cpu_per_chunk_us"],
                    "ttft": figures["ttft_ms"]["p50"],
                }
            )


def summary(base: Gateway, this: Gateway, sc: Scenario, pairs: int) -> str:
    def med(gw: Gateway, key: str) -> float:
        return statistics.median(r[key] or 0.0 for r in gw.rounds)

    lines = [f"{sc.name}: {pairs} pairs of {sc.round_seconds:g} s rounds, alternating; gateway CPU from /proc"]
    for gw in (base, this):
        per_event = f", {med(gw, 'event'):.2f} us/event" if sc.stream else ""
        lines.append(
            f"  {gw.label:<24} median {med(gw, 'all'):7.1f} us/req"
            f" (event loop's thread {med(gw, 'main'):6.1f}){per_event}, time to first byte {med(gw, 'ttft'):.3f} ms;"
            f" rounds {[round(r['all'] or 0.0) for r in gw.rounds]}"
        )
    figures = [("all", "all threads", "us/req", 1), ("main", "event loop's thread", "us/req", 1)]
    if sc.stream:
        figures.append(("event", "per event", "us/event", 1))
    figures.append(("ttft", "time to first byte (each round's median)", "ms", 3))
    for key, what, unit, digits in figures:
        diffs = [(t[key] or 0.0) - (b[key] or 0.0) for b, t in zip(base.rounds, this.rounds, strict=True)]
        lines.append(
            f"  paired difference (this tree - base), {what}: median {statistics.median(diffs):+.{digits}f} {unit}"
            f" (mean {statistics.mean(diffs):+.{digits}f}, from {min(diffs):+.{digits}f} to {max(diffs):+.{digits}f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pairs < 1 or args.seconds <= 0:
        raise SystemExit("bench.ab: --pairs must be at least 1 and --seconds positive")
    install_uvloop()
    sc = replace(next(s for s in FULL if s.name == args.scenario), round_seconds=args.seconds)
    work = Path(tempfile.mkdtemp(prefix="bench-ab-"))  # the base tree and the servers' logs
    try:
        with ExitStack() as stack:
            commit = base_tree(args.base, work / "base")
            gateway_cpu, other_cpu = pin_loadgen()
            sim, sim_port = stack.enter_context(start_sim(other_cpu, work / "sim.log"))
            url = f"http://127.0.0.1:{sim_port}/v1"
            gateways = []
            this_env = dict(args.this_env)
            this_label = "this tree" + "".join(f" {k}={v}" for k, v in this_env.items())
            for name, label, tree_root, own_env in (
                ("base", f"base ({args.base} {commit})", work / "base", {}),
                ("this", this_label, ROOT, this_env),
            ):
                env = {**dict(args.gateway_env), **own_env, "PYTHONPATH": str(tree_root)}
                check_imports(tree_root, env)
                proc, port = stack.enter_context(
                    start_gateway(gateway_cpu, work / f"{name}.log", "vllm", url, None, env)
                )
                endpoint = Endpoint(name, "127.0.0.1", port, "/v1", None)
                runner = Runner(
                    endpoint,
                    endpoint,
                    model="sim-model",
                    gateway_tree=settled_tree(proc),
                    backend_tree=None,
                    progress=lambda _: None,
                )
                gateways.append(Gateway(label, runner))
            asyncio.run(measure(gateways, sc, args.pairs))
    except BaseException:
        print(f"bench.ab: logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    print(summary(gateways[0], gateways[1], sc, args.pairs))
    failed = sum(gw.errors for gw in gateways)
    if failed:
        print(f"bench.ab: {failed} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
