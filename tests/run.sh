#!/usr/bin/env bash
# The whole test suite from a fresh checkout: creates .venv, installs the project with its
# dev extra, then runs pytest (any arguments are passed on). Needs only Python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# The real llama.cpp server for tests/test_llamacpp.py (and `python -m bench --backend llamacpp`):
# built once per machine into ~/.cache (about 4 minutes on 2 cores, its output in a log there),
# reused afterwards. Without cmake or a compiler it says so in one line and those tests skip.
.venv/bin/python tests/tools/build_llama_server.py
# A real Redis for tests/test_limits_redis.py, nginx for the benchmark's reference pass
# (tests/test_bench_smoke.py runs `bench --nginx`), and Prometheus (with promtool) for
# tests/test_dashboards.py: installed from Debian's packages where we are root (as CI is), each
# on its own; elsewhere those tests skip and say why. The tests start their own servers: a
# service the package starts is stopped and disabled.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  updated=""
  for pkg in redis-server nginx prometheus; do  # each package's command has its name
    command -v "$pkg" >/dev/null 2>&1 && continue
    echo "installing $pkg (apt-get) for the tests that use it"
    [ -n "$updated" ] || { apt-get update -qq >/dev/null 2>&1; updated=1; }
    extra=()
    [ "$pkg" = prometheus ] && extra=(--no-install-recommends)  # not its node exporter
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${extra[@]}" "$pkg" >/dev/null 2>&1 \
      || echo "could not install $pkg: the tests that need it will skip"
    if [ "$pkg" = prometheus ] && command -v systemctl >/dev/null 2>&1; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  done
fi
# pytest exits 5 when it collected no test: that is a failure here too (non-zero).
exec .venv/bin/python -m pytest "$@"
