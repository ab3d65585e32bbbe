#!/usr/bin/env bash
# DAPO on a Cloud TPU VM pod slice: create it (or reuse it), copy this checkout and set up the environment on
# every worker, then run dapo_jax.main on all workers at once (--worker=all); JAX connects them by itself.
#
#   TPU_NAME=dapo-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-64 bash launch/tpu_pod.sh \
#       --config=configs/dapo_qwen2_5_32b.py --config.model.hf_path=/mnt/models/Qwen2.5-32B \
#       --workdir=/mnt/gcs/runs/dapo32b
#   TPU_NAME=dapo-v4 ZONE=us-central2-b STEP=run bash launch/tpu_pod.sh ...     # skip create / copy / setup
#   TPU_NAME=dapo-v4 ZONE=us-central2-b STEP=delete bash launch/tpu_pod.sh      # give the slice back
#
# Arguments are dapo_jax.main's flags. Environment:
#   TPU_NAME, ZONE       required: the slice and its zone
#   PROJECT              gcloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE     slice to create when TPU_NAME does not exist (default v4-32)
#   RUNTIME_VERSION      TPU VM image (default tpu-ubuntu2204-base)
#   SPOT=1               create a spot (preemptible) slice; a preempted run resumes from its workdir
#   STEP                 all (default: create if missing, copy, setup, run) | setup (no run) | run | delete
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
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
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
  on_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/dapo_jax_src.tar.gz -C $REMOTE_DIR && \
          cd $REMOTE_DIR && ACCELERATOR=tpu bash scripts/setup.sh"
fi

if [ "$STEP" = "all" ] || [ "$STEP" = "run" ]; then
  quoted=$(printf '%q ' "$@")
  # --distributed=on: every worker must join; a worker that cannot find the others fails instead of training
  # alone.
  on_all "cd $REMOTE_DIR && LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS' XLA_FLAGS='${XLA_FLAGS:-}' \
          .venv/bin/python -m dapo_jax.main --distributed=on $quoted"
fi
