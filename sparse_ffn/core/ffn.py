"""FFN discovery: find every decoder layer's feed-forward block and its parts in a HF causal LM.

This is the only place that knows module names of model families. Everything else (masking,
calibration, Sparse Expansion) works on the `FFN` records returned by `find_ffns`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparse_ffn.core.names import FFNNames
from sparse_ffn.errors import UserError

# Known layouts, relative to one decoder layer: (down, act, gate, up, gate_up). `down` is the second
# linear (its input is the intermediate activation `a`); `act` the activation module.
_LAYOUTS: tuple[dict[str, str | None], ...] = (
    # Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3, Granite, OLMo, ...
    dict(down="mlp.down_proj", act="mlp.act_fn", gate="mlp.gate_proj", up="mlp.up_proj", gate_up=None),
    # Phi-3 (fused gate/up: first half gate, second half up)
    dict(down="mlp.down_proj", act="mlp.activation_fn", gate=None, up=None, gate_up="mlp.gate_up_proj"),
    # GPT-NeoX / Pythia, Falcon
    dict(down="mlp.dense_4h_to_h", act="mlp.act", gate=None, up="mlp.dense_h_to_4h", gate_up=None),
    # GPT-2 (Conv1D, weight stored transposed)
    dict(down="mlp.c_proj", act="mlp.act", gate=None, up="mlp.c_fc", gate_up=None),
    # Phi-1/2
    dict(down="mlp.fc2", act="mlp.activation_fn", gate=None, up="mlp.fc1", gate_up=None),
    # OPT (FFN lives directly in the decoder layer)
    dict(down="fc2", act="activation_fn", gate=None, up="fc1", gate_up=None),
    # GPT-J
    dict(down="mlp.fc_out", act="mlp.act", gate=None, up="mlp.fc_in", gate_up=None),
)

_HOW_TO_NAME = (
    "pass the module names explicitly: model_args ffn_layers=<path of the decoder-layer list>,"
    "ffn_down=<second linear, relative to a layer>,ffn_act=<activation module>"
    "[,ffn_gate=...,ffn_up=...|ffn_gate_up=...] (CLI: --ffn-layers/--ffn-down/...)"
)


@dataclass
class FFN:
    """One decoder layer's FFN. `down` is the module whose input is the activation `a` (d_ff wide)."""

    layer: int
    down: nn.Module
    act: nn.Module | None
    gate: nn.Module | None
    up: nn.Module | None
    gate_up: nn.Module | None

    @property
    def gated(self) -> bool:
        """True for act(W_gate x) * (W_up x) layouts (incl. a fused gate_up_proj)."""
        return self.gate is not None or self.gate_up is not None

    def down_weight(self) -> torch.Tensor:
        """W_down as (d_model, d_ff), whatever the module type (GPT-2's Conv1D stores it transposed)."""
        down = base_module(self.down)  # PEFT/LoRA wrapper -> the frozen base linear
        w = module_weight(down)
        return w.t() if is_conv1d(down) else w

    @property
    def d_ff(self) -> int:
        return self.down_weight().shape[1]

    def down_column_norms(self) -> torch.Tensor:
        """||W_down[:, i]||_2 for every neuron i, float32, shape (d_ff,), on the weight's device."""
        return self.down_weight().detach().float().norm(dim=0)


def module_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """`module.<name>`, or, where accelerate offloads it (the module holds a "meta" placeholder until
    its forward), the real tensor from the offload hook's weights map (CPU memory or a disk memmap)."""
    w = getattr(module, name)
    if w.device.type != "meta":
        return w
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        weights_map = getattr(h, "weights_map", None)
        if weights_map is not None:
            try:
                return weights_map[name]
            except KeyError:
                pass
    raise UserError(f"{type(module).__name__}.{name} is on the meta device and no offload map holds it "
                    f"(load the model's weights first)")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers `Conv1D` (a linear with its weight stored (d_in, d_out)), not torch's Conv1d."""
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Conv1d)


def base_module(module: nn.Module) -> nn.Module:
    """The wrapped linear of a PEFT/LoRA wrapper or an ExpertLinear (`base_layer`), else the module."""
    return getattr(module, "base_layer", module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (d_out, d_in) (nn.Linear layout), whatever the module (Conv1D, PEFT, ExpertLinear)."""
    base = base_module(module)
    return base.weight.t() if is_conv1d(base) else base.weight


def check_plain_linear(module: nn.Module, where: str) -> None:
    """UserError unless `module` is an nn.Linear or a GPT-2 Conv1D (experts replace it entirely, so a
    PEFT/LoRA wrapper's update would be silently lost)."""
    if hasattr(module, "base_layer"):
        raise UserError(f"{where} is wrapped by {type(module).__name__} (PEFT/LoRA?): merge the adapter into the "
                        f"weights (merge_and_unload) before calibrating or applying experts")
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise UserError(f"{where} is a {type(module).__name__}; experts need nn.Linear or Conv1D")


def _get(root: nn.Module, path: str | None) -> nn.Module | None:
    if not path:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: the given path, or the longest ModuleList of identical blocks."""
    if path:
        layers = _get(model, path)
        if not isinstance(layers, nn.ModuleList):
            raise UserError(f"ffn_layers={path!r}: no nn.ModuleList at that path in {type(model).__name__}")
        return path, layers
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise UserError(f"{type(model).__name__}: found no list of decoder layers; {_HOW_TO_NAME}")
    return best


def find_ffns(model: nn.Module, names: FFNNames | None = None) -> list[FFN]:
    """Every decoder layer's FFN, in layer order. Works through wrappers (PEFT) by searching modules.

    Raises UserError naming the model class when the layout is unknown (never a silent no-op).
    """
    _, layers = decoder_layers(model, names.layers if names else None)
    layouts = [dict(down=names.down, act=names.act, gate=names.gate, up=names.up, gate_up=names.gate_up)] if names else _LAYOUTS
    first = layers[0]
    for layout in layouts:
        if _get(first, layout["down"]) is not None and all(
            _get(first, layout[k]) is not None for k in ("act", "gate", "up", "gate_up") if layout[k]
        ):
            break
    else:
        if names:
            raise UserError(f"{type(model).__name__}: explicit FFN names {names} do not match decoder layer "
                            f"{type(first).__name__}")
        raise UserError(f"{type(model).__name__}: unknown FFN layout in decoder layer {type(first).__name__}; "
                        f"{_HOW_TO_NAME}")
    ffns = []
    for i, layer in enumerate(layers):
        parts = {k: _get(layer, layout[k]) for k in ("down", "act", "gate", "up", "gate_up")}
        if parts["down"] is None:
            raise UserError(f"{type(model).__name__}: layer {i} has no {layout['down']!r}")
        # PEFT (LoRA) wraps linears in a module with `base_layer`; `a` is still the wrapper's input.
        base = base_module(parts["down"])
        if not isinstance(getattr(base, "weight", None), torch.Tensor) or base.weight.dim() != 2:
            raise UserError(f"{type(model).__name__}: {layout['down']!r} in layer {i} is a "
                            f"{type(base).__name__}, not a linear layer")
        ffns.append(FFN(layer=i, **parts))
    return ffns


def model_fingerprint(model: nn.Module, ffns: list[FFN]) -> dict:
    """What identifies a model for an artifact: layer count, d_ff and a hash of the FFN down weights."""
    import hashlib

    h = hashlib.sha256()
    for ffn in ffns:
        w = ffn.down_weight().detach()
        # Hash a cheap, dtype-independent summary: the float32 column norms (exact for equal weights).
        h.update(ffn.down_column_norms().cpu().numpy().tobytes())
        h.update(str(tuple(w.shape)).encode())
    return {
        "num_layers": len(ffns),
        "d_ff": ffns[0].d_ff if ffns else 0,
        "weight_hash": "sha256:" + h.hexdigest()[:32],
    }
