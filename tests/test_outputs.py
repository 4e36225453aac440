"""Outputs and inputs that used to be tracebacks: output paths checked before any work, full disks and
refused permissions at write time, artifacts written with the umask's mode, wrong-typed threshold
file fields, a truncated model. Each is exit 2 with one line naming the file or the field."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from sparse_ffn.artifacts.atomic import atomic_write_bytes, check_writable
from sparse_ffn.cli import main
from sparse_ffn.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys) -> str:
    """The one `sparse-ffn: error:` line of stderr (transformers' progress bars aside); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("sparse-ffn: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def _read_only_place() -> Path | None:
    """A directory where even root cannot create a file here (/sys in containers), else None."""
    for d in ("/sys", "/proc/sys"):
        try:
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError:
            return Path(d)
    return None


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (the path checks must come first)."""
    import sparse_ffn.model_adapters.loading as loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_tokenizer", refuse)


def _bad_outputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name: (output path, text of the error)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    out = {"parent_is_file": (afile / "out.json", f"{afile} is not a directory"),
           "grandparent_is_file": (afile / "sub" / "out.json", f"{afile} is not a directory"),
           "is_directory": (tmp_path / "adir", "is a directory")}
    ro = _read_only_place()
    if ro is not None:
        out["read_only"] = (ro / "sub" / "out.json", f"cannot write in {ro}")
    return out


@pytest.mark.parametrize("case", ["parent_is_file", "grandparent_is_file", "is_directory", "read_only"])
def test_calibrate_thresholds_checks_out_before_the_calibration(tiny_llama_dir, text_file, tmp_path, capsys,
                                                                no_model_load, case):
    cases = _bad_outputs(tmp_path)
    if case not in cases:
        pytest.skip("no read-only directory on this machine")
    out, message = cases[case]
    argv = ["calibrate", "thresholds", "--model", str(tiny_llama_dir), "--data", str(text_file), "--tokens", "128",
            "--seq-len", "32", "--cett", "0.2", "--no-progress", "--out", str(out)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert f"--out {out}" in line and message in line, line


@pytest.mark.parametrize("case", ["parent_is_file", "read_only"])
def test_calibrate_experts_checks_out_before_loading(tiny_llama_dir, text_file, tmp_path, capsys, no_model_load,
                                                     case):
    cases = _bad_outputs(tmp_path)
    if case not in cases:
        pytest.skip("no read-only directory on this machine")
    out, message = cases[case]
    argv = ["calibrate", "experts", "--quiet", "--model", str(tiny_llama_dir), "--data", str(text_file),
            "--sparsity", "0.5", "--num-clusters", "2", "--nsamples", "2", "--seq-len", "32", "--out", str(out)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert f"--out {out}" in line and message in line, line


def test_inspect_sweep_gate_check_their_outputs_first(tiny_llama_dir, text_file, tmp_path, capsys, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    inspect = ["inspect", "--model", str(tiny_llama_dir), "--data", str(text_file), "--strategy", "topk", "--arg",
               "0.5", "--tokens", "64", "--seq-len", "32", "--no-progress"]
    assert main([*inspect, "--out-dir", str(afile / "runs")]) == 2
    assert f"--out-dir {afile / 'runs'}: {afile} is not a directory" in error_line(capsys)
    assert main([*inspect, "--out-dir", str(afile)]) == 2
    assert f"--out-dir {afile}: exists and is not a directory" in error_line(capsys)
    sweep = ["sweep", "--checkpoints", str(tiny_llama_dir), "--cett", "0.2", "--data", str(text_file),
             "--tokens", "64", "--seq-len", "32", "--no-progress"]
    assert main([*sweep, "--out-dir", str(afile)]) == 2
    assert f"--out-dir {afile}: exists and is not a directory" in error_line(capsys)
    # gate: checked before its inputs are even read (these do not exist)
    gate = ["gate", "--baseline", str(tmp_path / "none1"), "--candidate", str(tmp_path / "none2")]
    assert main([*gate, "--summary", str(tmp_path / "adir")]) == 2
    assert f"--summary {tmp_path / 'adir'}: is a directory" in error_line(capsys)
    assert main([*gate, "--plot", str(afile / "plot.png")]) == 2
    assert f"--plot {afile / 'plot.png'}: {afile} is not a directory" in error_line(capsys)
    ro = _read_only_place()
    if ro is not None:
        assert main([*gate, "--plot", str(ro / "plot.png")]) == 2
        assert f"--plot {ro / 'plot.png'}: cannot write in {ro}" in error_line(capsys)


def test_check_writable_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert check_writable(target, "--out") == target
    assert check_writable(tmp_path / "new_dir", "--out-dir", directory=True) == tmp_path / "new_dir"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Write-time failures: one line, nothing half-written
# ------------------------------------------------------------------------------------------------

def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_errors_are_one_line(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="a parent is a file") as e:
        atomic_write_bytes(afile / "x.json", b"{}")
    assert str(e.value).startswith(f"{afile / 'x.json'}: cannot write (")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(UserError) as e:
        atomic_write_bytes(tmp_path / "full.json", b"{}")
    assert str(e.value) == (f"{tmp_path / 'full.json'}: cannot write (No space left on device, ENOSPC) "
                            f"(disk full; nothing was written)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no temp file left behind


THR = ["calibrate", "thresholds", "--data", None, "--tokens", "128", "--seq-len", "32", "--cett", "0.2",
       "--no-progress"]


def _thr_argv(model, data, out):
    argv = list(THR)
    argv[3] = str(data)
    return [*argv, "--model", str(model), "--out", str(out)]


@pytest.mark.parametrize("failure", ["enospc", "eacces"])
def test_calibrate_thresholds_write_failure_is_one_line(tiny_llama_dir, text_file, tmp_path, capsys, monkeypatch,
                                                        failure):
    out = tmp_path / "thr.json"
    if failure == "enospc":
        monkeypatch.setattr(os, "fsync", _enospc)
        message = "No space left on device"
    else:
        def eacces(*a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(os, "replace", eacces)
        message = "Permission denied"
    assert main(_thr_argv(tiny_llama_dir, text_file, out)) == 2
    line = error_line(capsys)
    assert line.startswith(f"sparse-ffn: error: {out}: cannot write (") and message in line, line
    assert list(tmp_path.iterdir()) == []


def test_calibrate_experts_full_disk_mid_run_then_resumes(tiny_llama_dir, text_file, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "experts"
    argv = ["calibrate", "experts", "--quiet", "--model", str(tiny_llama_dir), "--data", str(text_file),
            "--sparsity", "0.5", "--num-clusters", "2", "--nsamples", "2", "--seq-len", "32", "--out", str(out)]
    real = tempfile.mkstemp

    def full_at_layer_1(*a, prefix="", **k):
        if "layer_001.safetensors" in prefix:
            _enospc()
        return real(*a, prefix=prefix, **k)

    monkeypatch.setattr(tempfile, "mkstemp", full_at_layer_1)
    assert main(argv) == 2
    line = error_line(capsys)
    partial = tmp_path / "experts.partial"
    assert line == (f"sparse-ffn: error: {partial / 'layer_001.safetensors'}: cannot write (No space left on "
                    f"device, ENOSPC) (disk full; nothing was written)")
    assert not out.exists()
    assert sorted(p.name for p in partial.iterdir()) == ["layer_000.json", "layer_000.safetensors", "progress.json"]
    monkeypatch.setattr(tempfile, "mkstemp", real)
    assert main(argv) == 0
    assert "resumed after layer 0" in capsys.readouterr().err
    assert main(["verify", str(out)]) == 0


# ------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def umask():
    before = os.umask(0o022)
    os.umask(before)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(before)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_artifacts_get_the_umask_mode(tiny_llama_dir, text_file, tmp_path, capsys, umask, mask, file_mode,
                                      dir_mode):
    umask(mask)
    thr = tmp_path / "thr.json"
    assert main(_thr_argv(tiny_llama_dir, text_file, thr)) == 0
    assert stat.S_IMODE(thr.stat().st_mode) == file_mode
    out = tmp_path / "experts"
    assert main(["calibrate", "experts", "--quiet", "--model", str(tiny_llama_dir), "--data", str(text_file),
                 "--sparsity", "0.5", "--num-clusters", "2", "--nsamples", "2", "--seq-len", "32",
                 "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["layer_000.safetensors", "layer_001.safetensors", "layer_002.safetensors",
                                       "manifest.json"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: file_mode for p in files}


# ------------------------------------------------------------------------------------------------
# Inputs: wrong-typed threshold file fields, a truncated model
# ------------------------------------------------------------------------------------------------

GOOD = {"format": "sparse-ffn/thresholds", "version": 1, "thresholds": [0.1, 0.1, 0.1]}


@pytest.mark.parametrize("field, value, message", [
    ("calibration", "x", "'calibration' must be an object, not a string"),
    ("calibration", {"data": []}, "'calibration.data' must be an object, not an array"),
    ("calibration", {"cett": "0.2"}, "'calibration.cett' must be a number, not a string"),
    ("sparsity", "x", "'sparsity' must be an object, not a string"),
    ("sparsity", {"per_layer": [0.1, "a"]}, "'sparsity.per_layer[1]' must be a number, not a string"),
    ("model", "x", "'model' must be an object, not a string"),
    ("model", {"num_layers": "3"}, "'model.num_layers' must be an integer, not a string"),
    ("model", {"d_ff": 1.5}, "'model.d_ff' must be an integer, not 1.5"),
    ("created_by", 5, "'created_by' must be an object, not an integer"),
    ("strategy", 1, "'strategy' must be a string, not an integer"),
])
def test_threshold_file_types_are_one_line(tiny_llama_dir, text_file, tmp_path, capsys, field, value, message):
    path = tmp_path / "thr.json"
    path.write_text(json.dumps({**GOOD, field: value}))
    argv = ["ppl", "--model", str(tiny_llama_dir), "--thresholds", str(path), "--data", str(text_file),
            "--seq-len", "32", "--tokens", "64", "--quiet"]
    assert main(argv) == 2
    assert error_line(capsys) == f"sparse-ffn: error: {path}: {message}"
    assert main(["verify", str(path)]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["problems"] == [f"{path}: {message}"]


def test_truncated_model_weights_are_one_line(tiny_llama_dir, text_file, tmp_path, capsys):
    import shutil

    model = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    argv = ["ppl", "--model", str(model), "--data", str(text_file), "--seq-len", "32", "--tokens", "64", "--quiet"]
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"sparse-ffn: error: --model {model}: cannot load the model"), line
