"""``python -m bench --backend llamacpp``: the real llama.cpp server as the benchmark's backend.

The binary is the one the test suite builds (``tests/tools/build_llama_server.py``: once per
machine into the user's cache; built here first when missing). The model is generated for the run
into a temporary directory: the 135 MB "paced" variant of ``tests/tools/tiny_gguf.py``, about
7-10 ms per token on one thread, so streams are paced like a small GPU serving a real model. The
server runs as in the tests: ``-c 2048 -np 4 -t 1``, alias ``tiny``, an API key. It ignores the
simulator's pacing headers and has no aborted-request counter, so the disconnect scenario's abort
share is null.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from tests.tools import build_llama_server
from tests.tools.llama_server import ALIAS, CTX, LlamaServer, pin_to
from tests.tools.tiny_gguf import PACED, write_model

#: The key the server is started with (the benchmark sends it on direct requests; the gateway
#: sends it as its backend key).
KEY = "bench-llama-key"
MODEL = ALIAS


class Unavailable(RuntimeError):
    """llama-server cannot be built or run here."""


@contextlib.contextmanager
def start_llamacpp(
    cpu: int | None, log: Path, progress: Callable[[str], None] = print
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Build (if needed) and start llama-server on a free port; yield ``(process, port)``."""
    missing = build_llama_server.toolchain_missing()
    if not build_llama_server.binary_path().is_file() and missing is not None:
        raise Unavailable(missing)
    try:
        binary = build_llama_server.ensure_built(lambda msg: progress(f"llama-server: {msg}"))
    except (subprocess.CalledProcessError, OSError, ValueError) as e:
        raise Unavailable(f"the llama-server build failed ({e}); see {build_llama_server.log_path()}") from e
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        model = write_model(Path(tmp) / "paced.gguf", replace(PACED, ctx=CTX))
        server = LlamaServer(model, log, api_key=KEY, preexec_fn=pin_to(cpu))
        progress(f"starting {binary} with a generated {model.stat().st_size / 1e6:.0f} MB model")
        with server:
            assert server.proc is not None
            yield server.proc, server.port
