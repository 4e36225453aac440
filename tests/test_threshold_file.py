"""Threshold file v1: round trip, the inline forms, and one-line refusals of bad files."""

import json

import pytest

from sparse_ffn.artifacts import thresholds as threshold_file
from sparse_ffn.errors import UserError


def test_round_trip_and_atomic_save(tmp_path):
    f = threshold_file.ThresholdFile(thresholds=[0.1, 0.0, 2.5],
                                     model={"name_or_path": "m", "num_layers": 3, "d_ff": 8, "weight_hash": "sha256:x"},
                                     calibration={"method": "cett", "cett": 0.2})
    path = f.save(tmp_path / "thr.json")
    assert [p.name for p in tmp_path.iterdir()] == ["thr.json"]  # no temp file left behind
    back = threshold_file.load(path)
    assert back.thresholds == [0.1, 0.0, 2.5] and back.model["d_ff"] == 8
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == "sparse-ffn/thresholds" and on_disk["version"] == 1
    assert on_disk["created_by"]["package"] == "sparse-ffn"


def test_inline_forms():
    assert threshold_file.resolve([0.5, 1]).thresholds == [0.5, 1.0]
    assert threshold_file.resolve("0.1,0.2,0.3").thresholds == [0.1, 0.2, 0.3]
    assert threshold_file.resolve("[0.1; 0.2]").thresholds == [0.1, 0.2]


def test_sparsing_law_text_file(tmp_path):
    p = tmp_path / "thr.txt"
    p.write_text("0.01,0.02,0.03\n")
    assert threshold_file.resolve(str(p)).thresholds == [0.01, 0.02, 0.03]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "sparse-ffn/thresholds", "version": 1, "thresholds": [0.1, NaN]}', "threshold 1 is nan"),
    ('{"format": "sparse-ffn/thresholds", "version": 1, "thresholds": [0.1, -1]}', "threshold 1 is -1"),
    ('{"format": "sparse-ffn/thresholds", "version": 1, "thresholds": []}', "non-empty list"),
    ('{"format": "sparse-ffn/thresholds", "version": 9, "thresholds": [1]}', "version 9"),
    ('{"format": "other", "thresholds": [1]}', "not a sparse-ffn thresholds file"),
    ("hello", "not JSON"),
])
def test_bad_files_give_one_line_naming_the_file(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(UserError) as e:
        threshold_file.resolve(str(p))
    assert message in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        threshold_file.resolve(str(tmp_path / "nope.json"))


def test_check_model_refuses_wrong_shape_and_warns_on_hash():
    f = threshold_file.ThresholdFile(thresholds=[0.1] * 3, source="thr.json",
                                     model={"num_layers": 3, "d_ff": 8, "weight_hash": "sha256:a"})
    f.check_model({"num_layers": 3, "d_ff": 8, "weight_hash": "sha256:a"})
    with pytest.raises(UserError, match="d_ff=8, but the model has d_ff=16"):
        f.check_model({"num_layers": 3, "d_ff": 16, "weight_hash": "sha256:a"})
    with pytest.raises(UserError, match="num_layers=3, but the model has num_layers=4"):
        f.check_model({"num_layers": 4, "d_ff": 8, "weight_hash": "sha256:a"})
    with pytest.warns(UserWarning, match="weight hash"):
        f.check_model({"num_layers": 3, "d_ff": 8, "weight_hash": "sha256:b"})
