"""Local (offline) lm-eval task configs: names written, errors, and stock prompts by construction."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from sparse_ffn.errors import UserError
from sparse_ffn.tasks.local import STOCK_TASKS, write_task_configs

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"shared data dir {DATA_DIR} not present (it sits beside the checkout)"
)
ALL = ["piqa_local", "arc_easy_local", "wikitext_local", "lambada_openai_local", "copa_local"]
GROUPS = ["sparsing_law_commonsense_local", "sparsing_law_reading_local", "sparsing_law_local"]


@needs_data
def test_writes_all_task_names(tmp_path: Path) -> None:
    """The shared data has these five (no HellaSwag, WinoGrande, BoolQ or SIQA); then the suite's groups."""
    skipped: list[str] = []
    assert write_task_configs(DATA_DIR, tmp_path, on_skip=lambda task, _: skipped.append(task)) == ALL + GROUPS
    assert skipped == ["hellaswag_local", "winogrande_local", "boolq_local", "social_iqa_local"]
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == sorted(f"{n}.yaml" for n in ALL + GROUPS)


def test_skips_tasks_without_data(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    piqa = data / STOCK_TASKS["piqa"].data_file
    piqa.parent.mkdir(parents=True)
    piqa.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n')
    out.mkdir()
    (out / "arc_easy_local.yaml").write_text("stale")  # from an earlier run with more data
    names = ["piqa_local", "sparsing_law_commonsense_local", "sparsing_law_local"]
    assert write_task_configs(data, out) == names
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.yaml" for n in names)


def test_missing_data_dir_raises(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises(UserError) as err:
        write_task_configs(missing, tmp_path / "out")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@needs_data
def test_piqa_built_from_local_file_with_stock_prompts(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import apply_template

    write_task_configs(DATA_DIR, tmp_path)
    tm = TaskManager(include_path=str(tmp_path))
    task = tm.load(["piqa_local"])["tasks"]["piqa_local"]

    first_line = (DATA_DIR / STOCK_TASKS["piqa"].data_file).open(encoding="utf-8").readline()
    doc = task.eval_docs[0]
    assert doc == json.loads(first_line)  # loaded from the local file, stock eval split
    assert len(task.eval_docs) == 1838

    stock = yaml.safe_load(tm.task_index["piqa"].yaml_path.read_text())  # the stock definition
    assert task.doc_to_text(doc) == apply_template(stock["doc_to_text"], doc)
    assert task.doc_to_choice(doc) == ast.literal_eval(apply_template(stock["doc_to_choice"], doc))
    assert task.doc_to_target(doc) == doc[stock["doc_to_target"]]
    assert [m["metric"] for m in task.config.metric_list] == [m["metric"] for m in stock["metric_list"]]
    assert task.config.output_type == stock["output_type"]
