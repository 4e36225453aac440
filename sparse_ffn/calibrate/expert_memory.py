"""What Sparse Expansion calibration holds at its peak, beyond the dense model (README's memory table):

    one layer's experts      K * sum over routed linears of d_out * d_in * b     (the layer being fitted)
    hidden states            T * d * b                                           (the layer-input cache)
    FFN inputs of the layer  T * (d + f) * 4                                     (float32, CPU)
    Hessian                  f^2 * 4 + f^2 * h                                   (one cluster's at a time,
                                                                                  h: accumulator bytes)

T calibration tokens, d model width, f FFN width, b bytes per weight. The cache (hidden states and FFN
inputs) goes to memory-mapped files when it exceeds `max_memory`. The manifest records these terms and
the largest number of expert bytes live at once (`observe`), under run.memory, with the bound
dense + 2 x one layer's experts + cache against the measured peak (`record`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from sparse_ffn.core.experts import routed_roles
from sparse_ffn.core.ffn import FFN, linear_weight


@dataclass
class CacheBudget:
    width: int  # d, the hidden-state width
    hidden_bytes: int
    inputs_bytes: int
    hessian_width: int  # f, the widest Hessian
    max_memory: int | None
    mapped: bool
    layer_experts_bytes: int = 0  # the most expert bytes installed at once (measured)

    @classmethod
    def plan(cls, ffns: list[FFN], windows_shape: tuple[int, int], batch_size: int, dtype: torch.dtype,
             max_memory: int | None) -> CacheBudget:
        tokens = windows_shape[0] * windows_shape[1]
        widths = {r: linear_weight(getattr(ffns[0], r)).shape[1] for r in routed_roles(ffns[0])}
        d, f = widths.get("up", widths.get("gate_up", widths.get("gate"))), widths["down"]
        hidden = tokens * d * torch.empty((), dtype=dtype).element_size()
        inputs = tokens * (d + f) * 4
        mapped = max_memory is not None and hidden + inputs > max_memory
        return cls(d, hidden, inputs, max(widths.values()), max_memory, mapped)

    def observe(self, modules: Iterable[nn.Module]) -> None:
        """Note the expert bytes installed now (the modules of every layer holding experts)."""
        live = sum(m.experts.numel() * m.experts.element_size() for m in modules if m.experts is not None)
        self.layer_experts_bytes = max(self.layer_experts_bytes, live)

    def cache_bytes(self) -> int:
        """The layer-input cache's share of the bound: its size in RAM, or the budget when it is mapped."""
        size = self.hidden_bytes + self.inputs_bytes
        return min(size, self.max_memory) if self.mapped and self.max_memory is not None else size

    def record(self, accumulator_bytes: int = 8, dense_rss_bytes: int | None = None,
               peak_rss_bytes: int | None = None) -> dict:
        """The terms, and with `dense_rss_bytes` (the process's RSS with the dense model loaded and run
        once) the bound: dense + two layers' experts (the layer's stacks and their encoding while it is
        written) + the cache; `peak_rss_bytes` (measured over the calibration) is checked against it."""
        f = self.hessian_width
        out = {"layer_experts_bytes": self.layer_experts_bytes, "hidden_bytes": self.hidden_bytes,
               "layer_inputs_bytes": self.inputs_bytes, "hessian_bytes": f * f * 4 + f * f * accumulator_bytes,
               "max_memory": self.max_memory, "cache_mapped": self.mapped}
        if dense_rss_bytes:
            bound = dense_rss_bytes + 2 * self.layer_experts_bytes + self.cache_bytes()
            out.update(dense_rss_bytes=dense_rss_bytes, bound_bytes=bound)
            if peak_rss_bytes:
                out.update(peak_rss_bytes=peak_rss_bytes, peak_within_bound=peak_rss_bytes <= bound)
        return out
