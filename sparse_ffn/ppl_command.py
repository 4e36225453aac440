"""`sparse-ffn ppl`: paper-parity perplexity (non-overlapping windows, token-level NLL); one JSON line.

    sparse-ffn ppl --model DIR --data wiki.test.raw --seq-len 2048                      # dense
    sparse-ffn ppl --model DIR --experts experts/ --data wiki.test.raw --seq-len 2048   # Sparse Expansion
    sparse-ffn ppl --thresholds thr.json --data wiki.test.raw --seq-len 512             # CETT thresholds

The measurement is `sparse_ffn.tasks.paper_ppl.paper_perplexity`; the last stdout line is its record.
"""

from __future__ import annotations

import argparse
import json
import sys

from .model_adapters.sparsity_setup import FFN_ARGS


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ppl", help="paper-parity perplexity (dense, --experts or --thresholds); prints one JSON line",
        description="Perplexity as the Sparse Expansion / SparseGPT papers measure it: the text tokenised once, "
                    "cut into non-overlapping --seq-len windows, exp(mean NLL of every predicted token). Not "
                    "lm-eval's wikitext word/byte perplexity. The last stdout line is one JSON object.")
    p.add_argument("--model", metavar="PATH", help="local Hugging Face model directory (default: the model the "
                                                   "experts manifest or thresholds file names)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--experts", metavar="DIR", help="Sparse Expansion experts directory (calibrate experts)")
    g.add_argument("--thresholds", metavar="F", help="CETT threshold file, or a comma-separated list (one per layer)")
    p.add_argument("--data", required=True, help="text file, .jsonl with \"text\", or datasets NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--seq-len", type=int, required=True, metavar="L", help="window length in tokens (paper: 2048)")
    p.add_argument("--tokens", type=int, metavar="N", help="score only the first N // L windows (default: all)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="windows per forward (default 1)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                   help="model dtype (default float32; auto = the checkpoint's)")
    p.add_argument("--threads", type=int, metavar="T", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for k in FFN_ARGS:
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, metavar="NAME",
                       help="FFN module name for an architecture the discovery does not know")
    p.set_defaults(func=_cmd_ppl)


def _cmd_ppl(args: argparse.Namespace, rest: list[str]) -> int:
    from .errors import UserError

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    from .tasks.paper_ppl import paper_perplexity

    r = paper_perplexity(args.model, args.data, args.seq_len, experts=args.experts, thresholds=args.thresholds,
                         tokens=args.tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                         ffn_args={k: getattr(args, k) for k in FFN_ARGS}, progress=not args.quiet)
    extra = f", mean sparsity {r['sparsity']['mean']:.4f}" if r["sparsity"] else ""
    print(f"sparse-ffn: perplexity {r['perplexity']:.4f} over {r['tokens']} predicted tokens ({r['windows']}/"
          f"{r['windows_available']} windows of {r['seq_len']}){extra}, {r['seconds']:.1f} s", file=sys.stderr)
    print(json.dumps(r, separators=(",", ":")))
    return 0
