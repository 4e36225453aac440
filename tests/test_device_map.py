"""A model spread by accelerate (layers on the CPU and offloaded to disk, or every weight offloaded to the
CPU with "meta" placeholders) masks, counts, evaluates and calibrates exactly like the model in one piece.

Offloaded weights sit on the meta device until accelerate's hook loads them, which runs after our forward
pre-hooks: the CETT thresholds tau = t / ||W_down[:, i]|| must come from the real weights (the offload
map), not from the placeholders.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lm_eval.api.instance import Instance
from sparse_ffn.calibrate.thresholds import calibrate_thresholds
from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts
from sparse_ffn.cli import main
from sparse_ffn.errors import UserError
from sparse_ffn.artifacts.experts import apply_experts_
from sparse_ffn.core.ffn import find_ffns, model_fingerprint
from sparse_ffn.core.masking import SparsityConfig, sparsify_
from sparse_ffn.model_adapters.lm_eval_adapter import SparseFFNLM
from sparse_ffn.artifacts.thresholds import load as load_thresholds
from tiny import CORPUS, make_tiny_experts

THRESHOLDS = (2e-4, 2e-4, 2e-4)
# layer 0 in CPU memory, layers 1-2 offloaded to disk (meta in the model, loaded per forward)
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


def whole(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def split(model_dir, tmp_path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, device_map=SPLIT,
                                                             offload_folder=str(tmp_path / "offload")).eval()


def cpu_offloaded(model_dir):
    from accelerate import cpu_offload

    return cpu_offload(whole(model_dir), execution_device="cpu")


@pytest.fixture(scope="module")
def ids(tiny_llama_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    return tok(CORPUS.splitlines()[:4], return_tensors="pt", padding=True)


def test_split_and_offloaded_models_mask_and_count_exactly_like_the_whole(tiny_llama_dir, tmp_path, ids):
    models = {"whole": whole(tiny_llama_dir), "split": split(tiny_llama_dir, tmp_path),
              "offloaded": cpu_offloaded(tiny_llama_dir)}
    assert [f.down.weight.device.type for f in find_ffns(models["split"])] == ["cpu", "meta", "meta"]
    assert {f.down.weight.device.type for f in find_ffns(models["offloaded"])} == {"meta"}
    ref = model_fingerprint(models["whole"], find_ffns(models["whole"]))
    out = {}
    for name, model in models.items():
        assert model_fingerprint(model, find_ffns(model)) == ref  # read from the offload maps
        handle = sparsify_(model, SparsityConfig("cett", thresholds=THRESHOLDS))
        with torch.no_grad():
            out[name] = model(**ids).logits, handle.stats.summary()
        handle.remove()
    logits, summary = out["whole"]
    assert 0.05 < summary["mean"] < 0.95 and summary["tokens"] == int(ids["attention_mask"].sum())
    for name in ("split", "offloaded"):
        assert torch.equal(out[name][0], logits), name
        assert out[name][1] == summary, name


def test_lm_eval_adapter_on_a_split_model(tiny_llama_dir, tmp_path):
    pairs = [("The sun rises in the", " east"), ("Paris is the capital of", " France"), ("Hello", " world")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (CORPUS[:300],), 0)]
    results = {}
    for name, model in (("whole", whole(tiny_llama_dir)), ("split", split(tiny_llama_dir, tmp_path))):
        lm = SparseFFNLM(pretrained=model, tokenizer=str(tiny_llama_dir), thresholds=list(THRESHOLDS),
                         batch_size=2, max_length=32)
        results[name] = lm.loglikelihood(reqs), lm.loglikelihood_rolling(rolling), lm.get_model_info()["sparse_ffn"]
    assert results["split"] == results["whole"]
    assert results["whole"][2]["sparsity"]["tokens"] > 0


def test_calibrate_thresholds_on_a_split_model_equals_the_whole(tiny_llama_dir, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    from sparse_ffn.artifacts.data import token_windows

    windows = token_windows(tok, CORPUS * 4, 32, 4 * 32)
    files = [calibrate_thresholds(m, windows, cett=0.2, batch_size=2, progress=False)
             for m in (whole(tiny_llama_dir), split(tiny_llama_dir, tmp_path))]
    assert files[1].thresholds == files[0].thresholds
    assert files[1].sparsity == files[0].sparsity


def test_calibrate_thresholds_cli_with_a_device_map_file(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    data.write_text(CORPUS * 4)
    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps(SPLIT))
    common = ["calibrate", "thresholds", "--model", str(tiny_llama_dir), "--data", str(data), "--tokens", "128",
              "--seq-len", "32", "--cett", "0.2", "--no-progress"]
    assert main([*common, "--device", "cpu", "--out", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--device-map", str(device_map), "--out", str(tmp_path / "b.json")]) == 0
    assert "spread over cpu, disk" in capsys.readouterr().err
    a, b = (load_thresholds(tmp_path / f) for f in ("a.json", "b.json"))
    assert b.thresholds == a.thresholds
    assert main([*common, "--device-map", str(tmp_path / "none.json"), "--out", str(tmp_path / "c.json")]) == 2
    assert "--device-map" in capsys.readouterr().err


def test_experts_refuse_offloaded_weights_with_one_line(tiny_llama_dir, tmp_path):
    experts = make_tiny_experts(tiny_llama_dir, tmp_path / "experts")
    with pytest.raises(UserError, match="offloaded"):
        apply_experts_(split(tiny_llama_dir, tmp_path), experts)
    with pytest.raises(UserError, match="offloaded"):
        calibrate_experts(split(tiny_llama_dir, tmp_path), torch.zeros(2, 8, dtype=torch.long),
                          ExpertsSettings(num_clusters=2, sparsity=0.5), tmp_path / "out", progress=False)
