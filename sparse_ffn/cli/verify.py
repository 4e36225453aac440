"""`sparse-ffn verify ARTIFACT`: check a threshold file or an experts directory without loading a model.

    sparse-ffn verify thr.json        # {"ok": true, "kind": "thresholds", "path": ..., "problems": [], ...}
    sparse-ffn verify experts/        # every layer file against the manifest: sha256, size, own layer, K

Prints one JSON object as the last stdout line: ok, kind ("thresholds" | "experts" | null when not
recognised), path, problems (one line each) and what was checked. Exit 0 when ok, 2 otherwise (with
one line on stderr). The checks are the loaders' own (`artifacts.thresholds.load`,
`artifacts.experts.read_manifest` / `read_layer`): what verifies here also loads, and the reverse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sparse_ffn.errors import UserError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify", help="check a threshold file or an experts directory (no model run); prints one JSON object",
        description="Check an artifact the way loading it would, without a model: a threshold file's format and "
                    "every field's type; an experts directory's manifest and every layer file (inside the "
                    "directory, size and sha256 as recorded, its own layer index, K and roles, tensors that "
                    "decode). Exit 0: ok; 2: problems (listed in the JSON).")
    p.add_argument("artifact", metavar="ARTIFACT", help="threshold file (JSON or comma list) or experts directory")
    p.set_defaults(func=_cmd_verify)


def verify_thresholds(path: Path) -> dict[str, Any]:
    from sparse_ffn.artifacts.thresholds import load

    out: dict[str, Any] = {"kind": "thresholds", "problems": []}
    try:
        thr = load(path)
    except UserError as e:
        out["problems"].append(str(e))
        return out
    n = len(thr.thresholds)
    out.update(layers=n, strategy=thr.strategy, model=thr.model or None)
    layers = (thr.model or {}).get("num_layers")
    if layers is not None and layers != n:
        out["problems"].append(f"{path}: {n} thresholds, but 'model.num_layers' is {layers}")
    per_layer = (thr.sparsity or {}).get("per_layer")
    if per_layer is not None and len(per_layer) != n:
        out["problems"].append(f"{path}: 'sparsity.per_layer' has {len(per_layer)} values for {n} thresholds")
    return out


def verify_experts(path: Path) -> dict[str, Any]:
    from sparse_ffn.artifacts.atomic import sha256_file
    from sparse_ffn.artifacts.experts import MANIFEST, read_layer, read_manifest

    out: dict[str, Any] = {"kind": "experts", "problems": []}
    try:
        manifest = read_manifest(path)
    except UserError as e:
        out["problems"].append(str(e))
        return out
    fp = manifest["model"]["fingerprint"]
    out.update(manifest_sha256=sha256_file(path / MANIFEST), layers=len(manifest["layers"]),
               num_clusters=manifest["settings"]["num_clusters"], roles=manifest["layout"]["roles"],
               model=manifest["model"].get("name_or_path"), fingerprint=fp,
               bytes=sum(e["bytes"] for e in manifest["layers"]), layers_ok=0)
    for i, entry in enumerate(manifest["layers"]):
        try:
            _, experts, _ = read_layer(path, manifest, i)
        except UserError as e:
            out["problems"].append(str(e))
            continue
        down = experts.get("down")
        if down is not None and down.shape[2] != fp["d_ff"]:
            out["problems"].append(f"{path / entry['file']}: down experts take {down.shape[2]} inputs, the "
                                   f"manifest's model has d_ff={fp['d_ff']}")
            continue
        out["layers_ok"] += 1
    return out


def verify(artifact: str) -> dict[str, Any]:
    """{"ok", "kind", "path", "problems", ...} for a threshold file or an experts directory."""
    path = Path(artifact)
    if path.is_dir():
        out = verify_experts(path)
    elif path.is_file():
        out = verify_thresholds(path)
    else:
        out = {"kind": None, "problems": [f"{path}: not found"]}
    return {"ok": not out["problems"], "kind": out.pop("kind"), "path": str(path.resolve()), **out}


def _cmd_verify(args: argparse.Namespace, rest: list[str]) -> int:
    result = verify(args.artifact)
    print(json.dumps(result))
    problems = result["problems"]
    if problems:
        more = f" (and {len(problems) - 1} more problem(s), see the JSON)" if len(problems) > 1 else ""
        print(f"sparse-ffn: error: {problems[0]}{more}", file=sys.stderr)
        return 2
    return 0
