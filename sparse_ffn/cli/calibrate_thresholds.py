"""`sparse-ffn calibrate thresholds`: PPL-k% (or fixed-CETT) per-layer thresholds -> a v1 threshold file.

    sparse-ffn calibrate thresholds --model DIR --data wiki.valid.txt --target-ppl-ratio 1.01 \\
        --eval-data wiki.test.txt --out thr.json
    sparse-ffn calibrate thresholds --model DIR --data wiki.valid.txt --target-ppl-ratio 1.01,1.05,1.10 \\
        --out-dir thr/        # thr/ppl-1.01.json, thr/ppl-1.05.json, thr/ppl-1.10.json

Fits on --data (--tokens tokens in non-overlapping --seq-len windows), optionally reports the PPL ratio
on held-out --eval-data, writes --out (or one file per target in --out-dir) atomically at the very end
and prints the path(s), one per line, last on stdout. Several targets share the dense pass, the
activations and the per-layer searches. Nothing is written on an error or an interrupt.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from sparse_ffn.errors import UserError

from sparse_ffn.cli.options import (
    add_batch_size_option,
    add_data_options,
    add_dtype_option,
    add_ffn_options,
    add_model_option,
    add_placement_options,
    calibrate_subparsers,
    check_out_dir,
    check_out_file,
    check_positive,
    ffn_names_from,
    log,
    parse_bytes,
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    sub = calibrate_subparsers(subparsers)
    p = sub.add_parser(
        "thresholds", help="per-layer CETT thresholds for PPL-k%% sparsity (or a fixed CETT); prints the file path",
        description="Fit per-layer CETT thresholds t_l (mask |a_i| < t_l/||W_down[:, i]||) on calibration text: "
                    "the largest CETT c whose thresholds keep PPL(sparse)/PPL(dense) <= --target-ppl-ratio on "
                    "that text, or a fixed --cett. Writes a v1 thresholds file for `--model_args thresholds=`.")
    add_model_option(p)
    add_data_options(p, what="calibration text")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-ppl-ratio", metavar="R[,R...]",
                      help="PPL-k%%: largest CETT with PPL ratio <= R on the calibration text (1.01 = PPL-1%%); "
                           "several, comma-separated, in one run (with --out-dir)")
    goal.add_argument("--cett", type=float, metavar="C", help="fixed CETT value c in [0, 1]")
    p.add_argument("--ratio-tol", type=float, metavar="TOL",
                   help="stop once the PPL ratio is within TOL below the target (default 1e-3, the precision of "
                        "the reference's bisection to 1e-3 in c; smaller costs more sparse passes); the search "
                        "also stops once c is resolved to 1e-3")
    p.add_argument("--eval-data", help="held-out text (same forms as --data): also report its PPL ratio")
    p.add_argument("--eval-tokens", type=int, help="tokens of --eval-data (default: as many as --tokens)")
    add_placement_options(p, device_map=True)
    add_dtype_option(p)
    add_batch_size_option(p, 4)
    p.add_argument("--activation-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="storage of the collected activations (16-bit halves memory, rounds them)")
    p.add_argument("--max-activation-memory", default="4GiB", metavar="SIZE",
                   help="cap on stored activations (+ cached tails); beyond it layers are fitted in groups, "
                        "recollected per step (slower). Default 4GiB; 'none' = no cap")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ffn_options(p)
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", help="threshold file to write (JSON; one target or --cett)")
    dest.add_argument("--out-dir", help="folder for one threshold file per target (ppl-R.json)")
    p.set_defaults(func=_cmd_thresholds)


def _cmd_thresholds(args: argparse.Namespace, rest: list[str]) -> int:
    start = time.perf_counter()
    # -- everything cheap to check, before loading a model ------------------------------------
    from sparse_ffn.calibrate.ppl_search import check_target
    from sparse_ffn.calibrate.thresholds import parse_targets, target_file_name

    targets = parse_targets(args.target_ppl_ratio) if args.target_ppl_ratio is not None else []
    check_target(targets[0] if targets else None, args.cett)
    check_positive(tokens=args.tokens, batch_size=args.batch_size, eval_tokens=args.eval_tokens)
    budget = parse_bytes(args.max_activation_memory)
    if args.ratio_tol is not None and not (math.isfinite(args.ratio_tol) and 0 < args.ratio_tol < 1):
        raise UserError(f"--ratio-tol {args.ratio_tol:g}: must be in (0, 1), e.g. 1e-3")
    if args.out is not None:
        if len(targets) > 1:
            raise UserError(f"--target-ppl-ratio {args.target_ppl_ratio}: several targets need --out-dir, not --out")
        outs = {(targets[0] if targets else args.cett): check_out_file(args.out)}
    else:
        out_dir = check_out_dir(args.out_dir)
        if args.cett is not None:
            outs = {args.cett: out_dir / f"cett-{args.cett:g}.json"}
        else:
            outs = {r: out_dir / target_file_name(r) for r in targets}
    names = ffn_names_from(args)

    from sparse_ffn.artifacts.data import load_text, token_windows

    text, sha = load_text(args.data)
    eval_text = eval_sha = None
    if args.eval_data:
        eval_text, eval_sha = load_text(args.eval_data)
        if eval_sha == sha:
            log(f"warning: --eval-data {args.eval_data} is the calibration text itself (not held out)")

    from sparse_ffn.artifacts.provenance import data_record
    from sparse_ffn.calibrate.ppl_search import RATIO_TOL
    from sparse_ffn.calibrate.thresholds import calibrate_targets
    from sparse_ffn.core.masking import SparsityConfig, sparsify_
    from sparse_ffn.core.perplexity import perplexity
    from sparse_ffn.model_adapters.loading import load_model, load_tokenizer, parse_device_map, placement_text, \
        resolve_device

    device_map = parse_device_map(args.device_map)
    tokenizer = load_tokenizer(args.model)
    windows = token_windows(tokenizer, text, args.seq_len, args.tokens, where=args.data)
    eval_windows = None
    if eval_text is not None:
        eval_windows = token_windows(tokenizer, eval_text, args.seq_len, args.eval_tokens or args.tokens,
                                     where=args.eval_data)

    device = resolve_device(args.device)
    model = load_model(args.model, device=device, dtype=args.dtype, seq_len=args.seq_len, device_map=device_map,
                       tokenizer=tokenizer)
    model_dir = Path(args.model).expanduser()

    log(f"calibrating on {windows.shape[0]} x {windows.shape[1]} tokens of {args.data} "
        f"({placement_text(model, device)}, {args.dtype})")
    files = calibrate_targets(
        model, windows, targets, cett=args.cett, names=names,
        batch_size=args.batch_size, activation_dtype=args.activation_dtype, max_activation_memory=budget,
        ratio_tol=RATIO_TOL if args.ratio_tol is None else args.ratio_tol,
        progress=not args.no_progress, log=log, data=data_record(args.data, sha))
    dense = None
    for key, thr in files.items():
        thr.model["name_or_path"] = str(model_dir.resolve())
        cal = thr.calibration
        log(f"{'target ' + format(key, 'g') + ': ' if targets else ''}c={cal['cett']:.5f}: PPL ratio "
            f"{cal['ppl_ratio']:.5f} on the calibration text, mean sparsity {thr.sparsity['mean']:.4f}")
        if eval_windows is None:
            continue
        if dense is None:
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
            "data": data_record(args.eval_data, eval_sha),
            "tokens": int(eval_windows.numel()), "seq_len": int(eval_windows.shape[1]),
            "ppl_dense": dense["perplexity"], "ppl_sparse": sparse["perplexity"], "ppl_ratio": ratio,
            "sparsity": measured["mean"],
        }
        log(f"held-out {args.eval_data}: PPL {dense['perplexity']:.4f} -> {sparse['perplexity']:.4f}, "
             f"ratio {ratio:.5f}, mean sparsity {measured['mean']:.4f}")
    command_s = round(time.perf_counter() - start, 3)
    for key, thr in files.items():
        thr.calibration["timing"]["command_s"] = command_s
        print(thr.save(outs[key]).resolve())
    return 0
