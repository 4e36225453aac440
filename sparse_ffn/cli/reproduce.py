"""`sparse-ffn reproduce sparsing-law`: the Sparsing Law table in one command.

    sparse-ffn reproduce sparsing-law --model DIR --calib-data wiki.valid.txt --data-dir ../shared/data \\
        --targets 1.01,1.05,1.10 --limit 50 --out-dir repro/

Calibrates the PPL-k% thresholds of all targets in one run (shared dense pass), runs the dense and
each sparse model on the suite (`sparsing_law_local` from --data-dir, else the hub group
`sparsing_law`) through `lm_eval.simple_evaluate` with per-sample logs, and writes repro/table.md,
table.csv, table.png. Layout of --out-dir: thresholds/ppl-R.json, tasks/ (the local task configs),
runs/<dense|ppl-R>/ (lm-eval's results JSON and samples, run.json when finished). A rerun reuses the
finished runs and threshold files. One JSON object last on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparse_ffn.cli.options import add_model_option, check_out_dir, check_positive, log
from sparse_ffn.errors import UserError

DEFAULT_TARGETS = "1.01,1.05,1.10"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    r = subparsers.add_parser("reproduce", help="reproduce a paper's evaluation in one command")
    rsub = r.add_subparsers(dest="reproduce_command", required=True)
    p = rsub.add_parser(
        "sparsing-law", help="dense vs PPL-k%% sparsity on the Sparsing Law zero-shot suite: table (md, csv, png)",
        description="Calibrate PPL-k%% CETT thresholds for every target, evaluate dense and sparse models on the "
                    "Sparsing Law suite with lm-eval, and write the paper's table with paired differences.")
    add_model_option(p)
    p.add_argument("--calib-data", required=True, metavar="FILE",
                   help="calibration text (a text file or .jsonl with a \"text\" field)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="local task data (piqa/, hellaswag/, ...; `sparse-ffn tasks write`); absent tasks are "
                        "skipped, one line each. Default: the hub tasks (needs the Hugging Face hub)")
    p.add_argument("--targets", default=DEFAULT_TARGETS, metavar="R[,R...]",
                   help=f"PPL ratio targets (default {DEFAULT_TARGETS}: PPL-1%%, 5%%, 10%%)")
    p.add_argument("--limit", type=int, metavar="N", help="documents per task (lm-eval --limit)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward (default 4)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="lm-eval --batch_size (default 8)")
    p.add_argument("--max-length", type=int, help="lm-eval model max_length (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--confidence", type=float, default=0.95, help="level of the paired CIs (default 0.95)")
    p.add_argument("--out-dir", required=True, help="folder for thresholds, runs and the table")
    p.set_defaults(func=_cmd_sparsing_law)


def percent_label(target: float) -> str:
    """1.01 -> 'PPL-1%', 1.1 -> 'PPL-10%', 1.005 -> 'PPL-0.5%'."""
    return f"PPL-{round((target - 1) * 100, 6):g}%"


def _cmd_sparsing_law(args: argparse.Namespace, rest: list[str]) -> int:
    start = time.perf_counter()
    from sparse_ffn.analysis.paired import check_confidence
    from sparse_ffn.artifacts.data import load_text
    from sparse_ffn.calibrate.thresholds import parse_targets, target_file_name
    from sparse_ffn.model_adapters.loading import model_dir

    targets = parse_targets(args.targets, "--targets")
    check_positive(limit=args.limit, tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                   eval_batch_size=args.eval_batch_size, max_length=args.max_length)
    check_confidence(args.confidence)
    out = check_out_dir(args.out_dir)
    model = model_dir(args.model)
    text, sha = load_text(args.calib_data)

    from sparse_ffn.tasks.local import STOCK_TASKS, SUFFIX, write_task_configs
    from sparse_ffn.tasks.sparsing_law import CATEGORIES, TOP, TYDIQA_NOTE, configs_dir

    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {args.data_dir}: not a directory")
        stock = [t for tasks in CATEGORIES.values() for t in tasks]
        if not any((data_dir / STOCK_TASKS[t].data_file).is_file() for t in stock):
            raise UserError(f"--data-dir {args.data_dir}: none of the Sparsing Law suite's data files found "
                            f"(looked for {', '.join(STOCK_TASKS[t].data_file for t in stock)})")
        suite = {f"{t}{SUFFIX}" for t in stock}
        tasks_dir = out / "tasks"
        names = write_task_configs(data_dir, tasks_dir, on_skip=lambda task, missing: log(
            f"skipped {task}: {missing} not found") if task in suite else None)
        suffix, include, group = SUFFIX, tasks_dir, f"{TOP}{SUFFIX}"
    else:
        names, suffix, include, group = None, "", configs_dir(), TOP
    categories = {cat.removeprefix("sparsing_law_"): [f"{t}{suffix}" for t in tasks
                                                       if names is None or f"{t}{suffix}" in names]
                  for cat, tasks in CATEGORIES.items()}
    tasks = [t for members in categories.values() for t in members]

    from sparse_ffn.analysis.reproduce import calibrate_missing, run_lm_eval
    from sparse_ffn.analysis import sparsing_law_table as table

    calib = calibrate_missing(model, args.calib_data, text, sha, targets, out / "thresholds", tokens=args.tokens,
                              seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
                              dtype=args.dtype, log=log)
    base_args = {"pretrained": str(model.resolve()), "dtype": args.dtype}
    if args.max_length:
        base_args["max_length"] = args.max_length
    variants = [("dense", "dense", None, {**base_args, "strategy": "dense"})]
    for r in targets:
        variants.append((percent_label(r), target_file_name(r).removesuffix(".json"), r,
                         {**base_args, "thresholds": str(calib.files[r].resolve())}))
    runs, rows = {}, []
    for label, name, target, model_args in variants:
        run_dir = out / "runs" / name
        record, reused = run_lm_eval(run_dir, model_args, [group], include, limit=args.limit,
                                     batch_size=args.eval_batch_size, device=args.device, log=log)
        row = table.read_row(run_dir, label, tasks, target)
        if rows:
            row.diff = table.paired_diffs(out / "runs" / "dense", run_dir, tasks, args.confidence)
        rows.append(row)
        runs[label] = {"dir": str(run_dir.resolve()), "reused": reused, "seconds": record["seconds"],
                       "sparsity": row.sparsity, "acc": dict(row.acc)}
    averages = table.add_averages(rows, categories, args.confidence)
    names_map = {t: table.column_name(t, suffix) for t in tasks}
    names_map.update({c: f"{c} avg" for c in averages})
    columns = []
    for cat, members in categories.items():
        columns += [t for t in members if any(t in r.acc for r in rows)]
        if cat in averages:
            columns.append(cat)
    note = (f"Model {model.resolve()}; tasks through lm-eval (group {group}), limit {args.limit or 'none'} per task; "
            f"thresholds calibrated on {args.tokens} tokens of {args.calib_data}. {TYDIQA_NOTE}.")
    from sparse_ffn.artifacts.atomic import atomic_write_bytes

    md = atomic_write_bytes(out / "table.md", table.markdown(rows, columns, names_map, args.confidence, note).encode())
    csv_path = atomic_write_bytes(out / "table.csv", table.csv_text(rows, columns, names_map).encode())
    png = table.plot_png(rows, columns, names_map, out / "table.png",
                         f"{model.name}: accuracy vs sparsity (Sparsing Law suite)")
    print(table.markdown(rows, columns, names_map, args.confidence))
    summary = {
        "table": {"markdown": str(md.resolve()), "csv": str(csv_path.resolve()), "png": str(png.resolve())},
        "runs": runs,
        "thresholds": {f"{r:g}": str(p.resolve()) for r, p in calib.files.items()},
        "calibration": {"reused": calib.reused, "seconds": round(calib.seconds, 3),
                        "dense_passes": calib.dense_passes, "sparse_passes": calib.sparse_passes},
        "seconds": round(time.perf_counter() - start, 3),
    }
    print(json.dumps(summary))
    return 0
