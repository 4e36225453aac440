"""Issue #3 acceptance: the file `sparse-ffn calibrate thresholds` writes loads in `lm_eval --model
sparse_ffn`, and the sparsity lm-eval reports on the calibration text matches the file's within 1 point
(same text, max_length = the calibration seq_len). Both real console scripts, in subprocesses.

A fixed --cett: on a random model no PPL target is meaningful (masking its random FFNs lowers the
perplexity, so any target is met at c = 1 and ~99% sparsity); c = 0.1 gives about half the neurons
masked, where a mismatch in counting would show most.

Why they can differ at all: calibration cuts the token stream into non-overlapping windows
t[kL:(k+1)L]; lm-eval's loglikelihood_rolling feeds [BOS] + t[0:L-1], then t[L-1:2L-1], ... (each
window shifted by one token, a BOS in front of the first). The text here is cut to exactly n*L tokens,
so both count n*L tokens, the same ones but BOS for the last token and one position apart.
"""

from __future__ import annotations

import json
import random
import subprocess

import pytest
import yaml

from conftest import BIN, run_lm_eval, subprocess_env
from tiny import CORPUS, make_tiny_model

from sparse_ffn.artifacts import thresholds as threshold_file

SEQ_LEN = 128
WINDOWS = 16


def _text_of_exactly(tokenizer, n_tokens: int) -> str:
    """Pseudo-random sentences from CORPUS's lines (seeded), cut so that the text encodes to exactly
    `n_tokens` tokens (and decoding the ids gives the text back)."""
    lines = CORPUS.splitlines(keepends=True)
    for seed in range(50):
        rng = random.Random(seed)
        words = " ".join(rng.choice(lines) for _ in range(4 * n_tokens // 20)).split(" ")
        rng.shuffle(words)
        ids = tokenizer(" ".join(words))["input_ids"]
        assert len(ids) > n_tokens
        text = tokenizer.decode(ids[:n_tokens])
        if tokenizer(text)["input_ids"] == ids[:n_tokens]:
            return text
    raise AssertionError("no text that round-trips at the cut")


@pytest.mark.slow
def test_lm_eval_reports_the_calibrated_sparsity(tmp_path):
    from transformers import AutoTokenizer

    model_dir = make_tiny_model("llama", tmp_path / "model", initializer_range=0.1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_tokens = WINDOWS * SEQ_LEN
    data = tmp_path / "calib.jsonl"  # one document: `calibrate` reads its "text", lm-eval its rows
    data.write_text(json.dumps({"text": _text_of_exactly(tokenizer, n_tokens)}) + "\n")

    thr_path = tmp_path / "thr.json"
    proc = subprocess.run([str(BIN / "sparse-ffn"), "calibrate", "thresholds", "--model", str(model_dir),
                           "--data", str(data), "--tokens", str(n_tokens), "--seq-len", str(SEQ_LEN),
                           "--cett", "0.1", "--device", "cpu", "--no-progress", "--out", str(thr_path)],
                          capture_output=True, text=True, env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    thr = threshold_file.load(thr_path)
    assert thr.sparsity["tokens"] == n_tokens and 0.2 < thr.sparsity["mean"] < 0.8

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "calib_text.yaml").write_text(yaml.safe_dump({
        "task": "calib_text", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    }, sort_keys=False))
    results = run_lm_eval(["--model", "sparse_ffn", "--model_args",
                           f"pretrained={model_dir},thresholds={thr_path},max_length={SEQ_LEN},dtype=float32",
                           "--tasks", "calib_text", "--include_path", str(tasks), "--device", "cpu",
                           "--batch_size", "4"], tmp_path / "lm_eval")
    reported = results["config"]["sparse_ffn"]["sparsity"]
    print(f"\ncalibration file: mean {thr.sparsity['mean']:.5f} per layer {thr.sparsity['per_layer']}\n"
          f"lm-eval reported: mean {reported['mean']:.5f} per layer {reported['per_layer']} "
          f"({reported['tokens']} tokens)")
    assert reported["tokens"] == n_tokens  # every rolling window's input, once: BOS + all tokens but the last
    assert abs(reported["mean"] - thr.sparsity["mean"]) < 0.01
    assert all(abs(a - b) < 0.01 for a, b in zip(reported["per_layer"], thr.sparsity["per_layer"]))
    assert results["config"]["sparse_ffn"]["thresholds_calibration"]["cett"] == thr.calibration["cett"]
