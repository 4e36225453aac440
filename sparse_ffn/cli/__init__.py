"""The `sparse-ffn` command. Commands that write an artifact print its path as the last line of
stdout; commands that measure print one JSON object as the last line. User mistakes exit 2 with
one line on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from sparse_ffn import __version__
from sparse_ffn.errors import UserError


# Modules that add their own subcommands: each has `add_commands(subparsers)`, whose parsers set
# `func(args, rest) -> int` as default. Imported lazily so `sparse-ffn --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "sparse_ffn.cli.eval", "sparse_ffn.cli.models", "sparse_ffn.cli.tasks", "sparse_ffn.cli.gate",
    "sparse_ffn.cli.serve", "sparse_ffn.cli.calibrate_experts", "sparse_ffn.cli.calibrate_thresholds",
    "sparse_ffn.cli.inspect", "sparse_ffn.cli.sweep", "sparse_ffn.cli.ppl", "sparse_ffn.cli.analyze",
    "sparse_ffn.cli.verify", "sparse_ffn.cli.reproduce",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-ffn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sparse-ffn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "eval":  # everything after `eval` belongs to lm_eval
        args, rest = parser.parse_args(["eval"]), argv[1:]
    else:
        args, rest = parser.parse_args(argv), []
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    try:
        return func(args, rest)
    except UserError as e:
        print(f"sparse-ffn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparse-ffn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
