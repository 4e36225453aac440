"""What the `sparse_ffn` lm-eval model adds around one lm-eval run, besides `config.sparse_ffn`:

- the line it logs on stderr when lm-eval assembles the results (HFLM has no end-of-run hook; lm-eval's
  `simple_evaluate` calls `get_model_info()` once, on rank 0, after every request has run and the counts
  of all ranks are summed): which strategy, the mean FFN sparsity, the tokens counted, the experts'
  balance with experts;
- the model name lm-eval files the results under when `pretrained` came from the artifact (the
  threshold file or experts manifest names the model): lm-eval's `GeneralConfigTracker` takes
  `model_name` from `pretrained=` in model_args or else invents a random one (`qdpv68r5/`); we wrap its
  `log_experiment_args` so that a run whose model_args name no model gets the model the adapter loaded,
  exactly as if `pretrained=` had been given (`__root__.cache__...__smollm2-135m/`, and `model_name`).
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

ARTIFACT_MODEL: dict[str, str | None] = {"name": None}
"""The model the last `sparse_ffn` model loaded from its artifact, until the next lm-eval run takes it."""


def name_results_after(model: str | None) -> None:
    """Have the next lm-eval run whose model_args name no model file its results under `model` (None:
    do not; `pretrained=` was given)."""
    install_model_naming()
    ARTIFACT_MODEL["name"] = None if model is None else str(model)


def install_model_naming() -> bool:
    """Wrap lm-eval's `GeneralConfigTracker.log_experiment_args` once; False when this lm-eval has none."""
    try:
        from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
        from lm_eval.utils import sanitize_model_name
    except ImportError:  # pragma: no cover - an lm-eval without the tracker: its naming stays
        return False
    original = getattr(GeneralConfigTracker, "log_experiment_args", None)
    derive = getattr(GeneralConfigTracker, "_get_model_name", None)
    if original is None or derive is None:  # pragma: no cover
        return False
    if getattr(original, "_sparse_ffn", False):
        return True
    signature = inspect.signature(original)

    @functools.wraps(original)
    def log_experiment_args(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        name, ARTIFACT_MODEL["name"] = ARTIFACT_MODEL["name"], None
        try:
            model_args = signature.bind(self, *args, **kwargs).arguments.get("model_args")
        except TypeError:  # pragma: no cover
            return out
        if name is not None and derive(model_args) is None:
            self.model_name, self.model_name_sanitized = name, sanitize_model_name(name)
        return out

    log_experiment_args._sparse_ffn = True  # type: ignore[attr-defined]
    GeneralConfigTracker.log_experiment_args = log_experiment_args
    return True


def _strategy_text(summary: dict) -> str:
    strategy = summary.get("strategy")
    if strategy == "cett":
        source = summary.get("thresholds_source")
        return "cett (thresholds " + ("inline" if source in (None, "<inline>") else Path(source).name) + ")"
    if strategy == "dense":
        return "dense (counts exact zeros)"
    arg = summary.get("prune_arg")
    return f"{strategy} ({'eps' if strategy == 'fat' else 'kept ratio'} {arg:g})" if arg is not None else str(strategy)


def run_end_line(summary: dict, model: str | None = None) -> str:
    """One line: model, strategy, mean FFN sparsity (fraction of activations masked, mean over layers,
    with the per-layer range), tokens counted; with experts, K, the balance (mean normalised entropy of
    the expert usage, 1 = uniform) and the tokens routed. `summary` is `SparseFFNLM.sparsity_summary()`."""
    sp = summary.get("sparsity") or {}
    layers = sp.get("per_layer") or []
    parts = [f"strategy {_strategy_text(summary)}"]
    if model:
        parts.insert(0, f"model {model}")
    mean = f"mean FFN sparsity {sp.get('mean', 0.0):.4f}"
    if layers:
        mean += f" over {len(layers)} layers ({min(layers):.3f}-{max(layers):.3f})"
    parts += [mean, f"{sp.get('tokens', 0)} tokens counted"]
    usage = summary.get("expert_usage")
    if usage is not None:
        ks = {len(v) for layer in usage.get("per_layer", []) for k, v in layer.items() if k != "layer"}
        balance = usage.get("balance")
        parts.append(f"experts K={'/'.join(map(str, sorted(ks))) or '?'}, balance "
                     f"{'N/A' if balance is None else f'{balance:.3f}'} (1 = uniform) over "
                     f"{usage.get('tokens', 0)} tokens")
    return "sparse-ffn: run done: " + "; ".join(parts)


def log_run_end(summary: dict, model: str | None = None, write: Callable[[str], Any] | None = None) -> str:
    """Write `run_end_line` to stderr (or `write`) and return it."""
    line = run_end_line(summary, model)
    if write is not None:
        write(line)
    else:
        print(line, file=sys.stderr, flush=True)
    return line
