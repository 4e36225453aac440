"""The Sparsing Law paper's zero-shot suite as lm-eval groups, with its macro averages.

Luo et al. (2024) report two averages: commonsense reasoning (PIQA, SIQA, HellaSwag, WinoGrande, COPA) and
reading comprehension (BoolQ, LAMBADA, TyDiQA). TyDiQA has no stock lm-eval task, so the reading group has
BoolQ and LAMBADA only. Each group's score is the unweighted mean over its tasks (`weight_by_size: false`)
of `acc` (filter `none`), the one accuracy metric every member reports (LAMBADA's `acc` is whether the last
word is the greedy continuation; `acc_norm` exists for PIQA and HellaSwag only). `sparsing_law` nests the two
groups; lm-eval averages a group over its leaf tasks, so it is the mean over all its tasks, not of the two
category means.

The hub groups (over the stock tasks) ship as YAML in `configs/` (`lm_eval --include_path` that folder);
`sparse-ffn tasks write` writes the `_local` groups over the local tasks whose data files exist.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection
from pathlib import Path

import yaml

METRIC = "acc"
TOP = "sparsing_law"
CATEGORIES: dict[str, tuple[str, ...]] = {  # group -> stock lm-eval task names, in the paper's order
    "sparsing_law_commonsense": ("piqa", "social_iqa", "hellaswag", "winogrande", "copa"),
    "sparsing_law_reading": ("boolq", "lambada_openai"),
}
TYDIQA_NOTE = ("TyDiQA, in the paper's reading-comprehension average, has no stock lm-eval task and is "
               "left out")
GROUP_NAMES: tuple[str, ...] = (*CATEGORIES, TOP)


def configs_dir() -> Path:
    """The folder of the shipped hub group YAMLs, for `lm_eval --include_path`."""
    return Path(__file__).resolve().parent / "configs"


def group_config(name: str, members: list[str], description: str) -> dict[str, object]:
    """An lm-eval group config: `members` with the unweighted mean of `acc,none` over its leaf tasks."""
    return {
        "group": name,
        "task": members,
        "aggregate_metric_list": [
            {"metric": METRIC, "filter_list": ["none"], "aggregation": "mean", "weight_by_size": False},
        ],
        "metadata": {"version": 1.0, "description": description},
    }


def suite_configs(present: Collection[str] | None = None, suffix: str = "") -> dict[str, dict[str, object]]:
    """The group configs by group name, over stock task names + `suffix`.

    `present` (stock names) keeps only those tasks; a group left without members is omitted. None keeps all.
    """
    configs: dict[str, dict[str, object]] = {}
    for group, tasks in CATEGORIES.items():
        members = [f"{t}{suffix}" for t in tasks if present is None or t in present]
        if members:
            what = "commonsense reasoning" if group.endswith("commonsense") else "reading comprehension"
            note = f"; {TYDIQA_NOTE}" if "boolq" in tasks else ""
            configs[f"{group}{suffix}"] = group_config(
                f"{group}{suffix}", members, f"Sparsing Law {what}: unweighted mean of {METRIC}{note}")
    if configs:
        configs[f"{TOP}{suffix}"] = group_config(
            f"{TOP}{suffix}", list(configs),
            f"Sparsing Law zero-shot suite: unweighted mean of {METRIC} over all its tasks; {TYDIQA_NOTE}")
    return configs


def render(config: dict[str, object]) -> str:
    """YAML text of one group config, headed by a comment on what it averages."""
    description: str = config["metadata"]["description"]  # type: ignore[index]
    header = "".join(f"# {line}\n" for line in textwrap.wrap(f"{description}.", 100, break_on_hyphens=False))
    return header + yaml.safe_dump(config, sort_keys=False, width=100)


def write_local_groups(out_dir: Path, present: Collection[str], suffix: str) -> list[str]:
    """Write the `_local` group YAMLs over the present stock tasks into out_dir; return the group names.

    Groups without any present member are not written (a stale file of theirs is removed).
    """
    configs = suite_configs(present, suffix)
    for group in GROUP_NAMES:
        name = f"{group}{suffix}"
        target = Path(out_dir) / f"{name}.yaml"
        if name in configs:
            target.write_text(render(configs[name]), encoding="utf-8")
        else:
            target.unlink(missing_ok=True)
    return list(configs)
