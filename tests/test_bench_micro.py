"""The micro-benchmarks in bench/micro still run: each body once, as a plain test, untimed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.servers import ROOT, clean_env


@pytest.mark.slow
def test_micro_benchmarks_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/micro", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    passed = re.search(r"(\d+) passed", out)
    assert passed is not None and int(passed.group(1)) >= 8, out
