from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import heap
from tests.fakes import FakeBackend
from tests.servers import Gateway, StartGateway

# Fixtures for the tests against the real llama.cpp server (they start nothing unless asked for).
pytest_plugins = ("tests.llamacpp",)


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    with FakeBackend() as fb:
        yield fb


@pytest.fixture(scope="module")
def module_backend() -> Iterator[FakeBackend]:
    with FakeBackend() as fb:
        yield fb


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw")


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """``start_gateway(**env)``: a gateway in this test's temporary directory (``.start()`` it, or
    enter it); every one still running at the end of the test is stopped."""
    started: list[Gateway] = []

    class _G(Gateway):
        def __init__(self, **env: str) -> None:
            super().__init__(tmp_path, **env)
            started.append(self)

    yield _G
    for g in started:
        if g.running:
            g.stop()
        elif g.proc is not None:
            g.kill()


@pytest.fixture
def collector() -> Iterator[list[dict[str, Any]]]:
    """The garbage collections that run during the test (their ``gc.callbacks`` info); the
    collector is put back as it was afterwards, whatever the test settled (``gateway.heap``)."""
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    runs: list[dict[str, Any]] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            runs.append(info)

    gc.callbacks.append(seen)
    try:
        yield runs
    finally:
        gc.callbacks.remove(seen)
        heap.restore()
        if gc.get_freeze_count() and not frozen:
            gc.unfreeze()
        gc.set_threshold(*before)
