"""`sparse-ffn tasks write`: lm-eval task configs that run stock tasks on local data files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparse_ffn.cli.options import log


def _cmd_tasks_write(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.tasks.local import write_task_configs

    def skipped(task: str, missing: Path) -> None:
        log(f"skipped {task}: {missing} not found")

    names = write_task_configs(Path(args.data_dir), Path(args.out), on_skip=skipped)
    print(f"tasks: {', '.join(names)}", file=sys.stderr)
    print(Path(args.out).resolve())
    return 0


def _cmd_tasks_suite(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.tasks.sparsing_law import configs_dir

    print(configs_dir())
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("tasks", help="lm-eval task configs for local data")
    tsub = t.add_subparsers(dest="tasks_command", required=True)
    w = tsub.add_parser("write", help="write configs for stock tasks on local files; prints the directory "
                                      "to pass as lm_eval --include_path")
    w.add_argument("--data-dir", required=True,
                   help="folder with piqa/, arc_easy/, hellaswag/, ... (one jsonl per task; absent ones are skipped)")
    w.add_argument("--out", required=True, help="directory to write the YAML configs into")
    w.set_defaults(func=_cmd_tasks_write)
    s = tsub.add_parser("suite", help="print the folder of the shipped Sparsing Law groups over the stock "
                                      "(hub) tasks, for lm_eval --include_path")
    s.set_defaults(func=_cmd_tasks_suite)
