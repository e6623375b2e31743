"""``gateway serve``'s open-file limit (issue #21): raised to what a worker needs to hold
GATEWAY_BACKPRESSURE client connections and its backend pools, and said on stderr, in one line,
when the hard limit cannot hold that many."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.server import FD_RESERVE, files_needed, nofile_plan
from tests.fakes import FakeBackend
from tests.reliability import worker_pids
from tests.servers import Gateway

INF = resource.RLIM_INFINITY


def test_files_needed_counts_clients_pools_and_a_reserve() -> None:
    s = load_settings({"GATEWAY_BACKPRESSURE": "1000", "GATEWAY_POOL_SIZE": "10"}, dotenv=None)
    assert files_needed(s, replicas=3) == 1000 + 30 + FD_RESERVE


@pytest.mark.parametrize(
    ("soft", "hard", "need", "plan"),
    [
        (1024, 524288, 17664, (17664, False)),  # the usual: soft raised, never beyond the need
        (1024, INF, 17664, (17664, False)),
        (20000, 20000, 17664, (None, False)),  # already enough: left alone, never lowered
        (INF, INF, 17664, (None, False)),
        (1024, 4096, 17664, (4096, True)),  # as far as the hard limit goes, and said
        (4096, 4096, 17664, (None, True)),
    ],
)
def test_nofile_plan(soft: int, hard: int, need: int, plan: tuple[int | None, bool]) -> None:
    assert nofile_plan(soft, hard, need) == plan


def worker_soft_nofile(g: Gateway) -> int:
    assert g.proc is not None
    (worker,) = worker_pids(g.proc.pid)
    for line in Path(f"/proc/{worker}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


def under_ulimit(g: Gateway, *flags: str) -> Gateway:
    """Start ``g`` through a shell that runs ``ulimit`` with each of ``flags`` first (limits it
    inherits)."""
    limits = " && ".join(f"ulimit {f}" for f in flags)
    g.argv = ["/bin/sh", "-c", f'{limits} && exec "$0" "$@"', *g.argv]
    return g.start()


def test_serve_raises_a_low_soft_limit(tmp_path: Path, backend: FakeBackend) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != INF and hard < 1500 + 1024 + FD_RESERVE:
        pytest.skip(f"the hard open-file limit ({hard}) is below what the test asks for")
    with under_ulimit(Gateway(tmp_path, BACKEND_BASE_URL=backend.url, GATEWAY_BACKPRESSURE="1500"), "-Sn 512") as g:
        # Granian 2.8 raises it to the hard limit itself; gateway serve does not rely on that.
        assert worker_soft_nofile(g) >= 1500 + 1024 + FD_RESERVE
        assert "open-file limit" not in g.output()


def test_serve_says_when_the_hard_limit_is_too_low(tmp_path: Path, backend: FakeBackend) -> None:
    with under_ulimit(Gateway(tmp_path, BACKEND_BASE_URL=backend.url), "-Sn 1024", "-Hn 2000") as g:
        assert worker_soft_nofile(g) == 2000
        (line,) = [x for x in g.output().splitlines() if "open-file limit" in x]
    assert line.startswith("gateway: warning: the open-file limit is 2000 (hard), below the 17664 ")
    assert "GATEWAY_BACKPRESSURE=16384" in line and "about 720 client connections" in line
