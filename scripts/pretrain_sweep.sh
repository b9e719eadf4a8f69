#!/usr/bin/env bash
# Pretrain candidate demo backbones side by side on one GPU, then run `ivpt demo` on each (issue 7).
# All use 100 classes x 1000 images, 10 per class held out.
#
#   OUT=/some/folder bash scripts/pretrain_sweep.sh         # on a CUDA machine, from the repository root
#   SMOKE=1 OUT=/tmp/sweep bash scripts/pretrain_sweep.sh   # dry run on the CPU with tiny settings
#
# Candidates (batch 512, the default class-attribute weight 0.1; the first sweep's four 8 px candidates with
# rich targets, at attribute weight 1, are in the README):
#   s8_cell_e30   the first shipped recipe's tokens and targets (8 px tokens, cell targets) at this scale, 30 epochs
#   s4_cell_e12   the shipped recipe (4 px tokens: a 16 x 16 grid at 64 px, cell targets) at this scale, 12 epochs
#   s4_rich_e12   4 px tokens, rich targets, 12 epochs
#   s4_w128_e12   4 px tokens, cell targets, width 128 and 4 heads, 12 epochs
# The pretraining images are drawn once (16 processes) and shared. A tiny model leaves a GPU mostly idle,
# so the trainings run at the same time, each guarded by --max-minutes. Results: $OUT/<name>.safetensors,
# $OUT/results.json (each candidate's demo table and pretraining diagnostics) and $OUT/sweep.log.
set -u

OUT=${OUT:-/tmp/ivpt_sweep}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/sweep.log"
WORK=${WORK:-/tmp/ivpt_sweep_work}
mkdir -p "$WORK"

if [ "${SMOKE:-0}" = "1" ]; then
    PER_CLASS=20; TEST_PER_CLASS=10; CLASSES=10; EPOCHS_SHORT=1; EPOCHS_LONG=2; BATCH=32; MINUTES=0.5; TRAIN_TIMEOUT=300
    DEMO_FLAGS=(--fast); DEMO_TIMEOUT=300; WORKERS=2
else
    PER_CLASS=1000; TEST_PER_CLASS=10; CLASSES=100; EPOCHS_SHORT=12; EPOCHS_LONG=30; BATCH=512; MINUTES=3.5; TRAIN_TIMEOUT=290
    DEMO_FLAGS=(); DEMO_TIMEOUT=180; WORKERS=16
fi
export OMP_NUM_THREADS=4

{
    date
    "$PYTHON" -c "import platform, timm, torch; print('python', platform.python_version(), 'torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
    for module in sklearn scipy matplotlib safetensors yaml tqdm; do
        "$PYTHON" -c "import $module" 2> /dev/null || echo "missing python module: $module"
    done
} >> "$LOG" 2>&1

NAMES=(s8_cell_e30 s4_cell_e12 s4_rich_e12 s4_w128_e12)

# train NAME EPOCHS RECIPE_JSON ARCH_JSON: one candidate, its log in $WORK/NAME.log.
train() {
    local name=$1 epochs=$2 recipe=$3 arch=$4
    timeout "$TRAIN_TIMEOUT" "$PYTHON" - "$name" "$epochs" "$recipe" "$arch" > "$WORK/$name.log" 2>&1 <<PY
import importlib.util, json, sys
from ivpt.demo.pretrain import pretrain_backbone
from ivpt.demo.recipe import PretrainRecipe

name, epochs, options, arch = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
recipe = PretrainRecipe(epochs=epochs, num_classes=$CLASSES, per_class=$PER_CLASS, test_per_class=$TEST_PER_CLASS,
                        batch_size=$BATCH, **options)
pretrain_backbone("$OUT/" + name + ".safetensors", recipe, data_dir="$WORK/data", workers=$WORKERS,
                  progress=True, arch_args=arch, max_minutes=$MINUTES,
                  diagnose=importlib.util.find_spec("sklearn") is not None)
PY
    echo "train $name exit $?" >> "$LOG"
}

# 1. The shared pretraining images (drawn once, cached as .npz in $WORK/data).
start=$(date +%s)
timeout 150 "$PYTHON" - >> "$LOG" 2>&1 <<PY
from pathlib import Path
from ivpt.demo.pretrain import _pretraining_images
from ivpt.demo.recipe import PretrainRecipe

recipe = PretrainRecipe(num_classes=$CLASSES, per_class=$PER_CLASS, test_per_class=$TEST_PER_CLASS)
data = _pretraining_images(recipe, Path("$WORK/data"), $WORKERS)
print("images", data.images.shape, "train", int(data.is_train.sum()))
PY
echo "data exit $? after $(( $(date +%s) - start )) s" >> "$LOG"

# 2. The candidates at once.
start=$(date +%s)
train s8_cell_e30 "$EPOCHS_LONG" '{"token_stride": 8}' '{}' &
train s4_cell_e12 "$EPOCHS_SHORT" '{"token_stride": 4}' '{}' &
train s4_rich_e12 "$EPOCHS_SHORT" '{"token_stride": 4, "appearance": "rich"}' '{}' &
train s4_w128_e12 "$EPOCHS_SHORT" '{"token_stride": 4}' '{"embed_dim": 128, "num_heads": 4}' &
wait
echo "training done after $(( $(date +%s) - start )) s" >> "$LOG"
for name in "${NAMES[@]}"; do
    echo "--- $name" >> "$LOG"
    grep -v "it/s" "$WORK/$name.log" | tail -n 12 >> "$LOG"
done

# 3. The demo on each candidate, at once.
start=$(date +%s)
for name in "${NAMES[@]}"; do
    if [ -f "$OUT/$name.safetensors" ]; then
        timeout "$DEMO_TIMEOUT" "$PYTHON" -m ivpt.cli demo "${DEMO_FLAGS[@]}" --out "$WORK/demo_$name" \
            --backbone "$OUT/$name.safetensors" > "$WORK/demo_$name.log" 2>&1 &
    fi
done
wait
echo "demos done after $(( $(date +%s) - start )) s" >> "$LOG"

"$PYTHON" - >> "$LOG" 2>&1 <<PY
import json
from pathlib import Path
from ivpt.demo.pretrain import weight_file_recipe

summary = {}
for name in "${NAMES[*]}".split():
    entry = {}
    weights = Path("$OUT") / f"{name}.safetensors"
    if weights.is_file():
        entry["recipe"] = weight_file_recipe(weights)
    results = Path("$WORK") / f"demo_{name}" / "results.json"
    if results.is_file():
        entry["demo"] = json.loads(results.read_text())
    timings = Path("$WORK") / f"demo_{name}" / "timings.json"
    if timings.is_file():
        entry["demo_timings"] = json.loads(timings.read_text())
    summary[name] = entry
Path("$OUT/results.json").write_text(json.dumps(summary, indent=1))
for name, entry in summary.items():
    print(name, json.dumps(entry.get("recipe", {}).get("diagnostics")), json.dumps(entry.get("demo", {}).get("ivpt")))
PY
for name in "${NAMES[@]}"; do
    echo "--- demo $name" >> "$LOG"
    tail -n 12 "$WORK/demo_$name.log" >> "$LOG" 2>/dev/null
done
date >> "$LOG"
cat "$LOG"
