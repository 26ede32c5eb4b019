#!/usr/bin/env bash
# Run a jaxnas job on every worker of a Cloud TPU VM pod (data parallel over all chips of all hosts).
#
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh --config=configs/dsara.py --workdir=/mnt/shared/runs/dsara
#
# The workdir must be a directory every worker sees (an NFS / Filestore mount, or a bucket mounted with
# gcsfuse): checkpoints are written once, coordinated by orbax; jaxnas does not write gs:// URLs itself.
#
# Creates the pod if it does not exist (set CREATE=0 to skip), installs jaxnas on every worker and starts
# `python3 -m jaxnas.main` on all of them at once (`--worker=all`) with `--config.parallel.distributed=True`:
# every worker starts JAX's distributed runtime (the pod is detected, no addresses needed), reads its own
# slice of each global batch, and the batch is sharded over all chips of all hosts.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REPO="${REPO:-https://github.com/jaxnas/jaxnas.git}"
if [[ "${CREATE:-1}" == 1 ]] && ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$VERSION"
fi
run_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
run_all "set -e; [ -d jaxnas ] || git clone $REPO jaxnas; cd jaxnas && git pull --ff-only && \
  python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e ."
args=$(printf ' %q' "$@")
run_all "cd jaxnas && python3 -m jaxnas.main$args --config.parallel.distributed=True"
