"""Sparse Expansion calibration (SPEC section 2): one-shot, block by block, like SparseGPT.

    result = calibrate_experts(model, windows, ExpertsSettings(num_clusters=16, sparsity=0.5), "experts/")

The inputs of decoder layer 0 are captured once (the model runs with every layer stubbed out, which
also records the keyword arguments each layer gets: attention mask, rotary position embeddings,
position ids; per layer, so Gemma's sliding/global layers get theirs). Then for each layer l, on the
stored hidden states (the outputs of the already-expanded layers 0..l-1):
  1. dense pass: run layer l, recording the input x of its first FFN linear(s) and the input a of its
     down linear (computed with the dense gate/up of this layer);
  2. routers "in" (on x) and "down" (on a): PCA + k-means (skipped for K = 1);
  3. per cluster k, one at a time: H_k = 2/n_k X_k^T X_k (float64 accumulation) and SparseGPT on a copy
     of each dense weight routed by that router (one cluster's Hessian held, not K);
  4. the layer file is written (atomically; a killed run resumes after the last finished layer);
  5. output pass: the layer runs with its experts installed; its outputs are the next layer's inputs.
A self-check first compares the layer-by-layer run with the model's own hidden states on one window,
so a family whose layers cannot be called like this fails with a clear error instead of a bad artifact.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from sparse_ffn.artifacts.expert_files import STORAGE_DOC, load_layer_file
from sparse_ffn.artifacts.experts import ArtifactWriter
from sparse_ffn.artifacts.provenance import (large_blocks_mapped, peak_memory, reset_peak_rss, resident_bytes,
                                             return_freed_memory)
from sparse_ffn.core.experts import ROUTER_OF, ExpertLinear, ExpertsHandle, install_layer, routed_roles
from sparse_ffn.core.ffn import (
    FFN,
    FFNNames,
    check_plain_linear,
    decoder_layers,
    find_ffns,
    linear_weight,
    model_fingerprint,
)
from sparse_ffn.core.hidden_states import HiddenStates, mapped_or_empty
from sparse_ffn.core.perplexity import model_device
from sparse_ffn.core.router import Router, project
from sparse_ffn.errors import UserError
from sparse_ffn.calibrate.expert_memory import CacheBudget
from sparse_ffn.calibrate.layer_runner import LayerRunner
from sparse_ffn.calibrate.router_fit import fit_pca, kmeans
from sparse_ffn.calibrate.sparsegpt import SparseGPTError, sparsegpt_prune

HESSIAN_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class ExpertsSettings:
    """What `sparse-ffn calibrate experts` takes (exactly one of sparsity and n_m)."""

    num_clusters: int
    sparsity: float | None = None
    n_m: tuple[int, int] | None = None
    pca_reduction: int | None = 32  # None: no PCA
    bits: int | None = None
    kmeans_restarts: int = 4
    kmeans_max_iter: int = 100
    seed: int = 0
    block_size: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.n_m is None):
            raise UserError("--sparsity: give a fraction in (0, 1) or N:M")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise UserError(f"--sparsity {self.sparsity}: must be in (0, 1)")
        if self.n_m is not None:
            n, m = self.n_m
            if not 0 < n < m:
                raise UserError(f"--sparsity {n}:{m}: N:M needs 0 < N < M")
            if self.block_size % m:
                raise UserError(f"--sparsity {n}:{m}: M must divide the block size {self.block_size}")
        if not isinstance(self.num_clusters, int) or self.num_clusters < 1:
            raise UserError(f"--num-clusters {self.num_clusters}: must be an integer >= 1")
        if self.pca_reduction is not None and self.pca_reduction < 1:
            raise UserError(f"--pca-reduction {self.pca_reduction}: must be >= 1")
        if self.bits is not None and not 1 <= self.bits <= 16:
            raise UserError(f"--bits {self.bits}: must be in 1..16")
        if self.kmeans_restarts < 1 or self.kmeans_max_iter < 1:
            raise UserError("--kmeans-restarts and k-means iterations must be >= 1")
        if not 0 <= self.percdamp:
            raise UserError(f"percdamp {self.percdamp}: must be >= 0")

    def to_json(self) -> dict:
        d = asdict(self)
        d["n_m"] = list(self.n_m) if self.n_m else None
        return d


def parse_sparsity(text: str) -> tuple[float | None, tuple[int, int] | None]:
    """"0.5" -> (0.5, None); "2:4" -> (None, (2, 4)). UserError for anything else."""
    text = str(text).strip()
    if ":" in text:
        parts = text.split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise UserError(f"--sparsity {text}: N:M must be two integers, e.g. 2:4") from None
        if not 0 < n < m:
            raise UserError(f"--sparsity {text}: N:M needs 0 < N < M")
        return None, (n, m)
    try:
        p = float(text)
    except ValueError:
        raise UserError(f"--sparsity {text}: not a number in (0, 1) or N:M") from None
    if not 0 < p < 1:
        raise UserError(f"--sparsity {text}: must be in (0, 1) (or N:M)")
    return p, None


# ------------------------------------------------------------------------------------------------
# Routers, Hessians, pruning
# ------------------------------------------------------------------------------------------------

def fit_router(x: Tensor, settings: ExpertsSettings, device: torch.device,
               threads: int | None = None) -> tuple[Router, Tensor, dict]:
    """(router, cluster of every row of x (CPU LongTensor), stats) for the rows of x (tokens, d_in).
    threads: CPU threads for k-means (None: `sweep_threads`' default)."""
    k = settings.num_clusters
    if k == 1:
        return Router(None, None, None), torch.zeros(x.shape[0], dtype=torch.long), {"clusters": 1}
    pca = fit_pca(x, settings.pca_reduction, device=device)
    rows = HESSIAN_CHUNK_ROWS
    points = torch.cat([project(x[i:i + rows].to(device), pca.mean.to(device),
                                None if pca.components is None else pca.components.to(device))
                        for i in range(0, x.shape[0], rows)])
    with sweep_threads(device, threads):  # many small ops, like the SparseGPT sweep
        km = kmeans(points, k, seed=settings.seed, restarts=settings.kmeans_restarts,
                    max_iter=settings.kmeans_max_iter, device=device)
    router = Router(pca.mean.cpu(), None if pca.components is None else pca.components.cpu(), km.centroids.cpu())
    stats = {"clusters": k, "pca_dims": None if pca.components is None else int(pca.components.shape[1]),
             "pca_explained_variance": pca.explained, "kmeans_inertia": km.inertia,
             "kmeans_iterations": km.iterations, "kmeans_restart": km.restart}
    return router, km.labels.cpu(), stats


def hessian_dtype_for(device: torch.device) -> torch.dtype:
    """The Hessian accumulation dtype: float64 on the CPU (cheap there; the artifacts of earlier versions
    byte for byte), float32 on accelerators (float64 is slow or absent there; `tests/test_calibrate_memory.py`
    bounds the difference)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def iter_cluster_hessians(x: Tensor, labels: Tensor, k: int, device: torch.device,
                          dtype: torch.dtype = torch.float64) -> Iterator[tuple[Tensor, int]]:
    """(H_c = 2/n_c X_c^T X_c as float32 (d_in, d_in), n_c) for c = 0..k-1, one at a time, accumulated in
    `dtype` on `device`, HESSIAN_CHUNK_ROWS rows at a time: the caller holds one cluster's Hessian."""
    for c in range(k):
        idx = (labels == c).nonzero().flatten() if k > 1 else None
        n = x.shape[0] if idx is None else idx.numel()
        h = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=device)
        for i in range(0, n, HESSIAN_CHUNK_ROWS):
            rows = x[i:i + HESSIAN_CHUNK_ROWS] if idx is None else x.index_select(0, idx[i:i + HESSIAN_CHUNK_ROWS])
            rows = rows.to(device, dtype)
            h += rows.T @ rows
            del rows  # a suspended generator keeps its locals: the last chunk (up to 8192 x d_in x 8 B) too
        hessian = (h * (2.0 / n)).float() if n else h.float()
        del h, idx  # the accumulator is not held while the caller prunes
        yield hessian, n
        del hessian


def cluster_hessians(x: Tensor, labels: Tensor, k: int, device: torch.device,
                     dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, int]]:
    """All of `iter_cluster_hessians` at once: [(H_c, n_c)] (k Hessians held)."""
    return list(iter_cluster_hessians(x, labels, k, device, dtype))


@contextlib.contextmanager
def sweep_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """torch's CPU thread count for the k-means and SparseGPT phases: `threads` when given (the user's
    --threads), else 1. Both are thousands of tiny ops: on a busy CPU, OpenMP threads waiting for each
    other made them 10-50x slower than one thread (measured: 38 s vs 0.7 s for a 576x1536 layer on a
    loaded 2-core machine), so one thread is the default. The previous setting is restored after."""
    n = torch.get_num_threads()
    want = 1 if threads is None else int(threads)
    if device.type != "cpu" or n == want:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def prune_experts(w: Tensor, hessians: list[tuple[Tensor, int]], settings: ExpertsSettings,
                  where: str, threads: int | None = None) -> tuple[Tensor, list[dict]]:
    """(K pruned copies of w (K, d_out, d_in) in w's dtype, per-expert stats); `threads` as in
    `sweep_threads`."""
    with sweep_threads(w.device, threads):
        return _prune_all(w, hessians, settings, where)


def _prune_all(w: Tensor, hessians: list[tuple[Tensor, int]], settings: ExpertsSettings,
               where: str) -> tuple[Tensor, list[dict]]:
    wf = w.detach().float()
    experts = torch.empty((len(hessians), *w.shape), dtype=w.dtype, device=w.device)  # filled in place
    stats = [prune_expert_into(experts[c], wf, h, n, settings, f"{where}, expert {c}", len(hessians))
             for c, (h, n) in enumerate(hessians)]
    return experts, stats


def prune_expert_into(out: Tensor, wf: Tensor, h: Tensor, n: int, settings: ExpertsSettings, where: str,
                      clusters: int) -> dict:
    """SparseGPT of the float32 weight `wf` for one cluster's Hessian `h` (n tokens), written into `out`
    (d_out, d_in); returns the expert's stats. Call inside `sweep_threads`."""
    if n == 0:  # cannot happen with k-means' empty-cluster repair unless points coincide
        raise UserError(f"{where}: no calibration tokens (too few distinct tokens for {clusters} clusters)")
    try:
        pruned, info = sparsegpt_prune(wf, h, settings.sparsity, settings.n_m, settings.block_size,
                                       settings.percdamp, settings.bits, return_info=True)
    except SparseGPTError as e:
        raise SparseGPTError(f"{where}: {e}") from None
    delta = wf - pruned
    err = float(((delta @ h) * delta).sum())
    base = float(((wf @ h) * wf).sum())
    out.copy_(pruned)
    return {"tokens": n, "damp": info["damp"], "rel_error": err / base if base > 0 else 0.0,
            "sparsity": float((pruned == 0).float().mean())}


# ------------------------------------------------------------------------------------------------
# The calibration
# ------------------------------------------------------------------------------------------------

@dataclass
class CalibrationResult:
    path: Path
    seconds: float
    peak_rss_bytes: int
    handle: ExpertsHandle | None = None  # the in-memory expanded model, when keep_applied
    resumed_from: int = 0
    layers: list[dict] = field(default_factory=list)


def _input_module(ffn: FFN) -> nn.Module:
    return ffn.gate_up if ffn.gate_up is not None else (ffn.gate if ffn.gate is not None else ffn.up)


def check_model_for_experts(ffns: list[FFN], settings: ExpertsSettings) -> None:
    """UserError when the FFNs cannot take experts with these settings (layout, N:M divisibility)."""
    for f in ffns:
        if f.up is None and f.gate_up is None:
            raise UserError(f"layer {f.layer}: FFN has no first linear (up/fc1) to route")
        for role in routed_roles(f):
            m = getattr(f, role)
            check_plain_linear(m, f"layer {f.layer} {role}")
            if settings.n_m is not None and linear_weight(m).shape[1] % settings.n_m[1]:
                raise UserError(f"--sparsity {settings.n_m[0]}:{settings.n_m[1]}: M does not divide the input "
                                f"width {linear_weight(m).shape[1]} of layer {f.layer} {role}")


def calibrate_experts(model: nn.Module, windows: Tensor, settings: ExpertsSettings, out: str | Path, *,
                      names: FFNNames | None = None, data: dict | None = None, batch_size: int = 8,
                      overwrite: bool = False, keep_applied: bool = False, progress: bool = True,
                      model_info: dict | None = None, threads: int | None = None, max_memory: int | None = None,
                      hessian_dtype: torch.dtype | None = None) -> CalibrationResult:
    """Calibrate Sparse Expansion experts for every FFN of `model` on `windows` (LongTensor (n, seq_len))
    and write the artifact directory `out`. Runs on the model's device. The model is left dense unless
    `keep_applied` (then `result.handle` holds the in-memory expanded model, equal to what
    `apply_experts_(model, out)` builds). `data` (source, sha256) goes into the manifest. `threads`:
    CPU threads of the k-means and SparseGPT phases (default 1, see `sweep_threads`; recorded in the
    manifest's "run"). Memory is bounded by one layer: only the layer being calibrated holds experts;
    the layer-input cache (hidden states and FFN inputs) goes to memory-mapped files when it exceeds
    `max_memory` bytes (None: in RAM). hessian_dtype: None = `hessian_dtype_for(device)`. The manifest's
    run.memory has the terms (`calibrate.expert_memory`).
    """
    t0 = time.time()
    ffns = find_ffns(model, names)
    _, layers = decoder_layers(model, names.layers if names else None)
    if len(layers) != len(ffns):
        raise UserError(f"{type(model).__name__}: {len(ffns)} FFNs but {len(layers)} decoder layers")
    check_model_for_experts(ffns, settings)
    n_windows, seq_len = windows.shape
    tokens = n_windows * seq_len
    if settings.num_clusters > tokens:
        raise UserError(f"--num-clusters {settings.num_clusters}: more clusters than the {tokens} calibration tokens")
    if any(linear_weight(getattr(f, r)).device.type == "meta" for f in ffns for r in routed_roles(f)):
        raise UserError(f"{type(model).__name__}: FFN weights are offloaded (meta device); experts calibration "
                        f"needs them in memory: place the model on real devices (no disk/CPU offload)")
    device = model_device(model)  # where the inputs go; each layer is fitted on its own device
    dtype = linear_weight(ffns[0].down).dtype
    fingerprint = model_fingerprint(model, ffns)
    first = ffns[0]
    header = {
        "model": {"name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
                  "class": type(model).__name__,
                  "model_type": getattr(getattr(model, "config", None), "model_type", None),
                  "dtype": str(dtype).replace("torch.", ""), "fingerprint": fingerprint, **(model_info or {})},
        "settings": settings.to_json(),
        # batch_size changes float rounding of the layer runs, so a resume must use the same one
        "data": {**(data or {}), "tokens": tokens, "windows": n_windows, "seq_len": seq_len, "batch_size": batch_size},
        "layout": {"gated": first.gated, "roles": routed_roles(first),
                   "routers": {r: [x for x in routed_roles(first) if ROUTER_OF[x] == r] for r in ("in", "down")},
                   "modules": {r: _module_name(layers[0], getattr(first, r)) for r in routed_roles(first)}},
        "storage": {"experts": STORAGE_DOC},
    }
    writer = ArtifactWriter(out, header, overwrite=overwrite)
    writer.check()

    runner = LayerRunner(model, layers)
    was_training = model.training
    model.eval()
    runner.self_check(windows[:1].to(device))
    return_freed_memory()  # the dense model is resident now (its forward touched every weight)
    dense_rss = resident_bytes()
    reset_peak_rss()  # the peak reported is this calibration's
    # freed layer-sized blocks go straight back to the OS: without this the peak grows layer by layer
    with large_blocks_mapped():
        handle = ExpertsHandle(model, ffns, layers)
        hdtype = hessian_dtype or hessian_dtype_for(device)
        try:
            budget = CacheBudget.plan(ffns, windows.shape, batch_size, dtype, max_memory)
            hidden = HiddenStates([tuple(windows[i:i + batch_size].shape) for i in range(0, n_windows, batch_size)],
                                  budget.width, dtype, None if not budget.mapped else 0)
            for j, i in enumerate(range(0, n_windows, batch_size)):
                hidden.batches[j].copy_(runner.capture(windows[i:i + batch_size].to(device)))
            done = writer.start()
            bar = _progress(len(ffns), progress, done)
            layer_entries = []
            for ffn in ffns:
                l = ffn.layer
                if l < done:  # resume: rebuild the finished layer from its file
                    routers, experts, _ = load_layer_file(writer.layer_path(l))
                    where = str(writer.layer_path(l))
                else:
                    tl = time.time()
                    routers, experts, stats = _fit_layer(runner, ffn, hidden.batches, tokens, settings, threads, hdtype,
                                                         budget.mapped, bar)
                    stats["seconds"] = round(time.time() - tl, 3)
                    where = f"layer {l}"
                # only this layer's experts are installed: earlier layers are in the artifact, their outputs in `hidden`
                install_layer(handle, ffn, routers, experts, where=where)
                budget.observe(m for m in model.modules() if isinstance(m, ExpertLinear))
                bar.set_postfix_str("output pass")
                for h in hidden.batches:
                    h.copy_(runner.run(l, h.to(device)))
                handle.uninstall(ffn)
                if l >= done:  # written after the output pass, so that encoding frees each dense stack as it goes
                    bar.set_postfix_str("write")
                    layer_entries.append(writer.write_layer(l, routers, experts, stats, consume=True))
                del experts
                bar.update(1)
            bar.close()
            memory = peak_memory(device)
            peak = memory.get("peak_rss_bytes", 0)
            seconds = time.time() - t0
            run = {"seconds": round(seconds, 3), **memory, "device": str(device), "resumed_from_layer": done,
                   "torch": torch.__version__, "threads": {"sweeps": 1 if threads is None else threads,
                                                           "torch": torch.get_num_threads()},
                   "hessian_dtype": str(hdtype).replace("torch.", ""), "memory": budget.record(
                       torch.empty((), dtype=hdtype).element_size(), dense_rss if device.type == "cpu" else None, peak)}
            path = writer.finish(len(ffns), run)
        finally:
            handle.remove()
            model.train(was_training)
    kept = None
    if keep_applied:
        from sparse_ffn.artifacts.experts import apply_experts_

        kept = apply_experts_(model, path, names, ffns=ffns)
    return CalibrationResult(path=path, seconds=seconds, peak_rss_bytes=peak, handle=kept, resumed_from=done,
                             layers=layer_entries)


def _fit_layer(runner: LayerRunner, ffn: FFN, hidden: list[Tensor], tokens: int, settings: ExpertsSettings,
               threads: int | None, hdtype: torch.dtype, mapped: bool, bar: Any
               ) -> tuple[dict[str, Router], dict[str, Tensor], dict]:
    """Steps 1-3 of the module docstring for one layer: (routers, experts by role, stats)."""
    bar.set_postfix_str("dense pass")
    inputs = dict(zip(("in", "down"), _dense_pass(runner, ffn, hidden, tokens, mapped)))
    routers, experts, stats = {}, {}, {"routers": {}, "experts": {}}
    layer_device = linear_weight(ffn.down).device
    k = settings.num_clusters
    fitted = {}
    for rname, inp in inputs.items():  # both routers first: the PCA's float64 copy never sits next to experts
        bar.set_postfix_str(f"router {rname}")
        fitted[rname] = fit_router(inp, settings, layer_device, threads)
    for rname in ("in", "down"):
        inp = inputs.pop(rname)  # each layer input is freed once its experts are pruned
        router, labels, rstats = fitted.pop(rname)
        roles = [role for role in routed_roles(ffn) if ROUTER_OF[role] == rname]
        weights = {role: linear_weight(getattr(ffn, role)) for role in roles}
        dense = {role: w.detach().float() for role, w in weights.items()}
        for role, w in weights.items():  # filled in place, cluster by cluster
            experts[role] = torch.empty((k, *w.shape), dtype=w.dtype, device=w.device)
            stats["experts"][role] = []
        rstats["tokens_per_cluster"] = []
        for c, (h, n) in enumerate(iter_cluster_hessians(inp, labels, k, layer_device, hdtype)):  # one at a time
            rstats["tokens_per_cluster"].append(n)
            for role, w in weights.items():
                bar.set_postfix_str(f"sparsegpt {role} {c + 1}/{k}")  # one SparseGPT solve at a time
                with sweep_threads(w.device, threads):
                    stats["experts"][role].append(prune_expert_into(
                        experts[role][c], dense[role], h, n, settings, f"layer {ffn.layer} {role}, expert {c}", k))
            del h
        del inp
        routers[rname], stats["routers"][rname] = router, rstats
    return routers, experts, stats


def _module_name(root: nn.Module, module: nn.Module) -> str | None:
    for name, m in root.named_modules():
        if m is module:
            return name
    return None


def _dense_pass(runner: LayerRunner, ffn: FFN, hidden: list[Tensor], tokens: int,
                mapped: bool = False) -> tuple[Tensor, Tensor]:
    """(x, a): the inputs of the layer's first FFN linear and of its down linear for every calibration
    token, float32 on the CPU (memory-mapped files when `mapped`), rows in window order."""
    d_in = linear_weight(_input_module(ffn)).shape[1]
    d_ff = linear_weight(ffn.down).shape[1]
    x = mapped_or_empty(tokens * d_in, torch.float32, mapped)[:tokens * d_in].view(tokens, d_in)
    a = mapped_or_empty(tokens * d_ff, torch.float32, mapped)[:tokens * d_ff].view(tokens, d_ff)
    pos = {"x": 0, "a": 0}

    def grab(buf: Tensor, key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            v = args[0].detach().reshape(-1, buf.shape[1])
            buf[pos[key]:pos[key] + v.shape[0]].copy_(v)
            pos[key] += v.shape[0]
        return hook

    hooks = [_input_module(ffn).register_forward_pre_hook(grab(x, "x")),
             ffn.down.register_forward_pre_hook(grab(a, "a"))]
    try:
        layer_device = linear_weight(ffn.down).device  # the cached hidden states stay on the CPU
        for h in hidden:
            runner.run(ffn.layer, h.to(layer_device))
    finally:
        for hk in hooks:
            hk.remove()
    if pos["x"] != tokens or pos["a"] != tokens:
        raise UserError(f"layer {ffn.layer}: the FFN saw {pos['x']}/{pos['a']} tokens, expected {tokens} "
                        f"(its linears are not called once per token)")
    return x, a


class _NoBar:
    def set_postfix_str(self, *a: Any, **k: Any) -> None: ...
    def update(self, *a: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, done: int):  # noqa: ANN202
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="experts: layers", unit="layer", file=sys.stderr, dynamic_ncols=True,
                initial=0, postfix="resuming" if done else None)
