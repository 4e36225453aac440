"""Where `analyze neurons` gets its inputs: one linear of a model (found by role or module name), its input
over token windows (a forward pre-hook; the model stops there), experts from artifacts, token spans.

    role, module, name = resolve_linear(model, find_ffns(model), layer=1, name="up")
    for x in linear_inputs(model, module, windows, batch_size=4): ...   # (batch * seq_len, d_in) float32
    experts = artifact_experts(["k1/", "k2/"], 1, role, (d_out, d_in), model_fingerprint(model, ffns))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

# -- sparse_ffn dependencies (artifact format, FFN discovery, errors) ----------------------------------
from sparse_ffn.analysis.neurons import LinearExperts
from sparse_ffn.core.router import Router
from sparse_ffn.errors import UserError
from sparse_ffn.core.experts import ROUTER_OF, routed_roles
from sparse_ffn.artifacts.experts import read_layer, read_manifest
from sparse_ffn.core.ffn import FFN


def resolve_linear(model: nn.Module, ffns: list[FFN], layer: int, name: str) -> tuple[str, nn.Module, str]:
    """(role, module, dotted module name) of `name` in decoder layer `layer`: a role (gate, up, gate_up,
    down), the module's own name (up_proj, fc1, c_fc, ...) or its dotted path. UserError otherwise."""
    if not 0 <= layer < len(ffns):
        raise UserError(f"--layer {layer}: the model has {len(ffns)} layers (0..{len(ffns) - 1})")
    ffn = ffns[layer]
    names = {id(m): n for n, m in model.named_modules()}
    known = []
    for role in routed_roles(ffn):
        module = getattr(ffn, role)
        full = names.get(id(module), role)
        known.append(f"{role} ({full.rsplit('.', 1)[-1]})")
        if name in (role, full, full.rsplit(".", 1)[-1]):
            return role, module, full
    raise UserError(f"--linear {name}: layer {layer} has {', '.join(known)}")


class StopForward(Exception):
    """Raised by the input hook: nothing after the chosen linear needs to run."""


def linear_inputs(model: nn.Module, module: nn.Module, windows: Tensor, batch_size: int) -> Iterator[Tensor]:
    """The input of `module` for every token of `windows` (n, seq_len): one float32 (batch * seq_len, d_in)
    tensor per batch of windows, on the module's device, in window order. The model runs up to `module`."""
    got: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        got.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        raise StopForward

    device = model.get_input_embeddings().weight.device
    handle = module.register_forward_pre_hook(hook)
    try:
        for i in range(0, windows.shape[0], batch_size):
            got.clear()
            try:
                with torch.no_grad():
                    model(input_ids=windows[i:i + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
            if len(got) != 1:
                raise UserError(f"{type(model).__name__}: the chosen linear ran {len(got)} times in one forward "
                                f"pass (expected once)")
            yield got[0]
    finally:
        handle.remove()


def cat_cpu(chunks: Iterator[Tensor]) -> Tensor:
    """The chunks (t, d) concatenated on the CPU (calibration inputs can be larger than a GPU should hold)."""
    return torch.cat([c.cpu() for c in chunks])


def artifact_experts(dirs: list[str], layer: int, role: str, weight_shape: tuple[int, int],
                     fingerprint: dict) -> list[LinearExperts]:
    """The experts of `role` in `layer` from each artifact directory, sorted by n. UserError for another
    model (any fingerprint difference, weight hash included: the experts are pruned copies of the dense
    weight), a missing layer/role, a shape mismatch, repeated n, no n = 1, or differing sparsity settings."""
    out: list[LinearExperts] = []
    first: dict | None = None
    for d in dirs:
        manifest = read_manifest(d)
        fp = (manifest.get("model") or {}).get("fingerprint") or {}
        for key in ("num_layers", "d_ff", "weight_hash"):
            if fp.get(key) != fingerprint[key]:
                raise UserError(f"--experts {d}: made for another model ({key} {fp.get(key)}, the model has "
                                f"{fingerprint[key]})")
        if layer >= len(manifest["layers"]):
            raise UserError(f"--experts {d}: no layer {layer}")
        entry = manifest["layers"][layer]
        routers, experts, _ = read_layer(d, manifest, layer)
        if role not in experts:
            raise UserError(f"--experts {d}: layer {layer} has no {role} experts")
        w = experts[role].float()
        if tuple(w.shape[1:]) != tuple(weight_shape):
            raise UserError(f"--experts {d}: {role} experts are {tuple(w.shape[1:])}, the linear is "
                            f"{tuple(weight_shape)}")
        key = {k: manifest["settings"].get(k) for k in ("sparsity", "n_m", "bits")}
        if first is not None and key != first:
            raise UserError(f"--experts {d}: sparsity settings {key} differ from the first artifact's {first}")
        first = key
        router = routers.get(ROUTER_OF[role]) or Router(None, None, None)
        out.append(LinearExperts(int(w.shape[0]), router, w, {
            "source": str(Path(d).resolve()), "settings": manifest["settings"], "data": manifest.get("data"),
            "created_by": manifest.get("created_by"), "layer_stats": entry.get("stats")}))
    ns = [e.clusters for e in out]
    if len(set(ns)) != len(ns):
        raise UserError(f"--experts: several artifacts with the same number of experts ({sorted(ns)})")
    if 1 not in ns:
        raise UserError(f"--experts: experts per linear {sorted(ns)}; RI needs an n = 1 (SparseGPT) artifact")
    return sorted(out, key=lambda e: e.clusters)


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text tokenised once, as one stream (the call `data.token_windows` and `calibrate experts` make)."""
    return tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]


def take_windows(ids: list[int], start: int, count: int, seq_len: int, where: str, flag: str) -> Tensor:
    """Tokens [start, start + count // s * s) as windows of s = min(seq_len, count): LongTensor (count // s, s)."""
    seq = min(seq_len, count)
    n = count // seq
    if start + n * seq > len(ids):
        raise UserError(f"{where}: too little data: {len(ids)} tokens, {flag} needs tokens {start}..{start + n * seq}")
    return torch.tensor(ids[start:start + n * seq], dtype=torch.long).view(n, seq)


def span(source: str, sha: str, start: int, windows: Tensor, used_for: str) -> dict:
    """Provenance of a token span: file (resolved) or datasets name, sha256, token range, shape, purpose."""
    return {"source": str(Path(source).resolve()) if Path(source).is_file() else source, "sha256": sha,
            "range": [start, start + int(windows.numel())], "tokens": int(windows.numel()),
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "used_for": used_for}
