"""`sparse-ffn inspect` and `sparse-ffn sweep` on tiny random models: numbers against the masking core and
the calibration they reuse, outputs and provenance, refusals (offline)."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import BIN, subprocess_env
from tiny import make_tiny_model

from sparse_ffn import __version__
from sparse_ffn.calibrate.thresholds import calibrate_thresholds
from sparse_ffn.calibrate.ppl_search import RATIO_TOL
from sparse_ffn.analysis.inspect import format_table, inspect_sparsity
from sparse_ffn.calibrate.sweep import Checkpoint, parse_step, resolve_checkpoints, sweep_checkpoints
from sparse_ffn.artifacts.data import load_text, token_windows
from sparse_ffn.errors import UserError
from sparse_ffn.core.masking import SparsityConfig, sparsify_
from sparse_ffn.core.perplexity import perplexity

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 64
TOKENS = 1024
D_FF = 128
PNG = b"\x89PNG\r\n\x1a\n"


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def model_and_windows(model_dir, text_file):
    from transformers import AutoTokenizer

    text, _ = load_text(str(text_file))
    return _load(model_dir), token_windows(AutoTokenizer.from_pretrained(model_dir), text, SEQ_LEN, TOKENS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A fake training run: 6 tiny Llamas (different seeds) named so that text order != step order."""
    root = tmp_path_factory.mktemp("run")
    for seed, name in enumerate(["checkpoint-100", "checkpoint-20", "step_300", "checkpoint-40", "ckpt-60",
                                 "checkpoint-1000"]):
        make_tiny_model("llama", root / name, seed=seed, initializer_range=0.1)
    return root


# -- inspect: the numbers ------------------------------------------------------------------------------

def test_topk_sparsity_is_exactly_the_dropped_fraction(model_and_windows):
    model, windows = model_and_windows
    r = inspect_sparsity(model, windows, "topk", 0.3, batch_size=3)
    kept = round(0.3 * D_FF)
    assert r.sparsity["per_layer"] == [1 - kept / D_FF] * 3
    assert r.mean_sparsity == 1 - kept / D_FF and r.sparsity["tokens"] == TOKENS
    assert r.ppl_ratio != 1.0 and r.ppl_ratio == pytest.approx(r.ppl_sparse / r.ppl_dense, rel=1e-9)
    assert "mean" in format_table(r) and len(format_table(r).splitlines()) == 3 + 4


def test_fat_eps_zero_is_the_dense_model(model_and_windows, tmp_path):
    model, windows = model_and_windows
    r = inspect_sparsity(model, windows, "fat", 0.0)
    assert r.ppl_ratio == 1.0 and r.ppl_sparse == r.ppl_dense
    assert r.ppl_dense == perplexity(model, windows, 4)["perplexity"]
    # on a ReLU model, FAT-0 counts the natural zeros: the same count as the dense strategy's exact zeros of a
    relu = _load(make_tiny_model("llama", tmp_path / "relu", hidden_act="relu", initializer_range=0.1))
    r = inspect_sparsity(relu, windows, "fat", 0.0)
    handle = sparsify_(relu, SparsityConfig("dense"))
    try:
        perplexity(relu, windows, 4)
        natural = handle.stats.summary()
    finally:
        handle.remove()
    assert r.ppl_ratio == 1.0
    assert r.sparsity["per_layer"] == natural["per_layer"] and 0.3 < r.mean_sparsity < 0.7


def test_cett_with_thresholds_is_what_the_masking_core_counts(model_and_windows):
    model, windows = model_and_windows
    thresholds = calibrate_thresholds(model, windows, cett=0.1).thresholds
    r = inspect_sparsity(model, windows, "cett", thresholds=thresholds, batch_size=2)
    handle = sparsify_(model, SparsityConfig("cett", thresholds=tuple(thresholds)))
    try:
        sparse = perplexity(model, windows, 4)
        measured = handle.stats.summary()
    finally:
        handle.remove()
    dense = perplexity(model, windows, 4)
    assert r.sparsity == measured and r.mean_sparsity > 0.2
    assert r.ppl_ratio == pytest.approx(sparse["perplexity"] / dense["perplexity"], rel=1e-9)
    assert r.thresholds == thresholds and r.cett is None


def test_cett_with_c_fits_the_thresholds_calibrate_would(model_and_windows):
    model, windows = model_and_windows
    r = inspect_sparsity(model, windows, "cett", 0.1)
    thr = calibrate_thresholds(model, windows, cett=0.1)
    assert r.thresholds == thr.thresholds and r.cett == 0.1
    assert r.sparsity["per_layer"] == thr.sparsity["per_layer"]
    assert r.ppl_ratio == thr.calibration["ppl_ratio"] > 1.0
    # applying those thresholds measures the same thing
    again = inspect_sparsity(model, windows, "cett", thresholds=r.thresholds)
    assert again.sparsity["per_layer"] == r.sparsity["per_layer"]
    assert again.ppl_ratio == pytest.approx(r.ppl_ratio, rel=1e-9)


def test_inspect_api_refusals(model_and_windows):
    model, windows = model_and_windows
    with pytest.raises(UserError, match="--arg"):
        inspect_sparsity(model, windows, "cett")
    with pytest.raises(UserError, match="cett only"):
        inspect_sparsity(model, windows, "fat", 0.1, thresholds=[0.0] * 3)
    with pytest.raises(UserError, match="kept ratio"):
        inspect_sparsity(model, windows, "topk", 1.5)
    with pytest.raises(UserError, match="3 FFN layers"):
        inspect_sparsity(model, windows, "cett", thresholds=[0.0] * 2)


# -- the inspect command ----------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sparse-ffn"), *args], capture_output=True, text=True,
                          env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, timeout=600)


def test_inspect_cli_writes_json_and_png(tmp_path, model_dir, text_file, model_and_windows):
    out = tmp_path / "out"
    proc = run_cli("inspect", "--model", str(model_dir), "--data", str(text_file), "--strategy", "topk", "--arg",
                   "0.3", "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN), "--device", "cpu", "--no-progress",
                   "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["mean_sparsity"] == 1 - round(0.3 * D_FF) / D_FF and last["ppl_ratio"] != 1
    assert sorted(p.name for p in out.iterdir()) == ["inspect-topk-0.3.json", "inspect-topk-0.3.png"]
    assert last["json"] == str(out / "inspect-topk-0.3.json") and Path(last["png"]).read_bytes()[:8] == PNG
    rep = json.loads(Path(last["json"]).read_text())
    model, windows = model_and_windows
    ref = inspect_sparsity(model, windows, "topk", 0.3)
    assert rep["ppl"]["ratio"] == pytest.approx(ref.ppl_ratio, rel=1e-6) and rep["ppl"]["ratio"] == last["ppl_ratio"]
    assert rep["sparsity"]["per_layer"] == ref.sparsity["per_layer"] and rep["d_ff"] == [D_FF] * 3
    assert rep["data"] == {"path": str(text_file.resolve()), "sha256": hashlib.sha256(text_file.read_bytes()).hexdigest(),
                           "tokens": TOKENS, "seq_len": SEQ_LEN, "windows": TOKENS // SEQ_LEN}
    assert rep["model"]["name_or_path"] == str(model_dir.resolve()) and rep["model"]["num_layers"] == 3
    assert rep["created_by"]["version"] == __version__ and rep["settings"]["topk"] == "per token"
    assert "act.ratio" in proc.stderr and "PPL dense" in proc.stderr  # the table


def test_inspect_cli_applies_a_threshold_file(tmp_path, model_dir, text_file, model_and_windows):
    model, windows = model_and_windows
    thr = calibrate_thresholds(model, windows, cett=0.1)
    thr.model["name_or_path"] = str(model_dir)
    thr_path = thr.save(tmp_path / "thr.json")
    out = tmp_path / "out"
    proc = run_cli("inspect", "--model", str(model_dir), "--data", str(text_file), "--strategy", "cett",
                   "--thresholds", str(thr_path), "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN),
                   "--no-progress", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    rep = json.loads((out / "inspect-cett-thr.json").read_text())
    # the same windows as the calibration: the file's own sparsity, layer by layer
    assert rep["sparsity"]["per_layer"] == thr.sparsity["per_layer"] and last["mean_sparsity"] == thr.sparsity["mean"]
    assert last["ppl_ratio"] == pytest.approx(thr.calibration["ppl_ratio"], rel=1e-6)
    assert rep["thresholds"] == thr.thresholds and rep["thresholds_file"]["calibration_cett"] == 0.1
    assert rep["thresholds_file"]["sha256"] == hashlib.sha256(thr_path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["missing data", "topk ratio > 1", "cett without c or file", "thresholds with fat",
                                  "missing model", "missing thresholds file"])
def test_inspect_cli_errors_exit_2_with_one_line_and_no_output(tmp_path, model_dir, text_file, case):
    out = tmp_path / "out"
    model, data = ["--model", str(model_dir)], ["--data", str(text_file)]
    args = {"missing data": [*model, "--data", str(tmp_path / "nope.txt"), "--strategy", "fat", "--arg", "0"],
            "topk ratio > 1": [*model, *data, "--strategy", "topk", "--arg", "1.5"],
            "cett without c or file": [*model, *data, "--strategy", "cett"],
            "thresholds with fat": [*model, *data, "--strategy", "fat", "--arg", "0", "--thresholds", str(text_file)],
            "missing model": ["--model", str(tmp_path / "no_model"), *data, "--strategy", "fat", "--arg", "0"],
            "missing thresholds file": [*model, *data, "--strategy", "cett", "--thresholds", str(tmp_path / "t.json")],
            }[case]
    proc = run_cli("inspect", *args, "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN), "--out-dir", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-ffn: error: "), proc.stderr
    assert not out.exists()


# -- sweep --------------------------------------------------------------------------------------------

def test_checkpoint_order():
    assert [parse_step(n) for n in ("checkpoint-200", "step_200", "ckpt200", "iter-7", "200", "final", "run3a")] == \
        [200, 200, 200, 7, 200, None, None]


def test_resolve_checkpoints_sorts_by_step_or_keeps_the_given_order(run_dir, tmp_path):
    found = resolve_checkpoints([run_dir])
    assert [c.step for c in found] == [20, 40, 60, 100, 300, 1000]
    picked = resolve_checkpoints([run_dir / "step_300", run_dir / "checkpoint-20"])
    assert [c.path.name for c in picked] == ["checkpoint-20", "step_300"]
    (tmp_path / "final").symlink_to(run_dir / "checkpoint-40")
    mixed = resolve_checkpoints([run_dir / "step_300", tmp_path / "final", run_dir / "checkpoint-20"])
    assert [c.path.name for c in mixed] == ["step_300", "final", "checkpoint-20"]  # one name has no step
    with pytest.raises(UserError, match="not a directory"):
        resolve_checkpoints([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model checkpoint"):
        resolve_checkpoints([tmp_path / "empty"])


def test_sweep_chooses_one_c_within_target_on_the_mean(run_dir, model_and_windows):
    _, windows = model_and_windows
    checkpoints = resolve_checkpoints([run_dir])
    target = 1.01
    result = sweep_checkpoints(checkpoints, _load, windows, target_ppl_ratio=target, batch_size=4)
    assert 0 < result.c < 1 and result.last == 5
    assert [r.step for r in result.rows] == [20, 40, 60, 100, 300, 1000]
    assert [r.in_mean for r in result.rows] == [False] + [True] * 5
    tail = result.rows[1:]
    mean = sum(r.ppl_ratio for r in tail) / 5
    assert mean == pytest.approx(result.mean_ppl_ratio, rel=1e-12) and 1.0 < mean <= target
    # the largest such c: the search stopped within its ratio tolerance of the target, or next to (within
    # c_tol = 1e-3 of) a c whose mean ratio exceeds it
    above = [s for s in result.search if s["cett"] > result.c and s["mean_ppl_ratio"] > target]
    assert mean >= target - RATIO_TOL or min(s["cett"] for s in above) - result.c <= 1e-3 + 1e-12, result.search
    for r in result.rows:
        assert r.c == result.c
        # each checkpoint at c: its own thresholds t_l(c), and the numbers inspect measures with them
        model = _load(Path(r.checkpoint))
        again = inspect_sparsity(model, windows, "cett", thresholds=r.thresholds)
        assert again.sparsity["per_layer"] == r.sparsity["per_layer"]
        assert again.ppl_ratio == pytest.approx(r.ppl_ratio, rel=1e-9)
        assert r.activation_ratio == 1 - r.sparsity["mean"]
    first = calibrate_thresholds(_load(Path(result.rows[0].checkpoint)), windows, cett=result.c)
    assert first.thresholds == pytest.approx(result.rows[0].thresholds, rel=1e-3)
    # a fixed c is taken as given
    fixed = sweep_checkpoints(checkpoints[:2], _load, windows, cett=0.05, last=1)
    assert [r.c for r in fixed.rows] == [0.05, 0.05] and [r.in_mean for r in fixed.rows] == [False, True]
    assert fixed.mean_ppl_ratio == fixed.rows[1].ppl_ratio


def test_sweep_cli_writes_csv_json_png(tmp_path, run_dir, text_file):
    out = tmp_path / "out"
    names = ["checkpoint-100", "checkpoint-20", "step_300", "checkpoint-40", "ckpt-60", "checkpoint-1000"]
    proc = run_cli("sweep", "--checkpoints", *(str(run_dir / n) for n in names), "--target-ppl-ratio", "1.01",
                   "--data", str(text_file), "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN), "--no-progress",
                   "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    assert Path(last["png"]).read_bytes()[:8] == PNG and last["checkpoints"] == 6
    rows = list(csv.DictReader(Path(last["csv"]).open()))
    assert list(rows[0]) == ["checkpoint", "step", "c", "sparsity", "activation_ratio", "ppl_ratio", "ppl_dense",
                             "ppl_sparse", "in_mean"]
    assert [Path(r["checkpoint"]).name for r in rows] == ["checkpoint-20", "checkpoint-40", "ckpt-60",
                                                         "checkpoint-100", "step_300", "checkpoint-1000"]
    assert [int(r["step"]) for r in rows] == [20, 40, 60, 100, 300, 1000]
    assert [r["in_mean"] for r in rows] == ["0", "1", "1", "1", "1", "1"]
    assert {float(r["c"]) for r in rows} == {last["cett"]}
    mean = sum(float(r["ppl_ratio"]) for r in rows[1:]) / 5
    assert mean == pytest.approx(last["mean_ppl_ratio"], rel=1e-12) and mean <= 1.01
    for r in rows:
        assert float(r["activation_ratio"]) == 1 - float(r["sparsity"])
        assert float(r["ppl_ratio"]) == pytest.approx(float(r["ppl_sparse"]) / float(r["ppl_dense"]), rel=1e-9)
    rep = json.loads(Path(last["json"]).read_text())
    assert rep["cett"] == last["cett"] and len(rep["checkpoints"]) == 6 and rep["search"]
    assert rep["data"]["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert rep["created_by"]["version"] == __version__
    assert all(len(c["per_layer"]) == 3 and len(c["thresholds"]) == 3 for c in rep["checkpoints"])


@pytest.mark.parametrize("case", ["target <= 1", "missing checkpoint", "missing data", "no checkpoints below",
                                  "cett > 1"])
def test_sweep_cli_errors_exit_2_with_one_line_and_no_output(tmp_path, run_dir, text_file, case):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    ck, data = ["--checkpoints", str(run_dir)], ["--data", str(text_file)]
    args = {"target <= 1": [*ck, *data, "--target-ppl-ratio", "1.0"],
            "missing checkpoint": ["--checkpoints", str(run_dir / "checkpoint-20"), str(tmp_path / "nope"), *data,
                                   "--target-ppl-ratio", "1.01"],
            "missing data": [*ck, "--data", str(tmp_path / "nope.txt"), "--target-ppl-ratio", "1.01"],
            "no checkpoints below": ["--checkpoints", str(tmp_path / "empty"), *data, "--target-ppl-ratio", "1.01"],
            "cett > 1": [*ck, *data, "--cett", "1.5"]}[case]
    proc = run_cli("sweep", *args, "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN), "--out-dir", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-ffn: error: "), proc.stderr
    assert not out.exists()


def test_sweep_api_refusals(run_dir, model_and_windows):
    _, windows = model_and_windows
    with pytest.raises(UserError, match="exactly one"):
        sweep_checkpoints([Checkpoint(run_dir, None)], _load, windows, target_ppl_ratio=1.01, cett=0.1)
    with pytest.raises(UserError, match="must be > 1"):
        sweep_checkpoints([Checkpoint(run_dir, None)], _load, windows, target_ppl_ratio=0.99)
