#!/usr/bin/env bash
# Run a jaxnas job on all GPUs of one machine: one process sees every local GPU, and the batch is sharded
# over them (jax.jit + NamedSharding); no distributed runtime is needed on a single node.
#
#   launch/gpu_multi.sh --config=configs/advrush.py --workdir=runs/advrush
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu_multi.sh --config=configs/darts.py --workdir=runs/darts
#
# Several nodes: see launch/slurm_multi_node.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print('devices:', jax.devices())"
exec python -m jaxnas.main "$@"
