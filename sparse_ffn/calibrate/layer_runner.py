"""Running a model's decoder layers one at a time, as sequential (SparseGPT-style) calibration does."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparse_ffn.errors import UserError


class _Stop(Exception):
    pass


class LayerRunner:
    """Calls a model's decoder layers one at a time with the arguments the model itself passes them.

    `capture(ids)` runs the model with every decoder layer replaced by a stub that records its
    arguments (and stops at the last layer), giving layer 0's hidden-state input and, per layer, the
    other positional and keyword arguments. Those depend only on the batch shape (no padding in
    calibration windows), so they are kept per batch size. `run(l, h)` calls layer l on h.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        self.model, self.layers = model, layers
        self._calls: dict[int, list[tuple[bool, tuple, dict]]] = {}  # batch size -> per layer (positional?, args, kwargs)

    def capture(self, ids: Tensor) -> Tensor:
        """Layer 0's input for `ids` (batch, seq); records the per-layer arguments for this batch size."""
        calls: list[Any] = [None] * len(self.layers)
        last = len(self.layers) - 1

        def stub(i: int):
            def forward(*args: Any, **kwargs: Any) -> Any:
                positional = bool(args)
                hidden = args[0] if positional else kwargs.pop("hidden_states")
                calls[i] = (positional, args[1:] if positional else (), kwargs, hidden)
                if i == last:
                    raise _Stop
                return hidden
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = stub(i)
        try:
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for layer in self.layers:
                del layer.forward
        if any(c is None for c in calls):
            raise UserError(f"{type(self.model).__name__}: the model did not call every decoder layer once "
                            f"per forward; sequential calibration is not supported for this family")
        self._calls[ids.shape[0]] = [(p, a, k) for p, a, k, _ in calls]
        return calls[0][3]

    def run(self, layer: int, hidden: Tensor) -> Tensor:
        positional, args, kwargs = self._calls[hidden.shape[0]][layer]
        with torch.no_grad():
            out = self.layers[layer](hidden, *args, **kwargs) if positional else \
                self.layers[layer](hidden_states=hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def self_check(self, ids: Tensor) -> None:
        """UserError unless running the layers one by one reproduces the model's hidden states on `ids`."""
        with torch.no_grad():
            ref = self.model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        if ref is None or len(ref) != len(self.layers) + 1:
            raise UserError(f"{type(self.model).__name__}: hidden states not available to check the "
                            f"layer-by-layer run; sequential calibration is not supported for this family")
        h = self.capture(ids)
        worst = 0.0
        for layer in range(len(self.layers) - 1):  # the last entry is after the final norm
            h = self.run(layer, h)
            scale = float(ref[layer + 1].abs().max()) or 1.0
            worst = max(worst, float((h - ref[layer + 1]).abs().max()) / scale)
        tol = 1e-3 if h.dtype == torch.float32 else 3e-2
        if not worst <= tol:
            raise UserError(f"{type(self.model).__name__}: running its decoder layers one at a time does not "
                            f"reproduce the model (relative difference {worst:.2e}); sequential calibration "
                            f"is not supported for this family")
