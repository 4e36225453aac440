"""`sparse-ffn ppl`: paper-parity perplexity (non-overlapping windows, token-level NLL); one JSON line.

    sparse-ffn ppl --model DIR --data wiki.test.raw --seq-len 2048                      # dense
    sparse-ffn ppl --model DIR --experts experts/ --data wiki.test.raw --seq-len 2048   # Sparse Expansion
    sparse-ffn ppl --thresholds thr.json --data wiki.test.raw --seq-len 512             # CETT thresholds

The measurement is `sparse_ffn.tasks.paper_ppl.paper_perplexity`; the last stdout line is its record.
"""

from __future__ import annotations

import argparse
import json

from sparse_ffn.cli.options import (
    add_batch_size_option,
    add_data_options,
    add_dtype_option,
    add_ffn_options,
    add_model_option,
    add_placement_options,
    add_threads_option,
    apply_threads,
    ffn_args,
    log,
    parse_bytes,
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ppl", help="paper-parity perplexity (dense, --experts or --thresholds); prints one JSON line",
        description="Perplexity as the Sparse Expansion / SparseGPT papers measure it: the text tokenised once, "
                    "cut into non-overlapping --seq-len windows, exp(mean NLL of every predicted token). Not "
                    "lm-eval's wikitext word/byte perplexity. The last stdout line is one JSON object.")
    add_model_option(p, required=False, help="local Hugging Face model directory (default: the model the experts "
                                             "manifest or thresholds file names)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--experts", metavar="DIR", help="Sparse Expansion experts directory (calibrate experts)")
    g.add_argument("--thresholds", metavar="F", help="CETT threshold file, or a comma-separated list (one per layer)")
    p.add_argument("--experts-streaming", action="store_true",
                   help="with --experts: evaluate layer by layer, one layer's experts in memory at a time (same "
                        "numbers as the in-memory model)")
    p.add_argument("--experts-max-memory", metavar="SIZE",
                   help="with --experts: stream when the experts need more than SIZE in memory (e.g. 4GiB)")
    add_data_options(p, what="evaluation text", tokens=None, seq_len=None)
    p.add_argument("--seq-len", type=int, required=True, metavar="L", help="window length in tokens (paper: 2048)")
    p.add_argument("--tokens", type=int, metavar="N", help="score only the first N // L windows (default: all)")
    add_batch_size_option(p, 1)
    add_placement_options(p)
    add_dtype_option(p, auto=True)
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ffn_options(p)
    p.set_defaults(func=_cmd_ppl)


def _cmd_ppl(args: argparse.Namespace, rest: list[str]) -> int:
    apply_threads(args.threads)
    from sparse_ffn.tasks.paper_ppl import paper_perplexity

    budget = None if args.experts_max_memory is None else parse_bytes(args.experts_max_memory, "--experts-max-memory")
    r = paper_perplexity(args.model, args.data, args.seq_len, experts=args.experts, thresholds=args.thresholds,
                         tokens=args.tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                         ffn_args=ffn_args(args), progress=not args.quiet,
                         streaming=True if args.experts_streaming else None, max_memory=budget)
    extra = f", mean sparsity {r['sparsity']['mean']:.4f}" if r["sparsity"] else ""
    log(f"perplexity {r['perplexity']:.4f} over {r['tokens']} predicted tokens ({r['windows']}/"
        f"{r['windows_available']} windows of {r['seq_len']}){extra}, {r['seconds']:.1f} s")
    print(json.dumps(r, separators=(",", ":")))
    return 0
