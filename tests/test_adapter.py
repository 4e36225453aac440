"""SparseFFNLM in-process: HFLM features keep working (peft, dtype, generate_until, model args)."""

from __future__ import annotations

import pytest
import torch

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from sparse_ffn.errors import UserError
from sparse_ffn.model_adapters.lm_eval_adapter import SparseFFNLM

PAIRS = [("The sun rises in the", " east"), ("To be, or not to be:", " that is the question"),
         ("Once upon a time", " there was a king who lived"), ("Hello", " world")]


def _ll_requests():
    return [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(PAIRS)]


def _gen_requests(n=12):
    return [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": n, "do_sample": False}), i)
            for i, (c, _) in enumerate(PAIRS)]


def test_zero_thresholds_match_hf_for_loglikelihood_and_greedy_generation(tiny_llama_dir):
    hf = HFLM(pretrained=str(tiny_llama_dir), device="cpu", batch_size=2, max_length=128)
    sp = SparseFFNLM(pretrained=str(tiny_llama_dir), thresholds=[0.0, 0.0, 0.0], device="cpu", batch_size=2,
                     max_length=128)
    assert sp.loglikelihood(_ll_requests()) == hf.loglikelihood(_ll_requests())
    assert sp.generate_until(_gen_requests()) == hf.generate_until(_gen_requests())
    info = sp.get_model_info()["sparse_ffn"]
    assert info["sparsity"]["mean"] == 0.0 and info["sparsity"]["tokens"] > 0


def test_generation_counts_prompt_tokens_without_left_padding(tiny_llama_dir):
    sp = SparseFFNLM(pretrained=str(tiny_llama_dir), strategy="dense", device="cpu", batch_size=4, max_length=128)
    reqs = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 1}), i)
            for i, (c, _) in enumerate(PAIRS)]
    sp.generate_until(reqs)
    # with one generated token, generate runs one forward over the (left-padded) prompts only
    prompt_tokens = sum(len(sp.tok_encode(c)) for c, _ in PAIRS)
    assert sp.sparsity.stats.counts()[1] == prompt_tokens


def test_peft_adapter_is_kept_and_zero_thresholds_match(tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["up_proj", "down_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    kw = dict(device="cpu", batch_size=4, max_length=128, peft=str(tmp_path / "lora"))
    hf = HFLM(pretrained=str(tiny_llama_dir), **kw)
    sp = SparseFFNLM(pretrained=str(tiny_llama_dir), thresholds="0,0,0", **kw)
    plain = HFLM(pretrained=str(tiny_llama_dir), device="cpu", batch_size=4, max_length=128)
    ll = sp.loglikelihood(_ll_requests())
    assert ll == hf.loglikelihood(_ll_requests())
    assert ll != plain.loglikelihood(_ll_requests())  # the adapter really is applied


def test_bfloat16_and_fat(tiny_llama_dir):
    sp = SparseFFNLM(pretrained=str(tiny_llama_dir), strategy="fat", prune_arg=0.01, dtype="bfloat16",
                     device="cpu", batch_size=1, max_length=128)
    assert sp.model.dtype == torch.bfloat16
    sp.loglikelihood(_ll_requests())
    s = sp.get_model_info()["sparse_ffn"]["sparsity"]
    assert 0 < s["mean"] < 1 and s["tokens"] > 0


def test_pretrained_from_thresholds_file_and_arg_errors(tiny_llama_dir, tmp_path):
    from sparse_ffn.artifacts.thresholds import ThresholdFile

    path = ThresholdFile(thresholds=[0.0] * 3, model={"name_or_path": str(tiny_llama_dir)}).save(tmp_path / "t.json")
    sp = SparseFFNLM(thresholds=str(path), device="cpu", max_length=64)
    assert sp.sparsity.config.strategy == "cett"
    with pytest.raises(UserError, match="pretrained"):
        SparseFFNLM(thresholds=[0.0, 0.0, 0.0], device="cpu")
    with pytest.raises(UserError, match="only goes with strategy=cett"):
        SparseFFNLM(pretrained=str(tiny_llama_dir), thresholds=[0.0] * 3, strategy="fat", prune_arg=0.1)
    with pytest.raises(UserError, match="topk"):
        SparseFFNLM(pretrained=str(tiny_llama_dir), strategy="topk", prune_arg=2)
