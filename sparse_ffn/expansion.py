"""Sparse Expansion at inference: routed expert linears, and the experts artifact (the one place for its format).

    handle = apply_experts_(model, "experts/")   # swap FFN linears for routed sparse experts
    model(ids)                                    # every token runs through the expert of its cluster
    handle.usage()                                # tokens per expert, per layer and router (real tokens only)
    handle.remove()                               # the dense linears are back

Routing (SPEC section 2): per decoder layer two routers. Router "in" is fitted on the input x of the
first FFN linear(s) and routes gate_proj and up_proj (or a fused gate_up_proj; for non-gated layouts
fc1 / dense_h_to_4h / c_fc); router "down" is fitted on the input a of down_proj (fc2 / dense_4h_to_h /
c_proj). Each token independently goes to the nearest centroid of its PCA projection; the experts run on
the tokens gathered per cluster, so a token's output does not depend on the other tokens in the batch.
K = 1 needs no router (plain FFN-only SparseGPT).

Artifact: a directory

    manifest.json                 {"format": "sparse-ffn/experts", "version": 1, "created_by": {...},
                                   "model": {"name_or_path", "class", "model_type", "dtype", "fingerprint"},
                                   "settings": {...calibration settings...}, "data": {"source", "sha256",
                                   "tokens", "windows", "seq_len", "batch_size"}, "layout": {"gated", "roles", "routers",
                                   "modules"}, "storage": {...}, "layers": [{"layer", "file", "sha256",
                                   "bytes", "stats"}], "run": {"seconds", "peak_rss_bytes", "device"}}
    layer_000.safetensors ...     one file per decoder layer:
        router.<r>.mean           (d_in,) float32              r in {"in", "down"}; absent when K = 1
        router.<r>.components     (d_in, d_in // reduction) float32; absent with --no-pca
        router.<r>.centroids      (K, dims) float32
        expert.<role>.<k>.<enc>   the K weights of each routed linear, role in {gate, up, gate_up, down},
                                  (d_out, d_in) in torch.nn.Linear layout (GPT-2 Conv1D: transposed), in
                                  the calibration dtype, each stored the smallest of three lossless ways:
            .dense                        the matrix;
            .bitmask + .values            uint8, bit j of byte i (little-endian) = element 8i+j (row-major)
                                          is nonzero; values = the nonzeros in row-major order;
            .indices + .values            int32 row-major flat indices of the nonzeros, and their values.
        safetensors metadata "sparse_ffn": JSON {"format", "version", "layer", "experts": {role: {"shape",
        "dtype", "router", "encoding": [per expert]}}, "routers": {r: {"clusters", "pca_dims"}}}.
        At 50% sparsity the bitmask wins (1/8 byte + the kept values per weight: 2.125 B/weight in
        float32, 1.125 in bf16); indices win below ~6% (float32) density.
    Quantised experts (--bits) are stored dequantised (their values lie on the per-row grid).

Writes are atomic: calibration writes into `<out>.partial/` (each layer file atomically, as soon as the
layer is done, so a killed run resumes from the last finished layer) and renames it to `<out>` after the
manifest. Bias terms are never stored: the experts use the dense linear's bias.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import __version__
from .atomic import atomic_write_bytes, atomic_write_json, sha256_file
from .counting import TokenCounter, forward_inputs
from .calibrate.router import Router
from .errors import UserError
from .ffn import FFN, FFNNames, _decoder_layers, find_ffns, model_fingerprint

FORMAT = "sparse-ffn/experts"
VERSION = 1
MANIFEST = "manifest.json"
ROLES: tuple[str, ...] = ("gate", "up", "gate_up", "down")
ROUTER_OF: dict[str, str] = {"gate": "in", "up": "in", "gate_up": "in", "down": "down"}
STORAGE_DOC = ("per expert weight the smallest lossless encoding: dense | bitmask (uint8, little-endian bits, "
               "row-major) + values | indices (int32 row-major flat) + values; --bits experts stored dequantised")


# ------------------------------------------------------------------------------------------------
# Linears of an FFN
# ------------------------------------------------------------------------------------------------

def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Conv1d)


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as (d_out, d_in) (nn.Linear layout), whatever the module (Conv1D, PEFT, ExpertLinear)."""
    base = _base(module)
    return base.weight.t() if _is_conv1d(base) else base.weight


def check_plain_linear(module: nn.Module, where: str) -> None:
    """UserError unless `module` is an nn.Linear or a GPT-2 Conv1D (experts replace it entirely, so a
    PEFT/LoRA wrapper's update would be silently lost)."""
    if hasattr(module, "base_layer"):
        raise UserError(f"{where} is wrapped by {type(module).__name__} (PEFT/LoRA?): merge the adapter into the "
                        f"weights (merge_and_unload) before calibrating or applying experts")
    if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
        raise UserError(f"{where} is a {type(module).__name__}; experts need nn.Linear or Conv1D")


def routed_roles(ffn: FFN) -> list[str]:
    """The FFN's linears that get experts, in forward order: gate, up | gate_up | up; then down."""
    return [r for r in ROLES if getattr(ffn, r) is not None]


def router_owner(roles: Iterable[str], router: str) -> str:
    """The role whose module records the usage of `router` (the first one routed by it)."""
    return next(r for r in roles if ROUTER_OF[r] == router)


# ------------------------------------------------------------------------------------------------
# The routed module and its usage counts
# ------------------------------------------------------------------------------------------------

class ExpertUsageStats(TokenCounter):
    """Tokens per expert, per (layer, router), over committed (real) tokens only: the protocol of
    `counting.TokenCounter`, as for `masking.SparsityStats` (so the lm-eval adapter drives both alike).
    Slot = (layer, router), width K (the router's clusters); the values recorded are cluster indices."""

    @property
    def slots(self) -> dict[tuple[int, str], int]:
        """(layer, router) -> K."""
        return self.widths

    def add_slot(self, layer: int, router: str, k: int) -> None:
        self.declare((layer, router), k)

    def record(self, layer: int, router: str, clusters: Tensor) -> None:  # type: ignore[override]
        super().record((layer, router), clusters)

    def _tally(self, slot: tuple[int, str], values: Tensor, weight: Tensor | None) -> Tensor:
        flat = values.reshape(-1).long()
        add = torch.ones_like(flat) if weight is None else weight.reshape(-1)
        return torch.zeros(self.widths[slot], dtype=torch.int64, device=flat.device).scatter_add_(0, flat, add)

    # -- reading ---------------------------------------------------------------------------------
    def counts(self) -> tuple[dict[tuple[int, str], list[int]], int]:
        """({(layer, router): tokens per expert}, tokens counted), as Python ints."""
        return self.totals()

    def summary(self) -> dict:
        """{"tokens", "per_layer": [{"layer", "<router>": [tokens per expert]}], "balance": mean over
        routers of (entropy of the usage / log K), 1 = uniform}."""
        counts, tokens = self.counts()
        layers: dict[int, dict] = {}
        balance = []
        for (layer, router), c in sorted(counts.items()):
            layers.setdefault(layer, {"layer": layer})[router] = c
            total = sum(c)
            if len(c) > 1 and total:
                p = [x / total for x in c if x]
                balance.append(-sum(x * math.log(x) for x in p) / math.log(len(c)))
        return {"tokens": tokens, "per_layer": list(layers.values()),
                "balance": sum(balance) / len(balance) if balance else None}


class ExpertLinear(nn.Module):
    """Drop-in for one FFN linear: K sparse copies of its weight, one chosen per token by `router`.

    `base_layer` is the dense module it replaced (restored by `remove()`; its bias is used, and
    `find_ffns`/`model_fingerprint` read the dense weight through it, as for a PEFT wrapper).
    `experts` is (K, d_out, d_in) in the dense weight's dtype.
    """

    def __init__(self, base_layer: nn.Module, router: Router, experts: Tensor, *,
                 stats: ExpertUsageStats | None = None, slot: tuple[int, str] | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.router = router  # shared between gate_proj and up_proj of a layer
        w = linear_weight(base_layer)
        if experts.dim() != 3 or tuple(experts.shape[1:]) != tuple(w.shape):
            raise UserError(f"experts of shape {tuple(experts.shape)} do not fit a {tuple(w.shape)} linear")
        if experts.shape[0] != router.num_clusters:
            raise UserError(f"{experts.shape[0]} experts for a router with {router.num_clusters} clusters")
        self.register_buffer("experts", experts.to(device=w.device, dtype=w.dtype).contiguous(), persistent=False)
        self.stats, self.slot = stats, slot

    @property
    def weight(self) -> Tensor:  # what code that peeks at `.weight` (dtype, device) expects
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def num_experts(self) -> int:
        return self.experts.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        bias = self.bias
        if self.num_experts == 1:
            out = nn.functional.linear(x2, self.experts[0], bias)
            clusters = torch.zeros(x2.shape[0], dtype=torch.long, device=x.device)
        else:
            clusters = self.router.route(x2)
            order = torch.argsort(clusters, stable=True)
            sizes = torch.bincount(clusters, minlength=self.num_experts).tolist()
            xs = x2.index_select(0, order)
            out = x2.new_empty(x2.shape[0], self.experts.shape[1])
            start = 0
            for k, n in enumerate(sizes):
                if n:
                    idx = order[start:start + n]
                    out.index_copy_(0, idx, nn.functional.linear(xs[start:start + n], self.experts[k], bias))
                    start += n
        if self.stats is not None and self.slot is not None:
            self.stats.record(self.slot[0], self.slot[1], clusters.view(lead))
        return out.view(*lead, out.shape[-1])

    def extra_repr(self) -> str:
        k, d_out, d_in = self.experts.shape
        return f"experts={k}, in_features={d_in}, out_features={d_out}"


def _parent(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for name, module in root.named_modules():
        for cname, c in module.named_children():
            if c is child:
                return module, cname
    raise ValueError("module not found in its layer")


class ExpertsHandle:
    """What `apply_experts_` (or a calibration) installed: `.stats`, `.usage()`, `.remove()`."""

    def __init__(self, model: nn.Module, ffns: list[FFN], layers: nn.ModuleList,
                 manifest: dict | None = None, source: str | None = None) -> None:
        if getattr(model, "_sparse_ffn_experts", None) is not None:
            raise UserError("this model already carries experts; call .remove() on their handle first")
        if getattr(model, "_sparse_ffn_handle", None) is not None:
            raise UserError("apply experts before installing activation masking (sparsify_), not after")
        self.model, self.ffns, self.manifest, self.source = model, ffns, manifest, source
        self.stats = ExpertUsageStats()
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attr, dense module)
        self.layers = layers  # the decoder layers: where each FFN's linears are looked up

        def begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.stats.begin_forward(*forward_inputs(args, kwargs))

        self._hooks = [model.register_forward_pre_hook(begin, with_kwargs=True),
                       model.register_forward_hook(lambda m, a, o: self.stats.end_forward())]
        model._sparse_ffn_experts = self

    def install(self, ffn: FFN, routers: dict[str, Router], experts: dict[str, Tensor]) -> dict[str, ExpertLinear]:
        """Swap each routed linear of `ffn` for an ExpertLinear (routers shared per name)."""
        roles = routed_roles(ffn)
        missing = [r for r in roles if r not in experts]
        if missing:
            raise UserError(f"layer {ffn.layer}: no experts for {', '.join(missing)}")
        out = {}
        for router_name in {ROUTER_OF[r] for r in roles}:
            self.stats.add_slot(ffn.layer, router_name, routers[router_name].num_clusters)
        for role in roles:
            dense = getattr(ffn, role)
            if isinstance(dense, ExpertLinear):
                raise UserError(f"layer {ffn.layer}: {role} already has experts")
            check_plain_linear(dense, f"layer {ffn.layer} {role}")
            router_name = ROUTER_OF[role]
            owner = router_owner(roles, router_name) == role
            module = ExpertLinear(dense, routers[router_name], experts[role], stats=self.stats,
                                  slot=(ffn.layer, router_name) if owner else None)
            parent, attr = _parent(self.layers[ffn.layer], dense)
            setattr(parent, attr, module)
            self._swapped.append((parent, attr, dense))
            setattr(ffn, role, module)
            out[role] = module
        return out

    def usage(self) -> dict:
        return self.stats.summary()

    def remove(self) -> None:
        """Put every dense linear back, drop the hooks."""
        for parent, attr, dense in reversed(self._swapped):
            setattr(parent, attr, dense)
        for f in self.ffns:
            for role in ROLES:
                m = getattr(f, role)
                if isinstance(m, ExpertLinear):
                    setattr(f, role, m.base_layer)
        self._swapped.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.model, "_sparse_ffn_experts", None) is self:
            del self.model._sparse_ffn_experts


# ------------------------------------------------------------------------------------------------
# Encoding of expert weights
# ------------------------------------------------------------------------------------------------

_BITS = 2 ** torch.arange(8, dtype=torch.int32)


def encode_weight(prefix: str, w: Tensor) -> tuple[dict[str, Tensor], str]:
    """The smallest lossless encoding of w: ({name: tensor}, "dense" | "bitmask" | "indices")."""
    w = w.detach().contiguous().cpu()
    flat = w.reshape(-1)
    n, size = flat.numel(), flat.element_size()
    nz = flat != 0
    nnz = int(nz.sum())
    cost = {"dense": n * size, "bitmask": -(-n // 8) + nnz * size, "indices": nnz * (4 + size)}
    enc = min(cost, key=lambda k: (cost[k], list(cost).index(k)))
    if enc == "dense":
        return {f"{prefix}.dense": w}, enc
    values = flat[nz].contiguous()
    if enc == "indices":
        return {f"{prefix}.indices": nz.nonzero().flatten().to(torch.int32), f"{prefix}.values": values}, enc
    bits = torch.zeros(-(-n // 8) * 8, dtype=torch.int32)
    bits[:n] = nz.to(torch.int32)
    packed = (bits.view(-1, 8) * _BITS).sum(1).to(torch.uint8)
    return {f"{prefix}.bitmask": packed, f"{prefix}.values": values}, enc


def decode_weight(tensors: dict[str, Tensor], prefix: str, shape: tuple[int, int], enc: str) -> Tensor:
    """Inverse of `encode_weight`."""
    n = shape[0] * shape[1]
    if enc == "dense":
        return tensors[f"{prefix}.dense"].reshape(shape)
    values = tensors[f"{prefix}.values"]
    out = torch.zeros(n, dtype=values.dtype)
    if enc == "indices":
        out[tensors[f"{prefix}.indices"].long()] = values
    elif enc == "bitmask":
        packed = tensors[f"{prefix}.bitmask"].to(torch.int32)
        mask = ((packed[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).bool().reshape(-1)[:n]
        out[mask] = values
    else:
        raise UserError(f"{prefix}: unknown encoding {enc!r}")
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Layer files
# ------------------------------------------------------------------------------------------------

def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def layer_bytes(layer: int, routers: dict[str, Router], experts: dict[str, Tensor]) -> tuple[bytes, dict]:
    """The safetensors bytes of one layer file (deterministic) and its metadata dict."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "layer": layer, "routers": {}, "experts": {}}
    for name, r in sorted(routers.items()):
        meta["routers"][name] = {"clusters": r.num_clusters,
                                 "pca_dims": None if r.components is None else int(r.components.shape[1])}
        for part in ("mean", "components", "centroids"):
            t = getattr(r, part)
            if t is not None:
                tensors[f"router.{name}.{part}"] = t.detach().float().contiguous().cpu()
    for role, w in experts.items():
        encs = []
        for k in range(w.shape[0]):
            enc_tensors, enc = encode_weight(f"expert.{role}.{k}", w[k])
            tensors.update(enc_tensors)
            encs.append(enc)
        meta["experts"][role] = {"shape": list(w.shape), "dtype": str(w.dtype).replace("torch.", ""),
                                 "router": ROUTER_OF[role], "encoding": encs}
    return save(tensors, metadata={"sparse_ffn": json.dumps(meta, sort_keys=True)}), meta


def load_layer_file(path: str | os.PathLike) -> tuple[dict[str, Router], dict[str, Tensor], dict]:
    """(routers by name, experts (K, d_out, d_in) by role, metadata) of one layer file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("sparse_ffn", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file is the user's to fix
        raise UserError(f"{path}: not a readable safetensors layer file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} layer file")
    if meta.get("version") != VERSION:
        raise UserError(f"{path}: layer file version {meta.get('version')}, this sparse-ffn reads {VERSION}")
    routers = {}
    for name in meta["routers"]:
        routers[name] = Router(tensors.get(f"router.{name}.mean"), tensors.get(f"router.{name}.components"),
                               tensors.get(f"router.{name}.centroids"))
    experts = {}
    for role, info in meta["experts"].items():
        k, d_out, d_in = info["shape"]
        experts[role] = torch.stack([decode_weight(tensors, f"expert.{role}.{i}", (d_out, d_in), info["encoding"][i])
                                     for i in range(k)])
    return routers, experts, meta


# ------------------------------------------------------------------------------------------------
# Artifact directory
# ------------------------------------------------------------------------------------------------

def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    """The validated manifest of an experts directory (UserError naming the path otherwise)."""
    d = Path(artifact_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"{d}: experts directory not found")
    if not path.is_file():
        hint = " (an unfinished calibration?)" if d.name.endswith(".partial") else ""
        raise UserError(f"{d}: no {MANIFEST}{hint}")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise UserError(f"{path}: version {m.get('version')}, this sparse-ffn reads version {VERSION}")
    if not isinstance(m.get("layers"), list) or not m["layers"]:
        raise UserError(f"{path}: no layers")
    return m


def check_fingerprint(manifest: dict, fingerprint: dict, where: str) -> None:
    """Refuse experts made for another shape of model; warn when only the weights' hash differs."""
    import warnings

    fp = (manifest.get("model") or {}).get("fingerprint") or {}
    for key in ("num_layers", "d_ff"):
        if fp.get(key) is not None and fp[key] != fingerprint[key]:
            raise UserError(f"{where}: experts made for {key}={fp[key]}, but the model has {key}={fingerprint[key]}")
    if fp.get("weight_hash") and fp["weight_hash"] != fingerprint["weight_hash"]:
        warnings.warn(f"{where}: weight hash differs from the model's (experts calibrated on other weights "
                      f"or dtype?)", stacklevel=3)


def apply_experts_(model: nn.Module, artifact_dir: str | os.PathLike, names: FFNNames | None = None) -> ExpertsHandle:
    """Swap every routed FFN linear of `model` for its experts from `artifact_dir` (in place).

    Checks the artifact against the model (layer count, d_ff, linear shapes; a different weight hash
    only warns). Returns the handle: `.stats`/`.usage()` (tokens per expert, real tokens only) and
    `.remove()` (restores the dense linears). Apply experts before `sparsify_`, not after.
    """
    manifest = read_manifest(artifact_dir)
    ffns = find_ffns(model, names)
    where = str(Path(artifact_dir) / MANIFEST)
    check_fingerprint(manifest, model_fingerprint(model, ffns), where)
    if len(manifest["layers"]) != len(ffns):
        raise UserError(f"{where}: {len(manifest['layers'])} layers, the model has {len(ffns)} FFN layers")
    handle = ExpertsHandle(model, ffns, _decoder_layers(model, names.layers if names else None)[1],
                           manifest=manifest, source=str(artifact_dir))
    try:
        for ffn, entry in zip(ffns, manifest["layers"]):
            routers, experts, _ = load_layer_file(Path(artifact_dir) / entry["file"])
            install_layer(handle, ffn, routers, experts, where=str(Path(artifact_dir) / entry["file"]))
    except BaseException:
        handle.remove()
        raise
    return handle


def install_layer(handle: ExpertsHandle, ffn: FFN, routers: dict[str, Router],
                  experts: dict[str, Tensor], where: str = "experts") -> None:
    """Check the experts against `ffn`'s linears, move them to the linears' device, install them."""
    for role in routed_roles(ffn):
        if role not in experts:
            raise UserError(f"{where}: no experts for {role} (layout mismatch)")
        w = linear_weight(getattr(ffn, role))
        if tuple(experts[role].shape[1:]) != tuple(w.shape):
            raise UserError(f"{where}: {role} experts are {tuple(experts[role].shape[1:])}, the model's "
                            f"linear is {tuple(w.shape)}")
    device = linear_weight(ffn.down).device
    if device.type == "meta":
        raise UserError(f"{where}: the model's FFN weights are offloaded (meta device); experts need them in "
                        f"memory: load the model without offloading (a device_map over real devices)")
    routers = {k: r.to(device) for k, r in routers.items()}
    handle.install(ffn, routers, experts)


class ArtifactWriter:
    """Writes an experts directory: `<out>.partial/` first (resumable), renamed to `<out>` at the end.

    `header` is the manifest without "layers"/"run"; a partial directory is resumed only when its
    header is the same (same model fingerprint, settings and data hash).
    """

    def __init__(self, out: str | os.PathLike, header: dict, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.header = {"format": FORMAT, "version": VERSION, **header}
        self.overwrite = overwrite

    def check(self) -> None:
        """Raise UserError (before anything is written) when `out` cannot be written."""
        if self.out.exists() and not self.overwrite:
            raise UserError(f"{self.out}: already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a directory")
        if self.partial.exists() and not self.overwrite and self._partial_header() not in (None, self._norm(self.header)):
            raise UserError(f"{self.partial}: an unfinished calibration with other settings, model or data; "
                            f"delete it or pass --overwrite")

    @staticmethod
    def _norm(obj: Any) -> Any:
        return json.loads(json.dumps(obj, sort_keys=True))

    def _partial_header(self) -> dict | None:
        try:
            return json.loads((self.partial / "progress.json").read_text())
        except (OSError, ValueError):
            return None

    def start(self) -> int:
        """Create/resume the partial directory; returns how many leading layers are already done."""
        self.check()
        if self.partial.exists() and (self.overwrite and self._partial_header() != self._norm(self.header)):
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        if self._partial_header() is None:
            atomic_write_json(self.partial / "progress.json", self._norm(self.header))
        done = 0
        while (self.partial / layer_file(done)).is_file() and (self.partial / f"layer_{done:03d}.json").is_file():
            done += 1
        return done

    def layer_path(self, layer: int) -> Path:
        return self.partial / layer_file(layer)

    def write_layer(self, layer: int, routers: dict[str, Router], experts: dict[str, Tensor], stats: dict) -> dict:
        data, meta = layer_bytes(layer, routers, experts)
        atomic_write_bytes(self.partial / layer_file(layer), data)
        entry = {"layer": layer, "file": layer_file(layer), "sha256": _sha256(data), "bytes": len(data),
                 "stats": stats}
        atomic_write_json(self.partial / f"layer_{layer:03d}.json", entry)  # written last: marks the layer done
        return entry

    def finish(self, num_layers: int, run: dict) -> Path:
        layers = []
        for layer in range(num_layers):
            layers.append(json.loads((self.partial / f"layer_{layer:03d}.json").read_text()))
        manifest = {**self.header, "layers": layers, "run": run,
                    "created_by": {"package": "sparse-ffn", "version": __version__}}
        atomic_write_json(self.partial / MANIFEST, manifest)
        for layer in range(num_layers):
            (self.partial / f"layer_{layer:03d}.json").unlink()
        (self.partial / "progress.json").unlink()
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        if old is not None:
            shutil.rmtree(old)
        return self.out


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


__all__ = ["FORMAT", "VERSION", "ExpertLinear", "ExpertUsageStats", "ExpertsHandle", "ArtifactWriter",
           "apply_experts_", "read_manifest", "load_layer_file", "layer_bytes", "encode_weight", "decode_weight",
           "routed_roles", "linear_weight", "sha256_file"]
