"""The routing benchmark's figures (from what one run measured), its goals, table and plot."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import report, scrape

if TYPE_CHECKING:
    from bench.routing import Load, Plan

Scrapes = tuple[list[str | None], str | None]  # the replicas' /metrics texts, the gateway's

fmt = report.fmt


def _sum(values: list[float | None]) -> float | None:
    """The sum, or ``None`` when any value is missing (a counter some replica lacks)."""
    return None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)


def _ratio(a: float | None, b: float | None, digits: int = 4) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def _replica_deltas(before: list[str | None], after: list[str | None], names: tuple[str, ...]) -> list[float | None]:
    out = []
    for b, a in zip(before, after, strict=True):
        was, now = scrape.first(scrape.series(b or ""), names), scrape.first(scrape.series(a or ""), names)
        out.append(scrape.delta(was, now))
    return out


def decisions(before: str | None, after: str | None) -> dict[str, int] | None:
    """The gateway's balancing decisions during the run, by reason; ``None`` when it counts none."""
    a = scrape.by_label(after or "", scrape.DECISIONS, "reason")
    if a is None:
        return None
    b = scrape.by_label(before or "", scrape.DECISIONS, "reason") or {}
    return {reason: int(n - b.get(reason, 0.0)) for reason, n in sorted(a.items())}


def figures(load: Load, before: Scrapes, after: Scrapes, gateway_cpu: float, ports: list[int]) -> dict[str, Any]:
    """One run's figures; ``ttft_values_ms`` holds every value (the caller pops it)."""
    ok = [(t, s) for t, s in zip(load.scheduled, load.samples, strict=True) if s.ok]
    failed = [s for s in load.samples if not s.ok]
    ttft_ms = [(s.first_byte - t) * 1000 for t, s in ok if s.first_byte is not None]
    wall = load.wall or 1e-9
    sent = _replica_deltas(before[0], after[0], scrape.REQUESTS)
    hits = _replica_deltas(before[0], after[0], scrape.PREFIX_HITS)
    queries = _replica_deltas(before[0], after[0], scrape.PREFIX_QUERIES)
    tokens = _sum(_replica_deltas(before[0], after[0], scrape.GENERATED))
    total_sent = _sum(sent)
    replicas = [
        {
            "port": port,
            "requests": None if n is None else int(n),
            "share": _ratio(n, total_sent),
            "waiting_peak": load.waiting_peak[i] if load.waiting_peak else None,
            "running_peak": load.running_peak[i] if load.running_peak else None,
            "prefix_cache_hit_rate": _ratio(hits[i], queries[i]),
        }
        for i, (port, n) in enumerate(zip(ports, sent, strict=True))
    ]
    n = len(load.samples)
    return {
        "requests": n,
        "errors": len(failed),
        "error_examples": sorted({s.error or f"status {s.status}" for s in failed})[:3],
        "ttft_ms": report.dist([v / 1000 for v in ttft_ms]),
        "throughput_rps": round(len(ok) / wall, 3),
        "output_tokens_per_s": None if tokens is None else round(tokens / wall, 1),
        "prefix_cache_hits": _sum(hits),
        "prefix_cache_queries": _sum(queries),
        "prefix_cache_hit_rate": _ratio(_sum(hits), _sum(queries)),
        "replicas": replicas,
        "gateway_cpu_s": round(gateway_cpu, 3),
        "gateway_cpu_per_request_us": round(gateway_cpu / max(1, n) * 1e6, 1),
        "decisions": decisions(before[1], after[1]),
        "wall_s": round(load.wall, 3),
        "ttft_values_ms": ttft_ms,
    }


def _max(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _pooled_replicas(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each replica's requests over the runs, its share and its queues' peaks."""
    count = len(runs[0]["replicas"])
    sent = [_sum([r["replicas"][i]["requests"] for r in runs]) for i in range(count)]
    total = _sum(sent)
    return [
        {
            "requests": None if sent[i] is None else int(sent[i] or 0),
            "share": _ratio(sent[i], total),
            "waiting_peak": _max([r["replicas"][i]["waiting_peak"] for r in runs]),
            "running_peak": _max([r["replicas"][i]["running_peak"] for r in runs]),
        }
        for i in range(count)
    ]


def _pooled_decisions(runs: list[dict[str, Any]]) -> dict[str, int] | None:
    if any(r["decisions"] is None for r in runs):
        return None
    out: dict[str, int] = {}
    for r in runs:
        for reason, n in r["decisions"].items():
            out[reason] = out.get(reason, 0) + n
    return out


def _pooled(runs: list[dict[str, Any]], ttft_ms: list[float]) -> dict[str, Any]:
    """One policy's figures for one workload over its rounds."""
    requests = sum(r["requests"] for r in runs)
    tokens = [r["output_tokens_per_s"] for r in runs]
    return {
        "runs": len(runs),
        "requests": requests,
        "errors": sum(r["errors"] for r in runs),
        "ttft_ms": report.dist([v / 1000 for v in ttft_ms]),
        "throughput_rps": round(sum(r["throughput_rps"] for r in runs) / len(runs), 3),
        "output_tokens_per_s": None if None in tokens else round(sum(t or 0.0 for t in tokens) / len(runs), 1),
        "prefix_cache_hit_rate": _ratio(
            _sum([r["prefix_cache_hits"] for r in runs]), _sum([r["prefix_cache_queries"] for r in runs])
        ),
        "replicas": _pooled_replicas(runs),
        "gateway_cpu_per_request_us": round(sum(r["gateway_cpu_s"] for r in runs) / max(1, requests) * 1e6, 1),
        "decisions": _pooled_decisions(runs),
    }


def summarise(
    runs: list[dict[str, Any]],
    ttfts: dict[tuple[str, str], list[float]],
    policies: tuple[str, ...],
    workloads: tuple[str, ...],
) -> dict[str, dict[str, Any]]:
    """``summary[workload][policy]``: the rounds pooled (time to first token over every request)."""
    out: dict[str, dict[str, Any]] = {}
    for w in workloads:
        out[w] = {}
        for p in policies:
            rs = [r for r in runs if r["policy"] == p and r["workload"] == w]
            if rs:
                out[w][p] = _pooled(rs, ttfts.get((p, w), []))
    return out


def _goal(value: float | None, target: str, met: bool | None) -> dict[str, Any]:
    return {"value": value, "target": target, "met": met}


def _at_most(a: float | None, b: float | None, factor: float) -> bool | None:
    return None if a is None or b is None else a <= factor * b


def _shared_goals(s: dict[str, Any], sweeps: dict[str, Any]) -> dict[str, Any]:
    base, new = s["p2c"], s["prefix"]
    hb, hn = base["prefix_cache_hit_rate"], new["prefix_cache_hit_rate"]
    hit_ratio = None if hb is None or hn is None else (float("inf") if hb == 0 < hn else _ratio(hn, hb, 3))
    p90b, p90n = base["ttft_ms"]["p90"], new["ttft_ms"]["p90"]
    kb, kn = sweeps.get("p2c", {}).get("knee_rps"), sweeps.get("prefix", {}).get("knee_rps")
    return {
        "hit_rate_ratio": _goal(hit_ratio, ">= 2 (prefix / p2c)", None if hit_ratio is None else hit_ratio >= 2),
        "ttft_p90_ratio": _goal(_ratio(p90n, p90b, 3), "<= 0.5 (prefix / p2c)", _at_most(p90n, p90b, 0.5)),
        "knee_rps": _goal(kn, f">= p2c's knee ({kb})", None if kn is None or kb is None else kn >= kb),
    }


def _control_goals(s: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for p in ("p50", "p90"):
        a, b = s["prefix"]["ttft_ms"][p], s["p2c"]["ttft_ms"][p]
        out[f"ttft_{p}_ratio"] = _goal(_ratio(a, b, 3), "<= 1.1 (prefix / p2c)", _at_most(a, b, 1.1))
    return out


def hot_spot(fig: dict[str, Any]) -> dict[str, Any]:
    """The largest replica share over the mean, and whether that replica was over 1.5x the mean
    while another replica's waiting queue stayed empty (the skewed workload's guard)."""
    reps = fig["replicas"]
    shares = [r["share"] for r in reps]
    if any(s is None for s in shares) or not shares:
        return _goal(None, "<= 1.5x the mean, unless every other replica queued", None)
    mean = 1 / len(shares)
    top = max(range(len(shares)), key=lambda i: shares[i] or 0.0)
    over = (shares[top] or 0.0) / mean
    others = [r["waiting_peak"] for i, r in enumerate(reps) if i != top]
    idle_other = None if any(w is None for w in others) else any(w == 0 for w in others)
    met = True if over <= 1.5 else (None if idle_other is None else not idle_other)
    return _goal(round(over, 3), "<= 1.5x the mean, unless every other replica queued", met)


def goals(summary: dict[str, dict[str, Any]], sweeps: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, checked on what was measured (``met`` is ``None`` where a figure is
    missing, e.g. hit rates without the engine model)."""
    out: dict[str, Any] = {}
    both = {w: s for w, s in summary.items() if "p2c" in s and "prefix" in s}
    if "shared" in both:
        out["shared"] = _shared_goals(both["shared"], sweeps)
    if "control" in both:
        out["control"] = _control_goals(both["control"])
    if "skewed" in summary:
        out["skewed"] = {f"max_share_over_mean_{p}": hot_spot(fig) for p, fig in summary["skewed"].items()}
    return out


def environment(
    args: argparse.Namespace,
    plan: Plan,
    cpus: tuple[int | None, int | None],
    loop: str,
    *,
    engine: bool,
    balance: bool,
) -> dict[str, Any]:
    """``bench``'s environment, with the plan and what this tree's simulator and gateway can do."""
    plan_doc = dataclasses.asdict(plan)
    env = report.environment({"routing": plan_doc, "gateway_env": dict(args.gateway_env)}, cpus, loop)
    env["sim_engine_model"] = engine
    env["gateway_knows_balance"] = balance
    return env


def _shares(fig: dict[str, Any]) -> str:
    return "/".join("-" if r["share"] is None else f"{r['share'] * 100:.0f}" for r in fig["replicas"])


def _peaks(fig: dict[str, Any]) -> str:
    return "/".join("-" if r["waiting_peak"] is None else f"{r['waiting_peak']:.0f}" for r in fig["replicas"])


def _decisions(fig: dict[str, Any]) -> str:
    d = fig["decisions"]
    return "n/a" if d is None else " ".join(f"{k}:{v}" for k, v in d.items()) or "none"


def _goal_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for workload, checks in doc["goals"].items():
        for name, g in checks.items():
            met = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
            lines.append(f"  {workload:<8} {name:<28} {fmt(g['value'], 3):>8}  target {g['target']}: {met}")
    return lines


def _sweeps(knee: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, sweep) for every sweep that ran."""
    out = [(f"{policy} shared", sweep) for policy, sweep in knee["sweeps"].items()]
    if knee["control_sweep"] is not None:
        out.append((f"{knee['reference_policy']} control", knee["control_sweep"]))
    return out


def table(doc: dict[str, Any]) -> str:
    """The summary per workload and policy, the sweep and the goals."""
    head = (
        f"{'workload':<8} {'policy':<7} {'n':>5} {'err':>4} {'ttft p50/p90/p99 ms':>26} {'req/s':>7} "
        f"{'tok/s':>8} {'hit':>6} {'share % per replica':>20} {'waiting peak':>13} {'cpu/req us':>10}  decisions"
    )
    lines = [head, "-" * len(head)]
    for workload, per_policy in doc["summary"].items():
        for policy, f in per_policy.items():
            t = f["ttft_ms"]
            lines.append(
                f"{workload:<8} {policy:<7} {f['requests']:>5} {f['errors']:>4} "
                f"{fmt(t['p50'], 1) + '/' + fmt(t['p90'], 1) + '/' + fmt(t['p99'], 1):>26} "
                f"{fmt(f['throughput_rps'], 1):>7} {fmt(f['output_tokens_per_s'], 0):>8} "
                f"{fmt(f['prefix_cache_hit_rate'], 3):>6} {_shares(f):>20} {_peaks(f):>13} "
                f"{fmt(f['gateway_cpu_per_request_us'], 0):>10}  {_decisions(f)}"
            )
    knee = doc["knee"]
    rates = ", ".join(f"{w} {r:g}/s ({doc['rate_source'][w]})" for w, r in doc["rates_rps"].items())
    lines.append(
        f"\nrates: {rates}; unloaded ttft p50 {fmt(knee['unloaded_ttft_p50_ms'], 1)} ms "
        f"({knee['reference_policy']}), threshold {fmt(knee['threshold_ms'], 1)} ms"
    )
    for label, sweep in _sweeps(knee):
        steps = ", ".join(f"{s['rate_rps']:g}/s: {fmt(s['ttft_ms']['p90'], 1)}" for s in sweep["steps"])
        lines.append(f"  {label:<15} knee {fmt(sweep['knee_rps'])}/s; ttft p90 ms by rate: {steps}")
    lines.append("goals:")
    lines.extend(_goal_lines(doc))
    env = doc["environment"]
    if not env["gateway_knows_balance"]:
        lines.append("note: this gateway does not read GATEWAY_BALANCE: every policy ran as its default (p2c)")
    if not env["sim_engine_model"]:
        lines.append("note: this simulator has no engine model (--engine): no prefix cache, so no hit rates")
    return "\n".join(lines)


def plot(doc: dict[str, Any], ttfts: dict[tuple[str, str], list[float]], path: Path) -> None:
    """Time to first token's distribution per workload (one line per policy), and the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(doc["summary"])
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(5 * (len(workloads) + 1), 3.8), squeeze=False)
    for ax, w in zip(axes.flat, workloads, strict=False):
        for policy in doc["summary"][w]:
            vals = sorted(ttfts.get((policy, w), []))
            if vals:
                ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", label=policy)
        ax.set_title(f"{w} at {doc['rates_rps'][w]:g} req/s", fontsize=10)
        ax.set_xlabel("time to first token (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[len(workloads)]
    for label, sweep in _sweeps(doc["knee"]):
        pts = [(s["rate_rps"], s["ttft_ms"]["p90"]) for s in sweep["steps"] if s["ttft_ms"]["p90"] is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    if doc["knee"]["threshold_ms"] is not None:
        ax.axhline(doc["knee"]["threshold_ms"], color="grey", linestyle="--", label="2x unloaded")
    ax.set_title("rate sweeps", fontsize=10)
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("ttft p90 (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
