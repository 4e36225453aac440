"""lm-eval results JSON files: their metrics by task, and what differs between two runs.

Values are in each metric's own units (accuracy: fraction of documents; perplexity: as lm-eval reports).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_ffn.analysis.paired import display_name
from sparse_ffn.errors import UserError

PPL_METRICS: frozenset[str] = frozenset({"word_perplexity", "byte_perplexity", "perplexity"})
LOWER_IS_BETTER: frozenset[str] = PPL_METRICS | {"bits_per_byte"}


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

    def sparsity_per_layer(self) -> list[float] | None:
        """`config.sparse_ffn.sparsity.per_layer` (fraction of FFN activations masked, per layer), if any."""
        block = self.config.get("sparse_ffn")
        sp = block.get("sparsity") if isinstance(block, dict) else None
        layers = sp.get("per_layer") if isinstance(sp, dict) else None
        if not isinstance(layers, list) or not layers:
            return None
        values = [_num(v) for v in layers]
        return None if any(v is None for v in values) else values  # type: ignore[return-value]


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
            found[display_name(name, filt)] = Metric(
                value, _num(entry.get(f"{name}_stderr,{filt}")),
                up if isinstance(up, bool) else name not in LOWER_IS_BETTER)
        if found:
            metrics[task] = found
    return Run(file, data, metrics)


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
