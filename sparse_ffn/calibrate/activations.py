"""Dense FFN activations of a model, collected with read-only hooks over calibration windows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_ffn.core.ffn import FFN
from sparse_ffn.core.perplexity import perplexity


def y_from_output(ffn: FFN) -> bool:
    """Whether down_proj's own output minus its bias is y = W a (a plain linear / GPT-2 Conv1D)."""
    return isinstance(ffn.down, nn.Linear) or type(ffn.down).__name__ == "Conv1D"


def collect_activations(model: nn.Module, ffns: list[FFN], windows: Tensor, layers: list[int], *,
                        dtype: torch.dtype = torch.float32, y_norms: bool = True, batch_size: int = 1,
                        progress: bool = False, desc: str = "dense pass") -> tuple[dict, dict, dict]:
    """One dense forward over `windows` with read-only hooks: ({layer: a (N, d_ff) in `dtype`},
    {layer: ||y|| (N,) float32, for every layer whose down_proj output gives it in float32},
    perplexity(..., per_window=True) of the dense model). N = n_windows * seq_len, window-major."""
    n = windows.numel()
    acts = {l: torch.empty(n, ffns[l].d_ff, dtype=dtype, device=ffns[l].down_weight().device) for l in layers}
    ys: dict[int, Tensor] = {}
    pos = {l: 0 for l in range(len(ffns))}
    hooks = []

    def pre(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            acts[layer][pos[layer]: pos[layer] + x.shape[0]].copy_(x)
        return hook

    def post(layer: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            p = pos[layer]
            rows = out.numel() // out.shape[-1]
            if out.dtype == torch.float32 and layer in ys:
                y = out.detach().reshape(rows, -1)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    y = y - bias.detach()
                ys[layer][p: p + rows] = y.norm(dim=1)
            pos[layer] = p + rows
        return hook

    try:
        for f in ffns:
            if f.layer in acts:
                hooks.append(f.down.register_forward_pre_hook(pre(f.layer)))
            if y_norms and y_from_output(f) and f.down_weight().dtype == torch.float32:
                ys[f.layer] = torch.empty(n, dtype=torch.float32, device=f.down_weight().device)
            hooks.append(f.down.register_forward_hook(post(f.layer)))
        ppl = perplexity(model, windows, batch_size, progress=progress, desc=desc, per_window=True)
    finally:
        for h in hooks:
            h.remove()
    bad = [l for l, p in pos.items() if p != n]
    if bad:
        raise RuntimeError(f"FFN hooks saw {pos[bad[0]]} tokens in layer {bad[0]}, expected {n}")
    return acts, ys, ppl
