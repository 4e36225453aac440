"""Experts artifacts that cannot load wrong: every layer file is checked against its manifest (sha256,
size, its own layer field, K, roles, a name inside the directory) at load (apply_experts_, `sparse-ffn
ppl --experts`, lm_eval experts=) and at resume (a partial layer that fails is recomputed, so the
artifact equals an uninterrupted run's); `sparse-ffn verify`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

from conftest import BIN, subprocess_env
from sparse_ffn.artifacts.experts import ArtifactWriter, apply_experts_, read_manifest
from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts
from sparse_ffn.cli import main
from sparse_ffn.errors import UserError
from tiny import CORPUS, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrate(model_dir, data, out, k=4, seed=0):
    from sparse_ffn.artifacts.data import token_windows

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    windows = token_windows(tok, Path(data).read_text(), 32, 6 * 32)
    settings = ExpertsSettings(num_clusters=k, sparsity=0.5, kmeans_restarts=2, seed=seed)
    return calibrate_experts(model, windows, settings, out, progress=False, batch_size=4)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """A tiny Llama (3 layers), its calibration text, and three artifacts: K=4 (the reference), K=4 with
    another k-means seed (foreign files of the same shape), K=2; plus a K=4 run killed before layer 2."""
    root = tmp_path_factory.mktemp("integrity")
    model = make_tiny_model("llama", root / "llama")
    data = root / "calib.txt"
    data.write_text(CORPUS * 8)
    ref = _calibrate(model, data, root / "ref").path
    other = _calibrate(model, data, root / "other", seed=1).path
    k2 = _calibrate(model, data, root / "k2", k=2).path
    real = ArtifactWriter.write_layer

    def dies_at_layer_2(self, layer, *args, **kw):
        if layer == 2:
            raise KeyboardInterrupt
        return real(self, layer, *args, **kw)

    ArtifactWriter.write_layer = dies_at_layer_2
    try:
        with pytest.raises(KeyboardInterrupt):
            _calibrate(model, data, root / "killed")
        with pytest.raises(KeyboardInterrupt):
            _calibrate(model, data, root / "killed_other", seed=1)
    finally:
        ArtifactWriter.write_layer = real
    return {"root": root, "model": model, "data": data, "ref": ref, "other": other, "k2": k2,
            "partial": root / "killed.partial", "partial_other": root / "killed_other.partial"}


def error_lines(err: str) -> list[str]:
    """The `sparse-ffn:` lines of stderr (transformers' own progress bars aside), asserting no traceback."""
    assert "Traceback" not in err, err[-2000:]
    return [line for line in err.splitlines() if line.startswith("sparse-ffn:")]


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def _rehash(d: Path, m: dict) -> None:
    """Make the manifest's sha256/bytes agree with the files now in place (a consistent forgery)."""
    for e in m["layers"]:
        data = (d / e["file"]).read_bytes()
        e["sha256"], e["bytes"] = hashlib.sha256(data).hexdigest(), len(data)


def _swap(d: Path, a: str, b: str) -> None:
    tmp = d / "swap.tmp"
    (d / a).rename(tmp)
    (d / b).rename(d / a)
    tmp.rename(d / b)


# Each tampering: (name, function(artifact dir, arts) -> None, text the one-line error must contain)
def t_swapped(d, arts):
    _swap(d, "layer_000.safetensors", "layer_001.safetensors")


def t_swapped_rehashed(d, arts):
    _swap(d, "layer_000.safetensors", "layer_001.safetensors")
    m = _manifest(d)
    _rehash(d, m)
    _write_manifest(d, m)


def t_manifest_k8(d, arts):
    m = _manifest(d)
    m["settings"]["num_clusters"] = 8
    _write_manifest(d, m)


def t_k2_file(d, arts):
    shutil.copy(arts["k2"] / "layer_001.safetensors", d / "layer_001.safetensors")
    m = _manifest(d)
    _rehash(d, m)
    _write_manifest(d, m)


def t_foreign(d, arts):
    shutil.copy(arts["other"] / "layer_001.safetensors", d / "layer_001.safetensors")


def t_outside_absolute(d, arts):
    m = _manifest(d)
    m["layers"][1]["file"] = str(arts["other"] / "layer_001.safetensors")
    _write_manifest(d, m)


def t_outside_dotdot(d, arts):
    m = _manifest(d)
    m["layers"][1]["file"] = "../other/layer_001.safetensors"
    _write_manifest(d, m)


def t_outside_symlink(d, arts):
    m = _manifest(d)
    (d / "link.safetensors").symlink_to(arts["ref"] / "layer_001.safetensors")
    m["layers"][1]["file"] = "link.safetensors"
    _write_manifest(d, m)


TAMPER = {
    "swapped": (t_swapped, "sha256"),
    "swapped_rehashed": (t_swapped_rehashed, "holds layer 1, the manifest puts it at layer 0"),
    "manifest_k8": (t_manifest_k8, "K=4 experts, the manifest says num_clusters=8"),
    "k2_file": (t_k2_file, "K=2 experts, the manifest says num_clusters=4"),
    "foreign": (t_foreign, "sha256"),
    "outside_absolute": (t_outside_absolute, "is not a file inside the artifact directory"),
    "outside_dotdot": (t_outside_dotdot, "is not a file inside the artifact directory"),
    "outside_symlink": (t_outside_symlink, "leads outside the artifact directory"),
}


def _tampered(arts, name) -> Path:
    d = _copy(arts["ref"], arts["root"] / f"t_{name}")
    TAMPER[name][0](d, arts)
    return d


def test_untampered_artifact_loads_and_verifies(arts, capsys):
    model = transformers.AutoModelForCausalLM.from_pretrained(arts["model"])
    apply_experts_(model, arts["ref"]).remove()
    assert main(["verify", str(arts["ref"])]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ok"] and out["kind"] == "experts" and out["layers"] == out["layers_ok"] == 3
    assert out["num_clusters"] == 4 and out["problems"] == []


@pytest.mark.parametrize("name", sorted(TAMPER))
def test_tampered_artifact_is_refused_at_load(arts, name, capsys):
    d = _tampered(arts, name)
    message = TAMPER[name][1]
    model = transformers.AutoModelForCausalLM.from_pretrained(arts["model"])
    with torch.no_grad():
        dense = model(torch.tensor([[5, 9, 12, 40]])).logits
    with pytest.raises(UserError, match=message) as err:
        apply_experts_(model, d)
    assert "\n" not in str(err.value) and str(d) in str(err.value)
    with torch.no_grad():  # nothing stays installed
        assert torch.equal(model(torch.tensor([[5, 9, 12, 40]])).logits, dense)
    # the same through `sparse-ffn ppl --experts` and `sparse-ffn verify`: exit 2, one line
    argv = ["ppl", "--experts", str(d), "--model", str(arts["model"]), "--data", str(arts["data"]),
            "--seq-len", "32", "--tokens", "64", "--quiet"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("sparse-ffn: error: ") and message in lines[0], lines
    assert captured.out == ""
    assert main(["verify", str(d)]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["ok"] is False and out["kind"] == "experts" and any(message in p for p in out["problems"])
    assert len(captured.err.strip().splitlines()) == 1


def test_a_file_is_hashed_once_per_state_and_again_once_it_changes(tmp_path, monkeypatch):
    """Layer-streamed evaluation checks every layer file at every call: a file unchanged since it was
    hashed is not hashed again; one written in place (same size) is, and refused; one hashed within
    RACY_NS of its last change is hashed at every check (a change in the same timestamp tick)."""
    import os
    import time

    from sparse_ffn.artifacts import integrity

    path = tmp_path / "layer_000.safetensors"
    path.write_bytes(b"x" * 1000)
    entry = {"layer": 0, "bytes": 1000, "sha256": hashlib.sha256(b"x" * 1000).hexdigest()}
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p) or real(p))
    integrity.check_digest(path, entry)
    integrity.check_digest(path, entry)
    assert len(hashed) == 2  # just written: racy, hashed every time
    old = time.time_ns() - 2 * integrity.RACY_NS
    os.utime(path, ns=(old, old))  # (ctime moves to now: still racy)
    monkeypatch.setattr(integrity, "RACY_NS", -10**12)  # treat the ctime as old enough
    integrity.check_digest(path, entry)
    integrity.check_digest(path, entry)
    integrity.check_digest(path, entry)
    assert len(hashed) == 3  # unchanged since it was hashed: once
    with open(path, "r+b") as f:
        f.write(b"y")  # in place, same size, same inode
    with pytest.raises(UserError, match="sha256"):
        integrity.check_digest(path, entry)
    assert len(hashed) == 4


def test_tampered_artifact_is_refused_by_lm_eval(arts, local_tasks):
    """The stock lm_eval script with experts=: exit != 0, one `sparse-ffn: error:` line, no traceback."""
    procs = {}
    for name in ("swapped", "manifest_k8", "k2_file", "outside_absolute"):
        d = _copy(arts["ref"], arts["root"] / f"lm_{name}")
        TAMPER[name][0](d, arts)
        cmd = [str(BIN / "lm_eval"), "--model", "sparse_ffn", "--model_args",
               f"pretrained={arts['model']},experts={d},max_length=64", "--tasks", "piqa_local",
               "--include_path", str(local_tasks), "--limit", "1", "--device", "cpu"]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=subprocess_env())
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode != 0, name
        errors = [line for line in err.splitlines() if line.startswith("sparse-ffn: error:")]
        assert len(errors) == 1 and TAMPER[name][1] in errors[0], (name, err[-2000:])
        assert "Traceback" not in err, name


# ------------------------------------------------------------------------------------------------
# Resume over a tampered partial directory
# ------------------------------------------------------------------------------------------------

def _marker(d: Path, layer: int) -> dict:
    return json.loads((d / f"layer_{layer:03d}.json").read_text())


def r_swapped(d, arts):
    _swap(d, "layer_000.safetensors", "layer_001.safetensors")


def r_swapped_with_markers(d, arts):
    _swap(d, "layer_000.safetensors", "layer_001.safetensors")
    _swap(d, "layer_000.json", "layer_001.json")


def r_k2_file(d, arts):  # a K=2 layer file whose marker was forged to match it
    shutil.copy(arts["k2"] / "layer_001.safetensors", d / "layer_001.safetensors")
    m = _marker(d, 1)
    data = (d / "layer_001.safetensors").read_bytes()
    m["sha256"], m["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (d / "layer_001.json").write_text(json.dumps(m))


def r_foreign(d, arts):
    shutil.copy(arts["other"] / "layer_001.safetensors", d / "layer_001.safetensors")


def r_foreign_with_marker(d, arts):  # file and marker of another calibration (other k-means seed)
    shutil.copy(arts["partial_other"] / "layer_001.safetensors", d / "layer_001.safetensors")
    shutil.copy(arts["partial_other"] / "layer_001.json", d / "layer_001.json")


def r_outside(d, arts):
    m = _marker(d, 1)
    m["file"] = str(arts["other"] / "layer_001.safetensors")
    (d / "layer_001.json").write_text(json.dumps(m))


RESUME = {  # name: (tampering, first layer recomputed, text of the warning)
    "swapped": (r_swapped, 0, "sha256"),
    "swapped_with_markers": (r_swapped_with_markers, 0, "marks layer 1"),
    "k2_file": (r_k2_file, 1, "K=2 experts, the manifest says num_clusters=4"),
    "foreign": (r_foreign, 1, "sha256"),
    "foreign_with_marker": (r_foreign_with_marker, 1, "written by another calibration"),
    "outside": (r_outside, 1, "expected layer 1 ('layer_001.safetensors')"),
}


def _comparable(d: Path) -> tuple[dict, dict]:
    """(bytes of every layer file, manifest without its timing fields)."""
    m = _manifest(d)
    m.pop("run")
    for e in m["layers"]:
        e["stats"].pop("seconds")
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}, m


@pytest.mark.parametrize("name", sorted(RESUME))
def test_resume_over_tampered_partial_equals_uninterrupted(arts, name, capsys):
    tamper, first, message = RESUME[name]
    out = arts["root"] / f"resume_{name}"
    partial = _copy(arts["partial"], out.with_name(out.name + ".partial"))
    tamper(partial, arts)
    capsys.readouterr()
    res = _calibrate(arts["model"], arts["data"], out)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("sparse-ffn: warning:")]
    assert len(warnings) == 1 and message in warnings[0], err
    assert f"recomputing from layer {first}" in warnings[0]
    assert res.resumed_from == first
    assert _comparable(res.path) == _comparable(arts["ref"])
    assert read_manifest(res.path)["layers"][1]["file"] == "layer_001.safetensors"


def test_untampered_partial_resumes(arts, capsys):
    out = arts["root"] / "resume_clean"
    _copy(arts["partial"], out.with_name(out.name + ".partial"))
    res = _calibrate(arts["model"], arts["data"], out)
    assert res.resumed_from == 2 and "warning" not in capsys.readouterr().err
    assert _comparable(res.path) == _comparable(arts["ref"])


# ------------------------------------------------------------------------------------------------
# Types of the manifest and the layer files
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(layers=["x"]), "'layers[0]' must be an object, not a string"),
    (lambda m: m.update(model="x"), "'model' must be an object, not a string"),
    (lambda m: m["model"].update(fingerprint=[1]), "'model.fingerprint' must be an object, not an array"),
    (lambda m: m["settings"].update(num_clusters="4"), "'settings.num_clusters' must be an integer, not a string"),
    (lambda m: m["settings"].update(num_clusters=True), "'settings.num_clusters' must be an integer, not a boolean"),
    (lambda m: m["layers"][0].update(sha256=5), "'layers[0].sha256' must be a string"),
    (lambda m: m["layers"][0].update(sha256="abc"), "'layers[0].sha256' must be 64 lowercase hex digits"),
    (lambda m: m["layers"][1].update(bytes="10"), "'layers[1].bytes' must be an integer"),
    (lambda m: m["layers"][2].update(stats=[]), "'layers[2].stats' must be an object, not an array"),
    (lambda m: m["layers"][2].update(layer=0), "'layers[2].layer' is 0, expected 2"),
    (lambda m: m["layers"][2].pop("file"), "'layers[2].file' is missing"),
    (lambda m: m.update(layout={"roles": ["gate", "fc9"]}), "'layout.roles' has 'fc9'"),
    (lambda m: m.update(data=3), "'data' must be an object, not an integer"),
    (lambda m: m.update(run="x"), "'run' must be an object, not a string"),
    (lambda m: m.update(created_by={"version": 1}), "'created_by.version' must be a string, not an integer"),
    (lambda m: m.update(settings=None), "'settings' must be an object, not null"),
    (lambda m: m["model"]["fingerprint"].update(num_layers=4), "'model.fingerprint.num_layers' is 4"),
])
def test_manifest_types_are_checked_with_one_line(arts, edit, message, capsys):
    d = _copy(arts["ref"], arts["root"] / "types")
    m = _manifest(d)
    edit(m)
    _write_manifest(d, m)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        read_manifest(d)
    assert str(err.value).startswith(str(d / "manifest.json")) and "\n" not in str(err.value)
    argv = ["ppl", "--experts", str(d), "--data", str(arts["data"]), "--seq-len", "32", "--quiet"]
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines


def test_layer_file_metadata_types_are_checked(arts):
    """A layer file rewritten with wrong-typed metadata (and a manifest agreeing on its hash)."""
    from safetensors.torch import load_file, save_file

    d = _copy(arts["ref"], arts["root"] / "meta_types")
    path = d / "layer_001.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sparse_ffn"])
    tensors = load_file(str(path))
    cases = [
        (lambda x: x.update(layer="1"), "'layer' must be an integer, not a string"),
        (lambda x: x["experts"]["down"].update(shape=[4, 2]), "'experts.down.shape' must have at least 3"),
        (lambda x: x["experts"]["down"].update(encoding=["dense"] * 3), "lists 3 experts, shape says 4"),
        (lambda x: x["experts"]["up"].update(router="down"), "'experts.up.router' is 'down', expected 'in'"),
        (lambda x: x["routers"]["in"].update(clusters=3), "has 4 experts, its router 3 clusters"),
        (lambda x: x["experts"]["down"].update(dtype="int8"), "'experts.down.dtype' must be one of"),
        (lambda x: x["experts"]["gate"].update(shape=[4, 128, 65]), "tensors of expert.gate.0 do not fit"),
    ]
    for edit, message in cases:
        bad = json.loads(json.dumps(meta))
        edit(bad)
        save_file(tensors, str(path), metadata={"sparse_ffn": json.dumps(bad)})
        m = _manifest(d)
        _rehash(d, m)
        _write_manifest(d, m)
        model = transformers.AutoModelForCausalLM.from_pretrained(arts["model"])
        with pytest.raises(UserError, match=message.replace("[", r"\[")) as err:
            apply_experts_(model, d)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_verify_reports_every_bad_layer_and_threshold_files(arts, tmp_path, capsys):
    d = _copy(arts["ref"], arts["root"] / "verify_two")
    shutil.copy(arts["other"] / "layer_000.safetensors", d / "layer_000.safetensors")
    shutil.copy(arts["other"] / "layer_002.safetensors", d / "layer_002.safetensors")
    assert main(["verify", str(d)]) == 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["layers_ok"] == 1 and len(out["problems"]) == 2
    assert "layer_000.safetensors" in out["problems"][0] and "layer_002.safetensors" in out["problems"][1]
    good = tmp_path / "thr.json"
    good.write_text(json.dumps({"format": "sparse-ffn/thresholds", "version": 1, "thresholds": [0.1, 0.2, 0.3],
                                "model": {"num_layers": 3, "d_ff": 64}}))
    assert main(["verify", str(good)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"ok": True, "kind": "thresholds", "path": str(good.resolve()), "problems": [], "layers": 3,
                   "strategy": "cett", "model": {"num_layers": 3, "d_ff": 64}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "sparse-ffn/thresholds", "version": 1, "thresholds": [0.1, 0.2],
                               "model": {"num_layers": 3}}))
    assert main(["verify", str(bad)]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["ok"] is False and out["problems"] == [f"{bad}: 2 thresholds, but 'model.num_layers' is 3"]
    assert captured.err.strip() == f"sparse-ffn: error: {bad}: 2 thresholds, but 'model.num_layers' is 3"
    assert main(["verify", str(tmp_path / "nope")]) == 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kind"] is None and "not found" in out["problems"][0]
