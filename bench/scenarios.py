"""The benchmark's scenarios: each bounded in requests and time, each run direct and through the
gateway in interleaved rounds."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    stream: bool
    #: Virtual users, each with its own keep-alive connection.
    concurrency: int
    #: Measured requests per target (direct, gateway), split over the rounds.
    requests: int
    #: Completion tokens per request (max_tokens).
    tokens: int
    #: Simulator pacing, sent as x-sim-* headers (real backends pace themselves).
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    #: All users start each round together (a burst), rather than a closed loop.
    burst: bool = False
    #: Each round's streams start spread evenly over this many seconds (one stream per
    #: connection, an open-loop wave: neither a burst nor a closed loop); 0 for none.
    spread_seconds: float = 0.0
    #: Disconnect after this many events (the disconnect scenario).
    abort_after: int | None = None
    #: Seconds a round may take at most; a round stops issuing requests after it.
    round_seconds: float = 30.0
    #: Seconds one request may take from its start; longer is a "timeout" error.
    timeout_seconds: float = 60.0


FULL: tuple[Scenario, ...] = (
    Scenario(
        "c1-nonstream",
        "one client, non-streamed requests, fast backend: the added latency most comparisons quote",
        stream=False,
        concurrency=1,
        requests=400,
        tokens=16,
    ),
    Scenario(
        "c1-stream",
        "one client, streamed requests, fast backend: added time to first token",
        stream=True,
        concurrency=1,
        requests=400,
        tokens=16,
    ),
    Scenario(
        "nonstream-c16",
        "16 clients, non-streamed requests, fast backend: gateway CPU per request",
        stream=False,
        concurrency=16,
        requests=4000,
        tokens=16,
    ),
    Scenario(
        "stream-fast-c16",
        "16 clients, 128-token streams from a backend with no delay: the gateway is the bottleneck",
        stream=True,
        concurrency=16,
        requests=800,
        tokens=128,
    ),
    Scenario(
        "stream-paced-c64",
        "64 streams starting together, paced like a GPU (20 ms TTFT, 20 ms between tokens)",
        stream=True,
        concurrency=64,
        requests=256,
        tokens=32,
        ttft_ms=20.0,
        itl_ms=20.0,
        burst=True,
    ),
    Scenario(
        "stream-paced-long-c64",
        "64 clients, 200-token streams paced at 5 ms a token: CPU per token when each arrives on its own",
        stream=True,
        concurrency=64,
        requests=256,
        tokens=200,
        ttft_ms=5.0,
        itl_ms=5.0,
    ),
    Scenario(
        "stream-paced-1000",
        "1,000 paced streams (20 ms TTFT, 20 ms between tokens) starting spread over the first second, one "
        "connection each: stalls show as each stream's largest gap between tokens",
        stream=True,
        concurrency=1000,
        # One wave of 1,000 streams per measured round at the default 4 rounds.
        requests=4000,
        tokens=50,
        ttft_ms=20.0,
        itl_ms=20.0,
        spread_seconds=1.0,
        round_seconds=20.0,
        # Each stream is bounded too (50 tokens take 1 s): one still open 10 s after its start is an error.
        timeout_seconds=10.0,
    ),
    Scenario(
        "disconnect",
        "32 paced streams whose clients leave after 4 events: share of generations the backend aborted within 1 s",
        stream=True,
        concurrency=32,
        requests=64,
        tokens=400,
        ttft_ms=5.0,
        itl_ms=20.0,
        burst=True,
        abort_after=4,
    ),
)


def smoke(scenarios: tuple[Scenario, ...] = FULL) -> tuple[Scenario, ...]:
    """A few seconds in all: tiny counts, same shapes (for the test suite)."""
    out = []
    for s in scenarios:
        conc = min(s.concurrency, 4)
        out.append(
            replace(
                s,
                concurrency=conc,
                requests=conc * 4,
                tokens=min(s.tokens, 8) if s.abort_after is None else 50,
                round_seconds=10.0,
                spread_seconds=min(s.spread_seconds, 0.2),
            )
        )
    return tuple(out)
