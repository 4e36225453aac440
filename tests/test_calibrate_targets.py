"""Several PPL-ratio targets in one calibration run (`calibrate_targets`, `calibrate thresholds
--target-ppl-ratio R1,R2,... --out-dir`): per target, the very file a single-target run writes."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import BIN, subprocess_env
from test_calibrate import SEQ_LEN, TOKENS, model_and_windows  # noqa: F401 - the same tiny model and windows

from sparse_ffn.artifacts import thresholds as threshold_file
from sparse_ffn.calibrate.thresholds import calibrate_targets, calibrate_thresholds, parse_targets, \
    target_file_name
from sparse_ffn.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = (1.002, 1.004, 1.01)


@pytest.fixture(scope="module")
def singles(model_and_windows):
    model, windows = model_and_windows
    return {r: calibrate_thresholds(model, windows, target_ppl_ratio=r, batch_size=4) for r in TARGETS}


def test_multi_target_equals_single_target_runs(model_and_windows, singles):
    model, windows = model_and_windows
    # an order unlike the single runs': later targets start from the memo of the earlier ones
    multi = calibrate_targets(model, windows, [1.01, 1.002, 1.004], batch_size=4)
    assert list(multi) == [1.01, 1.002, 1.004]
    cs = []
    for r in TARGETS:
        one, many = singles[r].calibration, multi[r].calibration
        assert multi[r].thresholds == singles[r].thresholds  # exactly
        assert many["cett"] == one["cett"] and many["ppl_ratio"] == one["ppl_ratio"]
        assert many["target_ppl_ratio"] == r and 1 < many["ppl_ratio"] <= r
        assert multi[r].sparsity == singles[r].sparsity
        assert [s["cett"] for s in many["search"]] == [s["cett"] for s in one["search"]]
        assert many["shared"]["targets"] == [1.01, 1.002, 1.004]
        cs.append(many["cett"])
    assert cs == sorted(cs) and len(set(cs)) == 3  # a looser target: a larger c
    # one dense pass for all; shared evaluations are not rerun
    timing = multi[1.01].calibration["timing"]
    assert timing["dense_passes"] == 1
    total_new = sum(multi[r].calibration["timing"]["new_sparse_passes"] for r in TARGETS)
    assert total_new == multi[1.01].calibration["shared"]["sparse_passes"]
    assert total_new <= sum(singles[r].calibration["timing"]["sparse_passes"] for r in TARGETS)


def test_each_target_starts_afresh_where_cett_is_not_monotone(model_and_windows):
    """With ratio_tol 8e-4 the 1.004 search of this tiny model fits a c at which one layer's CETT curve
    is not monotone (CETT(grid[11703]) > CETT(grid[11704])): a layer search that had fitted the 1.002
    search's c values first answered another crossing (0.21548 instead of 0.21552). Each target now
    starts from a fresh search, so the files equal the single-target runs' whatever the order."""
    model, windows = model_and_windows
    singles = {r: calibrate_thresholds(model, windows, target_ppl_ratio=r, batch_size=4, ratio_tol=8e-4)
               for r in (1.002, 1.004)}
    multi = calibrate_targets(model, windows, [1.002, 1.004], batch_size=4, ratio_tol=8e-4)
    for r in singles:
        assert multi[r].thresholds == singles[r].thresholds
        assert multi[r].calibration["ppl_ratio"] == singles[r].calibration["ppl_ratio"]
    assert multi[1.004].calibration["timing"]["dense_passes"] == 1  # still one dense pass for both


def test_parse_targets():
    assert parse_targets("1.01,1.05, 1.10") == [1.01, 1.05, 1.1]
    for text, match in [("1.01,abc", "unknown target 'abc'"), ("1.01,1.0", "must be > 1"),
                        ("1.01,0.9", "must be > 1"), ("1.01,1.01", "given twice"), ("", "unknown target")]:
        with pytest.raises(UserError, match=match):
            parse_targets(text)
    assert [target_file_name(r) for r in (1.01, 1.1, 1.005)] == ["ppl-1.01.json", "ppl-1.10.json",
                                                                 "ppl-1.005.json"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sparse-ffn"), "calibrate", "thresholds", *args], capture_output=True,
                          text=True, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, timeout=300)


def test_cli_out_dir_writes_one_file_per_target(tmp_path, model_dir, text_file, singles):
    out = tmp_path / "thr"
    proc = run_cli("--model", str(model_dir), "--data", str(text_file), "--tokens", str(TOKENS), "--seq-len",
                   str(SEQ_LEN), "--target-ppl-ratio", "1.002,1.004,1.01", "--device", "cpu", "--batch-size", "4",
                   "--no-progress", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["ppl-1.002.json", "ppl-1.004.json", "ppl-1.01.json"]
    assert proc.stdout.strip().splitlines()[-3:] == [str((out / n).resolve()) for n in names]
    assert sorted(p.name for p in out.iterdir()) == names
    for r, n in zip(TARGETS, names):
        thr = threshold_file.load(out / n)
        assert thr.thresholds == singles[r].thresholds
        assert thr.calibration["cett"] == singles[r].calibration["cett"]
        assert thr.calibration["ppl_ratio"] == singles[r].calibration["ppl_ratio"]
        assert json.loads((out / n).read_text())["calibration"]["target_ppl_ratio"] == r


@pytest.mark.parametrize("case", ["unknown target", "target<=1", "several targets with --out", "repeated"])
def test_cli_target_errors_exit_2_with_one_line(tmp_path, model_dir, text_file, case):
    ratio, dest = {"unknown target": ("1.01,PPL-5", "--out-dir"), "target<=1": ("1.01,1.0", "--out-dir"),
                   "several targets with --out": ("1.01,1.05", "--out"), "repeated": ("1.05,1.05", "--out-dir")}[case]
    proc = run_cli("--model", str(model_dir), "--data", str(text_file), "--target-ppl-ratio", ratio,
                   dest, str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-ffn: error: --target-ppl-ratio"), proc.stderr
    assert list(tmp_path.iterdir()) == []
