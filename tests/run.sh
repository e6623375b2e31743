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
# pytest exits 5 when it collected no test: that is a failure here too (non-zero).
exec .venv/bin/python -m pytest "$@"
