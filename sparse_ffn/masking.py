"""Activation masking: zero inactive entries of the FFN activation `a` before down_proj (SPEC section 1).

`sparsify_(model, config)` installs the hooks and returns a handle whose `.stats` counts inactive
(token, neuron) pairs and whose `.remove()` restores the dense model. Torch only: no harness import.

Where each strategy acts (a = act(g) * u for gated layouts, a = act(h) otherwise):
- dense: counts exact zeros of `a` (natural sparsity), changes nothing.
- fat:   act output entries with |act(g_i)| <= eps are zeroed (hook on the activation module).
- topk:  per token, all but the round(ratio * d_ff) largest |act(g_i)| are zeroed (activation module).
- cett:  a_i with |a_i| < t_l / ||W_down[:, i]|| is zeroed (pre-hook on down_proj).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import UserError
from .ffn import FFN, FFNNames, find_ffns

Strategy = Literal["dense", "fat", "topk", "cett"]
STRATEGIES: tuple[str, ...] = ("dense", "fat", "topk", "cett")


@dataclass(frozen=True)
class SparsityConfig:
    """What to mask. `arg` is eps (fat) or the kept ratio in (0, 1] (topk); `thresholds` are t_l (cett)."""

    strategy: Strategy = "dense"
    arg: float | None = None
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"strategy={self.strategy!r}: must be one of {', '.join(STRATEGIES)}")
        if self.strategy == "fat" and (self.arg is None or not self.arg >= 0):
            raise UserError(f"prune_arg={self.arg!r}: fat needs an eps >= 0")
        if self.strategy == "topk" and (self.arg is None or not 0 < self.arg <= 1):
            raise UserError(f"prune_arg={self.arg!r}: topk needs a kept ratio in (0, 1]")
        if self.strategy == "cett":
            if self.thresholds is None:
                raise UserError("strategy=cett needs per-layer thresholds (thresholds=FILE)")
            bad = [t for t in self.thresholds if not (math.isfinite(t) and t >= 0)]
            if bad:
                raise UserError(f"thresholds: {bad[0]!r} is not a finite number >= 0")


def prefix_mask(lengths: list[int], like: torch.Tensor) -> torch.Tensor:
    """Bool (batch, seq) on `like`'s device: row r is True on its first lengths[r] positions; rows
    beyond len(lengths) are all False."""
    positions = torch.arange(like.shape[1], device=like.device)
    valid = torch.zeros(like.shape[:2], dtype=torch.bool, device=like.device)
    valid[: len(lengths)] = positions[None, :] < torch.tensor(lengths, device=like.device)[:, None]
    return valid


class SparsityStats:
    """Inactive (token, neuron) counts per layer, over committed tokens only.

    Each forward pass leaves per-position counts (batch, seq) per layer as *pending*. In "auto" mode
    they are committed at the end of the forward for the positions the attention mask marks real
    (all positions when there is no mask). In "rows" mode the caller names the real prefix length of
    each batch row with `mark_row`; rows never marked (padding, auto-batch-size probes) are dropped.
    Counts stay on the device (no host sync per forward) until `summary()`.
    """

    def __init__(self, d_ff: list[int]) -> None:
        self.d_ff = d_ff  # per layer
        self.mode: Literal["auto", "rows"] = "auto"
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        n = len(self.d_ff)
        self._inactive: list[torch.Tensor | int] = [0] * n
        self._tokens: torch.Tensor | int = 0
        self._pending: list[torch.Tensor | None] = [None] * n
        self._valid: torch.Tensor | None = None
        self._rows: list[int] = []

    # -- called by the hooks ---------------------------------------------------------------
    def begin_forward(self, valid: torch.Tensor | None) -> None:
        self.flush()
        self._valid = valid

    def record(self, layer: int, inactive_per_position: torch.Tensor) -> None:
        if self.enabled:
            self._pending[layer] = inactive_per_position

    def end_forward(self) -> None:
        if self.mode == "auto":
            self._commit(self._valid)

    # -- called by the evaluation loop -----------------------------------------------------
    def mark_row(self, length: int) -> None:
        """The next batch row of the last forward has `length` real tokens (rows mode)."""
        self._rows.append(length)

    def flush(self) -> None:
        """Commit marked rows of the last forward (rows mode) and drop everything else pending."""
        if self.mode == "rows" and self._rows:
            ref = next((p for p in self._pending if p is not None), None)
            if ref is not None:
                self._commit(prefix_mask(self._rows, ref), tokens=sum(self._rows))
        self._pending = [None] * len(self._pending)
        self._rows = []
        self._valid = None

    def _commit(self, valid: torch.Tensor | None, tokens: int | None = None) -> None:
        ref = None
        for layer, counts in enumerate(self._pending):
            if counts is None:
                continue
            ref = counts
            if valid is not None:
                if counts.shape != valid.shape and counts.numel() == valid.numel():
                    counts = counts.reshape(valid.shape)  # layouts that flatten (batch, seq), e.g. OPT
                counts = counts * valid.to(counts.device)
            self._inactive[layer] = self._inactive[layer] + counts.sum(dtype=torch.int64)
        if ref is not None:
            if tokens is None:
                tokens = ref.numel() if valid is None else valid.sum(dtype=torch.int64)
            self._tokens = self._tokens + tokens
        self._pending = [None] * len(self._pending)

    def checkpoint(self) -> tuple:
        """The committed counts, to `restore` if the work that follows fails half-way."""
        self.flush()
        return list(self._inactive), self._tokens

    def restore(self, saved: tuple) -> None:
        self.flush()
        self._inactive, self._tokens = list(saved[0]), saved[1]

    # -- reading -----------------------------------------------------------------------------
    def counts(self) -> tuple[list[int], int]:
        """(inactive count per layer, tokens counted), as Python ints."""
        self.flush()
        return [int(x) for x in self._inactive], int(self._tokens)

    def summary(self) -> dict:
        """{"tokens", "mean", "per_layer"}: sparsity = inactive / (tokens * d_ff); mean over layers."""
        inactive, tokens = self.counts()
        per_layer = [c / (tokens * d) if tokens else 0.0 for c, d in zip(inactive, self.d_ff)]
        mean = sum(per_layer) / len(per_layer) if per_layer else 0.0
        return {"tokens": tokens, "mean": mean, "activation_ratio": 1.0 - mean, "per_layer": per_layer}


class SparsityHandle:
    """What `sparsify_` installed: the FFNs, the config, the stats; `remove()` undoes it."""

    def __init__(self, model: nn.Module, config: SparsityConfig, ffns: list[FFN]) -> None:
        self.model, self.config, self.ffns = model, config, ffns
        self.stats = SparsityStats([f.d_ff for f in ffns])
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.model, "_sparse_ffn_handle", None) is self:
            del self.model._sparse_ffn_handle


def _per_device(make: callable) -> callable:
    """Cache a tensor per device (layers of a dispatched model may sit on several devices)."""
    cache: dict[torch.device, torch.Tensor] = {}

    def get(device: torch.device) -> torch.Tensor:
        if device not in cache:
            cache[device] = make().to(device)
        return cache[device]

    return get


def _below(tau: torch.Tensor) -> torch.Tensor:
    """The largest float32 below each tau (tau itself where tau <= 0; 0/0 from a zero column -> 0)."""
    tau = torch.nan_to_num(tau, nan=0.0)
    return torch.where(tau > 0, torch.nextafter(tau, torch.zeros_like(tau)), tau)


def _cett_hook(stats: SparsityStats, layer: int, tau_below: callable):
    """a_i -> 0 where |a_i| < tau_i. `tau_below(device)` gives nextafter(tau, 0), float32, (d_ff,), so
    `|a| > tau_below` is exactly `|a| >= tau`; sign(clamp(|a| - tau_below, 0)) is that as a 0/1 factor
    (x - y is 0 only when x == y), about 4x cheaper on CPU than a boolean mask plus masked_fill.
    Outside autograd `a` (the FFN's temporary act(g) * u) is masked in place: one pass and one
    allocation fewer (about a third of the hook's time); with gradients it is left untouched."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        a = args[0]
        tau = tau_below(a.device)
        if a.dtype == tau.dtype:
            keep = a.abs().sub_(tau).clamp_(min=0).sign_()
        else:  # compare in float32: rounding tau to bf16/fp16 would move the boundary
            keep = (a.abs() > tau).to(a.dtype)
        stats.record(layer, (a.shape[-1] - keep.sum(-1)).to(torch.int32))
        masked = a * keep if a.requires_grad or a._is_view() else a.mul_(keep)
        return (masked,) + tuple(args[1:])

    return hook


def _dense_hook(stats: SparsityStats, layer: int):
    def hook(module: nn.Module, args: tuple) -> None:
        stats.record(layer, (args[0] == 0).sum(-1, dtype=torch.int32))

    return hook


def _fat_hook(stats: SparsityStats, layer: int, eps: float):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        kept = torch.nn.functional.hardshrink(out, eps) if eps > 0 else out  # x if |x| > eps else 0
        stats.record(layer, (kept == 0).sum(-1, dtype=torch.int32))
        return kept

    return hook


def _topk_hook(stats: SparsityStats, layer: int, ratio: float):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        d_ff = out.shape[-1]
        k = min(d_ff, max(1, round(ratio * d_ff)))
        idx = out.abs().topk(k, dim=-1, sorted=False).indices
        stats.record(layer, torch.full(out.shape[:-1], d_ff - k, dtype=torch.int32, device=out.device))
        return torch.zeros_like(out).scatter_(-1, idx, out.gather(-1, idx))

    return hook


def _input_positions(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return ids, kwargs.get("attention_mask")


def sparsify_(model: nn.Module, config: SparsityConfig, names: FFNNames | None = None) -> SparsityHandle:
    """Install `config`'s masking on every FFN of `model` (in place); returns the handle to read/remove.

    Raises UserError for an unknown FFN layout, a threshold count that does not match the layers, or
    a model that already carries a sparse-ffn handle.
    """
    if getattr(model, "_sparse_ffn_handle", None) is not None:
        raise UserError("this model is already sparsified; call .remove() on its handle first")
    ffns = find_ffns(model, names)
    if config.strategy == "cett" and len(config.thresholds) != len(ffns):
        raise UserError(f"thresholds: {len(config.thresholds)} values for a model with {len(ffns)} FFN layers")
    if config.strategy in ("fat", "topk"):
        acts = [f.act for f in ffns]
        if any(a is None for a in acts) or len({id(a) for a in acts}) != len(acts):
            raise UserError(f"strategy={config.strategy} needs one activation module per FFN "
                            f"(ffn_act=...), not found for {type(model).__name__}")
    handle = SparsityHandle(model, config, ffns)
    stats, hooks = handle.stats, handle._hooks
    for f in ffns:
        if config.strategy == "dense":
            hooks.append(f.down.register_forward_pre_hook(_dense_hook(stats, f.layer)))
        elif config.strategy == "cett":
            t = config.thresholds[f.layer]
            tau = _per_device(lambda f=f, t=t: _below(t / f.down_column_norms()))
            hooks.append(f.down.register_forward_pre_hook(_cett_hook(stats, f.layer, tau)))
        elif config.strategy == "fat":
            hooks.append(f.act.register_forward_hook(_fat_hook(stats, f.layer, config.arg)))
        else:
            hooks.append(f.act.register_forward_hook(_topk_hook(stats, f.layer, config.arg)))

    def begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids, mask = _input_positions(args, kwargs)
        valid = None
        if mask is not None and ids is not None and mask.dim() == 2:
            valid = mask[:, -ids.shape[1]:].bool()
        stats.begin_forward(valid)

    hooks.append(model.register_forward_pre_hook(begin, with_kwargs=True))
    hooks.append(model.register_forward_hook(lambda m, a, o: stats.end_forward()))
    model._sparse_ffn_handle = handle
    return handle
