"""Metrics: the figures added up per request and what a flush writes to prometheus-client."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway import metrics
from gateway.exchange import Exchange
from gateway.metrics import LATENCY_BUCKETS, Metrics
from gateway.usage import Usage, read_usage
from tests.promtext import metric

AMOUNT = st.one_of(
    st.sampled_from([0.0, *LATENCY_BUCKETS, 1e9]),  # exactly on a bound falls in that bound's bucket
    st.floats(min_value=-1.0, max_value=1e4, allow_nan=False),
)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("observe"), st.sampled_from(["a", "b"]), AMOUNT),
            st.tuples(st.just("inc"), st.sampled_from(["a", "b"]), st.integers(0, 5).map(float)),
            st.tuples(st.just("gauge"), st.sampled_from(["a", "b"]), st.sampled_from([1.0, -1.0])),
            st.tuples(st.just("flush"), st.just(""), st.just(0.0)),
        ),
        max_size=60,
    )
)
def test_added_up_figures_flush_to_what_direct_updates_give(steps: list[tuple[str, str, float]]) -> None:
    """The accumulators write to prometheus-client exactly what calling it directly writes."""

    def families(registry: CollectorRegistry) -> tuple[Histogram, Counter, Gauge]:
        return (
            Histogram("h_seconds", "h", ["l"], buckets=LATENCY_BUCKETS, registry=registry),
            Counter("c", "c", ["l"], registry=registry),
            Gauge("g", "g", ["l"], registry=registry),
        )

    direct_reg, summed_reg = CollectorRegistry(), CollectorRegistry()
    h, c, g = families(direct_reg)
    sh, sc, sg = families(summed_reg)
    acc: dict[tuple[str, str], metrics._Count | metrics._Observe] = {}

    def child(kind: str, family: Histogram | Counter | Gauge, label: str) -> metrics._Count | metrics._Observe:
        key = (kind, label)
        if key not in acc:
            metric = family.labels(label)
            acc[key] = metrics._Observe(metric) if kind == "observe" else metrics._Count(metric)
        return acc[key]

    for kind, label, amount in steps:
        if kind == "observe":
            h.labels(label).observe(amount)
            child(kind, sh, label).observe(amount)  # type: ignore[union-attr]
        elif kind == "inc":
            c.labels(label).inc(amount)
            child(kind, sc, label).inc(amount)  # type: ignore[union-attr]
        elif kind == "gauge":
            g.labels(label).inc(amount)
            child(kind, sg, label).inc(amount)  # type: ignore[union-attr]
        else:
            for each in acc.values():
                each.flush()
    for each in acc.values():
        each.flush()
    got, want = _series(summed_reg), _series(direct_reg)
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, a), (_, b) in zip(got, want, strict=True):
        # a _sum is added up in another order: equal to within float rounding; all else exactly
        assert a == b or ("_sum" in name and abs(a - b) <= 1e-9 * max(1.0, abs(b))), (name, a, b)


def _series(registry: CollectorRegistry) -> list[tuple[str, float]]:
    out = []
    for line in generate_latest(registry).decode().splitlines():
        if not line.startswith("#") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out.append((name, float(value)))
    return out


def test_a_scrape_shows_this_workers_requests_at_once_and_the_timer_flushes() -> None:
    async def run() -> tuple[str, str, str]:
        m = Metrics("vllm")
        ex = Exchange(1.0)
        ex.status, ex.started, ex.t_upstream, ex.t_first, ex.t_end = 200, True, 1.001, 1.01, 1.02
        m.record(ex, "chat", "m", read_usage(ex))
        untouched = generate_latest(m.registry).decode()  # nothing written yet: added up only
        scraped = m.exposition()[0].decode()  # the scrape flushes first
        m.start(asyncio.get_running_loop())
        m.record(ex, "chat", "m", read_usage(ex))
        timed = await _registry_when(m, 2)  # the timer's flush (no scrape in between)
        m.stop()
        return untouched, scraped, timed

    untouched, scraped, timed = asyncio.run(run())
    assert metric(untouched, "gateway_requests_total", route="chat", status="200") == 0
    assert metric(scraped, "gateway_requests_total", route="chat", status="200") == 1
    assert metric(scraped, "gateway_request_duration_seconds_bucket", route="chat", le="0.025") == 1
    assert metric(scraped, "gateway_request_duration_seconds_bucket", route="chat", le="0.01") == 0
    assert metric(timed, "gateway_requests_total", route="chat", status="200") == 2


def test_a_value_prometheus_refuses_does_not_stop_the_flushes() -> None:
    async def run() -> str:
        m = Metrics("vllm")
        m.start(asyncio.get_running_loop())
        m.child(m.tokens, "vllm", "m", "input").inc(-1)  # a counter refuses to go down
        ex = Exchange(1.0)
        ex.status, ex.started, ex.t_end = 200, True, 1.01
        m.record(ex, "chat", "m", read_usage(ex))
        await _registry_when(m, 1)  # the first tick wrote the request despite the refused value
        m.record(ex, "chat", "m", read_usage(ex))
        text = await _registry_when(m, 2)  # and a later tick came: the timer kept going
        m.stop()
        return text

    text = asyncio.run(run())
    assert metric(text, "gateway_requests_total", route="chat", status="200") == 2


async def _registry_when(m: Metrics, requests: int) -> str:
    """The registry's text once it counts ``requests`` chat requests (the timer flushed), or
    after a few flush intervals."""
    deadline = asyncio.get_running_loop().time() + metrics.FLUSH_INTERVAL * 5
    while True:
        text = generate_latest(m.registry).decode()
        if metric(text, "gateway_requests_total", route="chat", status="200") == requests:
            return text
        if asyncio.get_running_loop().time() > deadline:
            return text
        await asyncio.sleep(0.05)


def test_tokens_come_from_the_usage_given() -> None:
    """``record`` counts the usage it is handed (read once per request, see ``read_usage``):
    reported usage as input and output, an estimate apart, and none on routes without tokens."""
    m = Metrics("vllm")
    ex = Exchange(1.0)
    ex.status, ex.started, ex.t_end = 200, True, 1.01
    m.record(ex, "chat", "m", Usage(7, 3))
    m.record(ex, "completions", "m", Usage(0, 5, estimated=True))
    m.record(ex, "models", "m", Usage(100, 100))
    m.record(ex, "chat", "m", None)
    text = m.exposition()[0].decode()
    assert metric(text, "gateway_tokens_total", model="m", type="input") == 7
    assert metric(text, "gateway_tokens_total", model="m", type="output") == 3
    assert metric(text, "gateway_tokens_estimated_total", model="m", type="output") == 5
    assert metric(text, "gateway_requests_total", route="chat", status="200") == 2
