"""The real model: SmolLM2-135M-Instruct (fetched from PyPI, converted once, cached) through `lm_eval`."""

from __future__ import annotations

import pytest
import torch

from conftest import read_samples, run_lm_eval
from sparse_ffn.core.ffn import find_ffns, model_fingerprint
from sparse_ffn.artifacts.thresholds import ThresholdFile

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quantile_thresholds(smollm2_dir, shared_data, tmp_path_factory):
    """t_l = the 30% quantile of s = |a_i| ||w_i|| on a WikiText-2 valid snippet (not a calibration)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ffns = find_ffns(model)
    text = (shared_data / "wikitext2_tokens" / "valid.txt").read_text()[:3000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :256]
    s: dict[int, torch.Tensor] = {}
    hooks = [f.down.register_forward_pre_hook(
        lambda m, a, f=f: s.__setitem__(f.layer, (a[0].abs() * f.down_column_norms()).flatten())) for f in ffns]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    path = tmp_path_factory.mktemp("smol_thr") / "thr.json"
    ThresholdFile(thresholds=[float(s[f.layer].quantile(0.3)) for f in ffns],
                  model={"name_or_path": str(smollm2_dir), **model_fingerprint(model, ffns)}).save(path)
    return path


def _args(model_args: str, local_tasks, tasks: str, limit: str) -> list[str]:
    return ["--model_args", f"{model_args},max_length=256,dtype=float32", "--tasks", tasks,
            "--include_path", str(local_tasks), "--limit", limit, "--device", "cpu", "--batch_size", "8",
            "--log_samples"]


def test_smollm2_zero_thresholds_equal_hf(smollm2_dir, local_tasks, tmp_path):
    hf = run_lm_eval(["--model", "hf", *_args(f"pretrained={smollm2_dir}", local_tasks, "piqa_local", "6")],
                     tmp_path / "hf")
    zero = run_lm_eval(["--model", "sparse_ffn", *_args(f"pretrained={smollm2_dir},thresholds=[{','.join(['0'] * 30)}]",
                                                         local_tasks, "piqa_local", "6")], tmp_path / "zero")
    ll = lambda d: [r[0][0] for s in read_samples(d, "piqa_local") for r in s["resps"]]  # noqa: E731
    assert ll(tmp_path / "zero") == ll(tmp_path / "hf")
    assert zero["results"]["piqa_local"]["acc,none"] == hf["results"]["piqa_local"]["acc,none"]


def test_smollm2_thresholded_scores_and_sparsity(smollm2_dir, local_tasks, quantile_thresholds, tmp_path):
    tasks = "piqa_local,arc_easy_local"
    dense = run_lm_eval(["--model", "sparse_ffn", *_args(f"pretrained={smollm2_dir},strategy=dense", local_tasks,
                                                         tasks, "10")], tmp_path / "dense")
    sparse = run_lm_eval(["--model", "sparse_ffn", *_args(f"thresholds={quantile_thresholds}", local_tasks,
                                                          tasks, "10")], tmp_path / "sparse")
    d, s = dense["config"]["sparse_ffn"]["sparsity"], sparse["config"]["sparse_ffn"]["sparsity"]
    assert d["tokens"] == s["tokens"] > 0
    assert d["mean"] < 0.01  # SiLU: (almost) no exact zeros
    assert len(s["per_layer"]) == 30
    assert 0.15 < s["mean"] < 0.45, s["mean"]  # the 30% quantile of a different text
    # scores: a real model, a little worse when 30% of the FFN contributions are dropped
    for task in ("piqa_local", "arc_easy_local"):
        acc_d, acc_s = dense["results"][task]["acc,none"], sparse["results"][task]["acc,none"]
        assert acc_d >= 0.3 and abs(acc_d - acc_s) <= 0.3, (task, acc_d, acc_s)


def test_smollm2_wikitext_perplexity_moves_a_little(smollm2_dir, local_tasks, quantile_thresholds, tmp_path):
    ppl = {}
    for name, args in (("dense", f"pretrained={smollm2_dir},strategy=dense"), ("sparse", f"thresholds={quantile_thresholds}")):
        cli = _args(args, local_tasks, "wikitext_local", "1")
        cli[cli.index("--limit"):cli.index("--limit") + 2] = ["--samples", '{"wikitext_local": [29]}']  # 3 windows
        res = run_lm_eval(["--model", "sparse_ffn", *cli], tmp_path / name)
        ppl[name] = res["results"]["wikitext_local"]["word_perplexity,none"]
    assert 10 < ppl["dense"] < 300, ppl
    # dropping 30% of the smallest contributions moves perplexity, by a few percent either way on one page
    assert ppl["sparse"] != ppl["dense"] and 0.9 * ppl["dense"] < ppl["sparse"] < 1.5 * ppl["dense"], ppl
