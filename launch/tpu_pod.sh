#!/usr/bin/env bash
# DAPO on a Cloud TPU VM pod slice: create it (or reuse it), copy this checkout and set up the environment on
# every worker, then run dapo_jax.main on all workers at once (--worker=all); JAX connects them by itself.
#
#   TPU_NAME=dapo ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 bash launch/tpu_pod.sh \
#       --config=configs/dapo_qwen2_5_32b.py --config.model.hf_path=/mnt/models/Qwen2.5-32B \
#       --config.data.source_dir=/mnt/gcs/data --workdir=/mnt/gcs/runs/dapo32b
#   TPU_NAME=dapo ZONE=us-east5-a STEP=run bash launch/tpu_pod.sh ...     # skip create / copy / setup
#   TPU_NAME=dapo ZONE=us-east5-a STEP=logs bash launch/tpu_pod.sh        # follow worker 0's output
#   TPU_NAME=dapo ZONE=us-east5-a STEP=delete bash launch/tpu_pod.sh      # give the slice back
# (The 32B recipe needs ~43 GiB a chip: v5p, 95 GiB; a v4 chip has 32. The start-up check reads the chip's
# memory when JAX reports it.)
#
# Arguments are dapo_jax.main's flags. Environment:
#   TPU_NAME, ZONE       required: the slice and its zone
#   PROJECT              gcloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE     slice to create when TPU_NAME does not exist (default v5p-64)
#   RUNTIME_VERSION      TPU VM image (default: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e,
#                        v2-alpha-tpuv6e for v6e, else tpu-ubuntu2204-base)
#   SPOT=1               create a spot (preemptible) slice; a preempted run resumes from its workdir
#   STEP                 all (default: create if missing, copy, setup, run) | setup (no run) | run | logs | delete
#   DETACH               1 (default): the run goes on when this terminal or its ssh connection goes away
#                        (nohup, output in REMOTE_DIR/run.log on each worker; STEP=logs follows worker 0's);
#                        0: in the foreground (a dropped connection stops the run)
#   REMOTE_DIR           checkout location on the workers (default ~/dapo_jax)
#   LIBTPU_INIT_ARGS     passed to the run (default below: async collective fusion, overlapping the FSDP
#                        all-gathers with compute)
#   XLA_FLAGS            passed to the run as given
# The workdir must be a path every worker reaches (a shared disk, or a bucket mounted at the same path on each
# worker with gcsfuse; gs:// URLs are refused): Orbax writes each worker's shards there; only worker 0 writes
# metrics, logs and plots.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-64}
case "$ACCELERATOR_TYPE" in  # the TPU VM image that goes with the chip
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v5litepod-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$DEFAULT_RUNTIME}
REMOTE_DIR=${REMOTE_DIR:-'~/dapo_jax'}
STEP=${STEP:-all}
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-"--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"}
gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

on_all() {  # runs a shell command on every worker of the slice at once
  "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

if [ "$STEP" = "delete" ]; then
  exec "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
fi
if [ "$STEP" = "logs" ]; then
  exec "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 --command="tail -n 200 -F $REMOTE_DIR/run.log"
fi

if [ "$STEP" = "all" ] || [ "$STEP" = "setup" ]; then
  if ! "${gc[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
    echo "creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION)"
    "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
        --version="$RUNTIME_VERSION" ${SPOT:+--spot}
  fi
  # The tracked files of this checkout (and local changes to them), the same on every worker.
  archive=$(mktemp /tmp/dapo_jax_src.XXXXXX.tar.gz)
  git ls-files -z | tar --null -czf "$archive" -T -
  "${gc[@]}" scp "$archive" "$TPU_NAME":/tmp/dapo_jax_src.tar.gz "${where[@]}" --worker=all
  rm -f "$archive"
  # Ubuntu 22.04 TPU images ship Python 3.10; dapo_jax needs 3.11+.
  on_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/dapo_jax_src.tar.gz -C $REMOTE_DIR && \
          (command -v python3.11 >/dev/null || python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
           (sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv)) && \
          cd $REMOTE_DIR && ACCELERATOR=tpu bash scripts/setup.sh"
fi

if [ "$STEP" = "all" ] || [ "$STEP" = "run" ]; then
  quoted=$(printf '%q ' "$@")
  # --distributed=on: every worker must join; a worker that cannot find the others fails instead of training
  # alone.
  env_vars="LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS' XLA_FLAGS='${XLA_FLAGS:-}'"
  run=".venv/bin/python -m dapo_jax.main --distributed=on $quoted"
  if [ "${DETACH:-1}" = "1" ]; then
    on_all "cd $REMOTE_DIR && $env_vars nohup $run > run.log 2>&1 < /dev/null &"
    echo "started on every worker; follow it with: TPU_NAME=$TPU_NAME ZONE=$ZONE STEP=logs bash $0"
  else
    on_all "cd $REMOTE_DIR && $env_vars $run"
  fi
fi
