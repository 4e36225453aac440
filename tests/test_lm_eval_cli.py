"""The real `lm_eval` console script with `--model sparse_ffn` on a tiny random model (subprocesses)."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import BIN, read_samples, run_lm_eval, subprocess_env
from sparse_ffn.core.ffn import find_ffns, model_fingerprint
from sparse_ffn.artifacts.thresholds import ThresholdFile

TASKS = "piqa_local,arc_easy_local"


def _common(model_args: str, local_tasks, batch_size="4", limit="12") -> list[str]:
    return ["--model_args", model_args + ",max_length=256,dtype=float32", "--tasks", TASKS,
            "--include_path", str(local_tasks), "--limit", limit, "--device", "cpu",
            "--batch_size", batch_size, "--log_samples"]


def _loglikelihoods(out_dir, task):
    return [float(r[0][0]) for s in read_samples(out_dir, task) for r in s["resps"]]


@pytest.fixture(scope="module")
def thresholds_file(tiny_llama_dir, tmp_path_factory):
    """A v1 file with thresholds that mask a sizeable fraction on the tiny model."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ffns = find_ffns(model)
    path = tmp_path_factory.mktemp("thr") / "thr.json"
    # s_i = |a_i| * ||w_i|| is of order 1e-3 on the tiny random model
    ThresholdFile(thresholds=[2e-4] * len(ffns), model={"name_or_path": str(tiny_llama_dir),
                                                        **model_fingerprint(model, ffns)}).save(path)
    return path


def test_zero_thresholds_and_dense_equal_hf_exactly(tiny_llama_dir, local_tasks, tmp_path):
    runs = {
        "hf": ("hf", f"pretrained={tiny_llama_dir}"),
        "zero": ("sparse_ffn", f"pretrained={tiny_llama_dir},thresholds=[0,0,0]"),
        "dense": ("sparse_ffn", f"pretrained={tiny_llama_dir},strategy=dense"),
    }
    results = {}
    for name, (model, args) in runs.items():
        results[name] = run_lm_eval(["--model", model, *_common(args, local_tasks)], tmp_path / name)
    for task in TASKS.split(","):
        ref = _loglikelihoods(tmp_path / "hf", task)
        assert len(ref) >= 24  # 12 docs, 2+ choices each
        assert _loglikelihoods(tmp_path / "zero", task) == ref
        assert _loglikelihoods(tmp_path / "dense", task) == ref
        assert results["zero"]["results"][task]["acc,none"] == results["hf"]["results"][task]["acc,none"]
    block = results["zero"]["config"]["sparse_ffn"]
    assert block["strategy"] == "cett" and block["sparsity"]["mean"] == 0.0
    assert block["sparsity"]["tokens"] > 0


def test_sparsity_block_identical_across_batch_sizes(tiny_llama_dir, local_tasks, thresholds_file, tmp_path):
    blocks, lls = {}, {}
    for bs in ("1", "8", "auto"):
        res = run_lm_eval(["--model", "sparse_ffn", *_common(f"thresholds={thresholds_file}", local_tasks, bs)],
                          tmp_path / bs)
        blocks[bs] = res["config"]["sparse_ffn"]["sparsity"]
        lls[bs] = _loglikelihoods(tmp_path / bs, "piqa_local")
    sp = blocks["1"]
    assert 0.05 < sp["mean"] < 0.95, sp
    assert len(sp["per_layer"]) == 3
    # real tokens only: sum over requests of the scored input length, identical whatever the batching
    samples = read_samples(tmp_path / "1", "piqa_local") + read_samples(tmp_path / "1", "arc_easy_local")
    assert sp["tokens"] > 0
    for bs in ("8", "auto"):
        assert blocks[bs]["tokens"] == sp["tokens"]
        assert blocks[bs]["per_layer"] == sp["per_layer"]
        assert lls[bs] == pytest.approx(lls["1"], abs=1e-4)
    assert samples


def test_token_count_is_the_scored_input_length(tiny_llama_dir, local_tasks, tmp_path):
    """tokens counted == sum of len((ctx + cont)[:-1]) over distinct forwarded requests (no padding)."""
    import transformers

    res = run_lm_eval(["--model", "sparse_ffn", *_common(f"pretrained={tiny_llama_dir},strategy=dense",
                                                         local_tasks, "8", "5")], tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    inputs = set()  # lm-eval forwards each distinct input (ctx + cont)[:-1] once
    for task in TASKS.split(","):
        for s in read_samples(tmp_path, task):
            for arg in s["arguments"].values():
                ctx, cont = arg["arg_0"], arg["arg_1"]
                n = len(ctx) - len(ctx.rstrip())  # lm-eval moves trailing spaces to the continuation
                ctx, cont = ctx[: len(ctx) - n], ctx[len(ctx) - n:] + cont
                whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
                inputs.add(tuple(whole[-257:][:-1]))
    expected = sum(len(x) for x in inputs)
    assert res["config"]["sparse_ffn"]["sparsity"]["tokens"] == expected


def test_python_m_lm_eval_and_hf_still_resolve(tiny_llama_dir, local_tasks, tmp_path):
    cmd = [str(BIN / "python"), "-m", "lm_eval", "--model", "sparse_ffn",
           *_common(f"pretrained={tiny_llama_dir},strategy=topk,prune_arg=0.5", local_tasks, limit="3"),
           "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert res["config"]["sparse_ffn"]["sparsity"]["mean"] == pytest.approx(0.5)


BAD = {
    "layers": ('{"format": "sparse-ffn/thresholds", "version": 1, "thresholds": [0.1, 0.1]}', "2 thresholds"),
    "d_ff": ('{"format": "sparse-ffn/thresholds", "version": 1, "thresholds": [0.1, 0.1, 0.1],'
             ' "model": {"num_layers": 3, "d_ff": 999}}', "d_ff=999"),
    "nan": ('{"format": "sparse-ffn/thresholds", "version": 1, "thresholds": [0.1, NaN, 0.1]}', "nan"),
    "notjson": ("{oops", "not valid JSON"),
    "missing": (None, "not found"),
}


def test_bad_threshold_files_exit_nonzero_with_one_line(tiny_llama_dir, local_tasks, tmp_path):
    procs = {}
    for name, (content, _) in BAD.items():
        path = tmp_path / f"{name}.json"
        if content is not None:
            path.write_text(content)
        cmd = [str(BIN / "lm_eval"), "--model", "sparse_ffn", "--model_args",
               f"pretrained={tiny_llama_dir},thresholds={path}", "--tasks", "piqa_local",
               "--include_path", str(local_tasks), "--limit", "1", "--device", "cpu"]
        procs[name] = (path, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=subprocess_env()))
    for name, (path, proc) in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode != 0, name
        errors = [line for line in err.splitlines() if line.startswith("sparse-ffn: error:")]
        assert len(errors) == 1 and str(path) in errors[0] and BAD[name][1] in errors[0], err[-2000:]
        assert "Traceback" not in err


def test_sparse_ffn_eval_wrapper_runs_lm_eval_with_our_model(tiny_llama_dir, local_tasks, tmp_path):
    res = run_lm_eval(["eval", *_common(f"pretrained={tiny_llama_dir},strategy=topk,prune_arg=0.25", local_tasks,
                                        limit="2")], tmp_path, script="sparse-ffn")
    assert res["config"]["model"] == "sparse_ffn"
    assert res["config"]["sparse_ffn"]["sparsity"]["mean"] == pytest.approx(0.75)


def test_model_named_by_the_threshold_file_names_the_output_folder_and_the_run_end_line(
        tiny_llama_dir, local_tasks, thresholds_file, tmp_path):
    """No pretrained=: lm-eval files the results under the model the threshold file names (as with
    pretrained=, not a random folder), and the adapter logs one summary line at the end of the run."""
    from lm_eval.utils import sanitize_model_name

    runs = {"artifact": f"thresholds={thresholds_file}",
            "explicit": f"pretrained={tiny_llama_dir}/,thresholds={thresholds_file}"}  # pretrained= wins
    procs = {}
    for name, args in runs.items():
        cmd = [str(BIN / "lm_eval"), "--model", "sparse_ffn", *_common(args, local_tasks, limit="2"),
               "--output_path", str(tmp_path / name)]
        procs[name] = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    for name, proc in procs.items():
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = str(tiny_llama_dir) + ("/" if name == "explicit" else "")
        files = list((tmp_path / name).rglob("results_*.json"))
        assert len(files) == 1 and files[0].parent == tmp_path / name / sanitize_model_name(expected), files
        assert {p.name.split("_2")[0] for p in files[0].parent.glob("samples_*.jsonl")} == \
            {f"samples_{t}" for t in TASKS.split(",")}
        res = json.loads(files[0].read_text())
        assert res["model_name"] == expected and res["model_name_sanitized"] == sanitize_model_name(expected)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sparse-ffn: run done:")]
        assert len(lines) == 1, proc.stderr[-3000:]
        sp = res["config"]["sparse_ffn"]["sparsity"]
        assert 0.05 < sp["mean"] < 0.95 and sp["tokens"] > 0
        assert lines[0] == (f"sparse-ffn: run done: model {expected}; strategy cett (thresholds thr.json); "
                            f"mean FFN sparsity {sp['mean']:.4f} over 3 layers "
                            f"({min(sp['per_layer']):.3f}-{max(sp['per_layer']):.3f}); {sp['tokens']} tokens counted")


def test_device_and_batch_size_in_model_args_win_over_lm_evals_defaults(tiny_llama_dir, local_tasks, tmp_path):
    """lm-eval passes its --device default (cuda:0) and --batch_size default (1) even when they were not
    given; with them also in --model_args, HFLM fails ("multiple values for keyword argument"). Ours
    takes --model_args' values."""
    res = run_lm_eval(["--model", "sparse_ffn", "--model_args",
                       f"pretrained={tiny_llama_dir},strategy=topk,prune_arg=0.5,device=cpu,batch_size=3,max_length=256",
                       "--tasks", "piqa_local", "--include_path", str(local_tasks), "--limit", "2"], tmp_path)
    assert res["config"]["sparse_ffn"]["sparsity"]["mean"] == pytest.approx(0.5)
    assert res["config"]["model_args"]["device"] == "cpu"
