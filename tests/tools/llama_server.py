"""Start and stop the real llama-server (built by ``build_llama_server``) on 127.0.0.1.

Shared by the test fixtures (``tests/llamacpp.py``) and the benchmark (``bench/llamacpp.py``).
Standard library only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.tools.build_llama_server import binary_path

#: The model id the server lists (``-a``); requests may send any model name.
ALIAS = "tiny"
#: Total context shared by the slots; the model is generated with the same ``--ctx``.
CTX = 2048
SLOTS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """One ``llama-server`` process on a free (or given) port, its output in ``log``.

    ``start()`` polls ``/health`` until it answers 200 and gives up early if the process exits;
    ``stop()`` sends SIGTERM to the process's own pid, then SIGKILL after a timeout.
    """

    def __init__(
        self,
        model: Path,
        log: Path,
        *,
        api_key: str,
        port: int | None = None,
        embeddings: bool = False,
        ctx: int = CTX,
        slots: int = SLOTS,
        threads: int = 1,
        extra: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.log = log
        self.api_key = api_key
        self.port = port or free_port()
        self.embeddings = embeddings
        self.preexec_fn = preexec_fn
        self.argv = [
            str(binary_path()),
            "-m", str(model),
            "-a", ALIAS,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--api-key", api_key,
            "-c", str(ctx),
            "-np", str(slots),
            "-t", str(threads),
            "-tb", str(threads),
        ]  # fmt: skip
        if embeddings:
            self.argv += ["--embeddings", "--pooling", "mean"]
        self.argv += list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, as a gateway's ``BACKEND_BASE_URL``."""
        return self.url + "/v1"

    def start(self, timeout: float = 30.0) -> LlamaServer:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own build, fixed arguments
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=self.preexec_fn,  # noqa: PLW1509 - only sets the CPU affinity
            )
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.proc.returncode} before /health answered; "
                    f"last output:\n{self.output()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:  # 503 while the model loads
                e.close()
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"llama-server on port {self.port} not healthy within {timeout} s")

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(self, text: str, timeout: float, start: int = 0) -> float | None:
        """Seconds until ``text`` appears in the log after character ``start``, or None."""
        t0 = time.monotonic()
        while True:
            if text in self.output()[start:]:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self) -> LlamaServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pin_to(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child to one CPU (None: no pinning)."""
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin
