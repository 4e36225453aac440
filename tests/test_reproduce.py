"""`sparse-ffn reproduce sparsing-law` on the tiny model and tiny fixture files of the suite: thresholds for
every target from one calibration run, dense and sparse lm-eval runs with samples, the paper's table with
paired differences, and a rerun that reuses everything."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import read_results, read_samples
from test_sparsing_law_tasks import ROWS, write_data

from sparse_ffn.artifacts import thresholds as threshold_file
from sparse_ffn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 4
TARGETS = "1.002,1.004,1.01"


def reproduce(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["reproduce", "sparsing-law", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # five of the seven tasks: social_iqa and boolq absent (skipped, one line each)
    return write_data(tmp_path_factory.mktemp("suite_data"), ["piqa", "hellaswag", "winogrande", "copa",
                                                              "lambada_openai"])


def common(model_dir, text_file, data_dir, out) -> list[str]:
    return ["--model", str(model_dir), "--calib-data", str(text_file), "--data-dir", str(data_dir),
            "--targets", TARGETS, "--limit", str(LIMIT), "--tokens", "1024", "--seq-len", "64",
            "--max-length", "256", "--out-dir", str(out)]


def test_reproduce_writes_the_table_and_a_rerun_reuses_the_runs(capsys, tmp_path, model_dir, text_file, data_dir):
    out = tmp_path / "repro"
    code, stdout, stderr = reproduce(capsys, *common(model_dir, text_file, data_dir, out))
    assert code == 0, stderr[-3000:]
    skipped = [line for line in stderr.splitlines() if "skipped" in line]
    assert skipped == [f"sparse-ffn: skipped {t}_local: {data_dir / p} not found" for t, p in
                       [("boolq", "boolq/boolq_validation.jsonl"), ("social_iqa", "siqa/siqa_validation.jsonl")]]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert list(summary["runs"]) == ["dense", "PPL-0.2%", "PPL-0.4%", "PPL-1%"]
    assert not any(r["reused"] for r in summary["runs"].values())
    assert summary["calibration"]["dense_passes"] == 1 and summary["calibration"]["reused"] == []
    # the threshold files: one per target, each meeting its target
    files = sorted(p.name for p in (out / "thresholds").iterdir())
    assert files == ["ppl-1.002.json", "ppl-1.004.json", "ppl-1.01.json"]
    cs = []
    for name, r in zip(files, (1.002, 1.004, 1.01)):
        thr = threshold_file.load(out / "thresholds" / name)
        assert 1 < thr.calibration["ppl_ratio"] <= r
        cs.append(thr.calibration["cett"])
    assert cs == sorted(cs)
    # each run is a real lm-eval output with samples; the table's numbers are its numbers
    tasks = ["piqa_local", "hellaswag_local", "winogrande_local", "copa_local", "lambada_openai_local"]
    with (out / "table.csv").open() as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert list(table) == list(summary["runs"])
    names = {"piqa_local": "PIQA", "hellaswag_local": "HellaSwag", "winogrande_local": "WinoGrande",
             "copa_local": "COPA", "lambada_openai_local": "LAMBADA"}
    dense_dir = out / "runs" / "dense"
    for label, run in summary["runs"].items():
        res = read_results(Path(run["dir"]))
        sparsity = res["config"]["sparse_ffn"]["sparsity"]["mean"]
        assert float(table[label]["sparsity"]) == pytest.approx(sparsity, abs=1e-12)
        assert (sparsity == 0.0) == (label == "dense")
        for t in tasks:
            assert float(table[label][names[t]]) == pytest.approx(res["results"][t]["acc,none"], abs=1e-12)
        commonsense = [res["results"][t]["acc,none"] for t in tasks[:4]]
        assert float(table[label]["commonsense avg"]) == pytest.approx(np.mean(commonsense), abs=1e-12)
        assert float(table[label]["commonsense avg"]) == pytest.approx(
            res["results"]["sparsing_law_commonsense_local"]["acc,none"], abs=1e-12)
        assert float(table[label]["reading avg"]) == pytest.approx(res["results"]["lambada_openai_local"]["acc,none"])
        if label == "dense":
            assert table[label]["PIQA_diff"] == ""
            continue
        for t in tasks:  # the paired difference, by hand from the samples
            base = {s["doc_id"]: s["acc"] for s in read_samples(dense_dir, t)}
            cand = {s["doc_id"]: s["acc"] for s in read_samples(Path(run["dir"]), t)}
            assert sorted(base) == sorted(cand) and len(base) == min(LIMIT, len(ROWS[t.removesuffix("_local")]))
            d = [cand[i] - base[i] for i in base]
            assert float(table[label][f"{names[t]}_diff"]) == pytest.approx(np.mean(d), abs=1e-12)
            assert int(table[label][f"{names[t]}_n"]) == len(d)
            low, high = float(table[label][f"{names[t]}_ci_low"]), float(table[label][f"{names[t]}_ci_high"])
            assert low <= np.mean(d) <= high
        mean_d = np.mean([float(table[label][f"{names[t]}_diff"]) for t in tasks[:4]])
        assert float(table[label]["commonsense avg_diff"]) == pytest.approx(mean_d, abs=1e-12)
    md = (out / "table.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("|  | sparsity | PIQA | HellaSwag | WinoGrande | COPA | commonsense avg | LAMBADA |")
    assert [line.split("|")[1].strip() for line in lines[2:6]] == list(summary["runs"])
    assert "PPL-1% - dense (95% CI)" in md and "TyDiQA" in md
    png = (out / "table.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun: nothing recalibrated, no run redone, the same table
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json*")}
    code, stdout2, stderr2 = reproduce(capsys, *common(model_dir, text_file, data_dir, out))
    assert code == 0, stderr2[-3000:]
    again = json.loads(stdout2.strip().splitlines()[-1])
    assert all(r["reused"] for r in again["runs"].values())
    assert again["calibration"]["reused"] == [1.002, 1.004, 1.01] and again["calibration"]["dense_passes"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json*")} == mtimes
    assert (out / "table.md").read_text() == md
    assert "lm-eval:" not in stderr2 and "calibrating" not in stderr2

    # a changed threshold file makes its run stale (sha256 recorded): only that run is redone
    thr_file = out / "thresholds" / "ppl-1.01.json"
    obj = json.loads(thr_file.read_text())
    obj["thresholds"] = [0.0] * len(obj["thresholds"])
    thr_file.write_text(json.dumps(obj))
    code, stdout3, _ = reproduce(capsys, *common(model_dir, text_file, data_dir, out))
    assert code == 0
    third = json.loads(stdout3.strip().splitlines()[-1])
    assert [r["reused"] for r in third["runs"].values()] == [True, True, True, False]
    assert third["runs"]["PPL-1%"]["sparsity"] == 0.0


@pytest.mark.parametrize("case", ["unknown target", "target<=1", "missing calib data", "no suite data",
                                  "missing data dir"])
def test_reproduce_errors_exit_2_with_one_line(capsys, tmp_path, model_dir, text_file, data_dir, case):
    args = {"--model": str(model_dir), "--calib-data": str(text_file), "--data-dir": str(data_dir),
            "--targets": TARGETS, "--out-dir": str(tmp_path / "out")}
    empty = tmp_path / "empty"
    empty.mkdir()
    change, flag = {"unknown target": (("--targets", "1.01,ten"), "--targets"),
                    "target<=1": (("--targets", "1.05,0.99"), "--targets"),
                    "missing calib data": (("--calib-data", str(tmp_path / "nope.txt")), str(tmp_path / "nope.txt")),
                    "no suite data": (("--data-dir", str(empty)), "--data-dir"),
                    "missing data dir": (("--data-dir", str(tmp_path / "absent")), "--data-dir")}[case]
    args[change[0]] = change[1]
    code, _, stderr = reproduce(capsys, *[x for kv in args.items() for x in kv])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-ffn: error: ") and flag in lines[0], stderr
    assert not (tmp_path / "out" / "runs").exists()
