"""Issue #16 (tasks): the Sparsing Law zero-shot suite as lm-eval groups, hub and local.

Tiny fixture files in each Hugging Face dataset's own schema (written here), `sparse-ffn tasks write`, the
stock prompts on them, and the real `lm_eval` script through `--model sparse_ffn` (dense) and `--model hf`:
identical per-task scores, and group scores that are the unweighted mean of the member tasks' `acc`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import read_samples, run_lm_eval
from sparse_ffn.cli import main
from sparse_ffn.tasks.local import STOCK_TASKS, stock_tasks_dir
from sparse_ffn.tasks.sparsing_law import CATEGORIES, configs_dir, render, suite_configs

pytestmark = pytest.mark.usefixtures("one_thread")


def _hellaswag(i: int, label: int) -> dict:
    return {"ind": 100 + i, "activity_label": "Making tea", "ctx_a": f"[header] Step {i}. [title] Boil the water.",
            "ctx_b": "then the man", "ctx": f"[header] Step {i}. [title] Boil the water. then the man",
            "endings": ["pours it into the cup.", "eats the [step] kettle.", "sings to the river.", "sleeps."],
            "source_id": f"wikihow~{i}", "split": "val", "split_type": "indomain", "label": str(label)}


# stock task -> rows in its HF dataset's schema; the counts differ (3..6) so that the size-weighted and the
# unweighted mean of a group differ; with --limit LIMIT winogrande and lambada_openai give 5 docs
ROWS: dict[str, list[dict]] = {
    "piqa": [{"goal": g, "sol1": a, "sol2": b, "label": y} for g, a, b, y in [
        ("To keep bread fresh,", "store it in a cool dry place.", "store it in hot water.", 0),
        ("To open a stuck jar,", "put it in the freezer for a week.", "run the lid under hot water.", 1),
        ("To boil water,", "heat it on the stove.", "leave it by the window.", 0)]],
    "social_iqa": [{"context": c, "question": q, "answerA": a, "answerB": b, "answerC": d, "label": y}
                   for c, q, a, b, d, y in [
        ("Sam poured tea for his friend.", "How would the friend feel?", "thankful", "angry", "lost", "1"),
        ("Ana walked to school by the river.", "What did Ana do?", "slept", "walked", "flew", "2"),
        ("Tom read the paper by the window.", "Why did Tom do this?", "to swim", "to cook", "to learn", "3"),
        ("Kim met her friend at noon.", "What will Kim do next?", "say hello", "leave", "cry", "1")]],
    "hellaswag": [_hellaswag(i, y) for i, y in enumerate([0, 3, 1, 0, 2])],
    "winogrande": [{"sentence": s, "option1": a, "option2": b, "answer": y} for s, a, b, y in [
        ("The cup fell off the table because _ was too close to the edge.", "the cup", "the table", "1"),
        ("The sun is brighter than the moon because _ gives off its own light.", "the moon", "the sun", "2"),
        ("She put the bread in the cloth because _ kept it fresh.", "the cloth", "the bread", "1"),
        ("The fox jumped over the dog because _ was lazy.", "the fox", "the dog", "2"),
        ("The boat was faster than the bird, so _ arrived first.", "the boat", "the bird", "1"),
        ("Water boils before the soup because _ is thinner.", "the soup", "the water", "2")]],
    "copa": [{"premise": p, "choice1": a, "choice2": b, "question": q, "idx": i, "label": y}
             for i, (p, a, b, q, y) in enumerate([
        ("The man poured hot water on the lid.", "The jar opened.", "The jar broke.", "effect", 0),
        ("The children walked by the river.", "They wanted to count boats.", "It was raining.", "cause", 0),
        ("The bread stayed fresh.", "It was left in the sun.", "It was wrapped in a cloth.", "cause", 1),
        ("The sun rose in the east.", "The morning began.", "The night began.", "effect", 0)])],
    "boolq": [{"question": q, "passage": p, "idx": i, "label": y} for i, (q, p, y) in enumerate([
        ("is paris the capital of france", "Paris is the capital of France.", 1),
        ("does water boil at ten degrees", "Water boils at one hundred degrees at sea level.", 0),
        ("is rome in germany", "Rome is the capital of Italy.", 0)])],
    "lambada_openai": [{"text": t} for t in [
        "The quick brown fox jumps over the lazy dog", "The sun rises in the east and sets in the west",
        "Paris is the capital of France and Berlin is the capital of Germany",
        "She put the cup on the table and poured some tea", "The children walked to school along the river",
        "Let us meet at noon near the old bridge"]],
}
LIMIT = 5
SIZES = {f"{task}_local": min(len(rows), LIMIT) for task, rows in ROWS.items()}  # docs evaluated
LOCAL = [f"{t}_local" for t in ("piqa", "lambada_openai", "hellaswag", "winogrande", "boolq", "copa", "social_iqa")]
COMMONSENSE = ["piqa_local", "social_iqa_local", "hellaswag_local", "winogrande_local", "copa_local"]
READING = ["boolq_local", "lambada_openai_local"]
GROUPS = ["sparsing_law_commonsense_local", "sparsing_law_reading_local", "sparsing_law_local"]


def write_data(data_dir: Path, tasks: list[str]) -> Path:
    """The fixture rows of `tasks`, each at its `STOCK_TASKS` path under data_dir, one JSON object a line."""
    for task in tasks:
        path = data_dir / STOCK_TASKS[task].data_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS[task]), encoding="utf-8")
    return data_dir


def tasks_write(capsys, data_dir: Path, out: Path) -> tuple[list[str], list[str]]:
    """Run `sparse-ffn tasks write`; return (the names it reports, its `skipped` stderr lines)."""
    assert main(["tasks", "write", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == str(out.resolve())
    err = captured.err.splitlines()
    names = [line for line in err if line.startswith("tasks: ")]
    assert len(names) == 1
    return names[0].removeprefix("tasks: ").split(", "), [line for line in err if "skipped" in line]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    """`tasks write` output for all seven suite tasks (no ARC-Easy, no WikiText)."""
    from sparse_ffn.tasks.local import write_task_configs

    root = tmp_path_factory.mktemp("suite")
    write_task_configs(write_data(root / "data", list(ROWS)), root / "tasks")
    return root / "tasks"


def test_write_all_seven_and_the_groups(capsys, tmp_path):
    data = write_data(tmp_path / "data", list(ROWS))
    names, skipped = tasks_write(capsys, data, tmp_path / "out")
    assert names == LOCAL + GROUPS
    assert skipped == [f"sparse-ffn: skipped arc_easy_local: {data / STOCK_TASKS['arc_easy'].data_file} not found",
                       f"sparse-ffn: skipped wikitext_local: {data / STOCK_TASKS['wikitext'].data_file} not found"]
    groups = {g: yaml.safe_load((tmp_path / "out" / f"{g}.yaml").read_text()) for g in GROUPS}
    assert groups["sparsing_law_commonsense_local"]["task"] == COMMONSENSE
    assert groups["sparsing_law_reading_local"]["task"] == READING
    assert groups["sparsing_law_local"]["task"] == GROUPS[:2]
    for cfg in groups.values():
        assert cfg["aggregate_metric_list"] == [
            {"metric": "acc", "filter_list": ["none"], "aggregation": "mean", "weight_by_size": False}]
    assert "TyDiQA" in groups["sparsing_law_reading_local"]["metadata"]["description"]
    header = [line for line in (tmp_path / "out" / "sparsing_law_reading_local.yaml").read_text().splitlines()
              if line.startswith("#")]
    assert "TyDiQA" in " ".join(header)


def test_missing_files_skipped_one_line_each_and_groups_shrink(capsys, tmp_path):
    out = tmp_path / "out"
    tasks_write(capsys, write_data(tmp_path / "all", list(ROWS)), out)  # a first run with every file
    data = write_data(tmp_path / "some", ["hellaswag", "copa"])
    names, skipped = tasks_write(capsys, data, out)
    assert names == ["hellaswag_local", "copa_local", "sparsing_law_commonsense_local", "sparsing_law_local"]
    absent = [t for t in STOCK_TASKS if t not in ("hellaswag", "copa")]
    assert skipped == [f"sparse-ffn: skipped {t}_local: {data / STOCK_TASKS[t].data_file} not found" for t in absent]
    assert sorted(p.name for p in out.glob("*.yaml")) == sorted(f"{n}.yaml" for n in names)  # stale ones gone
    top = yaml.safe_load((out / "sparsing_law_local.yaml").read_text())
    assert top["task"] == ["sparsing_law_commonsense_local"]
    assert yaml.safe_load((out / "sparsing_law_commonsense_local.yaml").read_text())["task"] == [
        "hellaswag_local", "copa_local"]


def test_stock_yaml_names_and_sources_are_the_ones_mirrored():
    """Each spec's stock YAML defines the task of that name; the HF dataset behind it is the schema used here."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    expected = {"hellaswag": ("Rowan/hellaswag", None), "winogrande": ("allenai/winogrande", "winogrande_xl"),
                "boolq": ("aps/super_glue", "boolq"), "copa": ("aps/super_glue", "copa"),
                "social_iqa": ("lighteval/siqa", None)}  # lighteval/siqa is allenai/social_i_qa's schema
    for task, spec in STOCK_TASKS.items():
        stock = yaml.load((stock_tasks_dir() / spec.stock_yaml).read_text(), Loader=Loader)
        assert stock["task"] == task
        assert stock[f"{spec.split}_split"] == spec.split
        if task in expected:
            assert (stock["dataset_path"], stock["dataset_name"]) == expected[task]


def test_stock_prompts_and_processing_on_the_local_files(suite_dir):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(suite_dir))
    loaded = tm.load(["sparsing_law_local"])["tasks"]
    assert sorted(loaded) == sorted(LOCAL)
    for name, task in loaded.items():
        assert len(task.eval_docs) == len(ROWS[name.removesuffix("_local")]), name

    def first(name: str) -> tuple[object, ...]:
        """(text, choices, target) of the second doc; no choices for a loglikelihood task."""
        task = loaded[name]
        doc = task.eval_docs[1]
        if task.config.output_type != "multiple_choice":
            return task.doc_to_text(doc), task.doc_to_target(doc)
        return task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)

    # hellaswag: stock process_docs (activity label, capitalised ctx_b, [title] -> ". ", [..] dropped)
    assert first("hellaswag_local") == (
        "Making tea: Step 1.. Boil the water. Then the man",
        ["pours it into the cup.", "eats the kettle.", "sings to the river.", "sleeps."], 3)
    assert first("winogrande_local") == (
        1, ["The sun is brighter than the moon because the moon", "The sun is brighter than the moon because the sun"],
        "gives off its own light.")
    assert first("copa_local") == ("The children walked by the river because",
                                   [" they wanted to count boats.", " it was raining."], " they wanted to count boats.")
    assert first("social_iqa_local") == ("Q: Ana walked to school by the river. What did Ana do?\nA:",
                                         ["slept", "walked", "flew"], 1)
    assert first("boolq_local") == ("Water boils at one hundred degrees at sea level.\n"
                                    "Question: does water boil at ten degrees?\nAnswer:", ["no", "yes"], 0)
    assert first("piqa_local") == ("Question: To open a stuck jar,\nAnswer:",
                                   ["put it in the freezer for a week.", "run the lid under hot water."], 1)
    assert first("lambada_openai_local") == ("The sun rises in the east and sets in the", " west")


def test_hub_groups_ship_and_resolve_to_the_stock_tasks(capsys, tmp_path):
    """The shipped YAMLs are `suite_configs()`; lm-eval builds them over the stock task names. The hub data
    cannot be loaded offline, so stock-named overrides pointing at the local files stand in for it (lm-eval
    0.4.13 lets an --include_path task replace a stock one)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from packaging.version import Version

    assert main(["tasks", "suite"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(configs_dir())
    shipped = {p.stem: p.read_text() for p in configs_dir().glob("*.yaml")}
    assert shipped == {name: render(cfg) for name, cfg in suite_configs().items()}
    assert set(shipped) == {"sparsing_law", "sparsing_law_commonsense", "sparsing_law_reading"}
    stock = [t for tasks in CATEGORIES.values() for t in tasks]
    assert sorted(stock) == sorted(ROWS)

    if Version(lm_eval.__version__) < Version("0.4.13"):
        pytest.skip("stock task names can be overridden from --include_path only in lm-eval >= 0.4.13")
    from sparse_ffn.tasks.local import write_task_configs

    local = tmp_path / "local"
    write_task_configs(write_data(tmp_path / "data", list(ROWS)), local)
    overrides = tmp_path / "overrides"
    overrides.mkdir()
    for task in stock:  # the local config under the stock name
        cfg = yaml.safe_load((local / f"{task}_local.yaml").read_text())
        (overrides / f"{task}.yaml").write_text(yaml.safe_dump({**cfg, "task": task}))
    tm = TaskManager(include_path=[str(configs_dir()), str(overrides)])
    assert sorted(tm.load(["sparsing_law"])["tasks"]) == sorted(stock)


def _accs(results: dict, names: list[str]) -> dict[str, float]:
    return {n: results["results"][n]["acc,none"] for n in names}


def test_lm_eval_sparse_ffn_dense_equals_hf_and_groups_are_unweighted_means(tiny_llama_dir, suite_dir, tmp_path):
    common = ["--tasks", "sparsing_law_local", "--include_path", str(suite_dir), "--limit", str(LIMIT),
              "--device", "cpu", "--batch_size", "8", "--log_samples"]
    args = f"pretrained={tiny_llama_dir},max_length=256,dtype=float32"
    hf = run_lm_eval(["--model", "hf", "--model_args", args, *common], tmp_path / "hf")
    dense = run_lm_eval(["--model", "sparse_ffn", "--model_args", f"{args},strategy=dense", *common],
                        tmp_path / "dense")
    assert dense["config"]["sparse_ffn"]["sparsity"]["mean"] == 0.0

    accs = _accs(hf, LOCAL)
    assert _accs(dense, LOCAL) == accs  # identical dense scores, task by task
    for task in LOCAL:
        assert hf["n-samples"][task]["effective"] == SIZES[task]
        lls = [[r[0][0] for r in s["resps"]] for s in read_samples(tmp_path / "hf", task)]
        assert [[r[0][0] for r in s["resps"]] for s in read_samples(tmp_path / "dense", task)] == lls
        assert len(lls) == SIZES[task]

    members = dict(zip(GROUPS, [COMMONSENSE, READING, COMMONSENSE + READING]))
    for group, tasks in members.items():
        mean = sum(accs[t] for t in tasks) / len(tasks)
        weighted = sum(accs[t] * SIZES[t] for t in tasks) / sum(SIZES[t] for t in tasks)
        for res in (hf, dense):
            assert res["results"][group]["acc,none"] == pytest.approx(mean, abs=1e-12), group
        assert abs(weighted - mean) > 1e-3, (group, accs)  # the check above could tell them apart
    cats = [hf["results"][g]["acc,none"] for g in GROUPS[:2]]
    assert abs(sum(cats) / 2 - hf["results"]["sparsing_law_local"]["acc,none"]) > 1e-3  # over tasks, not groups
