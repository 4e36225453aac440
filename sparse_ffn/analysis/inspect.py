"""Per-layer sparsity and PPL ratio of one model under one masking strategy (the seed's `run_inspect.sh`).

    result = inspect_sparsity(model, windows, "topk", arg=0.3)        # windows: LongTensor (n, seq_len)
    result = inspect_sparsity(model, windows, "cett", arg=0.2)        # thresholds fitted at CETT c = 0.2
    result = inspect_sparsity(model, windows, "cett", thresholds=[...])
    print(format_table(result)); png = render_layer_chart(result, "title")

The PPL ratio is PPL(sparse) / PPL(dense) on the very same windows (paper-parity perplexity,
`sparse_ffn.core.perplexity`); sparsity is what the masking core counts (`sparsify_` stats) on those windows.
Torch is imported lazily: the CLI imports this package's command modules to build its parser.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from sparse_ffn.core.ffn import FFNNames


@dataclass
class InspectResult:
    """One strategy on one model and one set of windows.

    sparsity: the masking core's summary {"tokens", "mean", "activation_ratio", "per_layer"} (fractions
    of inactive (token, neuron) pairs, per layer, mean over layers); d_ff: per layer; thresholds: the
    per-layer t_l applied (cett only); cett: the c they were fitted at (when fitted here).
    """

    strategy: str
    arg: float | None
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float
    sparsity: dict
    d_ff: list[int]
    thresholds: list[float] | None = None
    cett: float | None = None
    tokens: int = 0
    seq_len: int = 0

    @property
    def mean_sparsity(self) -> float:
        return float(self.sparsity["mean"])


def inspect_sparsity(model: nn.Module, windows: Tensor, strategy: str, arg: float | None = None,
                     thresholds: list[float] | tuple[float, ...] | None = None, *, names: FFNNames | None = None,
                     batch_size: int = 4, progress: bool = False,
                     log: Callable[[str], None] | None = None) -> InspectResult:
    """Measure `strategy` on `model` over `windows` (LongTensor (n_windows, seq_len)).

    strategy "fat" (arg = eps >= 0), "topk" (arg = kept ratio in (0, 1]), "cett" with either arg = c in
    [0, 1] (per-layer thresholds fitted on these windows by `calibrate_thresholds`, reusing its dense
    and sparse passes) or `thresholds` (one t_l per FFN layer, applied as given). One dense and one
    sparse perplexity pass otherwise. ppl_ratio = exp(mean NLL sparse - mean NLL dense).
    Errors (UserError): bad strategy/arg/thresholds, a model without FFNs, too few tokens.
    """
    from sparse_ffn.errors import UserError
    from sparse_ffn.core.ffn import find_ffns
    from sparse_ffn.core.masking import SparsityConfig, sparsify_
    from sparse_ffn.core.perplexity import perplexity

    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise UserError(f"too little data: need at least one window of >= 2 tokens, got {tuple(windows.shape)}")
    ffns = find_ffns(model, names)
    d_ff = [f.d_ff for f in ffns]
    shape = dict(tokens=int(windows.numel()), seq_len=int(windows.shape[1]))
    if strategy == "cett" and thresholds is None:
        if arg is None:
            raise UserError("strategy cett needs a CETT value c (--arg) or a thresholds file (--thresholds)")
        from sparse_ffn.calibrate.thresholds import calibrate_thresholds

        thr = calibrate_thresholds(model, windows, cett=arg, names=names, batch_size=batch_size,
                                   progress=progress, log=log, steer_windows=None)
        cal = thr.calibration
        return InspectResult("cett", arg, cal["ppl_dense"], cal["ppl_sparse"], cal["ppl_ratio"],
                             {**thr.sparsity, "activation_ratio": 1.0 - thr.sparsity["mean"]}, d_ff,
                             thresholds=list(thr.thresholds), cett=arg, **shape)
    if strategy == "cett" and arg is not None:
        raise UserError("strategy cett: give a CETT value c or thresholds, not both")
    if strategy != "cett" and thresholds is not None:
        raise UserError(f"strategy {strategy}: thresholds go with strategy cett only")
    config = SparsityConfig(strategy, arg=arg, thresholds=tuple(thresholds) if thresholds is not None else None)
    was_training = model.training
    model.eval()
    try:
        dense = perplexity(model, windows, batch_size, progress=progress, desc="dense pass")
        handle = sparsify_(model, config, names)
        try:
            sparse = perplexity(model, windows, batch_size, progress=progress, desc=f"sparse pass ({strategy})")
            summary = handle.stats.summary()
        finally:
            handle.remove()
    finally:
        model.train(was_training)
    ratio = math.exp(sparse["nll"] - dense["nll"])
    return InspectResult(strategy, arg, dense["perplexity"], sparse["perplexity"], ratio, summary, d_ff,
                         thresholds=list(thresholds) if thresholds is not None else None, **shape)


def describe(result: InspectResult) -> str:
    """'topk 0.3', 'cett c=0.2', 'cett (thresholds)': the setting, for titles and tables."""
    if result.strategy == "cett":
        return f"cett c={result.cett:g}" if result.cett is not None else "cett (thresholds)"
    return f"{result.strategy} {result.arg:g}"


def format_table(result: InspectResult) -> str:
    """Plain-text table: one row per layer (d_ff, sparsity, activation ratio, threshold t_l for cett),
    then the mean and the perplexities."""
    has_t = result.thresholds is not None
    head = f"{'layer':>5}  {'d_ff':>6}  {'sparsity':>8}  {'act.ratio':>9}" + (f"  {'threshold':>11}" if has_t else "")
    lines = [f"{describe(result)}: {result.tokens} tokens in windows of {result.seq_len}", head]
    for l, (s, d) in enumerate(zip(result.sparsity["per_layer"], result.d_ff)):
        row = f"{l:>5}  {d:>6}  {s:>8.4f}  {1 - s:>9.4f}"
        lines.append(row + (f"  {result.thresholds[l]:>11.4g}" if has_t else ""))
    lines.append(f"{'mean':>5}  {'':>6}  {result.mean_sparsity:>8.4f}  {1 - result.mean_sparsity:>9.4f}")
    lines.append(f"PPL dense {result.ppl_dense:.4f}, sparse {result.ppl_sparse:.4f}, ratio {result.ppl_ratio:.5f}")
    return "\n".join(lines)


def render_layer_chart(result: InspectResult, title: str | None = None) -> bytes:
    """PNG bytes: per-layer sparsity bars (0..1), a dashed line at the mean, title with the setting and
    the PPL ratio (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_layer = result.sparsity["per_layer"]
    fig = Figure(figsize=(max(4.0, 0.32 * len(per_layer) + 2.0), 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(per_layer)), per_layer, color="#1f77b4")
    ax.axhline(result.mean_sparsity, color="#d62728", linestyle="--",
               label=f"mean {result.mean_sparsity:.3f}")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (inactive fraction)")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(per_layer)))
    if len(per_layer) > 24:
        ax.tick_params(axis="x", labelsize=6)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or f"{describe(result)}: PPL ratio {result.ppl_ratio:.4f}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
