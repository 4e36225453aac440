"""The Sparsing Law table (Luo et al. 2024, Table 1 / Tables 4-6 layout) from lm-eval runs: rows dense,
PPL-1%, PPL-5%, PPL-10%; columns sparsity, per-task accuracy, the commonsense and reading averages;
each sparse row's paired difference from dense (SPEC section 4) where both runs kept per-sample logs.

Units: accuracies and differences are fractions of items (0..1) in the data; the markdown shows
percentage points. An average is the unweighted mean over its tasks of `acc` (lm-eval's group score);
its paired difference is the mean of the per-task differences, with a normal-approximation CI from the
per-task paired standard errors (tasks are independent item sets): mean +/- z * sqrt(sum se_t^2) / T.
Per-task CIs are `paired_stats`' seeded percentile bootstrap.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sparse_ffn.analysis.paired import normal_quantile, pair_items, paired_stats, read_samples, samples_beside
from sparse_ffn.analysis.lm_eval_results import load_run
from sparse_ffn.artifacts.atomic import atomic_write_bytes

METRIC = "acc"
PAPER_NAMES = {"piqa": "PIQA", "social_iqa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "copa": "COPA", "boolq": "BoolQ", "lambada_openai": "LAMBADA"}


@dataclass
class Diff:
    """candidate - dense over paired items: mean, its CI at `confidence`, n items (None: not paired)."""

    mean: float
    low: float
    high: float
    n: int
    se: float | None


@dataclass
class Row:
    """One run of the table: its label ("dense", "PPL-1%"), mean sparsity, accuracy per task/average."""

    label: str
    sparsity: float | None
    acc: dict[str, float]
    diff: dict[str, Diff] = field(default_factory=dict)
    target: float | None = None


def column_name(task: str, suffix: str) -> str:
    stock = task.removesuffix(suffix)
    return PAPER_NAMES.get(stock, stock)


def read_row(run_dir: Path, label: str, tasks: Sequence[str], target: float | None = None) -> Row:
    """The accuracy of each task present in the run below `run_dir` (an lm-eval output path), and its
    sparsity (the sparse_ffn adapter's `config.sparse_ffn.sparsity.mean`)."""
    run = load_run(run_dir)
    acc = {t: run.metrics[t][METRIC].value for t in tasks if t in run.metrics and METRIC in run.metrics[t]}
    return Row(label, run.sparsity_mean(), acc, target=target)


def paired_diffs(dense_dir: Path, cand_dir: Path, tasks: Sequence[str], confidence: float) -> dict[str, Diff]:
    """Per task with samples in both runs: the paired difference of `acc` (candidate - dense)."""
    base_file, cand_file = load_run(dense_dir).path, load_run(cand_dir).path
    base_s, cand_s = samples_beside(base_file, tasks), samples_beside(cand_file, tasks)
    out = {}
    for t in tasks:
        if t not in base_s or t not in cand_s:
            continue
        pairs = pair_items(read_samples(base_s[t], t), read_samples(cand_s[t], t))
        b = [p[0].values.get(METRIC) for p in pairs]
        c = [p[1].values.get(METRIC) for p in pairs]
        if not pairs or any(v is None for v in b + c):
            continue
        st = paired_stats(b, c, confidence=confidence)
        out[t] = Diff(st.mean_diff, st.ci_low, st.ci_high, st.n, st.se)
    return out


def add_averages(rows: list[Row], categories: dict[str, Sequence[str]], confidence: float) -> list[str]:
    """Add each category's unweighted mean (over its tasks present in every row) to every row, and its
    paired difference where every member task is paired; returns the category names added."""
    added = []
    z = normal_quantile(1 - (1 - confidence) / 2)
    for cat, members in categories.items():
        present = [t for t in members if all(t in r.acc for r in rows)]
        if not present:
            continue
        added.append(cat)
        for r in rows:
            r.acc[cat] = sum(r.acc[t] for t in present) / len(present)
            diffs = [r.diff.get(t) for t in present]
            if rows and r is not rows[0] and all(d is not None for d in diffs):
                mean = sum(d.mean for d in diffs) / len(diffs)
                ses = [d.se for d in diffs]
                if all(s is not None for s in ses):
                    se = math.sqrt(sum(s * s for s in ses)) / len(ses)
                    r.diff[cat] = Diff(mean, mean - z * se, mean + z * se, sum(d.n for d in diffs), se)
    return added


def pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}"


def markdown(rows: list[Row], columns: list[str], names: dict[str, str], confidence: float, note: str = "") -> str:
    """The table: one line per run, then per sparse run a line of paired differences with CIs."""
    head = ["", "sparsity"] + [names[c] for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r.label, pct(r.sparsity)] + [pct(r.acc.get(c)) for c in columns]) + " |")
    for r in rows[1:]:
        if not r.diff:
            continue
        cells = []
        for c in columns:
            d = r.diff.get(c)
            cells.append("" if d is None else f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]")
        lines.append("| " + " | ".join([f"{r.label} - dense ({round(100 * confidence)}% CI)", ""] + cells) + " |")
    text = "\n".join(lines) + "\n"
    legend = (f"\nAccuracy (`acc`) in %, sparsity = mean fraction of masked FFN activations in %; paired "
              f"differences in percentage points over the same items, {round(100 * confidence)}% CI "
              "(per task: paired bootstrap; averages: normal approximation from the per-task paired s.e.).\n")
    return text + legend + (f"{note}\n" if note else "")


def csv_text(rows: list[Row], columns: list[str], names: dict[str, str]) -> str:
    """One CSV line per run: label, target, sparsity, then per column acc, diff, ci_low, ci_high, n."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["run", "target_ppl_ratio", "sparsity"]
    for c in columns:
        header += [names[c], f"{names[c]}_diff", f"{names[c]}_ci_low", f"{names[c]}_ci_high", f"{names[c]}_n"]
    w.writerow(header)
    for r in rows:
        line = [r.label, "" if r.target is None else r.target, "" if r.sparsity is None else r.sparsity]
        for c in columns:
            d = r.diff.get(c)
            line += [r.acc.get(c, "")] + (["", "", "", ""] if d is None else [d.mean, d.low, d.high, d.n])
        w.writerow(line)
    return buf.getvalue()


def plot_png(rows: list[Row], tasks: list[str], names: dict[str, str], path: Path, title: str) -> Path:
    """Accuracy against sparsity, one line per task (and per average), dense at its measured sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [100 * (r.sparsity or 0.0) for r in rows]
    for t in tasks:
        ys = [100 * r.acc[t] if t in r.acc else math.nan for r in rows]
        ax.plot(xs, ys, marker="o", label=names[t], linestyle="--" if t not in names or "avg" in names[t] else "-")
    for x, r in zip(xs, rows):
        ax.annotate(r.label, (x, ax.get_ylim()[0]), fontsize=7, rotation=90, va="bottom", ha="right", alpha=0.6)
    ax.set_xlabel("mean FFN activation sparsity (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
