#!/bin/bash
# Neuronal Disentanglement on SmolLM2-135M (docs/RESULTS.md): layers 1 and 28, up_proj and down_proj,
# 90% and 50% sparsity, n = 1, 2, 4, 8, 16 experts calibrated for each linear on 32,768 tokens, measured
# on 8,192 tokens of WikiText-2 raw test. One torch thread; about 25 min on a loaded 2-core CPU.
#   bash benchmarks/neurons_smollm2.sh OUT_DIR [DATA_DIR]     then: python benchmarks/neurons_table.py OUT_DIR
# CALIB=valid (default): calibrate on WikiText-2 valid (tokenized, <unk> version), measure test tokens 0..8191;
# CALIB=same: calibrate on test tokens 0..32767, measure test tokens 32768..40959.
set -euo pipefail
OUT=${1:?usage: neurons_smollm2.sh OUT_DIR [DATA_DIR]}
DATA=${2:-$(dirname "$0")/../../shared/data}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case ${CALIB:-valid} in
  valid) calib=(--calib-data "$DATA/wikitext2_tokens/valid.txt") ;;
  same) calib=() ;;
  *) echo "CALIB must be valid or same" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
MODEL=$($PY -m sparse_ffn.cli models fetch smollm2-135m | tail -1)
for L in 1 28; do for lin in up_proj down_proj; do for s in ${SPARSITIES:-0.9 0.5}; do
  dir=$OUT/L$L-$lin-s$s
  [ -f "$dir/done" ] && continue
  $PY -m sparse_ffn.cli analyze neurons --model "$MODEL" --data "$DATA/wikitext2_raw/wiki.test.raw" "${calib[@]}" \
    --sparsity "$s" --clusters 1,2,4,8,16 --layer $L --linear $lin --tokens 8192 --calib-tokens 32768 \
    --seq-len 512 --top 4 --device cpu --out-dir "$dir" > "$dir.stdout"
  touch "$dir/done"
done; done; done
