"""Perplexity, paper-parity: mean token NLL over non-overlapping windows, every predicted token counted.

This is the project's one perplexity implementation (calibration, benchmarks, reports use it). It is
not lm-eval's `wikitext` word/byte perplexity: label them apart when reporting both.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from sparse_ffn.core.lm_head import HeadInChunks


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embeddings' device (first parameter otherwise); for
    weights that accelerate offloads ("meta" until used), the device they run on."""
    try:
        emb = model.get_input_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            device = emb.weight.device
            if device.type == "meta":
                device = torch.device(getattr(getattr(emb, "_hf_hook", None), "execution_device", None) or "cpu")
            return device
    except (AttributeError, NotImplementedError):
        pass
    return next(model.parameters()).device


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, *, progress: bool = False,
               desc: str = "perplexity", per_window: bool = False,
               logits: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """{"perplexity", "nll", "tokens"} of `model` on `windows` (LongTensor (n_windows, seq_len)).

    Each window is one independent sequence (no attention mask: every position is real); position j
    predicts token j+1, so a window contributes seq_len - 1 predicted tokens. nll = mean over all
    predicted tokens of -log p (natural log, accumulated in float64); perplexity = exp(nll). Runs on the
    model's device, without gradients; batch composition does not change which tokens count.
    per_window=True adds "window_nll": each window's summed NLL (floats), e.g. for sub-set ratios.
    logits: `logits(i, ids)` gives the (batch, seq, vocab) logits of the i-th batch instead of a forward
    (e.g. a layer-streamed evaluation, `model_adapters.streaming`; it must run the model's own head, which
    `HeadInChunks` may defer). Token NLLs come from `lm_head.HeadInChunks` (the head a few positions at a
    time where the model's logits are its head's output unchanged; the full logits otherwise).
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be (n_windows >= 1, seq_len >= 2), got {tuple(windows.shape)}")
    device = model_device(model)
    batch_size = max(1, int(batch_size))
    starts = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    sums = []
    with torch.inference_mode(), HeadInChunks(model) as head:  # the head a few positions at a time (lm_head.py)
        for n, i in enumerate(starts):
            ids = windows[i: i + batch_size].to(device)
            out = model(input_ids=ids, use_cache=False).logits if logits is None else logits(n, ids)
            sums.append(head.token_nll(out, ids.to(out.device)).double().sum(dim=1))
            del out
    window_nll = torch.cat(sums).cpu()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean = float(window_nll.sum()) / tokens
    out = {"perplexity": math.exp(mean), "nll": mean, "tokens": tokens}
    if per_window:
        out["window_nll"] = window_nll.tolist()
    return out
