#!/usr/bin/env bash
# Pretraining on every GPU of one machine: one process, `jax.pmap` over all visible GPUs.
#
#     bash scripts/launch_local.sh configs/insloc_fpn_200ep.py runs/insloc_fpn_200ep [--config.x=y ...]
#
# The global batch (256 in the published configs) is split evenly over the GPUs, so it must divide by their
# number. Pick GPUs with CUDA_VISIBLE_DEVICES=0,1,2,3. Restarting the same command resumes from the newest
# checkpoint in the workdir, so the script can simply be rerun after a crash or preemption.
set -euo pipefail
if (($# < 2)); then
    echo "usage: $0 CONFIG WORKDIR [--config.section.field=value ...]" >&2
    exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
cd "$(dirname "$0")/.."

# Let XLA take the GPU memory it needs, not 75% of it up front, so the input pipeline's TensorFlow and a
# second process (evaluation, export) still fit; TensorFlow itself must not claim the GPUs.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

exec python -m insloc_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
