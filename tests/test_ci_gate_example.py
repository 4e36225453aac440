"""The README's CI job (examples/ci_gate.sh) on SmolLM2 with PPL-1% thresholds, as the project's CI runs it.

Calibrates PPL-1% CETT thresholds on WikiText-2 valid (2048 tokens: the quickstart's target on a
quarter of its 8192 tokens; on SmolLM2 both give c = 0.037 and mean sparsity 0.30), then runs the example job unchanged: dense and sparse `lm_eval` on the local PIQA
and ARC-Easy configs, gated with per-metric budgets and a minimum sparsity.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, subprocess_env

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ci_gate.sh"
LIMIT = "100"  # documents per task: acc stderr ~0.05, so a 1-point budget would gate noise
MAX_DROP = "acc=0.03,acc_norm=0.03"
MIN_SPARSITY = 0.25


def test_ci_gate_example_passes_on_smollm2_with_ppl1_thresholds(smollm2_dir, shared_data, tmp_path):
    thr = tmp_path / "smollm2_ppl1.json"
    cal = subprocess.run(
        [str(BIN / "sparse-ffn"), "calibrate", "thresholds", "--model", str(smollm2_dir),
         "--data", str(shared_data / "wikitext2_tokens" / "valid.txt"), "--tokens", "2048", "--seq-len", "512",
         "--target-ppl-ratio", "1.01", "--out", str(thr)],
        capture_output=True, text=True, env=subprocess_env(), timeout=1200)
    assert cal.returncode == 0, cal.stderr[-3000:]
    assert cal.stdout.strip().splitlines()[-1] == str(thr)
    made = json.loads(thr.read_text())
    assert 1.0 < made["calibration"]["ppl_ratio"] <= 1.01
    assert made["sparsity"]["mean"] > MIN_SPARSITY  # PPL-1% on SmolLM2 masks ~30% of the activations

    out = tmp_path / "gate-out"
    env = {**subprocess_env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "LIMIT": LIMIT,
           "MAX_DROP": MAX_DROP, "MIN_SPARSITY": str(MIN_SPARSITY), "OUT_DIR": str(out), "BATCH_SIZE": "16"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    job = subprocess.run(["bash", str(SCRIPT), str(thr), str(shared_data)], capture_output=True, text=True,
                         env=env, timeout=1800)
    report = (out / "gate.md").read_text() if (out / "gate.md").exists() else "(no gate.md)"
    assert job.returncode == 0, f"{job.stdout[-3000:]}\n{job.stderr[-3000:]}\n{report}"
    print(report)  # shown with -s / on failure: the numbers behind the verdict

    verdict = json.loads((out / "gate.json").read_text())
    assert verdict["passed"] is True
    assert verdict["comparison"] == "paired"  # both lm_eval runs logged their samples (--log_samples)
    gated = {(c["task"], c["metric"]): c for c in verdict["checks"] if c["kind"] == "max_drop"}
    assert set(gated) == {(t, m) for t in ("piqa_local", "arc_easy_local") for m in ("acc", "acc_norm")}
    for check in gated.values():
        assert check["passed"] and check["baseline"] - check["candidate"] <= 0.03 + 1e-9
    # the sparsity the sparse run reports is the one the thresholds were calibrated for (other text)
    results = json.loads(sorted((out / "sparse").rglob("results_*.json"))[-1].read_text())
    applied = results["config"]["sparse_ffn"]["sparsity"]
    sparsity_check = [c for c in verdict["checks"] if c["kind"] == "min_sparsity"]
    assert len(sparsity_check) == 1 and sparsity_check[0]["passed"]
    assert applied["mean"] >= MIN_SPARSITY and abs(applied["mean"] - made["sparsity"]["mean"]) < 0.05
    assert results["config"]["sparse_ffn"]["thresholds_source"] == str(thr)
