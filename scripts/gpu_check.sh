#!/usr/bin/env bash
# One-shot GPU benchmark of IVPT (issues 6 and 27): the training step and inference against the bare
# backbone, the data path alone and feeding the step, `ivpt eval` against its forwards, and
# train.compile (cold, then from torch's on-disk cache).
#
#   OUT=/some/folder bash scripts/gpu_check.sh         # on a CUDA machine, from the repository root
#   SMOKE=1 OUT=/tmp/check bash scripts/gpu_check.sh   # dry run on the CPU with a tiny ViT
#
# Every `ivpt bench` result is printed and appended to $OUT/gpu_bench.jsonl with a "label" field; a
# command that fails or times out appends {"label": ..., "error": ...} instead and the script goes on.
# Versions and the device go to $OUT/environment.txt. PARTS (default step,data,compile) picks what runs:
# `step` the step and inference rows (issue 6, about 3 minutes on an H200), `data` the data path and
# ivpt eval on a generated set of CUB-sized JPEGs (about 2 minutes with 16 cores; WORKERS=N sets the loader
# processes), `compile` train.compile cold, warm and end to end (a few minutes, cold compile bounded by
# COMPILE_TIMEOUT seconds).
set -u
PARTS=",${PARTS:-step,data,compile},"

OUT=${OUT:-/tmp/ivpt_gpu_check}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="$OUT/gpu_bench.jsonl"
: > "$RESULTS"
# Compiled kernels go to a cache of this run's own (COMPILE_CACHE=DIR for another), so that the first
# compile is cold and the second (a new process) shows what torch's on-disk cache saves. Not inherited
# from TORCHINDUCTOR_CACHE_DIR: torch sets that variable in any process that has looked its cache up.
export TORCHINDUCTOR_CACHE_DIR=${COMPILE_CACHE:-$OUT/inductor_cache}
DATA="$OUT/cub_sized"

if [ "${SMOKE:-0}" = "1" ]; then
    # A 12-block, 192-wide ViT on 32 px inputs (2 x 2 patches): every code path, seconds on a CPU.
    MODEL=(--arch vit_tiny_patch16_224 --img-size 32 --batch 2 --device cpu --n-pro 5,4,3)
    COUNTS=(--steps 2 --warmup 1)
    SHORT=300; LONG=900; COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-900}
    # Tiny nets on a shared CPU: a second thread only waits on the first.
    export OMP_NUM_THREADS=1
    # The dry run checks that compilation works, not how fast CPU kernels run: scalar C++ kernels compile
    # in about three quarters of the time of vectorised ones (a cold compile step: 190 against 253 s).
    export TORCHINDUCTOR_VEC_ISA_OK=${TORCHINDUCTOR_VEC_ISA_OK:-0}
    SYNTHETIC=(--classes 2 --per-class 8 --size 64)
    WORKERS=${WORKERS:-1}
    LOADER=(--batch 4 --device cpu --steps 2 --warmup 1 --samples 4 --rounds 1)
    LOADER_SIZES=(32 48)
    EVAL=(--arch vit_tiny_patch16_224 --img-size 32 --batch 4 --device cpu --n-pro 5,4,3 --steps 1 --warmup 0)
    E2E_COUNTS=(--steps 2 --warmup 1 --rounds 1)
else
    MODEL=(--arch vit_base_patch14_reg4_dinov2.lvd142m --img-size 518 --batch 16 --device cuda)
    COUNTS=(--steps 10 --warmup 3)
    SHORT=60; LONG=90; COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-240}
    # CUB's images are about 500 x 375 JPEGs: 500 px squares decode at (slightly more than) CUB's cost.
    SYNTHETIC=(--classes 10 --per-class 40 --size 500)
    # All cores but one for the loader (its per-worker rate says how many a run needs, docs/performance.md).
    WORKERS=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))}
    LOADER=(--batch 16 --device cuda --steps 20 --warmup 3 --samples 32 --rounds 5)
    LOADER_SIZES=(518 224)
    EVAL=(--arch vit_base_patch14_reg4_dinov2.lvd142m --img-size 518 --batch 32 --device cuda --steps 5 --warmup 2)
    E2E_COUNTS=(--steps 20 --warmup 5 --rounds 2)
fi

"$PYTHON" - > "$OUT/environment.txt" 2>&1 <<'PY'
import platform, timm, torch
print("python", platform.python_version(), "torch", torch.__version__, "timm", timm.__version__)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/environment.txt"
cat "$OUT/environment.txt"

# run LABEL SECONDS COMMAND...: run a command that prints one JSON line; tag it and keep it.
run() {
    local label=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@" > "$OUT/$label.stdout" 2> "$OUT/$label.stderr"
    local status=$? line
    line=$(tail -n 1 "$OUT/$label.stdout")
    if [ "$status" -eq 0 ] && [ "${line:0:1}" = "{" ]; then
        line="{\"label\": \"$label\", ${line:1}"
    else
        line="{\"label\": \"$label\", \"error\": \"exit status $status (124: timed out), see $label.stderr\"}"
    fi
    echo "$line" | tee -a "$RESULTS"
}

bench() {
    local label=$1 seconds=$2
    shift 2
    run "$label" "$seconds" "$PYTHON" -m ivpt.cli bench "$@" "${MODEL[@]}" "${COUNTS[@]}"
}

# The data path (issue 27) reads a synthetic set of CUB-sized JPEGs, generated once.
ensure_data() {
    [ -f "$DATA/synthetic.json" ] || "$PYTHON" -m ivpt.cli make-synthetic "$DATA" "${SYNTHETIC[@]}" \
        > "$OUT/make_synthetic.stdout" 2> "$OUT/make_synthetic.stderr"
}

if [[ $PARTS == *,step,* ]]; then
    bench train_bf16 "$SHORT" train-step --precision bf16
    bench eval_bf16 "$SHORT" eval --precision bf16
    bench train_fp16 "$SHORT" train-step --precision fp16
    # Before the optimisation: original and transformed batch in one 2B autograd forward.
    run train_bf16_joint_2B "$SHORT" "$PYTHON" -c '
import json, sys
from ivpt.cli import build_parser
from ivpt.bench import run_bench
args = build_parser().parse_args(["bench", "train-step", *sys.argv[1:]])
n_pro = tuple(int(k) for k in args.n_pro.split(",")) if args.n_pro else None
print(json.dumps({"joint_2B": True, **run_bench("train-step", args.arch, args.img_size, args.batch, args.precision,
    args.device, False, args.method, args.steps, args.warmup, n_pro, joint_transformed_pass=True)}))
' --precision bf16 "${MODEL[@]}" "${COUNTS[@]}"
    bench train_fp32 "$LONG" train-step --precision fp32
    bench eval_fp32 "$SHORT" eval --precision fp32
fi

if [[ $PARTS == *,data,* ]]; then
    ensure_data
    for size in "${LOADER_SIZES[@]}"; do
        run "loader_$size" "$LONG" "$PYTHON" -m ivpt.cli bench loader --data "$DATA" --img-size "$size" \
            --workers "$WORKERS" "${LOADER[@]}"
    done
    run train_e2e_bf16 "$LONG" "$PYTHON" -m ivpt.cli bench train --data "$DATA" --workers "$WORKERS" --precision bf16 \
        "${MODEL[@]}" "${E2E_COUNTS[@]}"
    run eval_metrics_bf16 "$LONG" "$PYTHON" -m ivpt.cli bench eval-metrics --data "$DATA" --workers "$WORKERS" \
        --precision bf16 --rounds 1 "${EVAL[@]}"
fi

if [[ $PARTS == *,compile,* ]]; then
    # Last: compilation time is hard to predict, and a timeout here loses nothing else. The second run is a
    # new process with the same shapes: it loads the kernels the first one compiled (compile_cache.hits).
    bench train_bf16_compile "$COMPILE_TIMEOUT" train-step --precision bf16 --compile
    bench train_bf16_compile_warm "$LONG" train-step --precision bf16 --compile
    ensure_data
    run train_e2e_bf16_compile "$LONG" "$PYTHON" -m ivpt.cli bench train --data "$DATA" --workers "$WORKERS" \
        --precision bf16 --compile "${MODEL[@]}" "${E2E_COUNTS[@]}"
fi

echo "results: $RESULTS"
