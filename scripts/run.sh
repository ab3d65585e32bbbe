#!/usr/bin/env bash
# Sets up .venv and runs the main job on its embedded default config (arguments go to dapo_jax.main).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dapo_jax.main --workdir="${WORKDIR:-runs/default}" "$@"
