"""Sparse Expansion calibration bounded by one layer (issue #13): earlier layers' experts are not kept,
the layer-input cache may live in memory-mapped files, float32 Hessians are close to float64 ones."""

from __future__ import annotations

import gc
import json

import pytest
import torch
import transformers

from sparse_ffn.artifacts.data import token_windows
from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts, cluster_hessians
from sparse_ffn.calibrate.layer_runner import LayerRunner
from sparse_ffn.calibrate.sparsegpt import sparsegpt_prune
from tiny import CORPUS, make_tiny_model

K = 4
SETTINGS = ExpertsSettings(num_clusters=K, sparsity=0.5, kmeans_restarts=2)


def live_stack_bytes(stack_bytes: int, before: frozenset = frozenset()) -> int:
    """Bytes of the distinct live tensor storages exactly the size of one (K, d_out, d_in) expert stack,
    less those in `before` (alive before the calibration: other tests' models)."""
    seen = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            st = o.untyped_storage()
            if st.nbytes() == stack_bytes and st.data_ptr() not in before:
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def calibrate(tmp_path, layers, monkeypatch, name, **kw):
    model_dir = make_tiny_model("llama", tmp_path / f"m{layers}", num_hidden_layers=layers)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = model.config
    stack = K * cfg.hidden_size * cfg.intermediate_size * 4  # gate, up and down stacks are all this size
    peak = {"bytes": 0}
    run = LayerRunner.run
    gc.collect()
    before = frozenset(o.untyped_storage().data_ptr() for o in gc.get_objects()
                       if isinstance(o, torch.Tensor) and o.device.type == "cpu")

    def watched(self, layer, hidden):
        peak["bytes"] = max(peak["bytes"], live_stack_bytes(stack, before))
        return run(self, layer, hidden)

    monkeypatch.setattr(LayerRunner, "run", watched)
    windows = token_windows(tok, CORPUS * 8, 32, 6 * 32)
    res = calibrate_experts(model, windows, SETTINGS, tmp_path / name, progress=False, batch_size=4, **kw)
    monkeypatch.setattr(LayerRunner, "run", run)
    return res, peak["bytes"], stack


def test_calibration_peak_does_not_grow_with_layers(tmp_path, monkeypatch):
    peaks = {}
    for layers in (2, 5):
        res, peak, stack = calibrate(tmp_path, layers, monkeypatch, f"k{layers}")
        m = json.loads((res.path / "manifest.json").read_text())
        assert m["run"]["memory"]["layer_experts_bytes"] == 3 * stack  # one layer's gate, up, down stacks
        assert m["run"]["memory"]["cache_mapped"] is False and m["run"]["hessian_dtype"] == "float64"
        mem = m["run"]["memory"]
        cache = mem["hidden_bytes"] + mem["layer_inputs_bytes"]
        # the bound: the dense model's RSS (loaded and run once) + two layers' experts + the cache
        assert mem["bound_bytes"] == mem["dense_rss_bytes"] + 2 * 3 * stack + cache
        assert mem["peak_rss_bytes"] == m["run"]["peak_rss_bytes"] >= mem["dense_rss_bytes"] > 0
        assert mem["peak_within_bound"] == (mem["peak_rss_bytes"] <= mem["bound_bytes"])
        peaks[layers] = peak
    # at most one layer's three stacks live at any layer run (none kept from earlier layers)
    assert peaks[2] == peaks[5] == 3 * stack


def test_mapped_layer_input_cache_gives_the_same_files(tmp_path, monkeypatch):
    a, _, _ = calibrate(tmp_path, 3, monkeypatch, "ram")
    b, _, _ = calibrate(tmp_path, 3, monkeypatch, "mapped", max_memory=1)
    mb = json.loads((b.path / "manifest.json").read_text())["run"]["memory"]
    assert mb["cache_mapped"] is True and mb["max_memory"] == 1
    files = sorted(p.name for p in a.path.glob("layer_*.safetensors"))
    assert len(files) == 3
    for f in files:
        assert (a.path / f).read_bytes() == (b.path / f).read_bytes()


def test_keep_applied_loads_the_artifact(tmp_path, monkeypatch):
    res, _, _ = calibrate(tmp_path, 2, monkeypatch, "kept", keep_applied=True)
    assert res.handle is not None and res.handle.source == str(res.path)
    assert all(m.loaded for layer in range(2) for m in res.handle.modules(layer).values())
    res.handle.remove()


def test_float32_hessians_close_to_float64():
    """A 1024-wide layer input with correlated, heavy-tailed features (like FFN activations), 16k tokens
    in 4 clusters: float32 accumulation against float64, and what SparseGPT makes of each."""
    g = torch.Generator().manual_seed(0)
    n, d = 16384, 256
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    x = (torch.randn(n, d, generator=g) ** 3) @ mix + 0.5 * torch.randn(d, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    h64 = cluster_hessians(x, labels, 4, torch.device("cpu"), torch.float64)
    h32 = cluster_hessians(x, labels, 4, torch.device("cpu"), torch.float32)
    w = torch.randn(64, d, generator=g)
    for (a, na), (b, nb) in zip(h64, h32):
        assert na == nb
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5
        pa, pb = sparsegpt_prune(w, a, 0.5), sparsegpt_prune(w, b, 0.5)
        agree = float(((pa == 0) == (pb == 0)).float().mean())
        assert agree > 0.995
        err = lambda p: float((((w - p) @ a) * (w - p)).sum())  # noqa: E731 - reconstruction error on H64
        assert abs(err(pa) - err(pb)) / err(pa) < 1e-3


def test_one_cluster_hessian_at_a_time(tmp_path, monkeypatch):
    """While an expert is pruned, one cluster's Hessian is alive (not the router's K), and no float64
    accumulator: the live CPU tensors shaped like a Hessian (d_in, d_in), float32 or float64, counted by
    storage."""
    from sparse_ffn.calibrate import experts as experts_module

    model_dir = make_tiny_model("llama", tmp_path / "m", num_hidden_layers=2)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sizes = {model.config.hidden_size, model.config.intermediate_size}  # the routers' input widths
    gc.collect()
    before = frozenset(o.untyped_storage().data_ptr() for o in gc.get_objects()
                       if isinstance(o, torch.Tensor) and o.device.type == "cpu")
    seen = {"calls": 0, "most": 0}
    prune = experts_module.prune_expert_into

    def watched(out, wf, h, n, *args):
        d = h.shape[0]
        assert d in sizes
        gc.collect()
        live = {o.untyped_storage().data_ptr() for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and o.device.type == "cpu" and tuple(o.shape) == (d, d)
                and o.dtype in (torch.float32, torch.float64) and o.untyped_storage().data_ptr() not in before}
        seen["calls"] += 1
        seen["most"] = max(seen["most"], len(live))
        return prune(out, wf, h, n, *args)

    monkeypatch.setattr(experts_module, "prune_expert_into", watched)
    res = calibrate_experts(model, token_windows(tok, CORPUS * 8, 32, 6 * 32), SETTINGS, tmp_path / "k4",
                            progress=False, batch_size=4)
    assert seen["calls"] == 2 * 3 * K  # layers x (gate, up, down) x clusters
    assert seen["most"] == 1  # the cluster's Hessian being used, nothing else of its size
    m = json.loads((res.path / "manifest.json").read_text())
    f = model.config.intermediate_size
    assert m["run"]["memory"]["hessian_bytes"] == f * f * 4 + f * f * 8
