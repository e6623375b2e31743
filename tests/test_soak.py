"""Soak, short mode (about a minute): mixed traffic with faults on both sides, and the gateway's
worker stays flat in memory, file descriptors and backend connections. ``just soak`` runs the
long mode (``tools/soak.py``, ten minutes by default) for RELIABILITY.md."""

from __future__ import annotations

import pytest

from tools.soak import render, soak

pytestmark = pytest.mark.slow


def test_short_soak_stays_flat() -> None:
    report = soak(seconds=55, concurrency=24, interval=2.5, warmup=10)
    print("\nRELIABILITY soak\n" + render(report))
    assert report.requests > 1000
    assert report.data_lost == 0
    assert not report.problems, report.problems
