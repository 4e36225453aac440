"""FFN discovery across model families, through PEFT, and the clear error for unknown layouts."""

import pytest
import torch
import transformers

from sparse_ffn.errors import UserError
from sparse_ffn.core.ffn import FFNNames, find_ffns
from sparse_ffn.core.masking import SparsityConfig, sparsify_
from tiny import ARCHS, make_tiny_model

GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {a: transformers.AutoModelForCausalLM.from_pretrained(make_tiny_model(a, root / a)).eval() for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_is_found_and_masking_hits_the_down_input(models, arch):
    model = models[arch]
    ffns = find_ffns(model)
    assert len(ffns) == 3 and [f.layer for f in ffns] == [0, 1, 2]
    assert all(f.gated == (arch in GATED) for f in ffns)
    assert ffns[0].d_ff == 128 and ffns[0].down_weight().shape == (64, 128)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        handle = sparsify_(model, SparsityConfig("cett", thresholds=(0.0,) * 3))
        assert torch.equal(model(ids).logits, ref)  # threshold 0 = dense, bit for bit, every family
        handle.remove()
        handle = sparsify_(model, SparsityConfig("topk", arg=0.25))
        out = model(ids).logits
        assert not torch.equal(out, ref)
        assert handle.stats.summary()["mean"] == pytest.approx(0.75)
        handle.remove()


def test_gpt2_conv1d_column_norms_are_of_the_transposed_weight(models):
    f = find_ffns(models["gpt2"])[0]
    w = f.down.weight  # Conv1D stores (d_in=d_ff, d_out=d_model)
    assert torch.allclose(f.down_column_norms(), w.norm(dim=1))


def test_through_peft_wrapper(models):
    peft = pytest.importorskip("peft")
    base = models["llama"]
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["down_proj", "up_proj"]))
    ffns = find_ffns(wrapped)
    assert len(ffns) == 3
    assert torch.equal(ffns[0].down_weight(), base.model.layers[0].mlp.down_proj.base_layer.weight)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        ref = wrapped(input_ids=ids).logits
        handle = sparsify_(wrapped, SparsityConfig("cett", thresholds=(0.0,) * 3))
        assert torch.equal(wrapped(input_ids=ids).logits, ref)
        assert handle.stats.summary()["tokens"] == 7
        handle.remove()
    wrapped.unload()


class _OddBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = torch.nn.ModuleDict({"inp": torch.nn.Linear(4, 8), "act": torch.nn.ReLU(), "out": torch.nn.Linear(8, 4)})

    def forward(self, x):
        return x + self.ff["out"](self.ff["act"](self.ff["inp"](x)))


class OddModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_OddBlock(), _OddBlock()])

    def forward(self, input_ids):
        x = torch.nn.functional.one_hot(input_ids, 4).float()
        for b in self.blocks:
            x = b(x)
        return x


def test_unknown_layout_error_names_the_class_and_the_way_out():
    with pytest.raises(UserError) as e:
        find_ffns(OddModel())
    msg = str(e.value)
    assert "OddModel" in msg and "ffn_down=" in msg and "\n" not in msg


def test_explicit_names_make_an_unknown_layout_work():
    model = OddModel()
    ffns = find_ffns(model, FFNNames(down="ff.out", act="ff.act", up="ff.inp", layers="blocks"))
    assert len(ffns) == 2 and not ffns[0].gated
    handle = sparsify_(model, SparsityConfig("dense"), FFNNames(down="ff.out", act="ff.act", layers="blocks"))
    model(torch.tensor([[0, 1, 2, 3]]))
    s = handle.stats.summary()
    assert s["tokens"] == 4 and 0 <= s["mean"] <= 1  # ReLU: natural zeros counted
    with pytest.raises(UserError, match="do not match"):
        find_ffns(model, FFNNames(down="ff.nope"))


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
def test_padded_batch_counts_only_real_tokens(models, arch):
    """OPT's FFN sees (batch * seq, d_ff): counts are still matched to the (batch, seq) mask."""
    model = models[arch]
    ids = torch.randint(4, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    handle = sparsify_(model, SparsityConfig("topk", arg=0.5))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    inactive, tokens = handle.stats.counts()
    handle.remove()
    assert tokens == 10 and inactive == [10 * 64] * 3
