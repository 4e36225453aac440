"""`sparse-ffn calibrate thresholds`: PPL-k% (or fixed-CETT) per-layer thresholds -> a v1 threshold file.

    sparse-ffn calibrate thresholds --model DIR --data wiki.valid.txt --target-ppl-ratio 1.01 \\
        --eval-data wiki.test.txt --out thr.json

Fits on --data (--tokens tokens in non-overlapping --seq-len windows), optionally reports the PPL ratio
on held-out --eval-data, writes --out atomically at the very end and prints its path as the last
stdout line. Nothing is written on an error or an interrupt.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from ..errors import UserError
from . import calibrate_subparsers
from .inspect_command import DEVICE_MAP_HELP

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int | None:
    """'4GiB', '512M', '1.5G', '1000000' -> bytes; 'none'/'unlimited' -> None (binary units)."""
    if text.strip().lower() in ("none", "unlimited", "inf"):
        return None
    m = _SIZE.match(text)
    if not m:
        raise UserError(f"--max-activation-memory {text!r}: not a size (e.g. 4GiB, 512MiB, 2000000000)")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    return int(value)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    sub = calibrate_subparsers(subparsers)
    p = sub.add_parser(
        "thresholds", help="per-layer CETT thresholds for PPL-k%% sparsity (or a fixed CETT); prints the file path",
        description="Fit per-layer CETT thresholds t_l (mask |a_i| < t_l/||W_down[:, i]||) on calibration text: "
                    "the largest CETT c whose thresholds keep PPL(sparse)/PPL(dense) <= --target-ppl-ratio on "
                    "that text, or a fixed --cett. Writes a v1 thresholds file for `--model_args thresholds=`.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True,
                   help="calibration text: a text file, a .jsonl with a \"text\" field, or a datasets name "
                        "NAME[:CONFIG[:SPLIT]] when reachable")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-ppl-ratio", type=float, metavar="R",
                      help="PPL-k%%: largest CETT with PPL ratio <= R on the calibration text (1.01 = PPL-1%%)")
    goal.add_argument("--cett", type=float, metavar="C", help="fixed CETT value c in [0, 1]")
    p.add_argument("--eval-data", help="held-out text (same forms as --data): also report its PPL ratio")
    p.add_argument("--eval-tokens", type=int, help="tokens of --eval-data (default: as many as --tokens)")
    place = p.add_mutually_exclusive_group()
    place.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    place.add_argument("--device-map", metavar="SPEC", help=DEVICE_MAP_HELP)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default float32)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--activation-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="storage of the collected activations (16-bit halves memory, rounds them)")
    p.add_argument("--max-activation-memory", default="4GiB", metavar="SIZE",
                   help="cap on stored activations (+ cached tails); beyond it layers are fitted in groups, "
                        "recollected per step (slower). Default 4GiB; 'none' = no cap")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name in ("layers", "down", "act", "gate", "up", "gate-up"):
        p.add_argument(f"--ffn-{name}", metavar="NAME",
                       help="explicit FFN module name for an unknown architecture (see find_ffns)")
    p.add_argument("--out", required=True, help="threshold file to write (JSON)")
    p.set_defaults(func=_cmd_thresholds)


def _log(msg: str) -> None:
    print(f"sparse-ffn: {msg}", file=sys.stderr, flush=True)


def _cmd_thresholds(args: argparse.Namespace, rest: list[str]) -> int:
    start = time.perf_counter()
    # -- everything cheap to check, before loading a model ------------------------------------
    if args.target_ppl_ratio is not None and not args.target_ppl_ratio > 1:
        raise UserError(f"--target-ppl-ratio {args.target_ppl_ratio:g}: must be > 1 (e.g. 1.01 for PPL-1%)")
    if args.cett is not None and not 0 <= args.cett <= 1:
        raise UserError(f"--cett {args.cett:g}: must be in [0, 1]")
    for flag, value in (("--tokens", args.tokens), ("--batch-size", args.batch_size),
                        ("--eval-tokens", args.eval_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    budget = parse_bytes(args.max_activation_memory)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {args.out}: is a directory")
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        raise UserError(f"--model {args.model}: not a local model directory")

    from ..data import load_text, token_windows

    text, sha = load_text(args.data)
    eval_text = eval_sha = None
    if args.eval_data:
        eval_text, eval_sha = load_text(args.eval_data)
        if eval_sha == sha:
            _log(f"warning: --eval-data {args.eval_data} is the calibration text itself (not held out)")

    from ..ffn import FFNNames
    from ..masking import SparsityConfig, sparsify_
    from ..perplexity import perplexity
    from .cett import calibrate_thresholds
    from .inspect_command import load_model, load_tokenizer, parse_device_map, placement_text, torch_device

    device_map = parse_device_map(args.device_map)
    tokenizer = load_tokenizer(model_dir)
    windows = token_windows(tokenizer, text, args.seq_len, args.tokens, where=args.data)
    eval_windows = None
    if eval_text is not None:
        eval_windows = token_windows(tokenizer, eval_text, args.seq_len, args.eval_tokens or args.tokens,
                                     where=args.eval_data)

    device = torch_device(args.device)
    model = load_model(model_dir, device, args.dtype, seq_len=args.seq_len, device_map=device_map)

    names = None
    given = {k: getattr(args, f"ffn_{k}") for k in ("layers", "down", "act", "gate", "up", "gate_up")}
    if any(given.values()):
        if not given["down"]:
            raise UserError("--ffn-down is required when any --ffn-* module name is given")
        names = FFNNames(**given)

    _log(f"calibrating on {windows.shape[0]} x {windows.shape[1]} tokens of {args.data} "
         f"({placement_text(model, device)}, {args.dtype})")
    thr = calibrate_thresholds(
        model, windows, target_ppl_ratio=args.target_ppl_ratio, cett=args.cett, names=names,
        batch_size=args.batch_size, activation_dtype=args.activation_dtype, max_activation_memory=budget,
        progress=not args.no_progress, log=_log,
        data={"path": str(Path(args.data).resolve()) if Path(args.data).is_file() else args.data, "sha256": sha})
    thr.model["name_or_path"] = str(model_dir.resolve())
    cal = thr.calibration
    _log(f"c={cal['cett']:.5f}: PPL ratio {cal['ppl_ratio']:.5f} on the calibration text, mean sparsity "
         f"{thr.sparsity['mean']:.4f}")

    if eval_windows is not None:
        dense = perplexity(model, eval_windows, args.batch_size, progress=not args.no_progress,
                           desc="held-out dense")
        handle = sparsify_(model, SparsityConfig("cett", thresholds=tuple(thr.thresholds)), names)
        try:
            sparse = perplexity(model, eval_windows, args.batch_size, progress=not args.no_progress,
                                desc="held-out sparse")
            measured = handle.stats.summary()
        finally:
            handle.remove()
        ratio = sparse["perplexity"] / dense["perplexity"]
        cal["eval"] = {
            "data": {"path": str(Path(args.eval_data).resolve()) if Path(args.eval_data).is_file()
                     else args.eval_data, "sha256": eval_sha},
            "tokens": int(eval_windows.numel()), "seq_len": int(eval_windows.shape[1]),
            "ppl_dense": dense["perplexity"], "ppl_sparse": sparse["perplexity"], "ppl_ratio": ratio,
            "sparsity": measured["mean"],
        }
        _log(f"held-out {args.eval_data}: PPL {dense['perplexity']:.4f} -> {sparse['perplexity']:.4f}, "
             f"ratio {ratio:.5f}, mean sparsity {measured['mean']:.4f}")
    cal["timing"]["command_s"] = round(time.perf_counter() - start, 3)
    path = thr.save(out)
    print(path.resolve())
    return 0
