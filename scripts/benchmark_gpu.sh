#!/usr/bin/env bash
# Side-by-side train-step benchmarks on one GPU, in one call: ours (JAX) and the PyTorch baseline.
#
#     bash scripts/benchmark_gpu.sh      # from the repository root; BUDGET_S=540, PYTHON=python by default
#
# Runs, most important first, until BUDGET_S seconds have passed (a run that would start with less than
# its minimum left is listed as skipped; one still running at the deadline is stopped and its finished
# configurations are kept). XLA compiles the R50-FPN step in about 210 s on an H200 (each batch size
# anew), so a 10-minute budget covers the first five: the bf16 matmul ceiling | torch FPN and C4 bf16
# eager (128) | JAX InsLoc-FPN bf16 at 128 (pixel augmentation inside the step, the training default;
# with a 2-step jax.profiler trace in profiles/fpn_128_bfloat16.tar.gz for TensorBoard / XProf) |
# JAX InsLoc-C4 bf16 at 128 | torch FPN bf16 torch.compile (128); then JAX FPN bf16 128 with the GPU
# autotuner off (compile time against step time) | with augmentation left to the host (as the torch
# baseline, whose input is already augmented) | float32 | at 64 and 32 | without box augmentation | C4 at
# 64 | torch C4 compile | torch FPN float32 eager.
# Everything goes to stdout and to $OUT/benchmarks.txt (./benchmarks.txt when OUT is unset). PYTHON must
# have jax with CUDA, flax, optax, torch and torchvision; no TensorFlow, no ml_collections. Where it also
# has grain (and the trainer's other needs: `bash scripts/gpu_wheels.sh` here downloads the wheels a GPU
# image lacks, installed there as that script says), the JAX InsLoc-FPN run is also fed end to end by the
# real input pipeline, one worker per core, from 512 ImageNet-like JPEGs written first by
# scripts/benchmark_input.py, which then times the host side on 1 and on every core.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
LOG="${OUT:-.}/benchmarks.txt"
BUDGET_S="${BUDGET_S:-540}"
PYTHON="${PYTHON:-python}"
: > "$LOG"

# run MIN_SECONDS COMMAND...: runs COMMAND if at least MIN_SECONDS of the budget are left, bounded by the rest.
run() {
    local need=$1
    shift
    local left=$((BUDGET_S - SECONDS))
    if ((left < need)); then
        echo "### skipped (${left}s of the budget left, needs ${need}s): $*" | tee -a "$LOG"
        return
    fi
    echo "### [$SECONDS s] $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$left" "$@" 2>&1 | grep --line-buffered -v -E '^[WI][0-9]{4} ' | tee -a "$LOG"
    echo "### exit ${PIPESTATUS[0]} after $SECONDS s" | tee -a "$LOG"
}

JAX="$PYTHON -u scripts/benchmark.py --steps 20 --warmup 3"
TORCH="$PYTHON -u scripts/benchmark_torch.py --steps 20 --warmup 3"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
    $PYTHON -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"
    $PYTHON -u scripts/benchmark_matmul.py
} 2>&1 | tee -a "$LOG"

FPN=configs/insloc_fpn_200ep.py
C4=configs/insloc_c4_200ep.py
run 30 $TORCH --arch fpn --dtype bfloat16 --mode eager --per_device_batch 128
run 20 $TORCH --arch c4 --dtype bfloat16 --mode eager --per_device_batch 128
FED=()
if $PYTHON -c "import grain" 2>/dev/null; then
    JPEGS=/tmp/insloc_bench_imagenet_like
    run 60 $PYTHON -u scripts/benchmark_input.py --image_dir $JPEGS --workers 1 "$(nproc)" --batches 10
    FED=(--end_to_end --config.data.source.kind=folder --config.data.source.root=$JPEGS)
fi
run 240 $JAX --config $FPN --dtype bfloat16 --per_device_batch 128 --profile "${OUT:-.}/profiles" "${FED[@]}"
run 200 $JAX --config $C4 --dtype bfloat16 --per_device_batch 128
run 120 $TORCH --arch fpn --dtype bfloat16 --mode compile --per_device_batch 128
run 120 env XLA_FLAGS=--xla_gpu_autotune_level=0 $JAX --config $FPN --dtype bfloat16 --per_device_batch 128
run 240 $JAX --config $FPN --dtype bfloat16 --per_device_batch 128 --config.data.augment_on=host
run 240 $JAX --config $FPN --dtype float32 --per_device_batch 128
run 240 $JAX --config $FPN --dtype bfloat16 --per_device_batch 64,32
run 240 $JAX --config $FPN --dtype bfloat16 --per_device_batch 128 "--config.box_aug.levels=()"
run 200 $JAX --config $C4 --dtype bfloat16 --per_device_batch 64
run 120 $TORCH --arch c4 --dtype bfloat16 --mode compile --per_device_batch 128
run 30 $TORCH --arch fpn --dtype float32 --mode eager --per_device_batch 128
echo "### done after $SECONDS s" | tee -a "$LOG"
