"""Resumable pieces of `sparse-ffn reproduce sparsing-law`: the PPL-k% threshold files of all targets
(one calibration run sharing the dense pass), and one lm-eval run per model variant through lm-eval's
own evaluator (`lm_eval.simple_evaluate`, model `sparse_ffn`, results JSON and samples saved by lm-eval's
`EvaluationTracker` as `lm_eval --output_path DIR --log_samples` does).

Resuming: a threshold file is reused when it was fitted on the same calibration data (sha256), tokens,
window length and model directory; a run is reused when its `run.json` (written last, atomically, after
lm-eval saved its files) records the same model arguments (including the threshold file's sha256), tasks,
limit and batch size. Anything else is redone.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sparse_ffn.artifacts import thresholds as threshold_file
from sparse_ffn.artifacts.atomic import atomic_write_json, sha256_file
from sparse_ffn.artifacts.provenance import created_by, data_record
from sparse_ffn.calibrate.thresholds import calibrate_targets, target_file_name

RUN_FILE = "run.json"


@dataclass
class Calibration:
    """Where the threshold files are, which were reused, and what the new ones cost."""

    files: dict[float, Path]
    reused: list[float]
    seconds: float
    dense_passes: int
    sparse_passes: int


def reusable_threshold_file(path: Path, sha: str, tokens: int, seq_len: int, model: Path) -> bool:
    """Whether `path` is a threshold file fitted on this data (sha256), tokens, seq_len and model dir."""
    if not path.is_file():
        return False
    try:
        thr = threshold_file.load(path)
    except Exception:  # noqa: BLE001 - an unreadable leftover is simply redone
        return False
    cal = thr.calibration
    return (cal.get("data", {}).get("sha256") == sha and cal.get("tokens") == tokens
            and cal.get("seq_len") == seq_len and thr.model.get("name_or_path") == str(model.resolve()))


def calibrate_missing(model_dir: Path, calib_data: str, text: str, sha: str, targets: Sequence[float],
                      out_dir: Path, *, tokens: int, seq_len: int, batch_size: int, device: str,
                      dtype: str, log: Callable[[str], None]) -> Calibration:
    """The threshold file of each target in out_dir (`ppl-R.json`), calibrating only the missing ones,
    all in one run (shared dense pass and activations)."""
    from sparse_ffn.artifacts.data import token_windows
    from sparse_ffn.model_adapters.loading import load_model_and_tokenizer

    files = {r: out_dir / target_file_name(r) for r in targets}
    reused = [r for r, p in files.items() if reusable_threshold_file(p, sha, tokens, seq_len, model_dir)]
    missing = [r for r in targets if r not in reused]
    if not missing:
        return Calibration(files, reused, 0.0, 0, 0)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_dir, device=device, dtype=dtype, seq_len=seq_len)
    windows = token_windows(tokenizer, text, seq_len, tokens, where=calib_data)
    log(f"calibrating PPL ratio targets {', '.join(f'{r:g}' for r in missing)} on {windows.shape[0]} x "
        f"{windows.shape[1]} tokens of {calib_data}")
    made = calibrate_targets(model, windows, missing, batch_size=batch_size, log=log,
                             data=data_record(calib_data, sha))
    any_file = next(iter(made.values()))
    for r, thr in made.items():
        thr.model["name_or_path"] = str(model_dir.resolve())
        thr.save(files[r])
    timing = any_file.calibration["timing"]
    return Calibration(files, reused, time.perf_counter() - start, int(timing["dense_passes"]),
                       int(any_file.calibration.get("shared", {}).get("sparse_passes", timing["sparse_passes"])))


def run_record(run_dir: Path) -> dict | None:
    """The finished run's record, or None when the run is absent or unfinished."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def run_lm_eval(run_dir: Path, model_args: dict, tasks: list[str], include_path: Path | None, *,
                limit: int | None, batch_size: int, device: str, log: Callable[[str], None]) -> tuple[dict, bool]:
    """One lm-eval run of the `sparse_ffn` model on `tasks` into run_dir (reused if finished with the
    same settings); returns (its run.json record, reused)."""
    settings = {"model": "sparse_ffn", "model_args": model_args, "tasks": tasks, "limit": limit,
                "batch_size": batch_size, "include_path": str(include_path) if include_path else None}
    thr = model_args.get("thresholds")
    if thr:
        settings["thresholds_sha256"] = sha256_file(thr)
    done = run_record(run_dir)
    if done is not None and done.get("settings") == settings:
        return done, True
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or outdated run
    run_dir.mkdir(parents=True)

    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    import sparse_ffn.model_adapters.lm_eval_adapter  # noqa: F401 - registers the `sparse_ffn` model

    start = time.perf_counter()
    tracker = EvaluationTracker(output_path=str(run_dir))
    tm = TaskManager(include_path=str(include_path) if include_path else None)
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    log(f"lm-eval: sparse_ffn ({args}) on {', '.join(tasks)}" + (f", limit {limit}" if limit else ""))
    results = lm_eval.simple_evaluate(model="sparse_ffn", model_args=args, tasks=tasks, limit=limit,
                                      batch_size=batch_size, device=device, log_samples=True,
                                      evaluation_tracker=tracker, task_manager=tm)
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    record = {"settings": settings, "seconds": round(time.perf_counter() - start, 3), "created_by": created_by()}
    atomic_write_json(run_dir / RUN_FILE, record)
    return record, False
