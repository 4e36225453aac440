"""`sparse-ffn gate` on real lm-eval results files (the `lm_eval` script on the tiny model), run as a user would."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, read_results, subprocess_env
from sparse_ffn.core.ffn import find_ffns, model_fingerprint
from sparse_ffn.artifacts.thresholds import ThresholdFile

TASKS = ("piqa_local", "arc_easy_local")


def dense_and_cett_runs(root: Path, model_dir: Path, local_tasks: Path, *, log_samples: bool) -> dict[str, Path]:
    """Output dirs of one dense and one cett `lm_eval --model sparse_ffn` run of `model_dir` on TASKS (the two
    run concurrently; with `--log_samples` when asked)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ffns = find_ffns(model)
    thr = ThresholdFile(thresholds=[2e-4] * len(ffns), model={"name_or_path": str(model_dir),
                                                              **model_fingerprint(model, ffns)}).save(root / "thr.json")
    procs = {}
    for name, extra in (("dense", "strategy=dense"), ("cett", f"thresholds={thr}")):
        cmd = [str(BIN / "lm_eval"), "--model", "sparse_ffn", "--model_args",
               f"pretrained={model_dir},{extra},max_length=256,dtype=float32", "--tasks", ",".join(TASKS),
               "--include_path", str(local_tasks), "--limit", "8", "--device", "cpu", "--batch_size", "8",
               "--output_path", str(root / name)] + (["--log_samples"] if log_samples else [])
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       env=subprocess_env())
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
    return {name: root / name for name in procs}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, local_tasks, tmp_path_factory) -> dict[str, Path]:
    """Output dirs of one dense and one cett `lm_eval --model sparse_ffn` run (the two run concurrently)."""
    return dense_and_cett_runs(tmp_path_factory.mktemp("gate_runs"), tiny_llama_dir, local_tasks, log_samples=False)


def _file(out_dir: Path) -> Path:
    return next(Path(out_dir).rglob("results_*.json"))


def _doctor(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    """Copy a results file, applying `edit(data)` to its JSON."""
    data = json.loads(src.read_text())
    edit(data)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(data, indent=2))
    return dst


def gate(*args: str | Path) -> tuple[int, dict | None, str, str]:
    """Run the `sparse-ffn gate` console script; (exit code, last stdout line as JSON or None, stdout, stderr)."""
    proc = subprocess.run([str(BIN / "sparse-ffn"), "gate", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if proc.returncode in (0, 1) else None
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, report, proc.stdout, proc.stderr


def _check(report: dict, task: str | None, metric: str) -> dict:
    return next(c for c in report["checks"] if c["task"] == task and c["metric"] == metric)


def test_real_runs_pass_within_their_observed_drop(runs):
    dense, cett = read_results(runs["dense"]), read_results(runs["cett"])
    drop = max(dense["results"][t][m] - cett["results"][t][m] for t in TASKS for m in ("acc,none", "acc_norm,none"))
    budget = max(drop, 0) + 0.01
    code, report, out, err = gate("--baseline", runs["dense"], "--candidate", runs["cett"],
                                  "--max-drop", f"acc={budget},acc_norm={budget}")
    assert code == 0 and report["passed"] is True, out + err
    assert report["baseline"] == str(_file(runs["dense"])) and report["candidate"] == str(_file(runs["cett"]))
    assert report["warnings"] == []  # same tasks, limit, n-shot, max_length, versions, weights
    assert {(c["task"], c["metric"]) for c in report["checks"]} == {(t, m) for t in TASKS for m in ("acc", "acc_norm")}
    c = _check(report, "piqa_local", "acc")
    r = dense["results"]["piqa_local"]
    assert c["baseline"] == r["acc,none"] and c["baseline_se"] == r["acc_stderr,none"]
    assert c["se"] == pytest.approx((r["acc_stderr,none"] ** 2 + c["candidate_se"] ** 2) ** 0.5)
    assert c["passed"] is True and c["kind"] == "max_drop"


def test_identical_runs_pass_default_budgets(runs):
    code, report, _, _ = gate("--baseline", runs["dense"], "--candidate", _file(runs["dense"]))
    assert code == 0 and all(c["budget"] == 0.01 and c["diff"] == 0 for c in report["checks"])
    assert len(report["warnings"]) == 1 and "the same file" in report["warnings"][0]


def test_doctored_drop_fails_and_is_flagged_within_noise(runs, tmp_path):
    def drop(d):
        d["results"]["piqa_local"]["acc,none"] -= 0.2

    cand = _doctor(_file(runs["cett"]), tmp_path / "cand.json", drop)
    summary, plot = tmp_path / "out" / "report.md", tmp_path / "out" / "report.png"
    code, report, out, _ = gate("--baseline", runs["dense"], "--candidate", cand, "--max-drop", "acc=0.05",
                                "--summary", summary, "--plot", plot)
    assert code == 1 and report["passed"] is False
    c = _check(report, "piqa_local", "acc")
    base = read_results(runs["dense"])["results"]["piqa_local"]["acc,none"]
    assert c["passed"] is False and c["diff"] == pytest.approx(c["candidate"] - base)
    assert c["within_noise"] is True  # 8 docs: se of the difference ~0.25 > 0.2 / 2
    assert _check(report, "piqa_local", "acc_norm")["passed"] is None  # not named in --max-drop: reported only
    assert "FAIL piqa_local/acc" in out
    md = summary.read_text()
    assert "| task | metric | baseline | candidate | diff ± se | budget | result |" in md
    assert "❌ FAIL (within noise)" in md and "FAILED (1 budget)" in md
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert sorted(p.name for p in plot.parent.iterdir()) == ["report.md", "report.png"]  # no temp files left


def test_drop_beyond_noise_is_not_flagged(runs, tmp_path):
    def precise(delta):  # as if many more documents: stderr 0.01
        def edit(d):
            d["results"]["arc_easy_local"].update({"acc_stderr,none": 0.01, "acc_norm_stderr,none": 0.01})
            d["results"]["arc_easy_local"]["acc,none"] += delta
        return edit

    base = _doctor(_file(runs["dense"]), tmp_path / "b.json", precise(0.0))
    cand = _doctor(_file(runs["dense"]), tmp_path / "c.json", precise(-0.1))
    code, report, _, _ = gate("--baseline", base, "--candidate", cand)
    c = _check(report, "arc_easy_local", "acc")
    assert code == 1 and c["passed"] is False and c["within_noise"] is False and c["note"] == ""


def test_min_sparsity(runs, tmp_path):
    mean = read_results(runs["cett"])["config"]["sparse_ffn"]["sparsity"]["mean"]
    assert 0.05 < mean < 0.95
    ok = ("--baseline", runs["dense"], "--candidate", runs["cett"], "--max-drop", "")
    code, report, _, _ = gate(*ok, "--min-sparsity", f"{mean - 0.01:.4f}")
    c = _check(report, None, "sparsity.mean")
    assert code == 0 and c["passed"] is True and c["candidate"] == mean and c["baseline"] == 0.0
    code, report, _, _ = gate(*ok, "--min-sparsity", f"{mean + 0.01:.4f}")
    assert code == 1 and _check(report, None, "sparsity.mean")["passed"] is False
    # a candidate without our block (e.g. `--model hf`): a failure with a reason, not a crash
    no_block = _doctor(_file(runs["cett"]), tmp_path / "hf.json", lambda d: d["config"].pop("sparse_ffn"))
    code, report, _, _ = gate("--baseline", runs["dense"], "--candidate", no_block, "--min-sparsity", "0.1")
    c = _check(report, None, "sparsity.mean")
    assert code == 1 and c["passed"] is False and "config.sparse_ffn.sparsity.mean" in c["note"]


def test_perplexity_ratio_and_na_stderr(runs, tmp_path):
    """lm-eval writes "N/A" for perplexity stderrs; lower is better; gated by candidate/baseline."""
    def add_ppl(value):
        def edit(d):
            d["results"]["piqa_local"].update({"word_perplexity,none": value, "word_perplexity_stderr,none": "N/A"})
            d["higher_is_better"]["piqa_local"]["word_perplexity"] = False
        return edit

    base = _doctor(_file(runs["dense"]), tmp_path / "b.json", add_ppl(20.0))
    cand = _doctor(_file(runs["dense"]), tmp_path / "c.json", add_ppl(20.6))
    code, report, _, _ = gate("--baseline", base, "--candidate", cand, "--max-ppl-ratio", "1.05")
    c = _check(report, "piqa_local", "word_perplexity")
    assert code == 0 and c["kind"] == "max_ppl_ratio" and c["ratio"] == pytest.approx(1.03) and c["se"] is None
    code, report, _, _ = gate("--baseline", base, "--candidate", cand, "--max-ppl-ratio", "1.02",
                              "--summary", tmp_path / "r.md")
    assert code == 1 and _check(report, "piqa_local", "word_perplexity")["passed"] is False
    assert "± N/A" in (tmp_path / "r.md").read_text()
    code, report, _, _ = gate("--baseline", base, "--candidate", cand)  # no ratio named: reported only
    assert code == 0 and _check(report, "piqa_local", "word_perplexity")["passed"] is None


def test_comparability_warnings(runs, tmp_path):
    def edit(d):
        d["config"]["limit"] = 16.0
        d["config"]["model_args"] = f"pretrained={d['model_name']},strategy=dense,max_length=512"  # string form
        d["n-shot"]["piqa_local"] = 5
        d["lm_eval_version"] = "0.4.99"
        del d["results"]["arc_easy_local"]

    cand = _doctor(_file(runs["dense"]), tmp_path / "c.json", edit)
    code, report, _, err = gate("--baseline", runs["dense"], "--candidate", cand, "--summary", tmp_path / "r.md")
    assert code == 0
    text = "\n".join(report["warnings"])
    for needle in ("tasks only in the baseline (not compared): arc_easy_local", "limit differs: baseline 8.0, "
                   "candidate 16.0", "max_length differs: baseline 256, candidate 512", "n-shot differs: piqa_local",
                   "lm-eval version differs"):
        assert needle in text, text
    assert {c["task"] for c in report["checks"]} == {"piqa_local"}
    assert err.count("sparse-ffn: warning:") == len(report["warnings"])
    assert "- ⚠️ limit differs" in (tmp_path / "r.md").read_text()


def test_directory_picks_newest_results_file(runs, tmp_path):
    model_dir = tmp_path / "out" / "some__model"
    _doctor(_file(runs["dense"]), model_dir / "results_2020-01-01T00-00-00.000000.json", lambda d: None)
    newest = _doctor(_file(runs["dense"]), model_dir / "results_2030-01-01T00-00-00.000000.json",
                     lambda d: d["results"]["piqa_local"].__setitem__("acc,none", 0.0))
    code, report, _, _ = gate("--baseline", runs["dense"], "--candidate", tmp_path / "out")
    assert report["candidate"] == str(newest) and code == 1


def _one_line_error(code: int, err: str, path: Path, problem: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sparse-ffn: error: {path}") and problem in lines[0], err


def test_unusable_inputs_exit_2(runs, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": {"piqa_local": ')
    notres = tmp_path / "notres.json"
    notres.write_text('{"hello": 1}')
    empty = tmp_path / "empty"
    empty.mkdir()
    other = _doctor(_file(runs["dense"]), tmp_path / "other.json",
                    lambda d: d.__setitem__("results", {"hellaswag": d["results"]["piqa_local"]}))
    two = tmp_path / "two"
    for m in ("a__model", "b__model"):
        _doctor(_file(runs["dense"]), two / m / "results_2025-01-01T00-00-00.json", lambda d: None)
    base = ("--baseline", runs["dense"])
    cases = [(bad, "not valid JSON"), (notres, "not an lm-eval results file"), (empty, "no results_*.json"),
             (tmp_path / "missing.json", "not found"), (other, "no task in common"),
             (two, "several models (a__model, b__model)")]
    for path, problem in cases:
        code, _, out, err = gate(*base, "--candidate", path)
        _one_line_error(code, err, path, problem)
        assert out == ""
    code, _, _, err = gate("--baseline", tmp_path / "gone", "--candidate", runs["cett"])
    _one_line_error(code, err, tmp_path / "gone", "not found")
    code, _, _, err = gate(*base, "--candidate", runs["cett"], "--max-drop", "acc:0.1")
    assert code == 2 and err.strip() == "sparse-ffn: error: --max-drop: 'acc:0.1' is not METRIC=NUMBER (a number >= 0)"


def test_ci_script_is_valid_bash():
    script = Path(__file__).resolve().parents[1] / "examples" / "ci_gate.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for needle in ("sparse-ffn models fetch smollm2-135m", "sparse-ffn tasks write", "strategy=dense",
                   "thresholds=", "sparse-ffn gate", "GITHUB_STEP_SUMMARY"):
        assert needle in text


def test_markdown_and_budget_parsing_in_process():
    from sparse_ffn.errors import UserError
    from sparse_ffn.analysis.gate import DEFAULT_MAX_DROP, Budgets, parse_max_drop

    assert parse_max_drop("acc=0.01, acc_norm=0.02") == {"acc": 0.01, "acc_norm": 0.02}
    assert parse_max_drop("") == {} and Budgets().drops == DEFAULT_MAX_DROP == {"acc": 0.01, "acc_norm": 0.01}
    for bad in ("acc", "acc=x", "acc=-1", "=0.1", "acc=nan"):
        with pytest.raises(UserError):
            parse_max_drop(bad)
