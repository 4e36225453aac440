"""The CI quality gate (`sparse-ffn gate`): two lm-eval results JSON files compared against budgets.

Budgets: ``--max-drop METRIC=X,...`` (the candidate may be at most X worse, in the metric's units;
default ``acc=0.01,acc_norm=0.01``), ``--max-ppl-ratio R`` (candidate/baseline for word_perplexity,
byte_perplexity and perplexity), ``--min-sparsity S`` (candidate's ``config.sparse_ffn.sparsity.mean``).
Other metrics are reported, not gated; with no budget at all the verdict is "not gated".

When both runs have lm-eval ``--log_samples`` files (beside the results files, or given with
``--baseline-samples/--candidate-samples``), a task's metrics are compared PAIRED over its items
(`sparse_ffn.analysis.paired`: mean difference, sd(d)/sqrt(n), seeded bootstrap CI, McNemar for 0/1
metrics). Otherwise the comparison is UNPAIRED: se = sqrt(se_b^2 + se_c^2) from lm-eval's stderrs and a
normal CI diff ± z se; both runs score the same documents, so this overstates the noise.
``--decide point`` fails a drop budget when the point estimate of the drop exceeds it; ``--decide upper``
when the upper end of the two-sided ``--confidence`` CI of the drop does (perplexity ratios are always
decided on the point estimate). A failing row is flagged "within noise" when the paired test's p-value
(Holm-adjusted across all paired rows with ``--holm``) is >= 1 - confidence, or, unpaired, when the drop
is at most 2 se. Exit 0: every budget holds (or none is set); 1: one fails; 2: unusable input (UserError).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparse_ffn.analysis.lm_eval_results import PPL_METRICS, Metric, Run, comparability_warnings, load_run
from sparse_ffn.analysis.paired import (
    DEFAULT_POWER, DEFAULT_RESAMPLES, DEFAULT_SEED, check_confidence, holm, metric_arrays,
    min_detectable_effect, normal_quantile, pair_items, paired_stats, read_samples, samples_beside,
    samples_from,
)
from sparse_ffn.errors import UserError

DEFAULT_MAX_DROP: dict[str, float] = {"acc": 0.01, "acc_norm": 0.01}
NOISE_SE = 2.0  # unpaired: a failing drop within this many standard errors is flagged "within noise"
DECIDE_RULES: tuple[str, ...] = ("point", "upper")


# -- checks --------------------------------------------------------------------------------------

@dataclass
class Check:
    """One row of the report, in the metric's units. `passed` is None for a metric no budget covers."""

    task: str | None
    metric: str
    kind: str  # "max_drop" | "max_ppl_ratio" | "min_sparsity" | "report"
    baseline: float | None
    candidate: float | None
    diff: float | None  # candidate - baseline
    se: float | None  # of diff: paired sd(d)/sqrt(n), else sqrt(se_b^2 + se_c^2); None when unknown
    baseline_se: float | None
    candidate_se: float | None
    budget: float | None
    passed: bool | None
    within_noise: bool = False
    ratio: float | None = None  # candidate / baseline, for perplexities
    note: str = ""
    method: str = "unpaired"  # "paired" (per-item differences) | "unpaired" (lm-eval's stderrs)
    n: int | None = None  # paired items
    ci_low: float | None = None  # CI of diff at the gate's confidence (paired: bootstrap; else diff ± z se)
    ci_high: float | None = None
    drop_upper: float | None = None  # upper confidence bound of the drop (how much worse the candidate is)
    test: str | None = None  # "mcnemar" | "paired t" (paired rows only)
    p_value: float | None = None  # two-sided, of "no difference"
    p_holm: float | None = None  # Holm-adjusted across the paired rows (with --holm)
    b: int | None = None  # McNemar: items right in the baseline, wrong in the candidate
    c: int | None = None  # McNemar: items wrong in the baseline, right in the candidate
    mde: float | None = None  # minimum detectable effect: (z_(1-alpha/2) + z_0.8) * se
    decided_on: str | None = None  # "point" | "upper": what the budget was compared with
    higher_is_better: bool | None = None


@dataclass
class Budgets:
    """The budgets and the rule that applies them."""

    max_drop: dict[str, float] | None = None  # None: DEFAULT_MAX_DROP
    max_ppl_ratio: float | None = None
    min_sparsity: float | None = None
    decide: str = "point"  # "point" | "upper"
    confidence: float = 0.95  # of the CIs (two-sided), and 1 - the test level for "within noise"
    holm: bool = False
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED

    @property
    def drops(self) -> dict[str, float]:
        return DEFAULT_MAX_DROP if self.max_drop is None else self.max_drop


@dataclass
class GateResult:
    baseline: Path
    candidate: Path
    checks: list[Check]
    warnings: list[str]
    budgets: Budgets = field(default_factory=Budgets)
    sparsity: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # run -> {mean, per_layer}
    samples: dict[str, dict[str, str]] = field(default_factory=dict)  # run -> task -> samples file used

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def gated(self) -> bool:
        """Some budget applied (else the verdict is "not gated")."""
        return any(c.budget is not None for c in self.checks)

    @property
    def verdict(self) -> str:
        return "not gated" if not self.gated else "passed" if self.passed else "failed"

    @property
    def comparison(self) -> str:
        """"paired", "unpaired" or "mixed" over the metric rows."""
        methods = {c.method for c in self.checks if c.task is not None and c.diff is not None}
        return methods.pop() if len(methods) == 1 else "mixed" if methods else "unpaired"

    def to_json(self) -> dict[str, Any]:
        b = self.budgets
        return {"passed": self.passed, "verdict": self.verdict, "comparison": self.comparison,
                "baseline": str(self.baseline), "candidate": str(self.candidate),
                "rule": {"decide": b.decide, "confidence": b.confidence, "holm": b.holm,
                         "resamples": b.resamples, "seed": b.seed, "power": DEFAULT_POWER},
                "checks": [asdict(c) for c in self.checks], "warnings": self.warnings,
                "sparsity": self.sparsity, "samples": self.samples}


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


Arrays = tuple[np.ndarray, np.ndarray]  # (baseline, candidate) per-item values of one metric


def _add_stats(check: Check, b: Metric, c: Metric, arrays: Arrays | None, budgets: Budgets) -> None:
    """Fill the paired statistics when the per-item values reproduce both runs' values, else unpaired ones."""
    assert check.diff is not None
    if arrays is not None:
        xb, xc = arrays
        if math.isclose(float(np.mean(xb)), b.value, abs_tol=1e-9) and math.isclose(float(np.mean(xc)), c.value,
                                                                                     abs_tol=1e-9):
            st = paired_stats(xb, xc, confidence=budgets.confidence, resamples=budgets.resamples, seed=budgets.seed)
            check.method, check.n, check.se, check.ci_low, check.ci_high = "paired", st.n, st.se, st.ci_low, st.ci_high
            check.test, check.p_value, check.b, check.c, check.mde = st.test, st.p_value, st.b, st.c, st.mde
            return
        check.note = "per-item values do not average to the results' values: compared unpaired"
    if check.se is not None:
        half = normal_quantile(1 - (1 - budgets.confidence) / 2) * check.se
        check.ci_low, check.ci_high = check.diff - half, check.diff + half
        check.mde = min_detectable_effect(check.se, budgets.confidence)


def _metric_check(task: str, name: str, b: Metric | None, c: Metric | None, budgets: Budgets,
                  arrays: Arrays | None = None) -> Check:
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
    sign = -1.0 if b.higher_is_better else 1.0  # worse = sign * diff > 0: the candidate is worse
    check = Check(task, name, kind, b.value, c.value, diff, se, b.stderr, c.stderr, budget, None,
                  higher_is_better=b.higher_is_better)
    _add_stats(check, b, c, arrays, budgets)
    if check.ci_low is not None and check.ci_high is not None:
        check.drop_upper = max(sign * check.ci_low, sign * check.ci_high) + 0.0  # no -0.0
    if kind == "max_ppl_ratio":
        check.ratio = c.value / b.value if b.value > 0 else math.inf
        check.passed, check.decided_on = check.ratio <= budget, "point"
    elif kind == "max_drop":
        assert budget is not None
        if budgets.decide == "upper" and check.drop_upper is not None:
            check.passed, check.decided_on = check.drop_upper <= budget + 1e-12, "upper"
        else:
            if budgets.decide == "upper":
                _add_note(check, "no stderr: decided on the point estimate")
            check.passed, check.decided_on = sign * diff <= budget + 1e-12, "point"
    if check.method == "unpaired" and check.passed is False and se is not None and sign * diff <= NOISE_SE * se:
        check.within_noise = True
        _add_note(check, "within noise")
    return check


def _add_note(check: Check, note: str) -> None:
    check.note = "; ".join(filter(None, [check.note, note]))


def _flag_noise(checks: list[Check], budgets: Budgets) -> None:
    """Holm-adjust the paired rows' p-values (with --holm); flag failing paired rows whose difference is
    not significant at 1 - confidence as within noise (unpaired rows are flagged in `_metric_check`)."""
    tested = [c for c in checks if c.method == "paired" and c.p_value is not None]
    if budgets.holm:
        for c, p in zip(tested, holm([c.p_value for c in tested if c.p_value is not None])):
            c.p_holm = p
    for c in tested:
        p = c.p_holm if budgets.holm else c.p_value
        if c.passed is False and p is not None and p >= 1 - budgets.confidence:
            c.within_noise = True
            _add_note(c, "within noise")


def _sparsity_check(base: Run, cand: Run, minimum: float) -> Check:
    b, c = base.sparsity_mean(), cand.sparsity_mean()
    if c is None:
        return Check(None, "sparsity.mean", "min_sparsity", b, None, None, None, None, None, minimum, False,
                     note="candidate has no config.sparse_ffn.sparsity.mean (not a --model sparse_ffn run?)")
    return Check(None, "sparsity.mean", "min_sparsity", b, c, None if b is None else c - b, None, None, None,
                 minimum, c >= minimum)


def _samples(run: Run, given: list[str | Path] | None, option: str) -> dict[str, Path]:
    return samples_from(given, option) if given else samples_beside(run.path, run.metrics)


def _paired_arrays(base: Run, cand: Run, common: list[str], given_b: list[str | Path] | None,
                   given_c: list[str | Path] | None, warnings: list[str]
                   ) -> tuple[dict[str, dict[str, Arrays]], dict[str, dict[str, str]]]:
    """Per task and metric, the matched per-item values of both runs; and the samples files used."""
    found = {"baseline": _samples(base, given_b, "--baseline-samples"),
             "candidate": _samples(cand, given_c, "--candidate-samples")}
    for run, given in (("baseline", given_b), ("candidate", given_c)):
        if given and (extra := sorted(set(found[run]) - set(common))):
            warnings.append(f"--{run}-samples: samples for {', '.join(extra)}, not a compared task (ignored)")
    arrays: dict[str, dict[str, Arrays]] = {}
    used: dict[str, dict[str, str]] = {"baseline": {}, "candidate": {}}
    for task in common:
        fb, fc = found["baseline"].get(task), found["candidate"].get(task)
        if fb is None or fc is None:
            if fb is not None or fc is not None:
                run, path = ("baseline", fb) if fb is not None else ("candidate", fc)
                warnings.append(f"{task}: per-sample log only in the {run} ({path}): compared unpaired")
            continue
        arrays[task] = metric_arrays(pair_items(read_samples(fb, task), read_samples(fc, task)))
        used["baseline"][task], used["candidate"][task] = str(fb), str(fc)
    return arrays, used


def _sparsity(run: Run) -> dict[str, Any] | None:
    mean = run.sparsity_mean()
    return None if mean is None else {"mean": mean, "per_layer": run.sparsity_per_layer()}


def gate(baseline: str | Path, candidate: str | Path, budgets: Budgets,
         baseline_samples: list[str | Path] | None = None,
         candidate_samples: list[str | Path] | None = None) -> GateResult:
    """Load both runs, pair their tasks, metrics and (with per-sample logs) items; check every budget."""
    if budgets.decide not in DECIDE_RULES:
        raise UserError(f"--decide: must be one of {', '.join(DECIDE_RULES)}, got {budgets.decide!r}")
    check_confidence(budgets.confidence)
    if budgets.resamples < 1:
        raise UserError(f"--resamples: must be >= 1, got {budgets.resamples}")
    base, cand = load_run(baseline), load_run(candidate)
    common = [t for t in base.metrics if t in cand.metrics]
    if not common:
        raise UserError(f"{cand.path}: no task in common with {base.path} (baseline: "
                        f"{', '.join(base.metrics) or 'none'}; candidate: {', '.join(cand.metrics) or 'none'})")
    warnings = comparability_warnings(base, cand, common)
    arrays, used = _paired_arrays(base, cand, common, baseline_samples, candidate_samples, warnings)
    checks = []
    for task in common:
        bm, cm = base.metrics[task], cand.metrics[task]
        for name in [*bm, *(n for n in cm if n not in bm)]:
            checks.append(_metric_check(task, name, bm.get(name), cm.get(name), budgets,
                                        arrays.get(task, {}).get(name)))
    _flag_noise(checks, budgets)
    if budgets.min_sparsity is not None:
        checks.append(_sparsity_check(base, cand, budgets.min_sparsity))
    names = {c.metric for c in checks} | {c.metric.partition(",")[0] for c in checks}
    for name in budgets.max_drop or {}:  # only budgets the user named
        if name not in names:
            warnings.append(f"--max-drop {name}: no such metric in the compared tasks (not checked)")
    if budgets.max_ppl_ratio is not None and not any(c.kind == "max_ppl_ratio" for c in checks):
        warnings.append("--max-ppl-ratio: no perplexity metric in the compared tasks (not checked)")
    return GateResult(base.path, cand.path, checks, warnings, budgets,
                      {"baseline": _sparsity(base), "candidate": _sparsity(cand)}, used)


# -- CLI -----------------------------------------------------------------------------------------
