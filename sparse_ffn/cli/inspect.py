"""`sparse-ffn inspect`: per-layer sparsity and PPL ratio of one model under one strategy.

    sparse-ffn inspect --model DIR --data wiki.valid.txt --strategy topk --arg 0.3 --out-dir runs/
    sparse-ffn inspect --model DIR --data wiki.valid.txt --strategy cett --arg 0.2 --out-dir runs/
    sparse-ffn inspect --model DIR --data wiki.valid.txt --strategy cett --thresholds thr.json --out-dir runs/

Prints a per-layer table on stderr, writes `inspect-<strategy>-<arg>.json` (numbers and provenance) and
`.png` (per-layer bars) into --out-dir at the very end, atomically, and prints one JSON object as the last
stdout line. Nothing is written on an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from sparse_ffn.cli.options import (
    add_batch_size_option,
    add_data_options,
    add_dtype_option,
    add_ffn_options,
    add_model_option,
    add_placement_options,
    check_out_dir,
    check_positive,
    ffn_names_from,
    log,
)
from sparse_ffn.errors import UserError


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
    from sparse_ffn.core.masking import STRATEGIES, strategy_help

    choices = tuple(name for name, s in STRATEGIES.items() if s.param is not None)
    add_model_option(p)
    p.add_argument("--strategy", required=True, choices=choices, help=strategy_help(choices))
    p.add_argument("--arg", "--prune-arg", type=float, dest="arg", metavar="X",
                   help="eps (fat), kept ratio r in (0, 1] (topk), CETT value c in [0, 1] (cett: thresholds "
                        "fitted on --data at that c)")
    p.add_argument("--thresholds", metavar="FILE", help="cett only: apply this threshold file instead of fitting")
    add_common_options(p)
    p.add_argument("--out-dir", required=True, help="directory for inspect-<strategy>-<arg>.json and .png")
    p.set_defaults(func=_cmd_inspect)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """The options `inspect` and `sweep` share: data, placement, dtype, batch size, --no-progress, --ffn-*."""
    add_data_options(p, what="evaluation text")
    add_placement_options(p)
    add_dtype_option(p)
    add_batch_size_option(p, 4)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ffn_options(p)


def check_common(args: argparse.Namespace) -> None:
    """Cheap checks of the shared options, before anything is loaded."""
    check_positive(tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len)
    check_out_dir(args.out_dir)


def _check_arg(args: argparse.Namespace) -> None:
    """--arg/--thresholds for the strategy (the strategy's own check from the registry)."""
    from sparse_ffn.core.masking import STRATEGIES

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
        raise UserError(f"--strategy {s}: --arg is required ({STRATEGIES[s].param})")
    STRATEGIES[s].check(x, None, "--arg")


def _cmd_inspect(args: argparse.Namespace, rest: list[str]) -> int:
    start = time.perf_counter()
    _check_arg(args)
    check_common(args)
    thr = None
    if args.thresholds is not None:
        from sparse_ffn.artifacts import thresholds as threshold_file

        thr = threshold_file.load(args.thresholds)
    from sparse_ffn.analysis.inspect import format_table, inspect_sparsity, render_layer_chart
    from sparse_ffn.artifacts.atomic import atomic_write_bytes, atomic_write_json, sha256_file
    from sparse_ffn.artifacts.data import load_text, token_windows
    from sparse_ffn.artifacts.provenance import created_by, data_record
    from sparse_ffn.core.ffn import find_ffns, model_fingerprint
    from sparse_ffn.model_adapters.loading import load_model, load_tokenizer, resolve_device

    names = ffn_names_from(args)
    tokenizer = load_tokenizer(args.model)  # a bad --model is reported before the data is read
    text, sha = load_text(args.data)
    windows = token_windows(tokenizer, text, args.seq_len, args.tokens, where=args.data)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device, dtype=args.dtype, seq_len=args.seq_len, tokenizer=tokenizer)
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
