"""`sparse-ffn inspect`: per-layer sparsity and PPL ratio of one model under one strategy.

    sparse-ffn inspect --model DIR --data wiki.valid.txt --strategy topk --arg 0.3 --out-dir runs/
    sparse-ffn inspect --model DIR --data wiki.valid.txt --strategy cett --arg 0.2 --out-dir runs/
    sparse-ffn inspect --model DIR --data wiki.valid.txt --strategy cett --thresholds thr.json --out-dir runs/

Prints a per-layer table on stderr, writes `inspect-<strategy>-<arg>.json` (numbers and provenance) and
`.png` (per-layer bars) into --out-dir at the very end, atomically, and prints one JSON object as the last
stdout line. Nothing is written on an error. Also home of the model/data loading helpers that
`sparse-ffn sweep` shares.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..ffn import FFNNames

FFN_NAME_ARGS: tuple[str, ...] = ("layers", "down", "act", "gate", "up", "gate_up")


# -- helpers shared with `sparse-ffn sweep` ----------------------------------------------------------

def log(msg: str) -> None:
    """One progress/info line on stderr."""
    print(f"sparse-ffn: {msg}", file=sys.stderr, flush=True)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--data, --tokens, --seq-len, --device, --dtype, --batch-size, --no-progress, --ffn-* (as in
    `calibrate thresholds`)."""
    p.add_argument("--data", required=True,
                   help="evaluation text: a text file, a .jsonl with a \"text\" field, or a datasets name "
                        "NAME[:CONFIG[:SPLIT]] when reachable")
    p.add_argument("--tokens", type=int, default=8192, help="tokens to use (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default float32)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name in FFN_NAME_ARGS:
        p.add_argument(f"--ffn-{name.replace('_', '-')}", dest=f"ffn_{name}", metavar="NAME",
                       help="explicit FFN module name for an unknown architecture (see find_ffns)")


def check_common(args: argparse.Namespace) -> None:
    """Cheap checks of the shared arguments, before anything is loaded."""
    for flag, value in (("--tokens", args.tokens), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {args.out_dir}: exists and is not a directory")


def ffn_names_from(args: argparse.Namespace) -> FFNNames | None:
    """The --ffn-* options as FFNNames (None when none is given)."""
    from ..model_adapters.sparsity_setup import ffn_names

    return ffn_names({f"ffn_{k}": getattr(args, f"ffn_{k}") for k in FFN_NAME_ARGS})


def torch_device(spec: str | None) -> torch.device:
    """--device as a torch.device (default cuda when available, else cpu)."""
    import torch

    try:
        device = torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {spec}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available here")
    return device


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def load_tokenizer(path: str | Path, flag: str = "--model") -> Any:
    """A local tokenizer directory -> tokenizer; UserError naming `flag` if it cannot be loaded."""
    from transformers import AutoTokenizer

    if not Path(path).expanduser().is_dir():
        raise UserError(f"{flag} {path}: not a local model directory")
    try:
        return AutoTokenizer.from_pretrained(Path(path).expanduser(), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag} {path}: cannot load its tokenizer ({_first_line(e)})") from None


PLACEMENTS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_HELP = ("spread the model over devices instead of --device: auto | balanced | balanced_low_0 | "
                   "sequential (accelerate's placements over the visible GPUs, then CPU memory), or a JSON file "
                   "{module name: device} (0, \"cuda:1\", \"cpu\", or \"disk\": offloaded to a temporary folder)")


def parse_device_map(spec: str | None) -> str | dict | None:
    """--device-map: a placement name, or the {module name: device} object of a JSON file (None: unset)."""
    if spec is None or spec in PLACEMENTS:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--device-map {spec}: neither {', '.join(PLACEMENTS)} nor a JSON file")
    try:
        device_map = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--device-map {spec}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(device_map, dict) or not device_map:
        raise UserError(f"--device-map {spec}: must be a JSON object {{module name: device}}")
    return device_map


def _offload_folder() -> str:
    """A temporary folder for "disk" entries of a device map, removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="sparse-ffn-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def load_model(path: str | Path, device: torch.device, dtype: str = "float32", *, seq_len: int | None = None,
               flag: str = "--model", device_map: str | dict | None = None) -> nn.Module:
    """A local Hugging Face causal LM directory -> model in eval mode on `device`, or spread by accelerate
    over `device_map` (see `parse_device_map`); refuses a seq_len beyond its max_position_embeddings.
    UserError naming `flag` on any failure."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{flag} {path}: not a local model directory")
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = device_map
        if isinstance(device_map, dict) and "disk" in device_map.values():
            placement["offload_folder"] = _offload_folder()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True,
                                                     **placement)
    except Exception as e:  # noqa: BLE001
        where = f" with --device-map {device_map}" if device_map is not None else ""
        raise UserError(f"{flag} {path}: cannot load the model{where} ({_first_line(e)})") from None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if seq_len is not None and max_pos and seq_len > max_pos:
        raise UserError(f"--seq-len {seq_len}: longer than the model's max_position_embeddings {max_pos} ({path})")
    return (model if device_map is not None else model.to(device)).eval()


def placement_text(model: nn.Module, device: torch.device) -> str:
    """Where the model sits, for a log line: the device, or the devices of its accelerate device map."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or len(set(map(str, device_map.values()))) < 2:
        return str(device) if not device_map else str(next(iter(device_map.values())))
    return "spread over " + ", ".join(sorted(set(map(str, device_map.values()))))


def data_record(spec: str, sha256: str, windows: Any) -> dict:
    """Provenance of the evaluation text: path (resolved when a file) or datasets name, sha256, shape."""
    return {"path": str(Path(spec).resolve()) if Path(spec).is_file() else spec, "sha256": sha256,
            "tokens": int(windows.numel()), "seq_len": int(windows.shape[1]), "windows": int(windows.shape[0])}


def created_by() -> dict:
    """Package, versions and time, for the provenance block of a report."""
    import torch
    import transformers

    return {"package": "sparse-ffn", "version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def arg_tag(value: float) -> str:
    """A float as a file-name part: 0.3 -> '0.3', 1e-05 -> '1e-05'."""
    return f"{value:g}"


# -- the command --------------------------------------------------------------------------------------

def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="per-layer sparsity and PPL ratio of one strategy on some text (JSON + PNG); "
                        "prints one JSON object",
        description="Measure one masking strategy on a model: sparsity per layer (fraction of inactive "
                    "(token, neuron) pairs) and PPL(sparse)/PPL(dense) on the same token windows. "
                    "Sparsing Law's run_inspect.sh.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--strategy", required=True, choices=("fat", "topk", "cett"),
                   help="fat: |act(g)| <= eps inactive; topk: keep the round(r*d_ff) largest |act(g)| per "
                        "token; cett: per-layer CETT thresholds")
    p.add_argument("--arg", "--prune-arg", type=float, dest="arg", metavar="X",
                   help="eps (fat), kept ratio r in (0, 1] (topk), CETT value c in [0, 1] (cett: thresholds "
                        "fitted on --data at that c)")
    p.add_argument("--thresholds", metavar="FILE", help="cett only: apply this threshold file instead of fitting")
    add_model_arguments(p)
    p.add_argument("--out-dir", required=True, help="directory for inspect-<strategy>-<arg>.json and .png")
    p.set_defaults(func=_cmd_inspect)


def _check_arg(args: argparse.Namespace) -> None:
    s, x = args.strategy, args.arg
    if s == "cett":
        if (x is None) == (args.thresholds is None):
            raise UserError("--strategy cett: give exactly one of --arg C (fit at CETT c) and --thresholds FILE")
        if x is not None and not (math.isfinite(x) and 0 <= x <= 1):
            raise UserError(f"--arg {x:g}: the CETT value c must be in [0, 1]")
        return
    if args.thresholds is not None:
        raise UserError(f"--thresholds: only with --strategy cett, not {s}")
    if x is None:
        raise UserError(f"--strategy {s}: --arg is required ({'eps >= 0' if s == 'fat' else 'kept ratio in (0, 1]'})")
    if s == "fat" and not (math.isfinite(x) and x >= 0):
        raise UserError(f"--arg {x:g}: fat needs an eps >= 0")
    if s == "topk" and not 0 < x <= 1:
        raise UserError(f"--arg {x:g}: topk needs a kept ratio in (0, 1]")


def _cmd_inspect(args: argparse.Namespace, rest: list[str]) -> int:
    start = time.perf_counter()
    _check_arg(args)
    check_common(args)
    thr = None
    if args.thresholds is not None:
        from .. import threshold_file

        thr = threshold_file.load(args.thresholds)
    tokenizer = load_tokenizer(args.model)  # a bad --model is reported before the data is read
    from ..atomic import atomic_write_bytes, atomic_write_json, sha256_file
    from ..data import load_text, token_windows
    from ..ffn import find_ffns, model_fingerprint
    from .inspect import format_table, inspect_sparsity, render_layer_chart

    text, sha = load_text(args.data)
    windows = token_windows(tokenizer, text, args.seq_len, args.tokens, where=args.data)
    device = torch_device(args.device)
    model = load_model(args.model, device, args.dtype, seq_len=args.seq_len)
    names = ffn_names_from(args)
    fingerprint = model_fingerprint(model, find_ffns(model, names))
    if thr is not None:
        thr.check_model(fingerprint)
    log(f"inspecting {args.strategy} on {windows.shape[0]} x {windows.shape[1]} tokens of {args.data} "
        f"({device}, {args.dtype})")
    result = inspect_sparsity(model, windows, args.strategy, args.arg,
                              thresholds=thr.thresholds if thr is not None else None, names=names,
                              batch_size=args.batch_size, progress=not args.no_progress, log=log)
    print(format_table(result), file=sys.stderr, flush=True)

    tag = f"{args.strategy}-{arg_tag(args.arg)}" if thr is None else f"cett-{Path(args.thresholds).stem}"
    out_dir = Path(args.out_dir)
    json_path, png_path = out_dir / f"inspect-{tag}.json", out_dir / f"inspect-{tag}.png"
    report = {
        "format": "sparse-ffn/inspect", "version": 1,
        "strategy": result.strategy, "arg": result.arg, "cett": result.cett,
        "ppl": {"dense": result.ppl_dense, "sparse": result.ppl_sparse, "ratio": result.ppl_ratio},
        "sparsity": {"mean": result.mean_sparsity, "activation_ratio": 1.0 - result.mean_sparsity,
                     "per_layer": result.sparsity["per_layer"], "tokens": result.sparsity["tokens"]},
        "d_ff": result.d_ff,
        "thresholds": result.thresholds,
        "thresholds_file": None if thr is None else {
            "path": str(Path(args.thresholds).resolve()), "sha256": sha256_file(args.thresholds),
            "calibration_cett": thr.calibration.get("cett")},
        "model": {"name_or_path": str(Path(args.model).expanduser().resolve()), **fingerprint},
        "data": data_record(args.data, sha, windows),
        "settings": {"device": str(device), "dtype": args.dtype, "batch_size": args.batch_size,
                     "topk": "per token" if args.strategy == "topk" else None},
        "created_by": created_by(),
        "timing": {"total_s": round(time.perf_counter() - start, 3)},
    }
    png = render_layer_chart(result)
    atomic_write_json(json_path, report)
    atomic_write_bytes(png_path, png)
    print(json.dumps({"strategy": result.strategy, "arg": result.arg, "mean_sparsity": result.mean_sparsity,
                      "activation_ratio": 1.0 - result.mean_sparsity, "ppl_ratio": result.ppl_ratio,
                      "ppl_dense": result.ppl_dense, "ppl_sparse": result.ppl_sparse,
                      "tokens": result.tokens, "json": str(json_path.resolve()), "png": str(png_path.resolve())}))
    return 0
