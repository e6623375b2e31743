"""gateway/drain.py (a worker's side of the drain, through the control directory) and the
supervisor's side in gateway/server.py, with a stand-in for Granian.

End to end (a real ``gateway serve`` drained by SIGTERM) is in test_faults.py and test_load.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import settings_from_strings
from gateway.drain import DRAIN_FILE, TICK, WorkerDrain, begin_drain, workers_idle
from gateway.server import Supervisor, settings_env

ME = os.getpid()


def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])  # noqa: S603
    child.wait()
    return child.pid


def report(control: Path, pid: int, text: str) -> None:
    (control / f"w-{pid}").write_text(text)


# -- the worker's side -------------------------------------------------------------------------------


def test_worker_reports_its_inflight_count_once_the_drain_begins(tmp_path: Path) -> None:
    inflight = [3]
    drained: list[float] = []

    async def go() -> None:
        drain = WorkerDrain(tmp_path, lambda: inflight[0], lambda: drained.append(time.monotonic()))
        drain.start()
        me = tmp_path / f"w-{ME}"
        assert me.read_text() == "up"  # counted as busy until it reports after the drain began
        await asyncio.sleep(TICK * 3)
        assert drained == [] and me.read_text() == "up"
        begin_drain(tmp_path)
        assert (tmp_path / DRAIN_FILE).exists()
        t0 = time.monotonic()
        while not drained and time.monotonic() - t0 < 1:
            await asyncio.sleep(TICK / 5)
        assert drained and drained[0] - t0 < TICK * 4
        await asyncio.sleep(TICK * 3)
        assert me.read_text() == "3" and len(drained) == 1  # on_drain runs once
        inflight[0] = 0
        await asyncio.sleep(TICK * 3)
        assert me.read_text() == "0"
        assert not list(tmp_path.glob("*.tmp"))  # written atomically: no leftovers
        await drain.stop()
        assert not me.exists()
        await drain.stop()  # twice is harmless

    asyncio.run(go())


def test_worker_stopped_before_any_drain(tmp_path: Path) -> None:
    async def go() -> None:
        drain = WorkerDrain(tmp_path, lambda: 0, lambda: None)
        await drain.stop()  # never started
        drain.start()
        await drain.stop()
        assert list(tmp_path.iterdir()) == []

    asyncio.run(go())


def test_workers_idle(tmp_path: Path) -> None:
    assert workers_idle(tmp_path)  # nobody reported: nothing to wait for
    report(tmp_path, ME, "up")
    assert not workers_idle(tmp_path)  # has not reported since the drain began
    report(tmp_path, ME, "2")
    assert not workers_idle(tmp_path)
    report(tmp_path, ME, "0")
    assert workers_idle(tmp_path)
    report(tmp_path, gone_pid(), "5")  # a worker that has exited holds nothing up
    assert workers_idle(tmp_path)
    (tmp_path / f"w-{os.getppid()}.tmp").write_text("7")  # a write in progress is not a report
    assert workers_idle(tmp_path)
    report(tmp_path, os.getppid(), "1")
    assert not workers_idle(tmp_path)


# -- the supervisor's side ----------------------------------------------------------------------------


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """A supervisor whose 'Granian' is a process that sleeps until it is signalled; its control
    directory holds this process as the one worker."""
    sup = Supervisor(settings_from_strings({"GATEWAY_DRAIN_SECONDS": "5"}))
    sup.control_dir = tmp_path / "ctl"
    sup.control_dir.mkdir()
    sup.child = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    yield sup
    if sup.child.poll() is None:
        sup.child.kill()
        sup.child.wait()


def drain(sup: Supervisor, seconds: float) -> tuple[int, float]:
    sup.settings = settings_from_strings({"GATEWAY_DRAIN_SECONDS": str(seconds)})
    t0 = time.monotonic()
    code = sup.drain_and_stop()
    return code, time.monotonic() - t0


def test_idle_workers_stop_at_once(supervisor: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    control = supervisor.control_dir
    assert control is not None and supervisor.child is not None
    report(control, ME, "0")
    code, took = drain(supervisor, 5)
    assert code == 0 and took < 1.5
    assert supervisor.child.returncode == -signal.SIGTERM  # Granian was asked to stop
    assert not control.exists() and supervisor.control_dir is None  # cleaned up
    assert "passed with requests still in flight" not in capsys.readouterr().err


def test_drain_waits_for_the_last_request(supervisor: Supervisor) -> None:
    control = supervisor.control_dir
    assert control is not None and supervisor.child is not None
    report(control, ME, "1")
    seen: list[bool] = []

    def finish() -> None:
        time.sleep(0.5)
        seen.append((control / DRAIN_FILE).exists())  # the workers were told
        report(control, ME, "0")

    t = threading.Thread(target=finish)
    t.start()
    code, took = drain(supervisor, 5)
    t.join()
    assert seen == [True]
    assert code == 0 and 0.5 <= took < 2.0
    assert supervisor.child.returncode == -signal.SIGTERM


def test_grace_period_caps_the_drain(supervisor: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    control = supervisor.control_dir
    assert control is not None and supervisor.child is not None
    report(control, ME, "4")
    code, took = drain(supervisor, 0.4)
    assert code == 0 and 0.4 <= took < 1.5
    assert supervisor.child.returncode == -signal.SIGTERM
    assert "GATEWAY_DRAIN_SECONDS (0.4 s) passed with requests still in flight" in capsys.readouterr().err


def test_child_already_gone(supervisor: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    assert supervisor.child is not None and supervisor.control_dir is not None
    supervisor.child.kill()
    supervisor.child.wait()
    report(supervisor.control_dir, ME, "4")  # would hold the drain up: it is not even started
    code, took = drain(supervisor, 5)
    assert code == 0 and took < 0.5
    assert supervisor.control_dir is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("exit_code", "returned"), [(0, 0), (3, 1)])
def test_wait_returns_when_granian_exits(tmp_path: Path, exit_code: int, returned: int) -> None:
    sup = Supervisor(settings_from_strings({}))
    sup.child = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({exit_code})"])  # noqa: S603
    assert sup.wait() == returned


def test_wait_drains_on_a_stop_request(supervisor: Supervisor) -> None:
    assert supervisor.control_dir is not None and supervisor.child is not None
    report(supervisor.control_dir, ME, "0")
    threading.Timer(0.2, supervisor.request_stop).start()
    t0 = time.monotonic()
    assert supervisor.wait() == 0
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert supervisor.child.returncode == -signal.SIGTERM


def test_workers_get_the_supervisors_settings() -> None:
    """Granian's workers rebuild their settings from the environment: the same ones come back."""
    given = settings_from_strings(
        {"GATEWAY_DRAIN_SECONDS": "7.5", "GATEWAY_METRICS": "false", "GATEWAY_POOL_SIZE": "3", "MODEL_NAME": "m"}
    )
    assert settings_from_strings(settings_env(given)) == given
