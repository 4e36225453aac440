"""`sparse-ffn sweep`: PPL-k% sparsity of every checkpoint of a training run (the seed's calc_sparsity.sh).

    sparse-ffn sweep --checkpoints run/checkpoint-* --target-ppl-ratio 1.01 --data valid.txt --out-dir sweep/
    sparse-ffn sweep --checkpoints run/ --cett 0.2 --data valid.txt --out-dir sweep/   # subdirs of run/

The method is `sparse_ffn.calibrate.sweep`. Writes sweep.csv, sweep.json (with provenance) and sweep.png
into --out-dir at the very end, atomically; prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparse_ffn.calibrate.sweep import LAST
from sparse_ffn.cli.inspect import add_common_options, check_common
from sparse_ffn.cli.options import check_positive, ffn_names_from, log, parse_bytes
from sparse_ffn.errors import UserError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="PPL-k%% sparsity of every checkpoint of a training run at one CETT c (CSV + PNG); "
                      "prints one JSON object",
        description="Sparsing Law's calc_sparsity: choose one CETT value c for a training run, the largest "
                    "whose mean PPL ratio over the last --last checkpoints stays <= --target-ppl-ratio "
                    "(each checkpoint fits its own per-layer thresholds at c), then measure every "
                    "checkpoint's sparsity at that c.")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="DIR",
                   help="model directories (or a directory of them); sorted by the step in their names "
                        "(checkpoint-200, step_200) when every one has one, else taken in the order given")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-ppl-ratio", type=float, metavar="R",
                      help="PPL-k%%: the largest c with mean PPL ratio <= R over the last checkpoints (1.01 = PPL-1%%)")
    goal.add_argument("--cett", type=float, metavar="C", help="a fixed CETT value c in [0, 1] instead of a search")
    p.add_argument("--last", type=int, default=LAST, help=f"checkpoints whose mean PPL ratio chooses c (default {LAST})")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the last checkpoint's)")
    p.add_argument("--max-activation-memory", default="4GiB", metavar="SIZE",
                   help="cap on the activations held for the last checkpoints together (default 4GiB; 'none')")
    add_common_options(p)
    p.add_argument("--out-dir", required=True, help="directory for sweep.csv, sweep.json and sweep.png")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.artifacts.data import load_text, token_windows
    from sparse_ffn.artifacts.provenance import created_by, data_record
    from sparse_ffn.calibrate.ppl_search import check_target
    from sparse_ffn.calibrate.sweep import resolve_checkpoints, sweep_checkpoints, write_outputs
    from sparse_ffn.model_adapters.loading import load_model, load_tokenizer, resolve_device

    start = time.perf_counter()
    check_target(args.target_ppl_ratio, args.cett)
    check_positive(last=args.last)
    check_common(args)
    budget = parse_bytes(args.max_activation_memory)
    checkpoints = resolve_checkpoints(args.checkpoints)
    tok_dir = args.tokenizer or checkpoints[-1].path
    try:
        tokenizer = load_tokenizer(tok_dir, "--tokenizer" if args.tokenizer else "--checkpoints")
    except UserError as e:
        raise UserError(f"{e}{'' if args.tokenizer else '; name one with --tokenizer DIR'}") from None

    text, sha = load_text(args.data)
    windows = token_windows(tokenizer, text, args.seq_len, args.tokens, where=args.data)
    device = resolve_device(args.device)
    names = ffn_names_from(args)
    log(f"sweep over {len(checkpoints)} checkpoints on {windows.shape[0]} x {windows.shape[1]} tokens of "
        f"{args.data} ({device}, {args.dtype})")
    result = sweep_checkpoints(
        checkpoints, lambda path: load_model(path, device=device, dtype=args.dtype, seq_len=args.seq_len,
                                            flag="--checkpoints"),
        windows, target_ppl_ratio=args.target_ppl_ratio, cett=args.cett, last=args.last, names=names,
        batch_size=args.batch_size, max_activation_memory=budget, progress=not args.no_progress, log=log)
    for r in result.rows:
        log(f"{Path(r.checkpoint).name:>24}  step {'-' if r.step is None else r.step:>8}  sparsity "
            f"{r.sparsity['mean']:.4f}  activation ratio {r.activation_ratio:.4f}  PPL ratio {r.ppl_ratio:.5f}"
            f"{'  *' if r.in_mean else ''}")
    provenance = {
        "data": data_record(args.data, sha, windows),
        "tokenizer": str(Path(tok_dir).resolve()),
        "settings": {"device": str(device), "dtype": args.dtype, "batch_size": args.batch_size,
                     "max_activation_memory": budget},
        "created_by": created_by(),
        "timing": {"total_s": round(time.perf_counter() - start, 3)},
    }
    paths = write_outputs(result, args.out_dir, provenance)
    print(json.dumps({"cett": result.c, "target_ppl_ratio": result.target_ppl_ratio,
                      "mean_ppl_ratio": result.mean_ppl_ratio, "checkpoints": len(result.rows),
                      "activation_ratio": {"first": result.rows[0].activation_ratio,
                                           "last": result.rows[-1].activation_ratio},
                      **{k: str(v.resolve()) for k, v in paths.items()}}))
    return 0
