"""The `sparse-ffn` command. Commands that write an artifact print its path as the last line of
stdout; commands that measure print one JSON object as the last line. User mistakes exit 2 with
one line on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import UserError


def _cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the stock lm-eval CLI with `--model sparse_ffn` (unless another model is named)."""
    from .plugin.startup import register

    register()
    from lm_eval.__main__ import cli_evaluate

    argv = list(rest)
    if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
        argv = ["--model", "sparse_ffn", *argv]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def _cmd_models_fetch(args: argparse.Namespace, rest: list[str]) -> int:
    from .model_zoo import fetch_model

    path = fetch_model(args.name, Path(args.cache_dir) if args.cache_dir else None)
    print(path)
    return 0


def _cmd_tasks_write(args: argparse.Namespace, rest: list[str]) -> int:
    from .tasks.local import write_task_configs

    names = write_task_configs(Path(args.data_dir), Path(args.out))
    print(f"tasks: {', '.join(names)}", file=sys.stderr)
    print(Path(args.out).resolve())
    return 0


# Modules that add their own subcommands: each has `add_commands(subparsers)`, whose parsers set
# `func(args, rest) -> int` as default. Imported lazily so `sparse-ffn --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "sparse_ffn.gate", "sparse_ffn.plugin.ultraeval_server", "sparse_ffn.calibrate.experts_command",
    "sparse_ffn.calibrate.command", "sparse_ffn.calibrate.inspect_command", "sparse_ffn.calibrate.sweep",
    "sparse_ffn.ppl_command", "sparse_ffn.analysis.neurons_command",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-ffn", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"sparse-ffn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="lm_eval with --model sparse_ffn; all other arguments go to lm_eval",
                       add_help=False)
    e.set_defaults(func=_cmd_eval, passthrough=True)

    m = sub.add_parser("models", help="real models available offline")
    msub = m.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="fetch and convert a known model into the cache; prints its directory")
    f.add_argument("name", help="e.g. smollm2-135m")
    f.add_argument("--cache-dir", help="default: $SPARSE_FFN_CACHE or ~/.cache/sparse-ffn")
    f.set_defaults(func=_cmd_models_fetch)

    t = sub.add_parser("tasks", help="lm-eval task configs for local data")
    tsub = t.add_subparsers(dest="tasks_command", required=True)
    w = tsub.add_parser("write", help="write configs for stock tasks on local files; prints the directory "
                                      "to pass as lm_eval --include_path")
    w.add_argument("--data-dir", required=True, help="folder with piqa/, arc_easy/, wikitext2_raw/, ...")
    w.add_argument("--out", required=True, help="directory to write the YAML configs into")
    w.set_defaults(func=_cmd_tasks_write)

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
