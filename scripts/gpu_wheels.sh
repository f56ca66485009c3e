#!/usr/bin/env bash
# Downloads, into ./.whl, the wheels a GPU image with jax, flax, optax, orbax, torch, NumPy, OpenCV and
# Pillow lacks for training and for `scripts/benchmark.py --end_to_end` (the input pipeline and the
# trainer's own needs), built for CPython 3.12 on x86-64 Linux. Install them there without an index:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp "${PLATFORMS[@]}" -d .whl \
    grain==0.2.18 array_record==0.8.6 portpicker ml_collections tensorboardX
ls -l .whl
