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
import statistics
import subprocess
import sys
import tarfile
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path

from bench.loadgen import install_uvloop
from bench.procstat import Tree
from bench.runner import Endpoint, Runner, cpu_plan, start_gateway, start_sim
from bench.scenarios import FULL, Scenario

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Side:
    """One gateway and its rounds: CPU us per request (all threads, main thread), per event, and
    the round's median time to first byte in ms."""

    label: str
    runner: Runner
    endpoint: Endpoint
    tree: Tree
    rounds: list[tuple[float, float, float, float]] = field(default_factory=list)
    errors: int = 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", default="HEAD", help="the git revision to compare with (default HEAD)")
    p.add_argument("--scenario", default="nonstream-c16", choices=[s.name for s in FULL if s.abort_after is None])
    p.add_argument("--pairs", type=int, default=10, help="rounds per side, alternating (default 10)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one round (default 2)")
    p.add_argument(
        "--gateway-env", action="append", default=[], metavar="KEY=VALUE", help="extra setting for both gateways"
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
    found = Path(probe.stdout.strip()).resolve()
    if probe.returncode != 0 or not found.is_relative_to(tree_root.resolve()):
        raise SystemExit(f"bench.ab: the gateway would be imported from {found or probe.stderr!r}, not {tree_root}")


async def measure(sides: list[Side], sc: Scenario, pairs: int) -> None:
    warm = replace(sc, round_seconds=min(1.0, sc.round_seconds))
    for side in sides:
        await side.runner._round(side.endpoint, warm, 10**9)
    for i in range(pairs):
        for side in sides if i % 2 == 0 else reversed(sides):
            side.tree.mark()
            samples = await side.runner._round(side.endpoint, sc, 10**9)
            total, main = side.tree.since_split()
            ok = [s for s in samples if s.ok]
            side.errors += len(samples) - len(ok)
            n = max(1, len(ok))
            events = max(1, sum(s.events for s in ok))
            ttfts = [t for s in ok if (t := s.ttft) is not None]
            ttft = statistics.median(ttfts) * 1e3 if ttfts else float("nan")
            side.rounds.append((total / n * 1e6, main / n * 1e6, total / events * 1e6, ttft))


def summary(base: Side, this: Side, sc: Scenario, pairs: int) -> str:
    def med(side: Side, i: int) -> float:
        return statistics.median(r[i] for r in side.rounds)

    lines = [f"{sc.name}: {pairs} pairs of {sc.round_seconds:g} s rounds, alternating; gateway CPU from /proc"]
    for side in (base, this):
        per_event = f", {med(side, 2):.2f} us/event" if sc.stream else ""
        lines.append(
            f"  {side.label:<24} median {med(side, 0):7.1f} us/req"
            f" (event loop's thread {med(side, 1):6.1f}){per_event}, time to first byte {med(side, 3):.3f} ms;"
            f" rounds {[round(r[0]) for r in side.rounds]}"
        )
    figures = [(0, "all threads", "us/req", 1), (1, "event loop's thread", "us/req", 1)]
    if sc.stream:
        figures.append((2, "per event", "us/event", 1))
    figures.append((3, "time to first byte (each round's median)", "ms", 3))
    for i, what, unit, digits in figures:
        diffs = [t[i] - b[i] for b, t in zip(base.rounds, this.rounds, strict=True)]
        lines.append(
            f"  paired difference (this tree - base), {what}: median {statistics.median(diffs):+.{digits}f} {unit}"
            f" (mean {statistics.mean(diffs):+.{digits}f}, from {min(diffs):+.{digits}f} to {max(diffs):+.{digits}f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pairs < 1 or args.seconds <= 0:
        raise SystemExit("bench.ab: --pairs must be at least 1 and --seconds positive")
    extra = {}
    for item in args.gateway_env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bench.ab: --gateway-env {item!r} is not KEY=VALUE")
        extra[key] = value
    install_uvloop()
    sc = replace(next(s for s in FULL if s.name == args.scenario), round_seconds=args.seconds)
    gateway_cpu, other_cpu = cpu_plan()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ab-")))
        commit = base_tree(args.base, work / "base")
        sim, sim_port = stack.enter_context(start_sim(other_cpu, work / "sim.log"))
        if other_cpu is not None:
            os.sched_setaffinity(0, {other_cpu})
        sides = []
        for label, tree_root in ((f"base ({args.base} {commit})", work / "base"), ("this tree", ROOT)):
            env = {**extra, "PYTHONPATH": str(tree_root)}
            check_imports(tree_root, env)
            name = "base" if tree_root != ROOT else "this"
            proc, port = stack.enter_context(
                start_gateway(gateway_cpu, work / f"{name}.log", "vllm", f"http://127.0.0.1:{sim_port}/v1", None, env)
            )
            endpoint = Endpoint(name, "127.0.0.1", port, "/v1", None)
            tree = Tree(proc.pid)
            runner = Runner(
                endpoint, endpoint, model="sim-model", gateway_tree=tree, backend_tree=None, progress=lambda _: None
            )
            sides.append(Side(label, runner, endpoint, tree))
        asyncio.run(measure(sides, sc, args.pairs))
    print(summary(sides[0], sides[1], sc, args.pairs))
    failed = sum(s.errors for s in sides)
    if failed:
        print(f"bench.ab: {failed} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
