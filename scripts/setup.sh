#!/usr/bin/env bash
# Creates .venv and installs dapo_jax with its pinned dependencies. `scripts/setup.sh test` adds test deps.
# ACCELERATOR=tpu or ACCELERATOR=cuda12 adds the pinned jax's accelerator plugin (libtpu / CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
# Python 3.11+ (the pinned numpy and jax need it): $PYTHON, else the newest python3.1x on PATH.
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup.sh: dapo_jax needs Python 3.11 or newer; '$PY' is $("$PY" --version 2>&1 | head -n 1 || echo missing)." >&2
  echo "  Install one (e.g. apt-get install python3.11 python3.11-venv) and run PYTHON=python3.11 bash $0 $*" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
  # The tests need torch (transformers is their parity oracle) on CPU only. PyPI's Linux torch pulls ~2.5 GB of
  # CUDA libraries: where PyTorch's CPU wheel index answers, its CPU build is taken instead (TORCH_CPU_INDEX=
  # empty skips the probe; offline machines install from their configured indexes as before).
  TORCH_CPU_INDEX=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
  extra=()
  if [ -n "$TORCH_CPU_INDEX" ] && .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' "$TORCH_CPU_INDEX" 2>/dev/null; then
    extra=(--extra-index-url "$TORCH_CPU_INDEX")
  fi
  .venv/bin/python -m pip install -q ${extra[@]+"${extra[@]}"} -r requirements.txt -r requirements-test.txt
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
