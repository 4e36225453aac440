"""Reports of a `sparse-ffn gate` result: terminal text, GitHub markdown, PNG.

Values are in each metric's units (accuracy: fraction of documents); sparsity is the fraction of FFN
activations masked (config.sparse_ffn.sparsity of each run). Reads a `sparse_ffn.gate.GateResult`.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparse_ffn.artifacts.atomic import atomic_write_bytes
from sparse_ffn.errors import UserError

if TYPE_CHECKING:
    from sparse_ffn.gate import Check, GateResult

COLORS: dict[bool | None, str] = {True: "#2ca02c", False: "#d62728", None: "#ff7f0e"}
BASELINE_COLOR = "#1f77b4"


def fmt(v: float | None) -> str:
    """4 decimals, or 4 significant digits for large values; "N/A" for None."""
    if v is None:
        return "N/A"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def budget_text(c: Check) -> str:
    if c.budget is None:
        return "not gated"
    return {"max_drop": f"drop ≤ {c.budget:g}", "max_ppl_ratio": f"ratio ≤ {c.budget:g}",
            "min_sparsity": f"min {c.budget:g}"}[c.kind]


def notes(c: Check) -> list[str]:
    return ([f"ratio {c.ratio:.4f}"] if c.ratio is not None else []) + ([c.note] if c.note else [])


def result_text(c: Check) -> str:
    word = {True: "✅ pass", False: "❌ FAIL", None: "—"}[c.passed]
    return word + (f" ({'; '.join(notes(c))})" if notes(c) else "")


def diff_text(c: Check) -> str:
    if c.diff is None:
        return "N/A"
    return f"{c.diff:+.4f} ± {fmt(c.se)}" if abs(c.diff) < 1000 else f"{c.diff:+.4g} ± {fmt(c.se)}"


def ci_text(c: Check) -> str:
    if c.ci_low is None or c.ci_high is None:
        return "N/A"
    return f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]" if max(abs(c.ci_low), abs(c.ci_high)) < 1000 else \
        f"[{c.ci_low:+.4g}, {c.ci_high:+.4g}]"


def test_text(c: Check) -> str:
    """"mcnemar p=0.6250 (b=3, c=1)", "paired t p=0.0312", with ", Holm 0.1250" when adjusted."""
    if c.p_value is None:
        return "N/A"
    out = f"{c.test} p={c.p_value:.4f}"
    if c.p_holm is not None:
        out += f", Holm {c.p_holm:.4f}"
    if c.b is not None:
        out += f" (b={c.b}, c={c.c})"
    return out


def verdict_text(result: GateResult) -> str:
    return {"passed": "PASSED", "failed": "FAILED", "not gated": "not gated (no budget set)"}[result.verdict]


def confidence_text(result: GateResult) -> str:
    return f"{result.budgets.confidence * 100:g}%"


def rule_text(result: GateResult) -> str:
    """The budget rule in words."""
    what = ("the point estimate of the drop" if result.budgets.decide == "point"
            else f"the upper end of the two-sided {confidence_text(result)} CI of the drop")
    return (f"a --max-drop budget fails when {what} exceeds it; perplexity ratios on the point estimate; "
            f"confidence {result.budgets.confidence:g}; Holm {'on' if result.budgets.holm else 'off'}")


def comparison_text(result: GateResult) -> str:
    return {"paired": "paired over matched items (lm-eval per-sample logs of both runs)",
            "unpaired": "unpaired (no per-sample logs of both runs): se = sqrt(se_b² + se_c²) from lm-eval's "
                        "stderrs, which overstates the noise of the difference",
            "mixed": "paired where both runs have per-sample logs, else unpaired (see the method column)",
            }[result.comparison]


def sparsity_text(result: GateResult) -> str:
    parts = [f"{run} {fmt(sp['mean']) if sp else 'N/A'}" for run, sp in result.sparsity.items()]
    return "sparsity (mean fraction of FFN activations masked): " + ", ".join(parts)


def stats_text(c: Check, result: GateResult) -> str:
    """"paired n=8; 95% CI [...]; mcnemar p=...; mde 0.2475" for the text report."""
    if c.diff is None:
        return ""
    parts = [f"{c.method}" + (f" n={c.n}" if c.n is not None else ""),
             f"{confidence_text(result)} CI {ci_text(c)}"]
    if c.p_value is not None:
        parts.append(test_text(c))
    parts.append(f"mde {fmt(c.mde)}")
    return " [" + "; ".join(parts) + "]"


def render_text(result: GateResult) -> str:
    """Plain lines for the terminal / CI log: the comparison and rule, one line per check, the verdict."""
    lines = [f"comparison: {comparison_text(result)}", f"rule: {rule_text(result)}"]
    for c in result.checks:
        where = f"{c.task}/{c.metric}" if c.task else c.metric
        word = {True: "pass", False: "FAIL", None: "-"}[c.passed]
        extra = "".join(f"; {x}" for x in notes(c))
        lines.append(f"{word:<4} {where}: {fmt(c.baseline)} -> {fmt(c.candidate)} "
                     f"(diff {diff_text(c)}; {budget_text(c)}{extra}){stats_text(c, result)}")
    lines.append(sparsity_text(result))
    lines.append(f"gate: {verdict_text(result)}")
    return "\n".join(lines)


def cell(s: Any) -> str:
    return str(s).replace("|", "\\|")


def render_markdown(result: GateResult) -> str:
    """A GitHub job-summary report: verdict, comparison and rule, table, sparsity, comparability warnings."""
    n_fail = sum(c.passed is False for c in result.checks)
    head = {"passed": "✅ PASSED", "failed": f"❌ FAILED ({n_fail} budget{'s' * (n_fail != 1)})",
            "not gated": "➖ not gated (no budget set)"}[result.verdict]
    conf = confidence_text(result)
    out = [f"## sparse-ffn gate: {head}", "",
           f"Baseline: `{result.baseline}`  ", f"Candidate: `{result.candidate}`", "",
           f"Comparison: {comparison_text(result)}.  ", f"Rule: {rule_text(result)}.", "",
           f"| task | metric | baseline | candidate | diff ± se | budget | result | {conf} CI | test | MDE | method |",
           "|---|---|---:|---:|---:|---|---|---:|---|---:|---|"]
    for c in result.checks:
        stats = (ci_text(c), test_text(c), fmt(c.mde), c.method + (f" (n={c.n})" if c.n else "")) \
            if c.diff is not None else ("", "", "", "")
        out.append("| " + " | ".join(cell(x) for x in (
            c.task or "—", c.metric, fmt(c.baseline), fmt(c.candidate), diff_text(c), budget_text(c),
            result_text(c), *stats)) + " |")
    out += ["", "diff = candidate − baseline. Paired rows: se = sd(d)/sqrt(n) over the items' differences d, "
            f"CI a percentile bootstrap ({result.budgets.resamples} resamples, seed {result.budgets.seed}), "
            "McNemar's exact test for 0/1 metrics (b = right→wrong, c = wrong→right), else a paired t-test; a "
            f"failing paired row with p ≥ {1 - result.budgets.confidence:g} is *within noise*. Unpaired rows: "
            "se = sqrt(se_b² + se_c²), CI diff ± z·se; a failing drop within 2 se is *within noise*. "
            "MDE = (z_(1−α/2) + z_0.8) · se: the smallest true difference detected with 80% power.", "",
            "### Sparsity", "", "| run | mean | layers |", "|---|---:|---|"]
    for run, sp in result.sparsity.items():
        layers = sp.get("per_layer") if sp else None
        per = ", ".join(f"{v:.3f}" for v in layers) if layers and len(layers) <= 12 else \
            f"{len(layers)} layers (see the PNG)" if layers else "—"
        out.append(f"| {run} | {fmt(sp['mean']) if sp else 'N/A'} | {per} |")
    out += ["", "### Comparability", ""]
    out += [f"- ⚠️ {cell(w)}" for w in result.warnings] or [
        "Same tasks, limit, n-shot, max_length and lm-eval version in both runs."]
    return "\n".join(out) + "\n"


def nan(v: float | None) -> float:
    """None -> NaN (matplotlib draws no error bar there)."""
    return math.nan if v is None else v


def plot_metric(ax: Any, metric: str, rows: list[Check]) -> None:
    """Baseline vs candidate bars (±1 lm-eval stderr) per task for one metric, labelled with the diff and CI."""
    x = list(range(len(rows)))
    ax.bar([p - 0.2 for p in x], [c.baseline for c in rows], 0.4, color=BASELINE_COLOR,
           yerr=[nan(c.baseline_se) for c in rows], capsize=4)
    ax.bar([p + 0.2 for p in x], [c.candidate for c in rows], 0.4, color=[COLORS[c.passed] for c in rows],
           yerr=[nan(c.candidate_se) for c in rows], capsize=4)
    for p, c in zip(x, rows):
        label = f"{c.diff:+.3g}" + (f"\n×{c.ratio:.3f}" if c.ratio is not None else "")
        if c.ci_low is not None and c.ci_high is not None and c.ratio is None:
            label += f"\n[{c.ci_low:+.3g}, {c.ci_high:+.3g}]"
        if c.passed is not None:
            label = ("pass" if c.passed else "FAIL") + "\n" + label
        top = max(c.baseline + (c.baseline_se or 0), c.candidate + (c.candidate_se or 0))
        ax.annotate(label, (p, top), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8, fontweight="bold", color=COLORS[c.passed])
    budget = next((budget_text(c) for c in rows if c.budget is not None), "not gated")
    ax.set_title(f"{metric}  ({budget})", fontsize=10)
    ax.set_xticks(x, [c.task for c in rows], rotation=20 if len(rows) > 3 else 0, fontsize=8)
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.margins(y=0.25)
    ax.set_ylim(bottom=0)


def plot_differences(ax: Any, rows: list[Check], result: GateResult) -> None:
    """Forest plot: candidate − baseline with its CI per task/metric; the drop budget as a red tick."""
    y = list(range(len(rows)))[::-1]
    for p, c in zip(y, rows):
        assert c.diff is not None and c.ci_low is not None and c.ci_high is not None
        ax.errorbar([c.diff], [p], xerr=[[c.diff - c.ci_low], [c.ci_high - c.diff]], fmt="o",
                    color=COLORS[c.passed], capsize=4)
        if c.kind == "max_drop" and c.budget is not None:
            ax.plot([-c.budget if c.higher_is_better is not False else c.budget], [p], "|", color="#d62728",
                    markersize=14, markeredgewidth=2)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(y, [f"{c.task}/{c.metric}\n{c.method}" for c in rows], fontsize=7)
    ax.set_title(f"candidate − baseline, {confidence_text(result)} CI (| = budget)", fontsize=10)


def plot_sparsity(ax: Any, result: GateResult) -> None:
    """Per-layer FFN sparsity of both runs (or the means, without per-layer data)."""
    runs = [(run, sp) for run, sp in result.sparsity.items() if sp]
    colors = {"baseline": BASELINE_COLOR, "candidate": "#9467bd"}
    if any(sp.get("per_layer") for _, sp in runs):
        for run, sp in runs:
            layers = sp.get("per_layer") or []
            ax.plot(range(len(layers)), layers, "o-", color=colors.get(run), label=f"{run} (mean {sp['mean']:.3f})")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("layer", fontsize=8)
        ax.legend(fontsize=7)
    else:
        ax.bar([run for run, _ in runs], [sp["mean"] for _, sp in runs], color=[colors.get(r) for r, _ in runs])
    ax.set_ylim(0, 1)
    ax.set_title("FFN sparsity (fraction masked)", fontsize=10)


def render_plot(result: GateResult, path: str | Path) -> Path:
    """Bars per metric, the differences with CIs, and the sparsity of both runs; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = [c for c in result.checks if c.task is not None and c.baseline is not None and c.candidate is not None]
    metrics = list(dict.fromkeys(c.metric for c in rows))
    if not metrics:
        raise UserError(f"{path}: nothing to plot (no metric present in both runs)")
    diffs = [c for c in rows if c.ratio is None and c.ci_low is not None and c.ci_high is not None]
    has_sparsity = any(result.sparsity.values())
    panels = len(metrics) + bool(diffs) + has_sparsity
    ncols = min(3, panels)
    nrows = -(-panels // ncols)
    width = max(max(sum(c.metric == m for c in rows) for m in metrics) * 1.8 + 1.2, 3.6)
    fig = Figure(figsize=(width * ncols, 3.8 * nrows + 1.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for i, metric in enumerate(metrics):
        plot_metric(fig.add_subplot(nrows, ncols, i + 1), metric, [c for c in rows if c.metric == metric])
    if diffs:
        plot_differences(fig.add_subplot(nrows, ncols, len(metrics) + 1), diffs, result)
    if has_sparsity:
        plot_sparsity(fig.add_subplot(nrows, ncols, panels), result)
    title = f"sparse-ffn gate: {verdict_text(result)}  |  {result.comparison}, decide {result.budgets.decide}"
    sp = next((c for c in result.checks if c.kind == "min_sparsity"), None)
    if sp is not None:
        title += f"  |  candidate sparsity {fmt(sp.candidate)} (min {sp.budget:g})"
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.legend(handles=[Patch(color=BASELINE_COLOR, label="baseline"),
                        *(Patch(color=COLORS[k], label=f"candidate: {v}")
                          for k, v in ((True, "pass"), (False, "fail"), (None, "not gated")))],
               loc="outside lower center", ncols=4, fontsize=8,
               title="bars: ±1 lm-eval stderr of each run; labels: candidate − baseline [CI]", title_fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
