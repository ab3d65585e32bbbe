#!/usr/bin/env bash
# Runs N cooperating processes of `dapo_jax.main` on this machine, each with D fake CPU devices, connected
# through a local coordinator and gloo collectives: a multi-host run in miniature (the tests use it).
#
#   bash launch/local_multiprocess.sh [--config=configs/default.py] --workdir=runs/mp [--config.x=y ...]
#   MODULE=dapo_jax.evaluate bash launch/local_multiprocess.sh --checkpoint=runs/mp --dataset=task --k=8
#
# Environment:
#   MODULE             the program every process runs (default dapo_jax.main; dapo_jax.evaluate takes the same
#                      distributed flags)
#   NUM_PROCESSES      processes to start (default 2)
#   DEVICES_PER_PROC   fake CPU devices per process (default 2): XLA_FLAGS=--xla_force_host_platform_device_count
#   COORDINATOR_PORT   localhost port of process 0's coordinator (default: a free one)
#   PYTHON             interpreter (default .venv/bin/python, else python3)
#   LOG_DIR            where process i's output goes as proc_i.log (default: the terminal, prefixed [i])
# Every process gets JAX_PLATFORMS=cpu; dapo_jax.distributed selects gloo for cross-process CPU collectives.
# Exits non-zero when any process fails; a failure stops the others.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${NUM_PROCESSES:-2}
D=${DEVICES_PER_PROC:-2}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PORT=${COORDINATOR_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < N; i++)); do
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$D ${XLA_FLAGS:-}"
       "$PY" -m "${MODULE:-dapo_jax.main}" --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" "$@")
  if [ -n "${LOG_DIR:-}" ]; then
    mkdir -p "$LOG_DIR"
    "${cmd[@]}" >"$LOG_DIR/proc_$i.log" 2>&1 &
  else
    # The recorded pid is python's own (not a subshell's), so a failure elsewhere stops it.
    "${cmd[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  fi
  pids+=($!)
done
status=0
for ((i = 0; i < N; i++)); do
  # The first failure stops the rest: the others would otherwise wait for it in a collective.
  if ! wait -n; then status=1; cleanup; break; fi
done
trap - EXIT
exit $status
