"""The Sparse Expansion artifact directory: its manifest, its resumable writer, and installing it on
a model (`apply_experts_`). The layer files themselves: `artifacts.expert_files`.

    manifest.json                 {"format": "sparse-ffn/experts", "version": 1, "created_by": {...},
                                   "model": {"name_or_path", "class", "model_type", "dtype", "fingerprint"},
                                   "settings": {...calibration settings...}, "data": {"source", "sha256",
                                   "tokens", "windows", "seq_len", "batch_size"}, "layout": {"gated", "roles", "routers",
                                   "modules"}, "storage": {...}, "layers": [{"layer", "file", "sha256",
                                   "bytes", "stats"}], "run": {"seconds", "peak_rss_bytes", "device"}}
    layer_000.safetensors ...     one file per decoder layer (see `artifacts.expert_files`)

Writes are atomic: calibration writes into `<out>.partial/` (each layer file atomically, as soon as the
layer is done, so a killed run resumes from the last finished layer) and renames it to `<out>` after the
manifest. Bias terms are never stored: the experts use the dense linear's bias.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from sparse_ffn.core.experts import ExpertsHandle, check_layer_experts, install_layer, install_layer_unloaded
from sparse_ffn.core.ffn import FFN, FFNNames, decoder_layers, find_ffns, linear_weight, model_fingerprint
from sparse_ffn.core.router import Router
from sparse_ffn.errors import UserError
from sparse_ffn.artifacts.atomic import atomic_write_bytes, atomic_write_json, check_writable, write_error
from sparse_ffn.artifacts.expert_files import (
    FORMAT,
    VERSION,
    expert_shapes,
    layer_bytes,
    layer_file,
    load_layer_file,
    read_layer_file,
    read_layer_meta,
)
from sparse_ffn.artifacts.integrity import check_digest, check_layer_fits, check_manifest, layer_path, \
    partial_entry_problem
from sparse_ffn.artifacts.provenance import check_fingerprint, check_header, created_by

MANIFEST = "manifest.json"


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
    check_header(m, FORMAT, VERSION, str(path), "experts manifest")
    if not isinstance(m.get("layers"), list) or not m["layers"]:
        raise UserError(f"{path}: no layers")
    return check_manifest(m, str(path))


def read_layer(artifact_dir: str | os.PathLike, manifest: dict, layer: int) -> tuple[dict, dict, dict]:
    """(routers, experts, metadata) of layer `layer`, checked against the manifest: the file inside the
    directory, its size and sha256, its own `layer` field, K and roles (`artifacts.integrity`)."""
    where = str(Path(artifact_dir) / MANIFEST)
    entry = manifest["layers"][layer]
    path = layer_path(artifact_dir, entry, where)
    check_digest(path, entry, where)
    routers, experts, meta = load_layer_file(path)
    check_layer_fits(meta, layer, manifest["settings"], manifest["layout"], str(path))
    return routers, experts, meta


def apply_experts_(model: nn.Module, artifact_dir: str | os.PathLike, names: FFNNames | None = None, *,
                   ffns: list[FFN] | None = None) -> ExpertsHandle:
    """Swap every routed FFN linear of `model` for its experts from `artifact_dir` (in place).

    Checks the artifact against the model (layer count, d_ff, linear shapes; a different weight hash
    only warns). Returns the handle: `.stats`/`.usage()` (tokens per expert, real tokens only) and
    `.remove()` (restores the dense linears). Apply experts before `sparsify_`, not after. `ffns`: the
    model's `find_ffns(model, names)` when already at hand (its records then point at the experts).
    """
    handle = experts_handle(model, artifact_dir, names, ffns=ffns)
    manifest, ffns = handle.manifest, handle.ffns
    try:
        for i, (ffn, entry) in enumerate(zip(ffns, manifest["layers"])):
            routers, experts, _ = read_layer(artifact_dir, manifest, i)
            install_layer(handle, ffn, routers, experts, where=str(Path(artifact_dir) / entry["file"]))
    except BaseException:
        handle.remove()
        raise
    return handle


def experts_handle(model: nn.Module, artifact_dir: str | os.PathLike, names: FFNNames | None = None, *,
                   ffns: list[FFN] | None = None) -> ExpertsHandle:
    """An empty ExpertsHandle on `model` for the artifact, after checking the artifact against the model
    (fingerprint, layer count)."""
    manifest = read_manifest(artifact_dir)
    ffns = find_ffns(model, names) if ffns is None else ffns
    where = str(Path(artifact_dir) / MANIFEST)
    check_fingerprint((manifest.get("model") or {}).get("fingerprint") or {}, model_fingerprint(model, ffns), where,
                      "experts made for")
    if len(manifest["layers"]) != len(ffns):
        raise UserError(f"{where}: {len(manifest['layers'])} layers, the model has {len(ffns)} FFN layers")
    return ExpertsHandle(model, ffns, decoder_layers(model, names.layers if names else None)[1],
                         manifest=manifest, source=str(artifact_dir))


def apply_experts_streamed_(model: nn.Module, artifact_dir: str | os.PathLike, names: FFNNames | None = None, *,
                            ffns: list[FFN] | None = None) -> ExpertsHandle:
    """`apply_experts_` for layer-streamed evaluation: every routed linear becomes an ExpertLinear with its
    router, but without experts (the layer files' expert tensors stay on disk); `load_layer_experts`
    brings one layer's in, `unload_layer_experts` drops them. The usage slots and the masking hooks are
    the in-memory mode's."""
    handle = experts_handle(model, artifact_dir, names, ffns=ffns)
    try:
        where = str(Path(artifact_dir) / MANIFEST)
        for i, (ffn, entry) in enumerate(zip(handle.ffns, handle.manifest["layers"])):
            path = layer_path(artifact_dir, entry, where)
            routers, _, meta = read_layer_file(path, experts=False)
            check_layer_fits(meta, i, handle.manifest["settings"], handle.manifest["layout"], str(path))
            install_layer_unloaded(handle, ffn, routers, {r: shape for r, (shape, _) in expert_shapes(meta).items()},
                                   where=str(path))
    except BaseException:
        handle.remove()
        raise
    return handle


def load_layer_experts(handle: ExpertsHandle, layer: int) -> None:
    """Decode layer `layer`'s experts from the handle's artifact into its (unloaded) ExpertLinear modules."""
    path = Path(handle.source) / handle.manifest["layers"][layer]["file"]
    _, experts, _ = read_layer(handle.source, handle.manifest, layer)  # sha256, layer, K checked each time
    modules = handle.modules(layer)
    check_layer_experts(handle.ffns[layer], {r: tuple(t.shape) for r, t in experts.items()}, str(path))
    for role, module in modules.items():
        module.load_(experts.pop(role))


def unload_layer_experts(handle: ExpertsHandle, layer: int) -> None:
    for module in handle.modules(layer).values():
        module.unload_()


def experts_memory_bytes(handle: ExpertsHandle) -> int:
    """Bytes the artifact's experts take in memory when all are loaded (K dense copies of each routed
    linear, in the model's dtype)."""
    total = 0
    for layer in range(len(handle.ffns)):
        for module in handle.modules(layer).values():
            w = linear_weight(module.base_layer)
            total += module.num_experts * w.numel() * w.element_size()
    return total


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
        check_writable(self.out, "experts directory", directory=True)
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
        try:
            self.partial.mkdir(parents=True, exist_ok=True)  # mode 0777 & ~umask
        except OSError as e:
            raise write_error(self.partial, e) from None
        if self._partial_header() is None:
            atomic_write_json(self.partial / "progress.json", self._norm(self.header))
        done = 0
        while (self.partial / layer_file(done)).is_file() and (self.partial / f"layer_{done:03d}.json").is_file():
            problem = self._untrusted(done)
            if problem:  # never trusted: this layer and every later one are recomputed (deterministically)
                print(f"sparse-ffn: warning: {problem}; recomputing from layer {done}", file=sys.stderr, flush=True)
                for path in self.partial.glob("layer_[0-9][0-9][0-9].*"):
                    if int(path.name[6:9]) >= done:
                        path.unlink()
                break
            done += 1
        return done

    def _header_digest(self) -> str:
        return hashlib.sha256(json.dumps(self._norm(self.header), sort_keys=True).encode()).hexdigest()

    def _untrusted(self, layer: int) -> str | None:
        """Why the finished-looking partial layer `layer` cannot be trusted (None: it can): its marker
        names another layer, file or calibration, the file's size/sha256 differ from the marker, or its
        own metadata names another layer or K (`artifacts.integrity.partial_entry_problem`)."""
        marker = self.partial / f"layer_{layer:03d}.json"
        try:
            entry = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            return f"{marker}: unreadable ({type(e).__name__})"
        path = self.partial / layer_file(layer)
        try:
            problem = partial_entry_problem(entry, layer, layer_file(layer), self._header_digest(), str(marker))
            if problem is None:
                check_digest(path, entry, str(marker))
                check_layer_fits(read_layer_meta(path), layer, self.header["settings"], self.header["layout"],
                                 str(path))
        except UserError as e:
            return str(e)
        return problem

    def layer_path(self, layer: int) -> Path:
        return self.partial / layer_file(layer)

    def write_layer(self, layer: int, routers: dict[str, Router], experts: dict[str, Tensor], stats: dict, *,
                    consume: bool = False) -> dict:
        """Write layer `layer`'s file (atomically) and its done-marker; `consume` as in `layer_bytes`."""
        data, meta = layer_bytes(layer, routers, experts, consume=consume)
        atomic_write_bytes(self.partial / layer_file(layer), data)
        entry = {"layer": layer, "file": layer_file(layer), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                 "stats": stats}
        # written last: marks the layer done, for this calibration (header digest) only
        atomic_write_json(self.partial / f"layer_{layer:03d}.json", {**entry, "partial_of": self._header_digest()})
        return entry

    def finish(self, num_layers: int, run: dict) -> Path:
        layers = []
        for layer in range(num_layers):
            entry = json.loads((self.partial / f"layer_{layer:03d}.json").read_text())
            entry.pop("partial_of", None)
            layers.append(entry)
        manifest = {**self.header, "layers": layers, "run": run,
                    "created_by": created_by(timestamp=False)}
        atomic_write_json(self.partial / MANIFEST, manifest)
        for layer in range(num_layers):
            (self.partial / f"layer_{layer:03d}.json").unlink()
        (self.partial / "progress.json").unlink()
        try:
            old = None
            if self.out.exists():
                old = self.out.with_name(self.out.name + ".old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(self.out, old)
            os.replace(self.partial, self.out)
            if old is not None:
                shutil.rmtree(old)
        except OSError as e:
            raise write_error(self.out, e) from None
        return self.out
