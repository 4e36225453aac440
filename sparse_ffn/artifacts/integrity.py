"""Integrity of a Sparse Expansion artifact: nothing loads unless it is the artifact its manifest says.

    check_manifest(manifest, where)                      every field's type, layer entries, file names
    path = layer_path(artifact_dir, entry, where)        the layer file, confined to the directory
    check_digest(path, entry)                            its size and sha256 against the manifest entry
    check_layer_meta(meta, where)                        the types of the file's own metadata
    check_layer_tensors(tensors, meta, where)            the tensors the metadata announces are there
    check_layer_fits(meta, layer, settings, layout, where)   its `layer`, K and roles against the manifest

Used by the one reader (`artifacts.experts.read_manifest`, `apply_experts_`, `ArtifactWriter.start` on
resume, `artifacts.expert_files.load_layer_file`) and by `sparse-ffn verify`. Shapes against the model
are `core.experts.install_layer`'s check. Every failure is a one-line UserError naming the file.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from sparse_ffn.core.experts import ROLES, ROUTER_OF
from sparse_ffn.errors import UserError
from sparse_ffn.artifacts.atomic import sha256_file
from sparse_ffn.artifacts.schema import BOOL, CREATED_BY, DICT, INT, NULL, NUM, STR, Field, ListOf, Obj, \
    at_least, check, check_fields, one_of

ROUTERS = tuple(dict.fromkeys(ROUTER_OF.values()))
ENCODINGS = ("dense", "bitmask", "indices")
DTYPES = ("float32", "float16", "bfloat16", "float64")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# file state (path, inode, size, mtime, ctime in ns) -> its sha256, for files hashed in this process at
# least RACY_NS after their last change (a change within a coarse timestamp tick leaves the stamps as
# they were: git's "racily clean" entries, which it too re-hashes)
_HASHED: dict[tuple[str, int, int, int, int], str] = {}
RACY_NS = 2 * 10**9


def _sha(v: Any) -> str | None:
    return None if _SHA256.match(v) else "must be 64 lowercase hex digits (a sha256)"


def _pair(v: Any) -> str | None:
    return None if v is None or len(v) == 2 else f"must be [N, M], not {v!r}"


FINGERPRINT = Obj({"num_layers": Field((INT,), True, at_least(1)), "d_ff": Field((INT,), True, at_least(1)),
                   "weight_hash": Field((STR, NULL))})
SETTINGS = Obj({
    "num_clusters": Field((INT,), True, at_least(1)), "sparsity": Field((NUM, NULL)),
    "n_m": Field(ListOf((INT,), nullable=True), rule=_pair), "pca_reduction": Field((INT, NULL), rule=at_least(1)),
    "bits": Field((INT, NULL)), "kmeans_restarts": Field((INT,)), "kmeans_max_iter": Field((INT,)),
    "seed": Field((INT,)), "block_size": Field((INT,)), "percdamp": Field((NUM,)),
})
LAYER_ENTRY = Obj({"layer": Field((INT,), True), "file": Field((STR,), True), "sha256": Field((STR,), True, _sha),
                   "bytes": Field((INT,), True, at_least(0)), "stats": Field((DICT,))})
MANIFEST_FIELDS = {
    "created_by": Field(CREATED_BY),
    "model": Field(Obj({"name_or_path": Field((STR, NULL)), "class": Field((STR, NULL)),
                        "model_type": Field((STR, NULL)), "dtype": Field((STR,)),
                        "fingerprint": Field(FINGERPRINT, True)}), True),
    "settings": Field(SETTINGS, True),
    "data": Field(Obj({"source": Field((STR, NULL)), "sha256": Field((STR, NULL)), "tokens": Field((INT,)),
                       "windows": Field((INT,)), "seq_len": Field((INT,)), "batch_size": Field((INT,))})),
    "layout": Field(Obj({"gated": Field((BOOL,)),
                         "roles": Field(ListOf((STR,), 1), True, lambda v: _subset(v, ROLES)),
                         "routers": Field(Obj(values=ListOf((STR,)))),
                         "modules": Field(Obj(values=(STR, NULL)))}), True),
    "storage": Field(Obj(values=(STR,))),
    "layers": Field(ListOf(LAYER_ENTRY, 1), True),
    "run": Field(Obj({"seconds": Field((NUM,)), "device": Field((STR,)), "resumed_from_layer": Field((INT,)),
                      "peak_rss_bytes": Field((INT,)), "peak_cuda_bytes": Field((INT,)),
                      "torch": Field((STR,)), "threads": Field((DICT,))})),
}
EXPERT_META = Obj({"shape": Field(ListOf((INT,), 3), True, lambda v: _shape3(v)),
                   "dtype": Field((STR,), True, one_of(*DTYPES)), "router": Field((STR,), True, one_of(*ROUTERS)),
                   "encoding": Field(ListOf((STR,)), True, lambda v: _subset(v, ENCODINGS))})
LAYER_META_FIELDS = {
    "layer": Field((INT,), True, at_least(0)),
    "routers": Field(Obj(values=Obj({"clusters": Field((INT,), True, at_least(1)),
                                     "pca_dims": Field((INT, NULL))})), True),
    "experts": Field(Obj(values=EXPERT_META), True),
}


def _subset(values: list, allowed: tuple) -> str | None:
    bad = [v for v in values if v not in allowed]
    return f"has {bad[0]!r}, not one of {', '.join(allowed)}" if bad else None


def _shape3(v: list) -> str | None:
    return None if len(v) == 3 and all(x >= 1 for x in v) else f"must be [K, d_out, d_in] (all >= 1), not {v!r}"


# ------------------------------------------------------------------------------------------------
# The manifest
# ------------------------------------------------------------------------------------------------

def check_manifest(m: dict, where: str) -> dict:
    """Every field of a manifest (header already checked) has its type; layer i is entry i; every
    layer file name is confined to the directory; the layout's roles are known."""
    check_fields(m, MANIFEST_FIELDS, where)
    seen: set[str] = set()
    for i, entry in enumerate(m["layers"]):
        if entry["layer"] != i:
            raise UserError(f"{where}: 'layers[{i}].layer' is {entry['layer']}, expected {i} (entries out of order)")
        safe_name(entry["file"], where, f"layers[{i}].file")
        if entry["file"] in seen:
            raise UserError(f"{where}: 'layers[{i}].file' {entry['file']!r} is named by two layers")
        seen.add(entry["file"])
    fp = m["model"]["fingerprint"]
    if fp["num_layers"] != len(m["layers"]):
        raise UserError(f"{where}: {len(m['layers'])} layers, but 'model.fingerprint.num_layers' is {fp['num_layers']}")
    return m


def safe_name(name: str, where: str, key: str) -> str:
    """A file name relative to the artifact directory: not absolute, no '..', no empty part."""
    parts = re.split(r"[\\/]", name)
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) \
            or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"{where}: '{key}' {name!r} is not a file inside the artifact directory")
    return name


def layer_path(artifact_dir: str | os.PathLike, entry: dict, where: str) -> Path:
    """The layer file of a manifest entry, refused when it (or a symlink on its way) leads outside."""
    root = Path(artifact_dir)
    name = safe_name(entry["file"], where, f"layers[{entry['layer']}].file")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{where}: layer {entry['layer']} file {name!r} leads outside the artifact directory")
    if not path.is_file():
        raise UserError(f"{path}: layer file not found (named by {where})")
    return path


def check_digest(path: Path, entry: dict, where: str | None = None) -> None:
    """The file's size and sha256 equal the entry's (what the manifest recorded at calibration).

    A file is hashed once per state (inode, size, mtime, ctime) in a process: layer-streamed evaluation
    reads every layer file at every call, and hashing them was 15% of a 1k-token call (SmolLM2 K=16).
    A file changed less than RACY_NS before it was hashed is hashed again the next time."""
    where = where or "the manifest"
    st = path.stat()
    size = st.st_size
    if size != entry["bytes"]:
        raise UserError(f"{path}: {size} bytes, {where} records {entry['bytes']} for layer {entry['layer']} "
                        f"(a swapped, foreign or damaged layer file)")
    state = (str(path.resolve()), st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _HASHED.get(state)
    if digest is None:
        digest = sha256_file(path)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS:
            _HASHED[state] = digest
    if digest != entry["sha256"]:
        raise UserError(f"{path}: sha256 {digest[:12]}... differs from layer {entry['layer']}'s "
                        f"{entry['sha256'][:12]}... in {where} (a swapped, foreign or damaged layer file)")


# ------------------------------------------------------------------------------------------------
# A layer file
# ------------------------------------------------------------------------------------------------

def check_layer_meta(meta: dict, where: str) -> dict:
    """The types of a layer file's metadata (header already checked); each expert's encodings number K
    and its router is the one of its role."""
    check_fields(meta, LAYER_META_FIELDS, where)
    for role, info in meta["experts"].items():
        if role not in ROLES:
            raise UserError(f"{where}: 'experts.{role}' is not one of {', '.join(ROLES)}")
        if info["router"] != ROUTER_OF[role] or info["router"] not in meta["routers"]:
            raise UserError(f"{where}: 'experts.{role}.router' is {info['router']!r}, expected {ROUTER_OF[role]!r} "
                            f"(listed under 'routers')")
        k = info["shape"][0]
        if len(info["encoding"]) != k:
            raise UserError(f"{where}: 'experts.{role}.encoding' lists {len(info['encoding'])} experts, shape says {k}")
        if meta["routers"][info["router"]]["clusters"] != k:
            raise UserError(f"{where}: 'experts.{role}' has {k} experts, its router "
                            f"{meta['routers'][info['router']]['clusters']} clusters")
    return meta


def check_layer_tensors(tensors: dict, meta: dict, where: str) -> None:
    """The tensors the metadata announces exist with fitting sizes and dtypes (before decoding)."""
    import torch

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"{where}: tensor {name!r} is missing")
        return tensors[name]

    for rname, r in meta["routers"].items():
        k, dims = r["clusters"], r["pca_dims"]
        if k == 1:
            continue
        cent, mean = get(f"router.{rname}.centroids"), get(f"router.{rname}.mean")
        comp = tensors.get(f"router.{rname}.components")
        width = cent.shape[1] if cent.dim() == 2 else -1
        if cent.dim() != 2 or cent.shape[0] != k or mean.dim() != 1 or (comp is None) != (dims is None) \
                or (comp is not None and tuple(comp.shape) != (mean.shape[0], dims)) \
                or width != (dims if dims is not None else mean.shape[0]):
            raise UserError(f"{where}: router {rname!r} tensors do not fit its metadata (clusters={k}, pca_dims={dims})")
    for role, info in meta["experts"].items():
        _, d_out, d_in = info["shape"]
        n = d_out * d_in
        dtype = getattr(torch, info["dtype"])
        for i, enc in enumerate(info["encoding"]):
            p = f"expert.{role}.{i}"
            if enc == "dense":
                t = get(f"{p}.dense")
                ok = t.numel() == n and t.dtype == dtype
            else:
                v = get(f"{p}.values")
                aux = get(f"{p}.{enc}")
                ok = v.dim() == 1 and v.dtype == dtype and v.numel() <= n and aux.dim() == 1
                if ok and enc == "indices":
                    ok = aux.numel() == v.numel() and (aux.numel() == 0 or (int(aux.min()) >= 0 and int(aux.max()) < n))
                elif ok:  # the bit count against the values: `decode_weight`'s check
                    ok = aux.dtype == torch.uint8 and aux.numel() == -(-n // 8)
            if not ok:
                raise UserError(f"{where}: tensors of {p} do not fit its metadata ({enc}, {d_out}x{d_in}, "
                                f"{info['dtype']})")
        routed = meta["routers"][info["router"]]
        mean = tensors.get(f"router.{info['router']}.mean")
        if routed["clusters"] > 1 and mean is not None and mean.shape[0] != d_in:
            raise UserError(f"{where}: router {info['router']!r} is {mean.shape[0]}-wide, the {role} experts take "
                            f"{d_in} inputs")


def check_layer_fits(meta: dict, layer: int, settings: dict, layout: dict, where: str) -> None:
    """A layer file belongs at `layer` of an artifact with these manifest settings and layout: its own
    `layer` field, K = settings.num_clusters for every expert and router, its roles = layout.roles."""
    if meta["layer"] != layer:
        raise UserError(f"{where}: holds layer {meta['layer']}, the manifest puts it at layer {layer} "
                        f"(swapped or foreign layer file)")
    roles = layout.get("roles")
    if roles is not None and sorted(meta["experts"]) != sorted(roles):
        raise UserError(f"{where}: experts for {', '.join(sorted(meta['experts']))}, the manifest's layout has "
                        f"{', '.join(sorted(roles))}")
    k = settings["num_clusters"]
    for role, info in sorted(meta["experts"].items()):
        if info["shape"][0] != k:
            raise UserError(f"{where}: {role} has K={info['shape'][0]} experts, the manifest says "
                            f"num_clusters={k}")
    for name, r in sorted(meta["routers"].items()):
        if r["clusters"] != k:
            raise UserError(f"{where}: router {name!r} has {r['clusters']} clusters, the manifest says "
                            f"num_clusters={k}")


def partial_entry_problem(entry: Any, layer: int, file: str, header_digest: str, where: str) -> str | None:
    """Why the marker `layer_NNN.json` of an unfinished calibration cannot be trusted (None: it can):
    not a layer entry, another layer or file, or written for another calibration (header digest)."""
    try:
        check(entry, LAYER_ENTRY, where, "")
    except UserError as e:
        return str(e)
    if entry["layer"] != layer or entry["file"] != file:
        return f"{where}: marks layer {entry['layer']} ({entry['file']!r}), expected layer {layer} ({file!r})"
    if entry.get("partial_of") != header_digest:
        return f"{where}: written by another calibration (settings, model or data differ)"
    return None
