"""Perplexity with the LM head in position chunks (core/lm_head.py): the same NLLs as the full logits, on
every family, the head deferred only where the model's logits are its head's output, and restored after."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import sparse_ffn.core.lm_head as lm_head
from sparse_ffn.core.lm_head import HeadInChunks, chunked_token_nll
from sparse_ffn.core.perplexity import perplexity
from tiny import ARCHS, make_tiny_model


def full_logits_window_nll(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The obvious computation: the model's whole logits, cross-entropy per window, summed in float64."""
    with torch.inference_mode():
        logits = model(input_ids=windows, use_cache=False).logits
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(),
                                          reduction="none")
    return nll.view(windows.shape[0], -1).double().sum(dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_perplexity_equals_the_full_logits_and_leaves_the_model_as_it_was(arch, tmp_path, monkeypatch):
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", 4 * 384 * 5)  # 5 positions a chunk: rows split unevenly
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(arch, tmp_path)).eval()
    windows = torch.randint(4, 300, (5, 23), generator=torch.Generator().manual_seed(0))
    want = full_logits_window_nll(model, windows)
    head = model.get_output_embeddings()
    for _ in range(2):  # the first call checks the head on its first batch, the second defers it from the start
        got = torch.tensor(perplexity(model, windows, batch_size=2, per_window=True)["window_nll"], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert "forward" not in vars(head)  # the class's forward again
    soft_capped = getattr(model.config, "final_logit_softcapping", None) is not None
    assert (lm_head._PLAIN_HEAD.get(model) is head) == (not soft_capped)  # gemma2 caps its logits: never deferred
    assert torch.equal(full_logits_window_nll(model, windows), want)


def test_a_model_that_changes_its_logits_after_the_head_is_never_deferred(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path)).eval()
    windows = torch.randint(4, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    plain = full_logits_window_nll(model, windows)
    forward = type(model).forward

    def scaled(self, *args, **kwargs):  # a Cohere-style logit scale
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled.__get__(model)
    for _ in range(2):
        got = torch.tensor(perplexity(model, windows, batch_size=2, per_window=True)["window_nll"], dtype=torch.float64)
        assert torch.equal(got, full_logits_window_nll(model, windows))
    assert lm_head._PLAIN_HEAD.get(model) is None
    assert not torch.allclose(got, plain)  # the scale is really applied


def test_chunked_token_nll_is_the_cross_entropy_of_the_whole_rows():
    g = torch.Generator().manual_seed(2)
    head = nn.Linear(8, 50, bias=True)
    hidden, ids = torch.randn(3, 11, 8, generator=g), torch.randint(0, 50, (3, 11), generator=g)
    want = torch.stack([nn.functional.cross_entropy(head(hidden[r, :-1]), ids[r, 1:], reduction="none")
                        for r in range(3)])
    for chunk_bytes in (4 * 50, 4 * 50 * 3, 2**20):  # 1, 3 and all positions a chunk
        lm_head.CHUNK_BYTES, old = chunk_bytes, lm_head.CHUNK_BYTES
        try:
            got = chunked_token_nll(head, hidden, ids, 50)
        finally:
            lm_head.CHUNK_BYTES = old
        assert got.shape == (3, 10)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_an_exception_inside_restores_the_head(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path)).eval()
    perplexity(model, torch.randint(4, 300, (2, 9)), batch_size=2)  # the head is known plain from now on
    head = model.get_output_embeddings()
    with pytest.raises(KeyError):
        with HeadInChunks(model) as chunks:
            assert chunks.deferred and "forward" in vars(head)
            raise KeyError("boom")
    assert "forward" not in vars(head)
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == head.out_features
