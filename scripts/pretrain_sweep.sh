#!/usr/bin/env bash
# The demo backbone's scaling curve and objective comparison (docs/demo.md, "The demo backbone").
#
#   OUT=/some/folder bash scripts/pretrain_sweep.sh                 # on the CPU (hours), or a GPU: DEVICE=cuda
#   SMOKE=1 OUT=/tmp/sweep bash scripts/pretrain_sweep.sh           # the same steps at a tiny size (minutes)
#
# 1. The shipped recipe (ivpt pretrain-backbone's defaults: self-distillation between masked views with the
#    dense part, appearance and part-appearance terms on the class-free 'generic' family) for COMPUTE times the
#    earlier shipped file's compute, writing a finished snapshot at each of SNAPSHOTS on the way (one run,
#    warm-up / constant rate / decay: each snapshot decays over the last fifth of its own compute).
# 2. The objective comparison at COMPARE, each a run of its own with a cosine schedule: the dense terms without
#    part appearance, self-distillation alone (no renderer signal), and self-distillation with every dense term.
# 3. A table of every file's feature diagnostics (part probe, attribute probes, ideal-prototype NMI on demo-family
#    images) in $OUT/curve.json and on the terminal; with DEMO=1, `ivpt demo` on each file too.
# Files: $OUT/default.safetensors (+ default_c<C>.safetensors), $OUT/dense_c<COMPARE>.safetensors,
# $OUT/distill_c<COMPARE>.safetensors, $OUT/distill_dense_c<COMPARE>.safetensors, their logs in $OUT/*.log.
set -u

OUT=${OUT:-/tmp/ivpt_sweep}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "${SMOKE:-0}" = "1" ]; then
    COMPUTE=${COMPUTE:-0.004}; SNAPSHOTS=${SNAPSHOTS:-0.001,0.002}; COMPARE=${COMPARE:-0.001}
    DATA=(--num-classes 4 --per-class 40); DEMO_FLAGS=(--fast)
else
    COMPUTE=${COMPUTE:-4}; SNAPSHOTS=${SNAPSHOTS:-0.25,0.5,1,2}; COMPARE=${COMPARE:-0.25}
    DATA=(); DEMO_FLAGS=()
fi
PRETRAIN=("$PYTHON" -m ivpt.cli pretrain-backbone --device "$DEVICE" --data-dir "$OUT/data" "${DATA[@]}")

# The four runs share the cached images; on one machine they run side by side (one thread each).
"${PRETRAIN[@]}" --out "$OUT/default.safetensors" --compute "$COMPUTE" --snapshots "$SNAPSHOTS" \
    > "$OUT/default.log" 2>&1 &
sleep 5  # a head start: a run draws the images unless another has cached them (the same images either way)
"${PRETRAIN[@]}" --out "$OUT/dense_c$COMPARE.safetensors" --compute "$COMPARE" --snapshots none \
    --part-appearance-weight 0 > "$OUT/dense.log" 2>&1 &
"${PRETRAIN[@]}" --out "$OUT/distill_c$COMPARE.safetensors" --compute "$COMPARE" --snapshots none \
    --distill-weight 1 --part-weight 0 --appearance-weight 0 --part-appearance-weight 0 > "$OUT/distill.log" 2>&1 &
"${PRETRAIN[@]}" --out "$OUT/distill_dense_c$COMPARE.safetensors" --compute "$COMPARE" --snapshots none \
    --distill-weight 1 > "$OUT/distill_dense.log" 2>&1 &
wait

if [ "${DEMO:-0}" = "1" ]; then
    for file in "$OUT"/*.safetensors; do
        name=$(basename "$file" .safetensors)
        "$PYTHON" -m ivpt.cli demo "${DEMO_FLAGS[@]}" --out "$OUT/demo_$name" --backbone "$file" \
            > "$OUT/demo_$name.log" 2>&1
    done
fi

"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from ivpt.demo.pretrain import weight_file_recipe

out = Path(sys.argv[1])
rows = {}
for path in sorted(out.glob("*.safetensors")):
    recipe = weight_file_recipe(path)
    rows[path.stem] = {key: recipe.get(key) for key in ("compute", "steps", "minutes", "threads", "device", "command")}
    rows[path.stem]["diagnostics"] = recipe.get("diagnostics")
    demo = out / f"demo_{path.stem}" / "results.json"
    if demo.is_file():
        rows[path.stem]["demo"] = json.loads(demo.read_text())
(out / "curve.json").write_text(json.dumps(rows, indent=1) + "\n")
print(f"{'file':<28}{'compute':>8}{'part probe':>11}{'head':>7}{'wing':>7}{'beak':>7}{'ideal NMI':>12}")
for name, row in rows.items():
    d = row["diagnostics"] or {}
    probes = d.get("attribute_probe_accuracy") or {}
    nmi = d.get("part_centroid_nmi") or []
    print(
        f"{name:<28}{row['compute']:>8}{d.get('part_probe_accuracy', '-'):>11}"
        f"{probes.get('head_colour', '-'):>7}{probes.get('wing_pattern', '-'):>7}{probes.get('beak_shape', '-'):>7}"
        f"{(f'{min(nmi):.1f}-{max(nmi):.1f}' if nmi else '-'):>12}"
    )
PY
