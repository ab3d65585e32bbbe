#!/usr/bin/env bash
# Sets up .venv with the test dependencies and runs the whole suite (8 fake CPU devices, see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
