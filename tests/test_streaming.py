"""Layer-streamed Sparse Expansion evaluation (issue #13): one layer's experts in memory at a time, the
same loglikelihoods, sparsity and expert usage as the in-memory model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from sparse_ffn.artifacts.data import token_windows
from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts
from sparse_ffn.core.experts import ExpertLinear
from sparse_ffn.errors import UserError
from tiny import CORPUS, make_tiny_model

PAIRS = [("The sun rises in the", " east"), ("Paris is the capital of", " France"), ("Hello", " world"),
         ("Water boils at one hundred", " degrees at sea level"), ("The sun rises in the", " west"),
         ("She put the cup on the", " table"), ("A small model can", " still learn a little"),
         ("To open a jar", " run the lid under hot water"), ("Hello", " world")]  # a duplicate input too
DOCS = [CORPUS[:300], CORPUS[300:900], "Short text.", CORPUS[:300]]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    data = CORPUS * 8
    out = {}
    for arch in ("llama", "gpt2", "opt"):
        model_dir = make_tiny_model(arch, root / arch)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        windows = token_windows(tok, data, 32, 6 * 32)
        res = calibrate_experts(model, windows, ExpertsSettings(num_clusters=4, sparsity=0.5, kmeans_restarts=2),
                                root / f"{arch}_k4", progress=False, batch_size=4)
        out[arch] = (model_dir, res.path)
    return out


def requests():
    from lm_eval.api.instance import Instance

    ll = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)]
    rolling = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
    return ll, rolling


def adapter(model_dir, experts, batch_size, **kw):
    from sparse_ffn.model_adapters.lm_eval_adapter import SparseFFNLM

    return SparseFFNLM(pretrained=str(model_dir), experts=str(experts), device="cpu", batch_size=batch_size,
                       max_length=64, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])  # gated, non-gated (Conv1D), OPT's flattened FFN
@pytest.mark.parametrize("batch_size", [1, 8])
def test_streamed_equals_in_memory(artifacts, arch, batch_size):
    model_dir, experts = artifacts[arch]
    ll, rolling = requests()
    memory = adapter(model_dir, experts, batch_size)
    streamed = adapter(model_dir, experts, batch_size, experts_streaming=True)
    assert streamed.stream is not None and memory.stream is None
    # streamed: no layer holds experts between calls
    assert all(not m.loaded for m in streamed.model.modules() if isinstance(m, ExpertLinear))
    assert memory.loglikelihood(ll) == streamed.loglikelihood(ll)  # exact: (float, bool) tuples
    assert memory.loglikelihood_rolling(rolling) == streamed.loglikelihood_rolling(rolling)
    a, b = memory.get_model_info()["sparse_ffn"], streamed.get_model_info()["sparse_ffn"]
    assert a["expert_usage"] == b["expert_usage"] and a["expert_usage"]["tokens"] > 0
    assert a["sparsity"] == b["sparsity"]
    assert b["experts_streaming"] is True and a["experts_streaming"] is False
    assert all(not m.loaded for m in streamed.model.modules() if isinstance(m, ExpertLinear))


def test_streaming_chosen_by_memory_budget_and_mapped_hidden_states(artifacts):
    model_dir, experts = artifacts["llama"]
    ll, _ = requests()
    memory = adapter(model_dir, experts, 4)
    need = memory.applied.info["experts_memory_bytes"]
    fits = adapter(model_dir, experts, 4, experts_max_memory=need)
    assert fits.stream is None and all(m.loaded for m in fits.model.modules() if isinstance(m, ExpertLinear))
    small = adapter(model_dir, experts, 4, experts_max_memory=f"{need // 2}")
    assert small.stream is not None
    small.stream.max_memory = 1  # hidden states to a memory-mapped file
    assert small.loglikelihood(ll) == memory.loglikelihood(ll) == fits.loglikelihood(ll)
    assert small.stream.last_hidden.mapped and small.stream.last_hidden.batches == []  # dropped after the call
    assert small.get_model_info()["sparse_ffn"]["expert_usage"] == memory.get_model_info()["sparse_ffn"]["expert_usage"]


def test_streaming_refuses_generation_and_auto_batch(artifacts):
    from lm_eval.api.instance import Instance

    model_dir, experts = artifacts["llama"]
    lm = adapter(model_dir, experts, 1, experts_streaming=True)
    with pytest.raises(UserError, match="in-memory mode"):
        lm.generate_until([Instance("generate_until", {}, ("Hello", {"max_gen_toks": 3}), 0)])
    with pytest.raises(UserError, match="batch_size=auto"):
        adapter(model_dir, experts, "auto", experts_streaming=True).loglikelihood(requests()[0])
    with pytest.raises(UserError, match="experts_streaming"):
        adapter(model_dir, experts, 1, experts_streaming="maybe")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_paper_ppl_streamed_equals_in_memory(artifacts, arch, tmp_path):
    from sparse_ffn.tasks.paper_ppl import paper_perplexity

    model_dir, experts = artifacts[arch]
    text = tmp_path / "test.txt"
    text.write_text(CORPUS * 3)
    kw = dict(experts=experts, batch_size=2, device="cpu", per_window=True, tokens=5 * 32)
    a = paper_perplexity(model_dir, text, 32, **kw)
    b = paper_perplexity(model_dir, text, 32, streaming=True, **kw)
    assert a["window_nll"] == b["window_nll"] and a["perplexity"] == b["perplexity"]
    assert a["expert_usage"] == b["expert_usage"] and b["expert_usage"]["tokens"] == 5 * 32
    assert b["experts_streaming"] is True and a["experts_streaming"] is False


def test_experts_decode_into_one_preallocated_stack(artifacts):
    from safetensors import safe_open

    from sparse_ffn.artifacts.expert_files import decode_experts, decode_weight, load_layer_file
    import json

    _, experts = artifacts["llama"]
    path = Path(experts) / "layer_001.safetensors"
    _, loaded, meta = load_layer_file(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    encodings = {e for info in meta["experts"].values() for e in info["encoding"]}
    assert "bitmask" in encodings
    for role, info in meta["experts"].items():
        k, d_out, d_in = info["shape"]
        old = torch.stack([decode_weight(tensors, f"expert.{role}.{i}", (d_out, d_in), info["encoding"][i])
                           for i in range(k)])
        assert torch.equal(loaded[role], old) and loaded[role].is_contiguous()
    # decoded into the stacks given (streaming reuses one per role): no new allocation per layer
    bufs = {role: torch.full(t.shape, 7.0, dtype=t.dtype) for role, t in loaded.items()}
    ptrs = {role: b.data_ptr() for role, b in bufs.items()}
    again = decode_experts(tensors, json.loads(json.dumps(meta)), out=bufs)
    assert all(again[r].data_ptr() == ptrs[r] and torch.equal(again[r], loaded[r]) for r in loaded)
