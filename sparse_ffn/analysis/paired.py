"""Paired comparison of two lm-eval runs that scored the same items (SPEC section 4).

Reads lm-eval ``--log_samples`` files (``samples_<task>_<timestamp>.jsonl``, one JSON object per
document and filter), matches the two runs' items by task, doc_id, filter and document hash, and for one
metric computes, over the n matched items, with d_i = candidate_i - baseline_i (metric units: for
accuracy a fraction of items):

- ``mean_diff`` = mean(d); ``se`` = sd(d, ddof=1) / sqrt(n);
- a percentile bootstrap CI of mean(d), items in (doc_id, filter) order: ``rng = numpy.random.default_rng(seed)``, then
  ``idx = rng.integers(0, n, size=(resamples, n))`` (drawn in row chunks, which gives the same numbers),
  ``numpy.quantile(d[idx].mean(axis=1), [alpha/2, 1 - alpha/2])`` with alpha = 1 - confidence;
- for 0/1 metrics McNemar's exact test: b = right->wrong, c = wrong->right items, the two-sided
  binomial test of b out of b + c at p = 1/2 (``scipy.stats.binomtest``; p = 1 when b + c = 0);
  for other metrics a paired t-test of mean(d) = 0 (t = mean/se, n - 1 degrees of freedom);
- the minimum detectable effect ``mde = (z_(1-alpha/2) + z_power) * se`` (normal approximation: the
  true |mean(d)| that a two-sided level-alpha test detects with probability `power`, default 0.8, at
  this n and this per-item spread of d);
- Holm's step-down adjustment of a family of p-values (``holm``).

Imports only the standard library, numpy, scipy and `sparse_ffn.errors`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

from sparse_ffn.errors import UserError

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
DEFAULT_POWER = 0.8
BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MiB of int64)
# keys of a samples line that are not per-item metric values
SAMPLE_FIELDS: frozenset[str] = frozenset({
    "doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
    "prompt_hash", "target_hash"})


# -- samples files -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One document under one filter in a samples file."""

    doc_id: int
    filter: str
    doc_hash: str | None  # lm-eval's sha256 of the document (json.dumps(doc, indent=2))
    content_hash: str | None  # sha256 of the canonical JSON of `doc` (document_hash); None without `doc`
    values: dict[str, float | None]  # metric -> per-item value; None when not a finite number (e.g. a list)


@dataclass(frozen=True)
class TaskSamples:
    """The items of one task in one run, keyed by (doc_id, filter)."""

    path: Path
    task: str
    items: dict[tuple[int, str], Item]


def display_name(metric: str, filt: str) -> str:
    """The gate's name of a metric: "acc" under filter "none", else "exact_match,strict-match"."""
    return metric if filt == "none" else f"{metric},{filt}"


def document_hash(doc: Any) -> str:
    """Hex sha256 of the canonical JSON of a document (sorted keys, no whitespace, UTF-8)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def task_of_samples_file(path: Path) -> str | None:
    """The task in lm-eval's name ``samples_<task>_<timestamp>.jsonl``, or None for another name."""
    name = path.name
    if not (name.startswith("samples_") and name.endswith(".jsonl")):
        return None
    task, sep, stamp = name[len("samples_"):-len(".jsonl")].rpartition("_")
    return task if sep and task and stamp else None


def samples_beside(results_file: Path, tasks: Iterable[str]) -> dict[str, Path]:
    """The samples files lm-eval wrote with `results_file` (same folder, same timestamp), by task."""
    stem = results_file.stem
    if "_" not in stem:
        return {}
    stamp = stem.rpartition("_")[2]
    found = {t: results_file.parent / f"samples_{t}_{stamp}.jsonl" for t in tasks}
    return {t: p for t, p in found.items() if p.is_file()}


def samples_from(paths: Sequence[str | Path], option: str) -> dict[str, Path]:
    """Samples files given on the command line (files, or folders searched recursively), by task.

    For a task with several files, the newest by name (lm-eval's names end with an ISO timestamp).
    """
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path}: not found ({option})")
        files = [path] if path.is_file() else sorted(f for f in path.rglob("samples_*.jsonl") if f.is_file())
        if not files:
            raise UserError(f"{path}: no samples_<task>_<timestamp>.jsonl below this directory ({option}; "
                            "an lm_eval --log_samples output?)")
        for f in files:
            task = task_of_samples_file(f)
            if task is None:
                raise UserError(f"{f}: not named samples_<task>_<timestamp>.jsonl ({option})")
            if task not in found or f.name > found[task].name:
                found[task] = f
    return found


def _item_values(line: dict[str, Any]) -> dict[str, float | None]:
    names = line.get("metrics")
    if not isinstance(names, list):
        names = [k for k in line if k not in SAMPLE_FIELDS]
    out: dict[str, float | None] = {}
    for name in names:
        if not isinstance(name, str) or name in SAMPLE_FIELDS:
            continue
        v = line.get(name)
        ok = isinstance(v, (bool, int, float)) and math.isfinite(float(v))
        out[name] = float(v) if ok else None
    return out


def read_samples(path: str | Path, task: str) -> TaskSamples:
    """Read one lm-eval samples file; UserError (naming the file and line) for anything unusable."""
    path = Path(path)
    items: dict[tuple[int, str], Item] = {}
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                doc_id = line.get("doc_id") if isinstance(line, dict) else None
                if isinstance(doc_id, bool) or not isinstance(doc_id, int):
                    raise UserError(f"{path}: line {lineno}: not an lm-eval sample (no integer doc_id)")
                filt = str(line.get("filter", "none"))
                if (doc_id, filt) in items:
                    raise UserError(f"{path}: task {task}: doc_id {doc_id} (filter {filt}) appears twice")
                dh = line.get("doc_hash")
                items[doc_id, filt] = Item(doc_id, filt, dh if isinstance(dh, str) else None,
                                           document_hash(line["doc"]) if "doc" in line else None,
                                           _item_values(line))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not items:
        raise UserError(f"{path}: no samples in this file")
    return TaskSamples(path, task, items)


def _same_document(a: Item, b: Item) -> bool | None:
    """True/False when a hash both items carry decides it; None when they share none."""
    checks = [(x, y) for x, y in ((a.doc_hash, b.doc_hash), (a.content_hash, b.content_hash))
              if x is not None and y is not None]
    return all(x == y for x, y in checks) if checks else None


def pair_items(base: TaskSamples, cand: TaskSamples) -> list[tuple[Item, Item]]:
    """The two runs' items of one task, matched by (doc_id, filter), in that order, and checked to be the
    same documents (lm-eval's doc_hash and the hash of `doc`, wherever both runs carry them).

    Raises UserError when the item sets differ or a matched document differs (or cannot be compared).
    """
    only_b = sorted(set(base.items) - set(cand.items))
    only_c = sorted(set(cand.items) - set(base.items))
    for extra, here, there, where in ((only_b, base, cand, "the candidate"), (only_c, cand, base, "the baseline")):
        if extra:
            doc_id, filt = extra[0]
            raise UserError(f"{here.path}: task {base.task}: doc_id {doc_id} (filter {filt}) is not in {where}'s "
                            f"samples {there.path} ({len(extra)} item(s) unmatched): the runs did not score the "
                            "same documents")
    pairs = []
    for key in sorted(base.items):
        b, c = base.items[key], cand.items[key]
        same = _same_document(b, c)
        if same is not True:
            why = "differs from" if same is False else "has no doc or doc_hash to compare with"
            raise UserError(f"{cand.path}: task {base.task}: doc_id {key[0]}: the document {why} the baseline's "
                            f"({base.path})")
        pairs.append((b, c))
    return pairs


def metric_arrays(pairs: Sequence[tuple[Item, Item]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per metric display name ("acc", "exact_match,strict-match"): (baseline, candidate) per-item values.

    Only metrics with a finite number for every item of its filter in both runs are returned.
    """
    groups: dict[str, list[tuple[float | None, float | None]]] = {}
    for b, c in pairs:
        for name in dict.fromkeys([*b.values, *c.values]):
            groups.setdefault(display_name(name, b.filter), []).append((b.values.get(name), c.values.get(name)))
    n_by_filter: dict[str, int] = {}
    for b, _ in pairs:
        n_by_filter[b.filter] = n_by_filter.get(b.filter, 0) + 1
    out = {}
    for name, rows in groups.items():
        filt = name.partition(",")[2] or "none"
        if len(rows) != n_by_filter.get(filt) or any(x is None or y is None for x, y in rows):
            continue
        out[name] = (np.array([x for x, _ in rows], dtype=np.float64), np.array([y for _, y in rows], dtype=np.float64))
    return out


# -- statistics ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedStats:
    """Paired statistics of one metric; differences are candidate - baseline, in the metric's units."""

    n: int  # matched items
    mean_diff: float  # mean(d)
    se: float | None  # sd(d, ddof=1) / sqrt(n); None when n < 2
    ci_low: float  # percentile bootstrap CI of mean(d) at `confidence`
    ci_high: float
    confidence: float
    test: str | None  # "mcnemar" (0/1 metric) | "paired t"; None when n < 2 (no test)
    p_value: float | None  # two-sided
    b: int | None  # 0/1 metrics: items right in the baseline, wrong in the candidate
    c: int | None  # 0/1 metrics: items wrong in the baseline, right in the candidate
    mde: float | None  # (z_(1-alpha/2) + z_power) * se
    power: float
    resamples: int
    seed: int


def check_confidence(confidence: float, option: str = "--confidence") -> float:
    """`confidence` if 0 < confidence < 1, else UserError."""
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise UserError(f"{option}: must be between 0 and 1 (exclusive), got {confidence}")
    return float(confidence)


def normal_quantile(q: float) -> float:
    """z with P(Z <= z) = q for a standard normal Z."""
    return float(stats.norm.ppf(q))


def min_detectable_effect(se: float, confidence: float, power: float = DEFAULT_POWER) -> float:
    """(z_(1-alpha/2) + z_power) * se, alpha = 1 - confidence: the smallest true difference (units of se)
    a two-sided level-alpha test detects with probability `power` (normal approximation)."""
    return (normal_quantile(1 - (1 - confidence) / 2) + normal_quantile(power)) * se


def bootstrap_ci(d: np.ndarray, confidence: float, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(d) over items (the algorithm in the module docstring)."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    if n == 0 or resamples < 1:
        raise ValueError("bootstrap_ci needs at least one item and one resample")
    rng = np.random.default_rng(seed)
    rows = max(1, BOOTSTRAP_CHUNK_ELEMENTS // n)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = 1 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mcnemar_exact(base: np.ndarray, cand: np.ndarray) -> tuple[int, int, float]:
    """(b, c, two-sided exact p) for 0/1 arrays: b = 1->0 items, c = 0->1 items."""
    b = int(np.sum((base == 1) & (cand == 0)))
    c = int(np.sum((base == 0) & (cand == 1)))
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return b, c, min(1.0, p)


def paired_t_pvalue(d: np.ndarray) -> float:
    """Two-sided p of a paired t-test of mean(d) = 0 (1.0 or 0.0 when all d_i are equal)."""
    n = len(d)
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1))


def is_binary(*arrays: np.ndarray) -> bool:
    """Every value is 0 or 1."""
    return all(bool(np.all((a == 0) | (a == 1))) for a in arrays)


def paired_stats(base: np.ndarray, cand: np.ndarray, *, confidence: float = 0.95,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                 power: float = DEFAULT_POWER) -> PairedStats:
    """Paired statistics of candidate - baseline over matched items (same order in both arrays)."""
    base, cand = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if base.shape != cand.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError("paired_stats needs two 1-d arrays of the same non-zero length")
    check_confidence(confidence)
    d = cand - base
    n = len(d)
    lo, hi = bootstrap_ci(d, confidence, resamples, seed)
    se = float(np.std(d, ddof=1)) / math.sqrt(n) if n >= 2 else None
    b = c = None
    test = p = None
    if is_binary(base, cand):
        b, c, p = mcnemar_exact(base, cand)
        test = "mcnemar"
    elif n >= 2:
        test, p = "paired t", paired_t_pvalue(d)
    mde = min_detectable_effect(se, confidence, power) if se is not None else None
    return PairedStats(n, float(np.mean(d)), se, lo, hi, confidence, test, p, b, c, mde, power, resamples, seed)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order.

    With p sorted ascending, p_adj(i) = max over j <= i of min(1, (m - j + 1) * p(j)) (i, j from 1).
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
