"""`sparse-ffn gate`: the CI quality gate over two lm-eval runs (the method: `sparse_ffn.analysis.gate`)."""

from __future__ import annotations

import argparse
import json
import sys

from sparse_ffn.analysis.gate import DECIDE_RULES
from sparse_ffn.analysis.paired import DEFAULT_RESAMPLES, DEFAULT_SEED
from sparse_ffn.errors import UserError

DESCRIPTION = ("Compare a candidate lm-eval run (sparse) with its baseline (dense) against budgets, paired per "
               "item when both runs have --log_samples files.")


def _cmd_gate(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.analysis.gate import Budgets, gate, parse_max_drop
    from sparse_ffn.analysis.gate_report import render_markdown, render_plot, render_text
    from sparse_ffn.artifacts.atomic import atomic_write_bytes

    budgets = Budgets(None if args.max_drop is None else parse_max_drop(args.max_drop),
                      args.max_ppl_ratio, args.min_sparsity, args.decide, args.confidence, args.holm,
                      args.resamples, args.seed)
    if budgets.max_ppl_ratio is not None and not budgets.max_ppl_ratio > 0:
        raise UserError(f"--max-ppl-ratio: must be > 0, got {args.max_ppl_ratio:g}")
    if budgets.min_sparsity is not None and not 0 <= budgets.min_sparsity <= 1:
        raise UserError(f"--min-sparsity: must be in [0, 1], got {args.min_sparsity:g}")
    from sparse_ffn.artifacts.atomic import check_writable

    for flag, path in (("--summary", args.summary), ("--plot", args.plot)):
        if path:
            check_writable(path, flag)
    result = gate(args.baseline, args.candidate, budgets, args.baseline_samples, args.candidate_samples)
    if args.summary:
        atomic_write_bytes(args.summary, render_markdown(result).encode())
    if args.plot:
        render_plot(result, args.plot)
    for w in result.warnings:
        print(f"sparse-ffn: warning: {w}", file=sys.stderr)
    print(render_text(result))
    print(json.dumps(result.to_json()))
    return 0 if result.passed else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "gate", help="CI quality gate: compare two lm-eval results JSON files against budgets",
        description=DESCRIPTION + " Exit 0: all budgets hold (or none is set); 1: one fails; "
        "2: unusable input. The last line of stdout is a JSON object {passed, verdict, comparison, checks, ...}.")
    g.add_argument("--baseline", required=True, help="results_*.json, or a directory (newest results_*.json below it)")
    g.add_argument("--candidate", required=True, help="same, for the run under test")
    g.add_argument("--baseline-samples", nargs="+", metavar="PATH",
                   help="lm-eval --log_samples files (samples_<task>_<timestamp>.jsonl) or folders of them "
                        "(default: those written beside the results file)")
    g.add_argument("--candidate-samples", nargs="+", metavar="PATH", help="same, for the run under test")
    g.add_argument("--max-drop", metavar="METRIC=X,...",
                   help="largest allowed drop per metric (default: acc=0.01,acc_norm=0.01; '' for none); "
                        "metrics not named are reported, not gated")
    g.add_argument("--max-ppl-ratio", type=float, metavar="R",
                   help="largest allowed candidate/baseline ratio of word_/byte_perplexity and perplexity")
    g.add_argument("--min-sparsity", type=float, metavar="S",
                   help="smallest allowed candidate config.sparse_ffn.sparsity.mean")
    g.add_argument("--decide", choices=DECIDE_RULES, default="point",
                   help="fail a --max-drop budget when the point estimate of the drop exceeds it (point, the "
                        "default) or the upper end of its two-sided --confidence CI does (upper)")
    g.add_argument("--confidence", type=float, default=0.95, metavar="C",
                   help="confidence of the CIs and of the minimum detectable effect (default 0.95)")
    g.add_argument("--holm", action="store_true",
                   help="Holm-adjust the paired tests' p-values across all paired task/metric rows")
    g.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, metavar="B",
                   help=f"paired bootstrap resamples (default {DEFAULT_RESAMPLES})")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"bootstrap seed (default {DEFAULT_SEED})")
    g.add_argument("--summary", metavar="REPORT.md", help="write a markdown report (e.g. $GITHUB_STEP_SUMMARY)")
    g.add_argument("--plot", metavar="REPORT.png", help="write a PNG of baseline vs candidate per task and metric")
    g.set_defaults(func=_cmd_gate)
