#!/usr/bin/env bash
# Issue 6's GPU measurements, run from the repository root on a machine with CUDA:
#
#   bench/run_gpu.sh 1 .. 5   one image shape of the matrix, every provider, dtype and cut,
#                             with its own copy-bandwidth ceiling and NVML telemetry, into
#                             $DEST/part-N.json (+ .md table, .png plot, nvidia-smi -q snapshot)
#   bench/run_gpu.sh suite    the pytest-benchmark suite: pytest bench/ --benchmark-json=...
#   bench/run_gpu.sh merge [DIR]
#                             (no GPU needed) merge DIR/part-*.json into
#                             bench/results/<gpu>-<yyyy-mm-dd>.json + .md (the README table) + .png
#   bench/run_gpu.sh all      1 .. 5, then merge (where one command may run that long)
#
# DEST is $BENCH_OUT, else $OUT (the folder a lent device machine sends back), else
# bench/results/parts. Each part is one command so that it fits a 10-minute limit; run
# them one per call, bring the part files back, then merge. Needs only the repository,
# PyTorch, Triton (nvidia-ml-py and matplotlib optional): no network, no install.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST="${BENCH_OUT:-${OUT:-bench/results/parts}}"
BENCH=(python -m diffeo_engine bench --verbose)
ALL="fused fused-kernel fused-deform torch-reference grid_sample grid_sample-compiled published-loop kornia torchvision-elastic"
NO_LOOP="fused fused-kernel fused-deform torch-reference grid_sample grid_sample-compiled kornia torchvision-elastic"

shape_of() {
    case "$1" in
        1) echo "256x3x32x32 $ALL" ;;
        2) echo "4096x3x32x32 $NO_LOOP" ;;   # published-loop: measured at B = 256 in part 1
        3) echo "16384x3x32x32 $NO_LOOP" ;;
        4) echo "4096x1x28x28 $ALL" ;;       # published-loop runs at B = 256
        5) echo "256x3x224x224 $ALL" ;;
        *) echo "unknown part $1" >&2; exit 2 ;;
    esac
}

need_cuda() {
    python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
        echo "no CUDA device: these measurements need a GPU" >&2; exit 3; }
    mkdir -p "$DEST"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -q > "$DEST/nvidia-smi-$1.txt" || true; fi
    python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
        "device", torch.cuda.get_device_name())'
    python -c 'import pynvml' 2>/dev/null || echo "warning: nvidia-ml-py missing: no clocks" >&2
}

run_part() {
    need_cuda "part-$1"
    read -r shape providers <<< "$(shape_of "$1")"
    # shellcheck disable=SC2086
    "${BENCH[@]}" --device cuda --shapes "$shape" --providers $providers \
        --out "$DEST/part-$1.json"
}

case "${1:-all}" in
    [1-5]) run_part "$1" ;;
    suite)
        need_cuda suite
        python -m pytest bench/ -q -p no:cacheprovider \
            --benchmark-json="$DEST/pytest-benchmark.json" --benchmark-columns=median,rounds
        ;;
    merge)
        parts=("${2:-$DEST}"/part-*.json)
        "${BENCH[@]}" --merge "${parts[@]}" --out bench/results/
        ;;
    all)
        for part in 1 2 3 4 5; do run_part "$part"; done
        "${BENCH[@]}" --merge "$DEST"/part-*.json --out bench/results/
        ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
