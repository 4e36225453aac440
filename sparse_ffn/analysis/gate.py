"""`sparse-ffn gate`: a CI quality gate comparing two lm-eval results JSON files.

Budgets: ``--max-drop METRIC=X,...`` (the candidate may be at most X worse; default
``acc=0.01,acc_norm=0.01``), ``--max-ppl-ratio R`` (candidate/baseline for word_perplexity,
byte_perplexity and perplexity), ``--min-sparsity S`` (candidate's ``config.sparse_ffn.sparsity.mean``).
Other metrics are reported, not gated. A failing drop no larger than 2 standard errors of the
difference, sqrt(se_b^2 + se_c^2), still fails but is flagged "within noise" (both runs score the
same documents, so this unpaired standard error overstates the noise of the difference).
Exit 0: every budget holds; 1: one fails; 2: unusable input (raised as UserError).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sparse_ffn.artifacts.atomic import atomic_write_bytes
from sparse_ffn.errors import UserError

DEFAULT_MAX_DROP: dict[str, float] = {"acc": 0.01, "acc_norm": 0.01}
PPL_METRICS: frozenset[str] = frozenset({"word_perplexity", "byte_perplexity", "perplexity"})
LOWER_IS_BETTER: frozenset[str] = PPL_METRICS | {"bits_per_byte"}
NOISE_SE = 2.0  # a failing drop within this many standard errors is flagged "within noise"


# -- loading -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """One `<metric>,<filter>` entry of a task in the results JSON."""

    value: float
    stderr: float | None  # None when lm-eval wrote "N/A" or nothing
    higher_is_better: bool


@dataclass
class Run:
    """One lm-eval results file: its metrics by task, then by display name ("acc", "exact_match,strict")."""

    path: Path
    data: dict[str, Any]
    metrics: dict[str, dict[str, Metric]]

    @property
    def config(self) -> dict[str, Any]:
        c = self.data.get("config")
        return c if isinstance(c, dict) else {}

    def sparsity_mean(self) -> float | None:
        block = self.config.get("sparse_ffn")
        sp = block.get("sparsity") if isinstance(block, dict) else None
        return _num(sp.get("mean")) if isinstance(sp, dict) else None


def _num(v: Any) -> float | None:
    """A finite float, or None for "N/A", null, NaN, bools and strings."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def find_results_file(path: Path) -> Path:
    """`path` itself if a file; for a directory, the newest results_*.json below it (one model only)."""
    if not path.exists():
        raise UserError(f"{path}: not found")
    if path.is_file():
        return path
    files = [f for f in path.rglob("results_*.json") if f.is_file()]
    if not files:
        raise UserError(f"{path}: no results_*.json file below this directory (an lm_eval --output_path?)")
    models = sorted({str(f.parent.relative_to(path)) for f in files})
    if len(models) > 1:
        raise UserError(f"{path}: results for several models ({', '.join(models)}); name the results file")
    # lm-eval names files results_<ISO timestamp>.json: the name sorts by time, and survives copying
    return max(files, key=lambda f: (f.name, f.stat().st_mtime))


def load_run(path: str | Path) -> Run:
    """Read an lm-eval results file (or the newest one below a directory)."""
    file = find_results_file(Path(path))
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{file}: not a text file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(f"{file}: not an lm-eval results file (no 'results' object)")
    hib = data.get("higher_is_better") if isinstance(data.get("higher_is_better"), dict) else {}
    metrics: dict[str, dict[str, Metric]] = {}
    for task, entry in data["results"].items():
        if not isinstance(entry, dict):
            continue
        task_hib = hib.get(task) if isinstance(hib.get(task), dict) else {}
        found: dict[str, Metric] = {}
        for key, raw in entry.items():
            name, sep, filt = key.partition(",")
            value = _num(raw)
            if not sep or name.endswith("_stderr") or value is None:
                continue  # "alias", "name", "sample_len", stderr entries, "N/A" values
            up = task_hib.get(name)
            found[name if filt == "none" else key] = Metric(
                value, _num(entry.get(f"{name}_stderr,{filt}")),
                up if isinstance(up, bool) else name not in LOWER_IS_BETTER)
        if found:
            metrics[task] = found
    return Run(file, data, metrics)


# -- checks --------------------------------------------------------------------------------------

@dataclass
class Check:
    """One row of the report. `passed` is None for a metric that no budget covers."""

    task: str | None
    metric: str
    kind: str  # "max_drop" | "max_ppl_ratio" | "min_sparsity" | "report"
    baseline: float | None
    candidate: float | None
    diff: float | None  # candidate - baseline
    se: float | None  # sqrt(se_b^2 + se_c^2); None when either stderr is absent
    baseline_se: float | None
    candidate_se: float | None
    budget: float | None
    passed: bool | None
    within_noise: bool = False
    ratio: float | None = None  # candidate / baseline, for perplexities
    note: str = ""


@dataclass
class Budgets:
    max_drop: dict[str, float] | None = None  # None: DEFAULT_MAX_DROP
    max_ppl_ratio: float | None = None
    min_sparsity: float | None = None

    @property
    def drops(self) -> dict[str, float]:
        return DEFAULT_MAX_DROP if self.max_drop is None else self.max_drop


@dataclass
class GateResult:
    baseline: Path
    candidate: Path
    checks: list[Check]
    warnings: list[str]

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "baseline": str(self.baseline), "candidate": str(self.candidate),
                "checks": [asdict(c) for c in self.checks], "warnings": self.warnings}


def parse_max_drop(text: str) -> dict[str, float]:
    """"acc=0.01,acc_norm=0.02" -> {"acc": 0.01, "acc_norm": 0.02}; "" -> {} (no drop budgets)."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, num = item.partition("=")
        try:
            value = float(num)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not math.isfinite(value) or value < 0:
            raise UserError(f"--max-drop: {item!r} is not METRIC=NUMBER (a number >= 0)")
        out[name.strip()] = value
    return out


def _budget_for(name: str, budgets: dict[str, float]) -> float | None:
    """A budget named "acc" covers acc under every filter; "exact_match,strict-match" just that one."""
    if name in budgets:
        return budgets[name]
    return budgets.get(name.partition(",")[0])


def _metric_check(task: str, name: str, b: Metric | None, c: Metric | None, budgets: Budgets) -> Check:
    base_name = name.partition(",")[0]
    drop_budget = _budget_for(name, budgets.drops)
    if base_name in PPL_METRICS and budgets.max_ppl_ratio is not None and drop_budget is None:
        kind, budget = "max_ppl_ratio", budgets.max_ppl_ratio
    elif drop_budget is not None:
        kind, budget = "max_drop", drop_budget
    else:
        kind, budget = "report", None
    if b is None or c is None:
        missing = "candidate" if c is None else "baseline"
        one = b or c
        assert one is not None
        values = (one.value, None) if c is None else (None, one.value)
        errs = (one.stderr, None) if c is None else (None, one.stderr)
        return Check(task, name, kind, values[0], values[1], None, None, errs[0], errs[1], budget,
                     None if budget is None else False, note=f"missing in the {missing}")
    diff = c.value - b.value
    se = math.hypot(b.stderr, c.stderr) if b.stderr is not None and c.stderr is not None else None
    worse = -diff if b.higher_is_better else diff  # > 0: the candidate is worse
    check = Check(task, name, kind, b.value, c.value, diff, se, b.stderr, c.stderr, budget, None)
    if kind == "max_ppl_ratio":
        check.ratio = c.value / b.value if b.value > 0 else math.inf
        check.passed = check.ratio <= budget
    elif kind == "max_drop":
        check.passed = worse <= budget + 1e-12
    if check.passed is False and se is not None and worse <= NOISE_SE * se:
        check.within_noise, check.note = True, "within noise"
    return check


def _sparsity_check(base: Run, cand: Run, minimum: float) -> Check:
    b, c = base.sparsity_mean(), cand.sparsity_mean()
    if c is None:
        return Check(None, "sparsity.mean", "min_sparsity", b, None, None, None, None, None, minimum, False,
                     note="candidate has no config.sparse_ffn.sparsity.mean (not a --model sparse_ffn run?)")
    return Check(None, "sparsity.mean", "min_sparsity", b, c, None if b is None else c - b, None, None, None,
                 minimum, c >= minimum)


# -- comparability -------------------------------------------------------------------------------

def _model_args(run: Run) -> dict[str, Any]:
    args = run.config.get("model_args")
    if isinstance(args, dict):
        return args
    if isinstance(args, str):  # "pretrained=x,max_length=512"
        return dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    return {}


def _limit(run: Run) -> Any:
    return run.config.get("limit", run.data.get("limit"))


def _max_length(run: Run) -> Any:
    v = _model_args(run).get("max_length")
    return run.data.get("max_length") if v is None else v


def _torch_version(run: Run) -> str | None:
    m = re.search(r"PyTorch version: (\S+)", str(run.data.get("pretty_env_info") or ""))
    return m.group(1) if m else None


def _weights(run: Run) -> Any:
    block = run.config.get("sparse_ffn")
    fp = block.get("model_fingerprint") if isinstance(block, dict) else None
    return fp.get("weight_hash") if isinstance(fp, dict) else None


def _same(a: Any, b: Any) -> bool:
    """Equal, treating limit 8 == 8.0 and max_length "512" == 512."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def _per_task(base: Run, cand: Run, key: str, tasks: list[str], sub: str | None = None) -> list[str]:
    """Tasks whose `data[key][task]` (or its `sub` entry) differs, as "task (b vs c)"."""
    out = []
    for t in tasks:
        vals = []
        for run in (base, cand):
            v = run.data.get(key, {}).get(t) if isinstance(run.data.get(key), dict) else None
            vals.append(v.get(sub) if sub and isinstance(v, dict) else v)
        if not _same(*vals):
            out.append(f"{t} ({vals[0]} vs {vals[1]})")
    return out


def comparability_warnings(base: Run, cand: Run, common: list[str]) -> list[str]:
    """What differs between the runs (beyond the model's sparsity), one line each."""
    warn: list[str] = []
    if base.path.resolve() == cand.path.resolve():
        warn.append(f"baseline and candidate are the same file ({base.path}): give each run its own "
                    "lm_eval --output_path")
    only_b = [t for t in base.metrics if t not in cand.metrics]
    only_c = [t for t in cand.metrics if t not in base.metrics]
    if only_b:
        warn.append(f"tasks only in the baseline (not compared): {', '.join(only_b)}")
    if only_c:
        warn.append(f"tasks only in the candidate (not compared): {', '.join(only_c)}")
    scalars = [("limit", _limit), ("max_length", _max_length),
               ("lm-eval version", lambda r: r.data.get("lm_eval_version")),
               ("lm-eval git hash", lambda r: r.data.get("git_hash")),
               ("transformers version", lambda r: r.data.get("transformers_version")),
               ("torch version", _torch_version)]
    if _weights(base) and _weights(cand):
        scalars.append(("model weights (sparse_ffn fingerprint)", _weights))
    else:
        scalars.append(("model", lambda r: r.data.get("model_name")))
    for label, get in scalars:
        b, c = get(base), get(cand)
        if not _same(b, c):
            warn.append(f"{label} differs: baseline {b}, candidate {c}")
    for label, key, sub in (("n-shot", "n-shot", None), ("task version", "versions", None),
                            ("documents evaluated", "n-samples", "effective")):
        if diffs := _per_task(base, cand, key, common, sub):
            warn.append(f"{label} differs: {', '.join(diffs)}")
    return warn


def gate(baseline: str | Path, candidate: str | Path, budgets: Budgets) -> GateResult:
    """Load both runs, pair their tasks and metrics, check every budget."""
    base, cand = load_run(baseline), load_run(candidate)
    common = [t for t in base.metrics if t in cand.metrics]
    if not common:
        raise UserError(f"{cand.path}: no task in common with {base.path} (baseline: "
                        f"{', '.join(base.metrics) or 'none'}; candidate: {', '.join(cand.metrics) or 'none'})")
    checks = []
    for task in common:
        bm, cm = base.metrics[task], cand.metrics[task]
        for name in [*bm, *(n for n in cm if n not in bm)]:
            checks.append(_metric_check(task, name, bm.get(name), cm.get(name), budgets))
    if budgets.min_sparsity is not None:
        checks.append(_sparsity_check(base, cand, budgets.min_sparsity))
    warnings = comparability_warnings(base, cand, common)
    names = {c.metric for c in checks} | {c.metric.partition(",")[0] for c in checks}
    for name in budgets.max_drop or {}:  # only budgets the user named
        if name not in names:
            warnings.append(f"--max-drop {name}: no such metric in the compared tasks (not checked)")
    if budgets.max_ppl_ratio is not None and not any(c.kind == "max_ppl_ratio" for c in checks):
        warnings.append("--max-ppl-ratio: no perplexity metric in the compared tasks (not checked)")
    return GateResult(base.path, cand.path, checks, warnings)


# -- rendering -----------------------------------------------------------------------------------

def _fmt(v: float | None) -> str:
    if v is None:
        return "N/A"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def _budget_text(c: Check) -> str:
    if c.budget is None:
        return "not gated"
    return {"max_drop": f"drop ≤ {c.budget:g}", "max_ppl_ratio": f"ratio ≤ {c.budget:g}",
            "min_sparsity": f"min {c.budget:g}"}[c.kind]


def _notes(c: Check) -> list[str]:
    return ([f"ratio {c.ratio:.4f}"] if c.ratio is not None else []) + ([c.note] if c.note else [])


def _result_text(c: Check) -> str:
    word = {True: "✅ pass", False: "❌ FAIL", None: "—"}[c.passed]
    return word + (f" ({'; '.join(_notes(c))})" if _notes(c) else "")


def _diff_text(c: Check) -> str:
    if c.diff is None:
        return "N/A"
    return f"{c.diff:+.4f} ± {_fmt(c.se)}" if abs(c.diff) < 1000 else f"{c.diff:+.4g} ± {_fmt(c.se)}"


def render_text(result: GateResult) -> str:
    """Plain lines for the terminal / CI log."""
    lines = []
    for c in result.checks:
        where = f"{c.task}/{c.metric}" if c.task else c.metric
        word = {True: "pass", False: "FAIL", None: "-"}[c.passed]
        extra = "".join(f"; {x}" for x in _notes(c))
        lines.append(f"{word:<4} {where}: {_fmt(c.baseline)} -> {_fmt(c.candidate)} "
                     f"(diff {_diff_text(c)}; {_budget_text(c)}{extra})")
    lines.append(f"gate: {'PASSED' if result.passed else 'FAILED'}")
    return "\n".join(lines)


def render_markdown(result: GateResult) -> str:
    """A GitHub job-summary report: verdict, table, comparability warnings."""
    def cell(s: Any) -> str:
        return str(s).replace("|", "\\|")

    n_fail = sum(c.passed is False for c in result.checks)
    head = "✅ PASSED" if result.passed else f"❌ FAILED ({n_fail} budget{'s' * (n_fail != 1)})"
    out = [f"## sparse-ffn gate: {head}", "",
           f"Baseline: `{result.baseline}`  ", f"Candidate: `{result.candidate}`", "",
           "| task | metric | baseline | candidate | diff ± se | budget | result |",
           "|---|---|---:|---:|---:|---|---|"]
    for c in result.checks:
        out.append("| " + " | ".join(cell(x) for x in (
            c.task or "—", c.metric, _fmt(c.baseline), _fmt(c.candidate), _diff_text(c), _budget_text(c),
            _result_text(c))) + " |")
    out += ["", "se = sqrt(se_b² + se_c²) from lm-eval's stderr; a failing drop within "
            f"{NOISE_SE:g} se is marked *within noise*.", "", "### Comparability", ""]
    out += [f"- ⚠️ {cell(w)}" for w in result.warnings] or [
        "Same tasks, limit, n-shot, max_length and lm-eval version in both runs."]
    return "\n".join(out) + "\n"


def render_plot(result: GateResult, path: str | Path) -> Path:
    """Baseline vs candidate bars with ±1 stderr error bars, one panel per metric; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = [c for c in result.checks if c.task is not None and c.baseline is not None and c.candidate is not None]
    metrics = list(dict.fromkeys(c.metric for c in rows))
    if not metrics:
        raise UserError(f"{path}: nothing to plot (no metric present in both runs)")
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    width = max(max(sum(c.metric == m for c in rows) for m in metrics) * 1.8 + 1.2, 3.6)
    fig = Figure(figsize=(width * ncols, 3.8 * nrows + 1.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    colors = {True: "#2ca02c", False: "#d62728", None: "#ff7f0e"}
    nan = lambda v: math.nan if v is None else v  # noqa: E731  (no error bar where lm-eval has none)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        mrows = [c for c in rows if c.metric == metric]
        x = list(range(len(mrows)))
        ax.bar([p - 0.2 for p in x], [c.baseline for c in mrows], 0.4, color="#1f77b4",
               yerr=[nan(c.baseline_se) for c in mrows], capsize=4)
        ax.bar([p + 0.2 for p in x], [c.candidate for c in mrows], 0.4, color=[colors[c.passed] for c in mrows],
               yerr=[nan(c.candidate_se) for c in mrows], capsize=4)
        for p, c in zip(x, mrows):
            label = f"{c.diff:+.3g}" + (f"\n×{c.ratio:.3f}" if c.ratio is not None else "")
            if c.passed is not None:
                label = ("pass" if c.passed else "FAIL") + "\n" + label
            top = max(c.baseline + (c.baseline_se or 0), c.candidate + (c.candidate_se or 0))
            ax.annotate(label, (p, top), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8, fontweight="bold", color=colors[c.passed])
        budget = next((_budget_text(c) for c in mrows if c.budget is not None), "not gated")
        ax.set_title(f"{metric}  ({budget})", fontsize=10)
        ax.set_xticks(x, [c.task for c in mrows], rotation=20 if len(mrows) > 3 else 0, fontsize=8)
        ax.set_xlim(-0.7, len(mrows) - 0.3)
        ax.margins(y=0.25)
        ax.set_ylim(bottom=0)
    title = f"sparse-ffn gate: {'PASSED' if result.passed else 'FAILED'}"
    sp = next((c for c in result.checks if c.kind == "min_sparsity"), None)
    if sp is not None:
        title += f"  |  candidate sparsity {_fmt(sp.candidate)} (min {sp.budget:g})"
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.legend(handles=[Patch(color="#1f77b4", label="baseline"),
                        *(Patch(color=colors[k], label=f"candidate: {v}")
                          for k, v in ((True, "pass"), (False, "fail"), (None, "not gated")))],
               loc="outside lower center", ncols=4, fontsize=8,
               title="error bars: ±1 lm-eval stderr of each run; labels: candidate − baseline", title_fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


# -- CLI -----------------------------------------------------------------------------------------

def _cmd_gate(args: argparse.Namespace, rest: list[str]) -> int:
    budgets = Budgets(None if args.max_drop is None else parse_max_drop(args.max_drop),
                      args.max_ppl_ratio, args.min_sparsity)
    if budgets.max_ppl_ratio is not None and not budgets.max_ppl_ratio > 0:
        raise UserError(f"--max-ppl-ratio: must be > 0, got {args.max_ppl_ratio:g}")
    if budgets.min_sparsity is not None and not 0 <= budgets.min_sparsity <= 1:
        raise UserError(f"--min-sparsity: must be in [0, 1], got {args.min_sparsity:g}")
    result = gate(args.baseline, args.candidate, budgets)
    if args.summary:
        atomic_write_bytes(args.summary, render_markdown(result).encode())
    if args.plot:
        render_plot(result, args.plot)
    for w in result.warnings:
        print(f"sparse-ffn: warning: {w}", file=sys.stderr)
    print(render_text(result))
    print(json.dumps(result.to_json()))
    return 0 if result.passed else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "gate", help="CI quality gate: compare two lm-eval results JSON files against budgets",
        description=__doc__.split("\n\n")[0] + " Exit 0: all budgets hold; 1: one fails; 2: unusable input. "
        "The last line of stdout is a JSON object {passed, checks, warnings}.")
    g.add_argument("--baseline", required=True, help="results_*.json, or a directory (newest results_*.json below it)")
    g.add_argument("--candidate", required=True, help="same, for the run under test")
    g.add_argument("--max-drop", metavar="METRIC=X,...",
                   help="largest allowed drop per metric (default: acc=0.01,acc_norm=0.01; '' for none); "
                        "metrics not named are reported, not gated")
    g.add_argument("--max-ppl-ratio", type=float, metavar="R",
                   help="largest allowed candidate/baseline ratio of word_/byte_perplexity and perplexity")
    g.add_argument("--min-sparsity", type=float, metavar="S",
                   help="smallest allowed candidate config.sparse_ffn.sparsity.mean")
    g.add_argument("--summary", metavar="REPORT.md", help="write a markdown report (e.g. $GITHUB_STEP_SUMMARY)")
    g.add_argument("--plot", metavar="REPORT.png", help="write a PNG of baseline vs candidate per task and metric")
    g.set_defaults(func=_cmd_gate)
