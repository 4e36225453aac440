"""lm-eval task configs that run stock tasks offline on local data files.

Each written YAML `include:`s the stock task file of the installed lm_eval package, so prompts, targets
and metrics are the stock ones by construction; only the dataset source (a local JSONL file, loaded with
`dataset_path: json`) changes. Tasks get the name `<stock>_local`: lm-eval 0.4.13 lets an
`--include_path` task override a stock name (with a warning), but older 0.4.x releases silently keep the
stock task, so a new name is the only choice that works on every supported version.

The Sparsing Law groups (`sparsing_law_local` and its two categories, see `sparsing_law`) are written
over the `_local` tasks present.

Only the stock task's evaluation split is provided (the others are set to null), so few-shot examples,
if asked for, are drawn from that split (lm-eval warns).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import yaml

from sparse_ffn.errors import UserError
from sparse_ffn.tasks.sparsing_law import write_local_groups


class TaskSpec(NamedTuple):
    stock_yaml: str  # relative to lm_eval/tasks/
    data_file: str  # relative to the data dir
    split: str  # the split the stock task evaluates on


# stock task name -> where its stock YAML and local file are; each file is in its HF dataset's schema
STOCK_TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa/piqa.yaml", "piqa/piqa_validation.jsonl", "validation"),
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "arc_easy/arc_easy_test.jsonl", "test"),
    "wikitext": TaskSpec(
        "wikitext/wikitext.yaml", "wikitext2_raw/wikitext-2-raw-v1_test_document_level.jsonl", "test"
    ),
    "lambada_openai": TaskSpec("lambada/lambada_openai.yaml", "lambada_openai/lambada_test.jsonl", "test"),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "hellaswag/hellaswag_validation.jsonl", "validation"),
    "winogrande": TaskSpec(
        "winogrande/default.yaml", "winogrande/winogrande_xl_validation.jsonl", "validation"
    ),
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "boolq/boolq_validation.jsonl", "validation"),
    "copa": TaskSpec("super_glue/copa/default.yaml", "copa/copa_validation.jsonl", "validation"),
    "social_iqa": TaskSpec("siqa/siqa.yaml", "siqa/siqa_validation.jsonl", "validation"),
}
SUFFIX = "_local"


def stock_tasks_dir() -> Path:
    """The `tasks/` folder of the installed lm_eval package (found without importing it)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise UserError("lm_eval is not installed; install lm-eval to write task configs")
    return Path(spec.origin).parent / "tasks"


def write_task_configs(
    data_dir: Path, out_dir: Path, on_skip: Callable[[str, Path], None] | None = None
) -> list[str]:
    """Write `<stock>_local.yaml` configs into out_dir for each stock task whose file is in data_dir,
    then the `sparsing_law*_local` groups over them.

    Use with `lm_eval --include_path out_dir --tasks piqa_local,...`. Returns the task names written, then
    the group names; tasks without a data file are skipped (`on_skip(task, missing_file)`, and a stale
    config of theirs is removed). Raises UserError if data_dir holds none of the files.
    """
    data_dir, out_dir = Path(data_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    present = {name: spec for name, spec in STOCK_TASKS.items() if (data_dir / spec.data_file).is_file()}
    if not present:
        wanted = ", ".join(s.data_file for s in STOCK_TASKS.values())
        raise UserError(f"{data_dir}: none of the task data files found (looked for {wanted})")

    tasks_dir = stock_tasks_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for name, spec in STOCK_TASKS.items():
        task = f"{name}{SUFFIX}"
        target = out_dir / f"{task}.yaml"
        if name not in present:
            target.unlink(missing_ok=True)
            if on_skip is not None:
                on_skip(task, data_dir / spec.data_file)
            continue
        stock = tasks_dir / spec.stock_yaml
        if not stock.is_file():
            raise UserError(f"{stock}: stock lm-eval task config not found in the installed lm_eval")
        cfg: dict[str, object] = {
            "include": str(stock),
            "task": task,
            "tag": [],  # inheriting ai2_arc/lambada would replace those stock tags' members in 0.4.13
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.split: str(data_dir / spec.data_file)}},
            "training_split": None,
            "validation_split": None,
            "test_split": None,
        }
        cfg[f"{spec.split}_split"] = spec.split
        target.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        written.append(task)
    return written + write_local_groups(out_dir, present, SUFFIX)
