#!/usr/bin/env bash
# Sets up .venv with the test dependencies and runs the whole suite (8 fake CPU devices, see tests/conftest.py), in
# two worker processes (pytest-xdist), a test file each at a time; `bash scripts/test.sh -n 0` runs it in one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
