"""`sparse-ffn eval ARGS...`: the stock lm-eval CLI with `--model sparse_ffn` (unless another is named)."""

from __future__ import annotations

import argparse
import sys


def _cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.plugin.startup import register

    register()
    from lm_eval.__main__ import cli_evaluate

    argv = list(rest)
    if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
        argv = ["--model", "sparse_ffn", *argv]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("eval", help="lm_eval with --model sparse_ffn; all other arguments go to lm_eval",
                              add_help=False)
    e.set_defaults(func=_cmd_eval, passthrough=True)
