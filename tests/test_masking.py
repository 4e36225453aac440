"""The masking core against slow, obvious recomputations on real (tiny, random) HF models."""

import math

import pytest
import torch
import transformers

from sparse_ffn.errors import UserError
from sparse_ffn.core.ffn import find_ffns
from sparse_ffn.core.masking import SparsityConfig, sparsify_


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=64, **overrides)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def capture_down_inputs(model, ffns):
    """Pre-hooks that record what each down_proj receives (registered order decides what they see)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [f.down.register_forward_pre_hook(lambda m, a, i=f.layer: seen.__setitem__(i, a[0].clone()))
             for f in ffns]
    return seen, hooks


def test_cett_masks_exactly_entries_below_t_over_column_norm():
    model = tiny_llama()
    ffns = find_ffns(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    before, h1 = capture_down_inputs(model, ffns)  # sees `a` before masking
    with torch.no_grad():
        model(ids)
    # thresholds: the median contribution size s_i = |a_i| * ||w_i|| of each layer
    norms = [f.down_weight().detach() for f in ffns]
    col_norms = [[math.sqrt(sum(float(w[r, i]) ** 2 for r in range(w.shape[0]))) for i in range(w.shape[1])]
                 for w in norms]
    thresholds = tuple(float((before[l].abs() * torch.tensor(col_norms[l])).median()) for l in range(3))
    handle = sparsify_(model, SparsityConfig("cett", thresholds=thresholds))
    after, h2 = capture_down_inputs(model, ffns)  # registered later: sees the masked `a`
    with torch.no_grad():
        model(ids)
    masked_total = 0
    for l in range(3):
        a, out = before[l].reshape(-1, 48), after[l].reshape(-1, 48)
        for j in range(a.shape[0]):
            for i in range(48):
                below = abs(float(a[j, i])) < thresholds[l] / col_norms[l][i]
                assert (float(out[j, i]) == 0.0) == (below or float(a[j, i]) == 0.0), (l, j, i)
                if below:
                    masked_total += 1
                else:
                    assert float(out[j, i]) == float(a[j, i])
    summary = handle.stats.summary()
    assert summary["tokens"] == 18
    assert summary["mean"] == pytest.approx(masked_total / (3 * 18 * 48), abs=1e-12)
    assert 0.3 < summary["mean"] < 0.7
    for h in h1 + h2:
        h.remove()


@pytest.mark.parametrize("strategy", ["dense", "cett"])
def test_zero_threshold_and_dense_are_bit_identical(strategy):
    model = tiny_llama()
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        handle = sparsify_(model, SparsityConfig(strategy, thresholds=(0.0,) * 3 if strategy == "cett" else None))
        assert torch.equal(model(ids).logits, ref)
        assert handle.stats.summary()["mean"] == 0.0
        handle.remove()
        assert torch.equal(model(ids).logits, ref)


def test_cett_with_gradients_matches_in_place_inference_path():
    """No grad: `a` is masked in place; with grad: out of place (autograd intact). Same numbers."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    handle = sparsify_(model, SparsityConfig("cett", thresholds=(0.02, 0.03, 0.04)))
    with torch.no_grad():
        ref = model(ids).logits
    logits = model(ids).logits  # gradients enabled
    assert torch.equal(logits.detach(), ref)
    logits.logsumexp(-1).sum().backward()
    down = find_ffns(model)[0].down
    assert down.weight.grad is not None and torch.isfinite(down.weight.grad).all()
    counts, tokens = handle.stats.counts()
    assert tokens == 28 and counts[0] > 0
    handle.remove()


def test_remove_restores_dense_after_real_masking():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
        handle = sparsify_(model, SparsityConfig("fat", arg=0.05))
        assert not torch.equal(model(ids).logits, ref)
        handle.remove()
        assert torch.equal(model(ids).logits, ref)
        sparsify_(model, SparsityConfig("dense")).remove()  # can be applied again after remove


def test_fat_and_topk_against_obvious_recomputation():
    model = tiny_llama()
    ffns = find_ffns(model)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    gate_acts: dict[int, torch.Tensor] = {}
    hooks = [f.act.register_forward_hook(lambda m, a, o, i=f.layer: gate_acts.__setitem__(i, o.clone()))
             for f in ffns]
    for config in (SparsityConfig("fat", arg=0.02), SparsityConfig("topk", arg=0.25)):
        handle = sparsify_(model, config)
        after, h2 = capture_down_inputs(model, ffns)
        with torch.no_grad():
            model(ids)
        for l in range(3):
            g = gate_acts[l].reshape(-1, 48)  # hook registered first: the unmasked act(g)
            out = after[l].reshape(-1, 48)
            for j in range(g.shape[0]):
                row = [abs(float(x)) for x in g[j]]
                if config.strategy == "fat":
                    inactive = [x <= 0.02 for x in row]
                else:
                    k = round(0.25 * 48)
                    kept = sorted(range(48), key=lambda i: -row[i])[:k]
                    inactive = [i not in kept for i in range(48)]
                for i in range(48):
                    if inactive[i]:
                        assert float(out[j, i]) == 0.0
        if config.strategy == "topk":
            assert handle.stats.summary()["mean"] == pytest.approx(1 - 12 / 48)
        handle.remove()
        for h in h2:
            h.remove()
    for h in hooks:
        h.remove()


def test_attention_mask_excludes_padding_from_counts():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    handle = sparsify_(model, SparsityConfig("cett", thresholds=(0.01,) * 3))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    padded = handle.stats.counts()
    handle.stats.reset()
    with torch.no_grad():
        model(ids[:1])
        model(ids[1:, 2:])
    alone = handle.stats.counts()
    assert padded[1] == alone[1] == 10
    # the same real tokens give the same counts (left padding does not change real positions' `a`
    # beyond float noise here, so compare loosely on inactive counts)
    assert all(abs(x - y) <= 2 for x, y in zip(padded[0], alone[0]))


def test_config_and_model_mismatch_errors():
    with pytest.raises(UserError, match="strategy"):
        SparsityConfig("magic")
    with pytest.raises(UserError, match="topk"):
        SparsityConfig("topk", arg=1.5)
    with pytest.raises(UserError, match="finite"):
        SparsityConfig("cett", thresholds=(float("nan"),))
    model = tiny_llama()
    with pytest.raises(UserError, match="3 FFN layers"):
        sparsify_(model, SparsityConfig("cett", thresholds=(0.1, 0.1)))
    handle = sparsify_(model, SparsityConfig("dense"))
    with pytest.raises(UserError, match="already sparsified"):
        sparsify_(model, SparsityConfig("dense"))
    handle.remove()
