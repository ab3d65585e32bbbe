#!/usr/bin/env bash
# Creates .venv and installs dapo_jax with its pinned dependencies. `scripts/setup.sh test` adds test deps.
# ACCELERATOR=tpu or ACCELERATOR=cuda12 adds the pinned jax's accelerator plugin (libtpu / CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
case "${ACCELERATOR:-cpu}" in
  cpu) ;;
  tpu|cuda12|cuda13)
    JAX_VERSION=$(sed -n 's/^jax==//p' requirements.txt)
    .venv/bin/python -m pip install -q "jax[${ACCELERATOR}]==${JAX_VERSION}" ;;
  *) echo "setup.sh: ACCELERATOR must be cpu, tpu, cuda12 or cuda13, got ${ACCELERATOR}" >&2; exit 2 ;;
esac
.venv/bin/python -m pip install -q --no-deps -e .
