"""Figures from samples, the terminal table, the JSON file and the PNG plot."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.loadgen import Sample
from bench.procstat import cpu_model
from bench.runner import Side
from bench.scenarios import Scenario

SATURATED = 0.9  # of one CPU


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def dist(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds."""
    return {f"p{p}": (None if (v := pct(values, p)) is None else round(v * 1000, 4)) for p in (50, 90, 99)}


def largest_gaps(samples: list[Sample]) -> dict[str, float | None]:
    """Over the streams, each one's largest gap between two body reads (its worst stall between
    tokens): p50, p99 and the maximum, in milliseconds; streams with fewer than two reads have
    no gap and are left out."""
    worst = [g for s in samples if (g := s.largest_gap()) is not None]
    out: dict[str, float | None] = {
        f"p{p}": (None if (v := pct(worst, p)) is None else round(v * 1000, 4)) for p in (50, 99)
    }
    out["max"] = round(max(worst) * 1000, 4) if worst else None
    return out


def side_figures(side: Side, sc: Scenario) -> dict[str, Any]:
    ok: list[Sample] = []
    failed: list[Sample] = []
    for s in side.samples:
        (ok if s.ok or (s.aborted and s.error is None) else failed).append(s)
    errors = len(failed)
    ttft = [t for s in ok if (t := s.ttft) is not None]
    lat = [t for s in ok if (t := s.latency) is not None and not s.aborted]
    gaps = [g for s in ok for g in s.gaps()]
    events = sum(s.events for s in ok)
    wall = side.wall or 1e-9
    out: dict[str, Any] = {
        "requests": len(side.samples),
        "errors": errors,
        "error_examples": sorted({s.error or f"status {s.status}" for s in failed})[:3],
        "ttft_ms": dist(ttft),
        "gap_ms": dist(gaps),
        "latency_ms": dist(lat),
        "largest_gap_ms": largest_gaps(ok) if sc.stream else None,
        "throughput_rps": round(len(ok) / wall, 2),
        "events": events,
        "events_per_s": round(events / wall, 1),
        "wall_s": round(side.wall, 3),
        "cpu_utilisation": {
            "loadgen": round(side.loadgen_cpu / wall, 3),
            "backend": round(side.backend_cpu / wall, 3),
            "gateway": round(side.gateway_cpu / wall, 3),
        },
    }
    if sc.abort_after is not None:
        out["aborted_sent"] = side.aborted_sent
        out["aborted_seen_within_1s"] = side.aborted_seen
        out["abort_share"] = (
            None
            if side.aborted_seen is None or not side.aborted_sent
            else round(side.aborted_seen / side.aborted_sent, 3)
        )
    return out


def added(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ttft_ms", "gap_ms", "latency_ms"):
        out[key] = {p: _minus(gateway[key][p], direct[key][p], 4) for p in direct[key]}
    out["throughput_rps"] = round(gateway["throughput_rps"] - direct["throughput_rps"], 2)
    return out


def gateway_cost(side: Side, figures: dict[str, Any], sc: Scenario) -> dict[str, Any]:
    n = max(1, len(side.samples))
    events = max(1, figures["events"])
    return {
        "cpu_s": round(side.gateway_cpu, 4),
        "cpu_per_request_us": round(side.gateway_cpu / n * 1e6, 2),
        "cpu_per_chunk_us": round(side.gateway_cpu / events * 1e6, 3) if sc.stream else None,
        # Of that, the main threads': in a Granian worker, the event loop running the app. The
        # rest is Granian's runtime threads (nginx has only main threads).
        "main_thread_cpu_per_request_us": round(side.gateway_main_cpu / n * 1e6, 2),
        "main_thread_cpu_per_chunk_us": round(side.gateway_main_cpu / events * 1e6, 3) if sc.stream else None,
        # Of the whole, the kernel's (system time, in 10 ms ticks): with paced streams, the
        # upstream hop's reads and wake-ups are most of what a proxy costs above its server.
        "kernel_cpu_per_request_us": round(side.gateway_kernel_cpu / n * 1e6, 2),
        "kernel_cpu_per_chunk_us": round(side.gateway_kernel_cpu / events * 1e6, 3) if sc.stream else None,
        "rss_mib": round(side.gateway_rss / 2**20, 1),
    }


def _minus(a: float | None, b: float | None, digits: int) -> float | None:
    return None if a is None or b is None else round(a - b, digits)


def above(gateway: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """The gateway's CPU above the floor's (Granian alone) for the same load, in all, and split
    between the event loop's thread (the app's Python, the upstream socket) and Granian's others."""
    out = {
        key: _minus(gateway[key], floor[key], digits)
        for key, digits in (
            ("cpu_per_request_us", 2),
            ("cpu_per_chunk_us", 3),
            ("main_thread_cpu_per_request_us", 2),
            ("main_thread_cpu_per_chunk_us", 3),
            ("kernel_cpu_per_request_us", 2),
            ("kernel_cpu_per_chunk_us", 3),
        )
    }
    for unit, digits in (("request", 2), ("chunk", 3)):
        whole, main = out[f"cpu_per_{unit}_us"], out[f"main_thread_cpu_per_{unit}_us"]
        out[f"other_threads_cpu_per_{unit}_us"] = _minus(whole, main, digits)
    return out


def times(gateway: dict[str, Any], nginx: dict[str, Any]) -> dict[str, float | None]:
    """The gateway's CPU as a multiple of nginx's for the same load; None where either side's CPU
    came to no 10 ms tick at all (a short run): no figure rather than 0x or a division by zero."""

    def ratio(key: str) -> float | None:
        g, n = gateway[key], nginx[key]
        return None if not g or not n else round(g / n, 2)

    return {"cpu_per_request": ratio("cpu_per_request_us"), "cpu_per_chunk": ratio("cpu_per_chunk_us")}


def against_floor(result: dict[str, Any]) -> dict[str, Any]:
    """The floor stands in for the backend, so nothing is added to compare: the CPU above it."""
    return {"above_floor": above(result["gateway_cost"], result["floor_cost"])}


def against_nginx(result: dict[str, Any]) -> dict[str, Any]:
    """nginx stands where the gateway does, in front of the same backend: what it adds, and the
    gateway's CPU as a multiple of its."""
    out: dict[str, Any] = {
        "nginx_added": added(result["direct"], result["nginx"]),
        "times_nginx": times(result["gateway_cost"], result["nginx_cost"]),
    }
    g, n = result["gateway"].get("largest_gap_ms"), result["nginx"].get("largest_gap_ms")
    if g is not None and n is not None:
        # The 1,000-stream goal: the gateway's p99 of each stream's largest gap within nginx's + 2 ms.
        out["largest_gap_p99_above_nginx_ms"] = _minus(g["p99"], n["p99"], 4)
    return out


def limits(direct: dict[str, Any], gateway: dict[str, Any]) -> list[str]:
    """Which process was saturated in which phase (>= 90% of a CPU)."""
    out = []
    for label, fig in (("direct", direct), ("gateway", gateway)):
        if fig["wall_s"] < 0.5:
            continue  # CPU is read in 10 ms ticks: too coarse to judge a shorter phase
        for proc, used in fig["cpu_utilisation"].items():
            if used >= SATURATED:
                out.append(f"{proc} saturated during the {label} rounds ({used:.0%} of a CPU)")
    return out


def environment(args: dict[str, Any], pinned: tuple[int | None, int | None], loop: str) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv],  # noqa: S607
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=5,
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        if rev and git("status", "--porcelain", "--untracked-files=no"):
            rev += "+dirty"
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "pinning": {"gateway_cpu": pinned[0], "backend_and_loadgen_cpu": pinned[1]},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadgen_loop": loop,
        "packages": {
            p: version(p) for p in ("gateway", "granian", "httpcore", "h11", "msgspec", "uvloop", "orjson", "anyio")
        },
        "git_revision": rev or None,
        "args": args,
    }


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<17} {'target':<8} {'n':>5} {'err':>4} "
        f"{'ttft p50/p90/p99 ms':>24} {'gap p50/p99 ms':>16} {'lat p50/p99 ms':>18} "
        f"{'req/s':>8} {'cpu/req us':>10} {'cpu/chunk us':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        labels = ("direct", "gateway", "added", *(k for k in ("floor", "nginx") if k in r))
        for label in labels:
            f = r[label]
            if label == "added":
                n = err = ""
                rps = fmt(f["throughput_rps"], 1)
            else:
                n, err, rps = str(f["requests"]), str(f["errors"]), fmt(f["throughput_rps"], 1)
            t, g, lat = f["ttft_ms"], f["gap_ms"], f["latency_ms"]
            cost = r.get(f"{label}_cost")
            lines.append(
                f"{r['scenario'] if label == 'direct' else '':<17} {label:<8} {n:>5} {err:>4} "
                f"{fmt(t['p50']) + '/' + fmt(t['p90']) + '/' + fmt(t['p99']):>24} "
                f"{fmt(g['p50']) + '/' + fmt(g['p99']):>16} {fmt(lat['p50']) + '/' + fmt(lat['p99']):>18} {rps:>8} "
                f"{fmt(cost['cpu_per_request_us'], 1) if cost else '':>10} "
                f"{fmt(cost['cpu_per_chunk_us'], 2) if cost and cost['cpu_per_chunk_us'] is not None else '':>12}"
            )
        if r["params"].get("spread_seconds"):
            parts = [
                f"{label} {fmt(w['p50'])}/{fmt(w['p99'])}/{fmt(w['max'])}"
                for label in ("direct", "gateway", "floor", "nginx")
                if label in r and (w := r[label].get("largest_gap_ms")) is not None
            ]
            lines.append(f"{'':<17} each stream's largest gap p50/p99/max ms: " + ", ".join(parts))
            if "largest_gap_p99_above_nginx_ms" in r:
                lines.append(
                    f"{'':<17}   gateway's p99 of it minus nginx's: {fmt(r['largest_gap_p99_above_nginx_ms'])} ms"
                )
        if "abort_share" in r["gateway"]:
            lines.append(
                f"{'':<17} aborts seen by the backend within 1 s: direct {fmt(r['direct']['abort_share'], 3)}, "
                f"gateway {fmt(r['gateway']['abort_share'], 3)}"
            )
        kernel = []
        for label in ("gateway", "floor", "nginx"):
            cost = r.get(f"{label}_cost")
            if cost:
                per_chunk = cost["kernel_cpu_per_chunk_us"]
                kernel.append(
                    f"{label} {fmt(cost['kernel_cpu_per_request_us'], 1)} us/req"
                    + ("" if per_chunk is None else f", {fmt(per_chunk, 2)} us/chunk")
                )
        if kernel:
            lines.append(f"{'':<17} of the CPU, in the kernel (system time): " + "; ".join(kernel))
        if "above_floor" in r:
            a = r["above_floor"]
            chunk = a["cpu_per_chunk_us"] is not None
            lines.append(
                f"{'':<17} gateway above the floor: {fmt(a['cpu_per_request_us'], 1)} us/req"
                + (f", {fmt(a['cpu_per_chunk_us'], 2)} us/chunk" if chunk else "")
            )
            lines.append(
                f"{'':<17}   in the event loop's thread {fmt(a['main_thread_cpu_per_request_us'], 1)} us/req"
                + (f", {fmt(a['main_thread_cpu_per_chunk_us'], 2)} us/chunk" if chunk else "")
                + f"; in Granian's other threads {fmt(a['other_threads_cpu_per_request_us'], 1)} us/req"
                + (f", {fmt(a['other_threads_cpu_per_chunk_us'], 2)} us/chunk" if chunk else "")
            )
            lines.append(
                f"{'':<17}   in the kernel {fmt(a['kernel_cpu_per_request_us'], 1)} us/req"
                + (f", {fmt(a['kernel_cpu_per_chunk_us'], 2)} us/chunk" if chunk else "")
            )
        if "times_nginx" in r:
            x = r["times_nginx"]
            lines.append(
                f"{'':<17} gateway CPU / nginx CPU: {fmt(x['cpu_per_request'])}x per request"
                + (f", {fmt(x['cpu_per_chunk'])}x per chunk" if x["cpu_per_chunk"] is not None else "")
                + f"; nginx's added ttft p50 {fmt(r['nginx_added']['ttft_ms']['p50'])} ms"
            )
        for note in r["limits"]:
            lines.append(f"{'':<17} note: {note}")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], samples: dict[str, dict[str, list[Sample]]], path: Path) -> None:
    """One panel per scenario, one line per target (direct, gateway, and the floor and nginx when
    they ran): the distribution of TTFT (streams), latency (non-streamed), or each stream's
    largest gap between tokens (the spread scenario, whose figure is stalls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"direct": "tab:blue", "gateway": "tab:orange", "floor": "tab:green", "nginx": "tab:red"}
    n = len(results)
    cols = 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results, strict=False):
        stream = r["params"]["stream"]
        stalls = bool(r["params"].get("spread_seconds"))
        for label, ss in samples[r["scenario"]].items():
            if stalls:
                times = (s.largest_gap() for s in ss if s.error is None)
            else:
                times = (s.ttft if stream else s.latency for s in ss if s.error is None)
            vals = sorted(t * 1000 for t in times if t is not None)
            if vals:
                ys = [(i + 1) / len(vals) for i in range(len(vals))]
                ax.step(vals, ys, where="post", label=label, color=colors.get(label))
        ax.set_title(r["scenario"], fontsize=10)
        what = "each stream's largest gap" if stalls else "time to first byte" if stream else "latency"
        ax.set_xlabel(what + " (ms)")
        ax.set_ylabel("fraction of " + ("streams" if stalls else "requests"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
