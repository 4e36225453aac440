"""`calibrate experts --threads T`: k-means and SparseGPT run on T torch threads (1 by default)."""

from __future__ import annotations

import json

import torch

import sparse_ffn.calibrate.experts as experts_module
from sparse_ffn.cli import main


def _record_threads(monkeypatch) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {"kmeans": [], "sparsegpt": []}
    kmeans, prune = experts_module.kmeans, experts_module.sparsegpt_prune

    def counting_kmeans(*args, **kwargs):
        seen["kmeans"].append(torch.get_num_threads())
        return kmeans(*args, **kwargs)

    def counting_prune(*args, **kwargs):
        seen["sparsegpt"].append(torch.get_num_threads())
        return prune(*args, **kwargs)

    monkeypatch.setattr(experts_module, "kmeans", counting_kmeans)
    monkeypatch.setattr(experts_module, "sparsegpt_prune", counting_prune)
    return seen


def _calibrate(model_dir, text_file, out, *extra: str) -> int:
    return main(["calibrate", "experts", "--quiet", "--model", str(model_dir), "--data", str(text_file),
                 "--sparsity", "0.5", "--num-clusters", "2", "--nsamples", "2", "--seq-len", "32",
                 "--device", "cpu", "--out", str(out), *extra])


def test_threads_option_reaches_kmeans_and_sparsegpt(model_dir, text_file, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        seen = _record_threads(monkeypatch)
        assert _calibrate(model_dir, text_file, tmp_path / "t2", "--threads", "2") == 0
        assert seen["kmeans"] and seen["sparsegpt"]
        assert set(seen["kmeans"]) == {2} and set(seen["sparsegpt"]) == {2}, seen
        run = json.loads((tmp_path / "t2" / "manifest.json").read_text())["run"]
        assert run["threads"] == {"sweeps": 2, "torch": 2}
    finally:
        torch.set_num_threads(before)


def test_without_threads_the_sweeps_default_to_one_thread(model_dir, text_file, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = _record_threads(monkeypatch)
        assert _calibrate(model_dir, text_file, tmp_path / "t1") == 0
        assert set(seen["kmeans"]) == {1} and set(seen["sparsegpt"]) == {1}, seen
        assert torch.get_num_threads() == 2  # restored after each phase
    finally:
        torch.set_num_threads(before)
