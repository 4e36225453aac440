#!/usr/bin/env bash
# CI quality gate: evaluate SmolLM2-135M dense and with CETT thresholds on piqa + arc_easy (local data),
# then fail the job when the sparse model loses more accuracy than the budget allows. Both lm_eval runs
# log their per-item results (--log_samples), so the gate compares them paired over the same items.
#
#   examples/ci_gate.sh THRESHOLDS.json [DATA_DIR]
#
# THRESHOLDS.json: a threshold file for SmolLM2-135M (e.g. from `sparse-ffn calibrate thresholds`);
#   may also be given as $THRESHOLDS. It must not contain a comma (lm_eval splits --model_args on commas).
# DATA_DIR: folder with piqa/ and arc_easy/ JSONL files (or $DATA_DIR).
# Environment (all optional):
#   TASKS=piqa_local,arc_easy_local  tasks (any written by `sparse-ffn tasks write`, e.g. wikitext_local)
#   LIMIT=50            documents per task (the paired CI of an accuracy drop narrows as 1/sqrt(LIMIT):
#                       the gate prints the minimum detectable effect at this size)
#   MAX_DROP=...        e.g. acc=0.02,acc_norm=0.02 (default: the gate's acc=0.01,acc_norm=0.01)
#   MIN_SPARSITY=0.3    also require this mean FFN sparsity of the sparse run
#   OUT_DIR=gate-out    where results, gate.md, gate.png and gate.json go (upload it as an artifact)
#   DEVICE=cpu BATCH_SIZE=8 MAX_LENGTH=512 SPARSE_FFN_CACHE=...  (model cache, worth caching in CI)
# Exit status: the gate's (0 pass, 1 a budget fails, 2 unusable input); any other failure stops earlier.
set -euo pipefail

THR=${1:-${THRESHOLDS:-}}
DATA=${2:-${DATA_DIR:-}}
if [[ -z "$THR" || -z "$DATA" ]]; then
    echo "usage: $0 THRESHOLDS.json DATA_DIR   (or set THRESHOLDS and DATA_DIR)" >&2
    exit 2
fi
[[ -f "$THR" ]] || { echo "$0: error: $THR: thresholds file not found" >&2; exit 2; }
THR=$(cd "$(dirname "$THR")" && pwd)/$(basename "$THR")
[[ "$THR" != *,* ]] || { echo "$0: error: $THR: path contains a comma" >&2; exit 2; }

LIMIT=${LIMIT:-50}
OUT=${OUT_DIR:-gate-out}
TASKS=${TASKS:-piqa_local,arc_easy_local}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

MODEL=$(sparse-ffn models fetch smollm2-135m | tail -n 1)
TASK_DIR=$(sparse-ffn tasks write --data-dir "$DATA" --out "$OUT/tasks" | tail -n 1)
rm -rf "$OUT/dense" "$OUT/sparse"  # the gate reads the newest results file: leave no stale ones

run_eval() {  # run_eval NAME MODEL_ARGS
    echo "::group::lm_eval $1 ($TASKS, limit $LIMIT)"
    echo "sparse-ffn ci_gate: lm_eval $1: $2 on $TASKS, $LIMIT documents per task" >&2
    lm_eval --model sparse_ffn --model_args "pretrained=$MODEL,$2,max_length=${MAX_LENGTH:-512}" \
        --tasks "$TASKS" --include_path "$TASK_DIR" --limit "$LIMIT" --log_samples \
        --device "${DEVICE:-cpu}" --batch_size "${BATCH_SIZE:-8}" --output_path "$OUT/$1"
    echo "::endgroup::"
}
run_eval dense "strategy=dense"
run_eval sparse "thresholds=$THR"

gate_args=(--baseline "$OUT/dense" --candidate "$OUT/sparse" --summary "$OUT/gate.md" --plot "$OUT/gate.png")
[[ -n "${MAX_DROP+set}" ]] && gate_args+=(--max-drop "$MAX_DROP")  # set but empty: no budgets
[[ -n "${MIN_SPARSITY:-}" ]] && gate_args+=(--min-sparsity "$MIN_SPARSITY")

status=0
sparse-ffn gate "${gate_args[@]}" > "$OUT/gate.log" || status=$?
cat "$OUT/gate.log"
tail -n 1 "$OUT/gate.log" > "$OUT/gate.json" || true
# append (the step summary file may already hold other output of this step)
if [[ -n "${GITHUB_STEP_SUMMARY:-}" && -f "$OUT/gate.md" ]]; then
    cat "$OUT/gate.md" >> "$GITHUB_STEP_SUMMARY"
fi
exit "$status"
