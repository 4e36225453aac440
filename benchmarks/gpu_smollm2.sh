#!/usr/bin/env bash
# The GPU checks of issues #13 and #16 in one short run (about 6 minutes on one H200), each step under its
# own time limit so that one slow step cannot take the others' time:
#   1. calibrate_speed.py: PPL-1% thresholds, ours vs the plain reference, on the GPU (8192 WikiText-2 valid
#      tokens, rows of 1024), with peak GPU memory of each;
#   2. expansion_speed.py: Sparse Expansion calibration at K=1 and K=16 (50%, 16 x 512 tokens) against the
#      floor, then paper_perplexity of the K=16 artifact in memory and layer-streamed (2 and 16 windows of
#      512), with peak GPU memory of each.
#
#   MODEL=~/.cache/sparse-ffn/models/smollm2-135m DATA=../shared/data OUT=/tmp/gpu bash benchmarks/gpu_smollm2.sh
#
# Logs and JSON summaries go to $OUT (calibrate_speed.{log,json}, expansion_speed.log).
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:?MODEL=local model directory}"
DATA="${DATA:-../shared/data}"
OUT="${OUT:-/tmp/sparse_ffn_gpu}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'EOF' 2>&1 | tee "$OUT/environment.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF

timeout "${CALIBRATE_LIMIT_S:-150}" "$PY" benchmarks/calibrate_speed.py --model "$MODEL" --device "$DEVICE" \
  --data "$DATA/wikitext2_tokens/valid.txt" --tokens 8192 --seq-len 1024 --target 1.01 \
  --json "$OUT/calibrate_speed.json" 2>&1 | tee "$OUT/calibrate_speed.log"
echo "calibrate_speed exit ${PIPESTATUS[0]}"

timeout "${EXPANSION_LIMIT_S:-270}" "$PY" benchmarks/expansion_speed.py --model "$MODEL" --device "$DEVICE" \
  --data "$DATA/wikitext2_tokens/valid.txt" --eval-data "$DATA/wikitext2_raw/wiki.test.raw" \
  --nsamples 16 --seq-len 512 --clusters 1,16 --eval-seq-len 512 --eval-windows 2,16 --repeats 3 \
  --threads "${THREADS:-4}" 2>&1 | tee "$OUT/expansion_speed.log"
echo "expansion_speed exit ${PIPESTATUS[0]}"
