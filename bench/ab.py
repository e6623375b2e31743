"""``python -m bench.ab`` (``just bench-ab``): the gateway's CPU, this tree against a git revision.

    python -m bench.ab                                # the working tree against HEAD
    python -m bench.ab --base HEAD~3 --scenario stream-fast-c16 --pairs 12

Two gateways, one from the working tree and one from ``--base`` (its ``gateway/`` package, taken
with ``git archive``), both pinned to the gateway's CPU in front of one simulator, answer the same
scenario in alternating rounds. Each round's CPU (from ``/proc``) per request is paired with the
other side's next to it, so a slow stretch of the machine touches both sides of a pair: the median
of the paired differences resolves a few microseconds where whole ``just bench`` runs, minutes
apart, differ by more. With ``--floor`` each round also runs Granian alone (``bench.floor``, the
same settings, pinned alike) next to both gateways, and each gateway's CPU above the floor is
taken within the round. With ``--nginx`` each round also runs nginx in front of the same simulator
(``runner.start_nginx``), and each gateway's time to first byte (p50 and p99) is taken against
nginx's in the same round, as is, for a streamed scenario, the p99 of its streams' largest gap
between reads. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path

from bench import report
from bench.loadgen import install_uvloop, raise_nofile
from bench.runner import (
    Endpoint,
    Runner,
    Side,
    add_gateway_env,
    pin_loadgen,
    settled_tree,
    start_floor,
    start_gateway,
    start_nginx,
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
    p.add_argument(
        "--floor",
        action="store_true",
        help="each round also runs Granian alone (bench.floor, with --gateway-env) next to both gateways: "
        "each side's CPU above the floor, and the paired difference of it, per round",
    )
    p.add_argument(
        "--nginx",
        action="store_true",
        help="each round also runs nginx (from PATH) in front of the same simulator: each side's time to first "
        "byte (p50, p99) against nginx's in the same round, paired, and its CPU as a multiple of nginx's",
    )
    add_gateway_env(p, "extra setting for both gateways (and the floor)")
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
            gaps = figures["largest_gap_ms"]
            gw.rounds.append(
                {
                    "all": cost["cpu_per_request_us"],
                    "main": cost["main_thread_cpu_per_request_us"],
                    "kernel": cost["kernel_cpu_per_request_us"],
                    "event": cost["cpu_per_chunk_us"],
                    "ttft": figures["ttft_ms"]["p50"],
                    "ttft99": figures["ttft_ms"]["p99"],
                    "gap99": gaps["p99"] if gaps else None,
                }
            )


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median of ``values`` (paired differences):
    the order statistics ``k`` in from each end, with ``k`` the largest for which a binomial(n,
    1/2) count falls below ``k`` with probability at most (1 - level) / 2 (the sign test's
    interval). None when there are too few values for ``level`` (fewer than 6 pairs at 95%). An
    interval that holds 0 says the pairs did not show a difference."""
    n = len(values)
    tail = (1.0 - level) / 2
    k, cumulative = 0, 0.0
    while k < n:
        cumulative += math.comb(n, k) / 2**n  # P(count == k)
        if cumulative > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def _fmt(value: float | int | None, spec: str) -> str:
    """``value`` formatted by ``spec``; "-" for no figure."""
    return "-" if value is None else format(value, spec)


def _median_of(gw: Gateway, key: str) -> float | None:
    """The median of a server's rounds' ``key`` (rounds without the figure left out)."""
    values = [v for r in gw.rounds if (v := r[key]) is not None]
    return statistics.median(values) if values else None


def _medians(gw: Gateway, sc: Scenario) -> str:
    """A server's medians: CPU per request (all threads, the loop's, the kernel's), per event, time
    to first byte."""
    per_event = f", {_fmt(_median_of(gw, 'event'), '.2f')} us/event" if sc.stream else ""
    return (
        f"  {gw.label:<24} median {_fmt(_median_of(gw, 'all'), '7.1f')} us/req (event loop's thread"
        f" {_fmt(_median_of(gw, 'main'), '6.1f')}, kernel {_fmt(_median_of(gw, 'kernel'), '.1f')}){per_event},"
        f" time to first byte {_fmt(_median_of(gw, 'ttft'), '.3f')}"
        f" ms; rounds {[round(r['all'] or 0.0) for r in gw.rounds]}"
    )


def _spread(d: dict[str, float | int | None], digits: int, unit: str) -> str:
    """``over_reference``'s figures as printed: the median, then the mean, range and interval."""
    spec = f"+.{digits}f"
    interval = (
        "too few pairs for a 95% interval"
        if d["low"] is None
        else f"95% interval of the median {_fmt(d['low'], spec)} to {_fmt(d['high'], spec)}"
    )
    return (
        f"{_fmt(d['median'], spec)} {unit} (mean {_fmt(d['mean'], spec)}, from {_fmt(d['min'], spec)}"
        f" to {_fmt(d['max'], spec)}; {interval})"
    )


def summary(base: Gateway, this: Gateway, sc: Scenario, pairs: int) -> str:
    lines = [f"{sc.name}: {pairs} pairs of {sc.round_seconds:g} s rounds, alternating; gateway CPU from /proc"]
    lines += [_medians(gw, sc) for gw in (base, this)]
    figures = [("all", "all threads", "us/req", 1), ("main", "event loop's thread", "us/req", 1)]
    if sc.stream:
        figures.append(("event", "per event", "us/event", 1))
    figures.append(("ttft", "time to first byte (each round's median)", "ms", 3))
    if sc.stream:
        figures.append(("gap99", "each stream's largest gap between reads (each round's p99)", "ms", 3))
    for key, what, unit, digits in figures:
        d = over_reference([r[key] for r in this.rounds], [r[key] for r in base.rounds])
        lines.append(f"  paired difference (this tree - base), {what}: median {_spread(d, digits, unit)}")
    return "\n".join(lines)


ABOVE_FLOOR_KEYS = (
    "rounds",
    "base_above",
    "this_above",
    "base_times_floor",
    "this_times_floor",
    "this_share_of_base",
    "diff_median",
    "diff_mean",
    "diff_min",
    "diff_max",
)


def above_floor(
    base: Sequence[float | None], this: Sequence[float | None], floor: Sequence[float | None]
) -> dict[str, float | int | None]:
    """Each gateway's figure above the floor's in the same round (``base[i] - floor[i]``), paired
    round by round: the medians of each side's share above the floor and of the floor's multiple,
    the paired difference of the shares (this tree - base; the floor cancels out of it, so it is
    the plain paired difference, now next to what it is a part of), and this tree's share as a
    fraction of the base's. Rounds where any of the three has no figure are left out."""
    rows = [(b, t, f) for b, t, f in zip(base, this, floor, strict=True) if None not in (b, t, f)]
    if not rows:
        return dict.fromkeys(ABOVE_FLOOR_KEYS, None)
    base_above = [b - f for b, _, f in rows if b is not None and f is not None]
    this_above = [t - f for _, t, f in rows if t is not None and f is not None]
    diffs = [t - b for b, t in zip(base_above, this_above, strict=True)]
    base_x = [b / f for b, _, f in rows if b is not None and f]
    this_x = [t / f for _, t, f in rows if t is not None and f]
    b_med, t_med = statistics.median(base_above), statistics.median(this_above)
    return {
        "rounds": len(rows),
        "base_above": b_med,
        "this_above": t_med,
        "base_times_floor": statistics.median(base_x) if base_x else None,
        "this_times_floor": statistics.median(this_x) if this_x else None,
        "this_share_of_base": t_med / b_med if b_med > 0 else None,
        "diff_median": statistics.median(diffs),
        "diff_mean": statistics.mean(diffs),
        "diff_min": min(diffs),
        "diff_max": max(diffs),
    }


def floor_summary(base: Gateway, this: Gateway, floor: Gateway, sc: Scenario) -> str:
    """The lines ``--floor`` adds: the floor's own medians, then per figure each side above it."""
    lines = [_medians(floor, sc)]
    figures = [("all", "all threads", "us/req", 1), ("main", "event loop's thread", "us/req", 1)]
    if sc.stream:
        figures.append(("event", "per event", "us/event", 2))
    for key, what, unit, digits in figures:
        a = above_floor([r[key] for r in base.rounds], [r[key] for r in this.rounds], [r[key] for r in floor.rounds])
        d = f"+.{digits}f"
        lines.append(
            f"  above the floor, {what} (each round's, median): base {_fmt(a['base_above'], d)} {unit}"
            f" ({_fmt(a['base_times_floor'], '.2f')}x the floor), this tree {_fmt(a['this_above'], d)} {unit}"
            f" ({_fmt(a['this_times_floor'], '.2f')}x); this tree's share / base's"
            f" {_fmt(a['this_share_of_base'], '.2f')};"
            f" paired difference median {_fmt(a['diff_median'], d)} (mean {_fmt(a['diff_mean'], d)},"
            f" from {_fmt(a['diff_min'], d)} to {_fmt(a['diff_max'], d)})"
        )
    return "\n".join(lines)


def over_reference(side: Sequence[float | None], reference: Sequence[float | None]) -> dict[str, float | int | None]:
    """A side's figure minus the reference's in the same round (this tree's minus the base's, or a
    side's minus nginx's), round by round:
    the median, mean and range of those differences, and the 95% interval of the median
    (``median_interval``; None with fewer than 6 rounds). Rounds where either has no figure are
    left out; none left gives no figures."""
    diffs = [a - r for a, r in zip(side, reference, strict=True) if a is not None and r is not None]
    if not diffs:
        return {"rounds": 0, "median": None, "mean": None, "min": None, "max": None, "low": None, "high": None}
    interval = median_interval(diffs)
    return {
        "rounds": len(diffs),
        "median": statistics.median(diffs),
        "mean": statistics.mean(diffs),
        "min": min(diffs),
        "max": max(diffs),
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
    }


def nginx_summary(base: Gateway, this: Gateway, nginx: Gateway, sc: Scenario) -> str:
    """The lines ``--nginx`` adds: nginx's own medians, then each side's time to first byte over
    nginx's in the same round (the issue's "added TTFT no more than nginx's + 0.5 ms" is this
    difference: the backend's share cancels out), for a streamed scenario the p99 of its streams'
    largest gap between reads over nginx's (the 1,000-stream goal's figure), and its CPU as a
    multiple of nginx's."""
    lines = [
        f"  {nginx.label:<24} median {_fmt(_median_of(nginx, 'all'), '7.1f')} us/req"
        f" (kernel {_fmt(_median_of(nginx, 'kernel'), '.1f')}), time to first byte p50"
        f" {_fmt(_median_of(nginx, 'ttft'), '.3f')} ms, p99 {_fmt(_median_of(nginx, 'ttft99'), '.3f')} ms;"
        f" rounds {[round(r['all'] or 0.0) for r in nginx.rounds]}"
    ]
    sides = ((base, "base"), (this, "this tree"))
    figures = [("ttft", "time to first byte p50"), ("ttft99", "time to first byte p99")]
    if sc.stream:  # the 1,000-stream goal: this p99 within nginx's + 2 ms
        figures.append(("gap99", "each stream's largest gap p99"))
    for key, what in figures:
        reference = [r[key] for r in nginx.rounds]
        parts = [
            f"{name} {_spread(over_reference([r[key] for r in gw.rounds], reference), 3, 'ms')}" for gw, name in sides
        ]
        lines.append(f"  over nginx in the same round, {what} (median): " + "; ".join(parts))
    ratios = []
    for gw, name in sides:
        pairs = zip((r["all"] for r in gw.rounds), (r["all"] for r in nginx.rounds), strict=True)
        x = [a / n for a, n in pairs if a and n]
        ratios.append(f"{name} {_fmt(statistics.median(x) if x else None, '.2f')}x")
    lines.append("  CPU per request as a multiple of nginx's in the same round (median): " + ", ".join(ratios))
    return "\n".join(lines)


def _runner(name: str, port: int, proc: subprocess.Popen[bytes]) -> Runner:
    """The load runner for one server of the pairing (a gateway, or the floor) on ``port``."""
    endpoint = Endpoint(name, "127.0.0.1", port, "/v1", None)
    tree = settled_tree(proc)
    return Runner(endpoint, endpoint, model="sim-model", gateway_tree=tree, backend_tree=None, progress=lambda _: None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pairs < 1 or args.seconds <= 0:
        raise SystemExit("bench.ab: --pairs must be at least 1 and --seconds positive")
    if args.nginx and not shutil.which("nginx"):
        raise SystemExit("bench.ab: --nginx needs nginx on PATH (e.g. apt-get install nginx)")
    raise_nofile()  # stream-paced-1000 holds a thousand connections to each side
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
                gateways.append(Gateway(label, _runner(name, port, proc)))
            if args.floor:
                proc, port = stack.enter_context(start_floor(gateway_cpu, work / "floor.log", dict(args.gateway_env)))
                gateways.append(Gateway("floor (Granian alone)", _runner("floor", port, proc)))
            if args.nginx:
                proc, port = stack.enter_context(start_nginx(gateway_cpu, work / "nginx.log", "127.0.0.1", sim_port))
                gateways.append(Gateway("nginx", _runner("nginx", port, proc)))
            asyncio.run(measure(gateways, sc, args.pairs))
    except BaseException:
        print(f"bench.ab: logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    print(summary(gateways[0], gateways[1], sc, args.pairs))
    if args.floor:
        print(floor_summary(gateways[0], gateways[1], gateways[2], sc))
    if args.nginx:
        print(nginx_summary(gateways[0], gateways[1], gateways[-1], sc))
    failed = sum(gw.errors for gw in gateways)
    if failed:
        print(f"bench.ab: {failed} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
