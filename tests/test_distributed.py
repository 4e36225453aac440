"""Several processes (`accelerate launch`, gloo on CPU) through the real `lm_eval` script: the same
scores as one process, and exactly the same sparsity and expert-usage counts in rank 0's results JSON.

The tasks are built to hit every place where lm-eval pads or repeats work across ranks: an odd number
of documents per task (the evaluator pads the short rank with clones of its last request), documents
duplicated within and across ranks, and rolling windows in unequal numbers per rank (HFLM pads them
with copies of the rank's first window).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, read_results, read_samples, run_lm_eval, subprocess_env
from sparse_ffn.core.ffn import find_ffns, model_fingerprint
from sparse_ffn.tasks.local import stock_tasks_dir
from sparse_ffn.artifacts.thresholds import ThresholdFile
from test_smollm2 import quantile_thresholds  # noqa: F401 - a fixture, shared
from tiny import make_tiny_experts

pytestmark = pytest.mark.skipif(not (BIN / "accelerate").is_file(), reason="accelerate's launcher not installed")

TASKS = "dist_piqa,dist_wikitext,dist_gen"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_accelerate(args: list[str], out_dir: Path, processes: int = 2) -> tuple[dict, str]:
    """`accelerate launch -m lm_eval ARGS` with `processes` CPU processes; (results JSON, stderr).

    accelerate's `--cpu` launches one process (several need MPI), so the workers are started the
    multi-GPU way (torchrun) with ACCELERATE_USE_CPU=1: accelerate then sets them up as MULTI_CPU (gloo).
    """
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "lm_eval", *args, "--output_path", str(out_dir)]
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return read_results(out_dir), proc.stderr


@pytest.fixture(scope="module")
def dist_tasks(shared_data, tmp_path_factory) -> Path:
    """Three small tasks: loglikelihood (PIQA docs A A B C B D E), loglikelihood_rolling (WikiText
    pages P P Q, cut short) and generate_until (the PIQA docs, 4 greedy tokens)."""
    d = tmp_path_factory.mktemp("dist_tasks")
    rows = [json.loads(line) for line in (shared_data / "piqa" / "piqa_validation.jsonl").open()]
    a, b, c, dd, e = [r for r in rows if len(r["goal"]) + max(len(r["sol1"]), len(r["sol2"])) < 90][:5]
    (d / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (a, a, b, c, b, dd, e)))
    wiki = shared_data / "wikitext2_raw" / "wikitext-2-raw-v1_test_document_level.jsonl"
    pages = [json.loads(line)["page"] for _, line in zip(range(2), wiki.open())]
    p, q = pages[0][:700], pages[1][:400]
    (d / "wiki.jsonl").write_text("".join(json.dumps({"page": x}) + "\n" for x in (p, p, q)))
    stock = stock_tasks_dir()
    local = {"tag": [], "dataset_path": "json", "dataset_name": None, "training_split": None,
             "validation_split": None, "test_split": None}
    configs = {
        "dist_piqa": {"include": str(stock / "piqa" / "piqa.yaml"), **local, "validation_split": "validation",
                      "dataset_kwargs": {"data_files": {"validation": str(d / "piqa.jsonl")}}},
        "dist_wikitext": {"include": str(stock / "wikitext" / "wikitext.yaml"), **local, "test_split": "test",
                          "dataset_kwargs": {"data_files": {"test": str(d / "wiki.jsonl")}}},
        "dist_gen": {**local, "validation_split": "validation", "output_type": "generate_until",
                     "dataset_kwargs": {"data_files": {"validation": str(d / "piqa.jsonl")}},
                     "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "{{sol1}}",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
                     "metric_list": [{"metric": "exact_match"}]},
    }
    for name, cfg in configs.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **cfg}, sort_keys=False))
    return d


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(thresholds file masking ~20% on the tiny model, experts directory with K=2)."""
    import transformers

    root = tmp_path_factory.mktemp("dist_artifacts")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ffns = find_ffns(model)
    thr = root / "thr.json"
    ThresholdFile(thresholds=[2e-4] * len(ffns),
                  model={"name_or_path": str(tiny_llama_dir), **model_fingerprint(model, ffns)}).save(thr)
    return thr, make_tiny_experts(tiny_llama_dir, root / "experts")


def _answers(out_dir: Path, task: str) -> list:
    """Per document, the first answer to each of its requests: (loglikelihood, is_greedy) | loglikelihood
    | generated text. (A rank's padding clones append more answers to its last request.)"""
    return [[resp[0] for resp in s["resps"]] for s in read_samples(out_dir, task)]


def assert_same_run(one: dict, many: dict, one_dir: Path, many_dir: Path, tasks: list[str]) -> None:
    """Scores equal (up to float noise from other batch compositions), counts exactly equal."""
    for task in tasks:
        for metric, value in one["results"][task].items():
            if isinstance(value, float):
                assert many["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
        for doc1, doc2 in zip(_answers(one_dir, task), _answers(many_dir, task), strict=True):
            for a, b in zip(doc1, doc2, strict=True):  # as the samples file writes them: strings
                if isinstance(a, list):  # loglikelihood: [logprob, is_greedy]
                    assert a[1] == b[1], (task, a, b)
                    a, b = a[0], b[0]
                if a != b:  # a log-likelihood computed in another batch; generated text must be equal
                    assert float(b) == pytest.approx(float(a), rel=1e-5, abs=1e-4), (task, a, b)
    s1, s2 = one["config"]["sparse_ffn"], many["config"]["sparse_ffn"]
    assert s1["sparsity"]["tokens"] > 0
    assert s2["sparsity"] == s1["sparsity"]  # tokens, mean and per-layer: the very same numbers
    assert s2.get("expert_usage") == s1.get("expert_usage")


def test_two_processes_equal_one_process_tiny(tiny_llama_dir, tiny_artifacts, dist_tasks, tmp_path):
    thr, experts = tiny_artifacts
    args = ["--model", "sparse_ffn", "--model_args",
            f"pretrained={tiny_llama_dir},thresholds={thr},experts={experts},max_length=64,dtype=float32",
            "--tasks", TASKS, "--include_path", str(dist_tasks), "--device", "cpu", "--batch_size", "2",
            "--log_samples"]
    one = run_lm_eval(args, tmp_path / "one")
    many, stderr = run_accelerate(args, tmp_path / "many")
    assert "on rank 1" in stderr  # really two ranks, each with its share of the documents
    assert_same_run(one, many, tmp_path / "one", tmp_path / "many", TASKS.split(","))
    usage = one["config"]["sparse_ffn"]["expert_usage"]
    assert usage["tokens"] == one["config"]["sparse_ffn"]["sparsity"]["tokens"]
    assert 0.0 < one["config"]["sparse_ffn"]["sparsity"]["mean"] < 1.0


@pytest.mark.slow
def test_two_processes_equal_one_process_smollm2(smollm2_dir, quantile_thresholds, local_tasks, tmp_path):
    args = ["--model", "sparse_ffn", "--model_args", f"thresholds={quantile_thresholds},max_length=256,dtype=float32",
            "--tasks", "piqa_local,wikitext_local", "--include_path", str(local_tasks), "--device", "cpu",
            "--samples", json.dumps({"piqa_local": [0, 1, 2], "wikitext_local": [28, 29]}),  # 1 and 3 windows
            "--batch_size", "1", "--log_samples"]  # one row per forward: the same arithmetic in both runs
    one = run_lm_eval(args, tmp_path / "one")
    many, stderr = run_accelerate(args, tmp_path / "many")
    assert "on rank 1" in stderr
    assert_same_run(one, many, tmp_path / "one", tmp_path / "many", ["piqa_local", "wikitext_local"])
