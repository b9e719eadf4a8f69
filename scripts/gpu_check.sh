#!/usr/bin/env bash
# One-shot GPU benchmark of IVPT (issue 6): the training step and inference against the bare backbone.
#
#   OUT=/some/folder bash scripts/gpu_check.sh         # on a CUDA machine, from the repository root
#   SMOKE=1 OUT=/tmp/check bash scripts/gpu_check.sh   # dry run on the CPU with a tiny ViT
#
# Every `ivpt bench` result is printed and appended to $OUT/gpu_bench.jsonl with a "label" field; a
# command that fails or times out appends {"label": ..., "error": ...} instead and the script goes on.
# Versions and the device go to $OUT/environment.txt. Budget: about 3 minutes on an H200.
set -u

OUT=${OUT:-/tmp/ivpt_gpu_check}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="$OUT/gpu_bench.jsonl"
: > "$RESULTS"

if [ "${SMOKE:-0}" = "1" ]; then
    # A 12-block, 192-wide ViT on 32 px inputs (2 x 2 patches): every code path, seconds on a CPU.
    MODEL=(--arch vit_tiny_patch16_224 --img-size 32 --batch 2 --device cpu --n-pro 5,4,3)
    COUNTS=(--steps 2 --warmup 1)
    SHORT=300; LONG=900
    # Tiny nets on a shared CPU: a second thread only waits on the first.
    export OMP_NUM_THREADS=1
    # The dry run checks that compilation works, not how fast CPU kernels run: scalar C++ kernels compile
    # in about three quarters of the time of vectorised ones (a cold compile step: 190 against 253 s).
    export TORCHINDUCTOR_VEC_ISA_OK=${TORCHINDUCTOR_VEC_ISA_OK:-0}
else
    MODEL=(--arch vit_base_patch14_reg4_dinov2.lvd142m --img-size 518 --batch 16 --device cuda)
    COUNTS=(--steps 10 --warmup 3)
    SHORT=60; LONG=90
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
# Last: compilation time is hard to predict, and a timeout here loses nothing else.
bench train_bf16_compile "$LONG" train-step --precision bf16 --compile

echo "results: $RESULTS"
