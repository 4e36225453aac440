"""Figures of `sparse-ffn analyze neurons` (PNG bytes; matplotlib's Agg canvas, no display needed).

    png = render_histograms(m.dense, m.sparse, stats, [2402], title="layer 1 up_proj, 90%")
    png = render_summary(stats, summary, title="layer 1 up_proj, 90%")
"""

from __future__ import annotations

import io
import math

import numpy as np
from torch import Tensor

from sparse_ffn.analysis.neurons import NeuronStats

DENSE, SPARSE = "#1f77b4", "#d62728"


def _canvas(width: float, height: float):  # noqa: ANN202
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3g}"


def render_histograms(dense: Tensor, sparse: dict[int, Tensor], stats: NeuronStats, neurons: list[int],
                      title: str, bins: int = 60) -> bytes:
    """One row per neuron, one panel per n: dense (blue) and sparse (red) output histograms on shared bins
    (the 0.1-99.9 percentile range of both), WD_n and RI_n in each panel's title (the seed's figure)."""
    ns = stats.clusters
    fig = _canvas(2.6 * len(ns) + 0.4, 2.1 * max(1, len(neurons)) + 0.5)
    axes = fig.subplots(max(1, len(neurons)), len(ns), squeeze=False)
    for r, j in enumerate(neurons):
        d = dense[:, j].double().numpy()
        for c, n in enumerate(ns):
            s = sparse[n][:, j].double().numpy()
            both = np.concatenate([d, s])
            lo, hi = np.percentile(both, [0.1, 99.9])
            if not hi > lo:
                lo, hi = float(both.min()) - 0.5, float(both.max()) + 0.5
            edges = np.linspace(lo, hi, bins + 1)
            ax = axes[r][c]
            ax.hist(d, bins=edges, density=True, color=DENSE, alpha=0.55, label="dense")
            ax.hist(s, bins=edges, density=True, color=SPARSE, alpha=0.55, label="sparse")
            ri = float(stats.ri[n][j])
            ax.set_title(f"n={n}: WD={_fmt(float(stats.wd[n][j]))}, RI={_fmt(ri)}", fontsize=8)
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel(f"neuron {j}\ndensity", fontsize=8)
            if r == len(neurons) - 1:
                ax.set_xlabel("output", fontsize=7)
    axes[0][0].legend(fontsize=6, loc="upper right")
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def render_summary(stats: NeuronStats, summary: dict, title: str) -> bytes:
    """Left: RI at the largest n against non-Gaussianity, one dot per neuron, Spearman rho [CI] in the
    title. Right: WD_n against n (median and 10-90% band over neurons)."""
    ns = stats.clusters
    fig = _canvas(9.0, 3.6)
    left, right = fig.subplots(1, 2)
    top = ns[-1]
    if top > 1:
        x, y = stats.non_gaussianity.numpy(), stats.ri[top].numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        left.scatter(x[ok], y[ok], s=4 if ok.sum() > 200 else 16, alpha=0.5, color=SPARSE, linewidths=0)
        left.axhline(0, color="grey", linewidth=0.6)
        sp = summary["spearman"][str(top)]["non_gaussianity_vs_ri"]
        if sp["rho"] is None:
            text = "Spearman rho n/a"
        else:
            lo, hi = sp["ci"]
            text = (f"Spearman rho {sp['rho']:.3f} [{_fmt(math.nan if lo is None else lo)}, "
                    f"{_fmt(math.nan if hi is None else hi)}] ({int(ok.sum())} neurons)")
        left.set_title(text, fontsize=8)
        left.set_xlabel("non-Gaussianity of the dense output: W1(standardised, N(0,1))", fontsize=7)
        left.set_ylabel(f"RI at n={top}", fontsize=8)
    else:
        left.text(0.5, 0.5, "only n = 1: no RI", ha="center", va="center")
    left.tick_params(labelsize=7)
    med = [summary["wd"][str(n)]["median"] for n in ns]
    p10 = [summary["wd"][str(n)]["p10"] for n in ns]
    p90 = [summary["wd"][str(n)]["p90"] for n in ns]
    right.plot(ns, med, marker="o", color=SPARSE, label="median over neurons")
    right.fill_between(ns, p10, p90, color=SPARSE, alpha=0.2, label="10-90%")
    right.set_xscale("log", base=2)
    right.set_xticks(ns, [str(n) for n in ns])
    right.set_xlabel("n (experts)", fontsize=8)
    right.set_ylabel("WD(dense, sparse_n)", fontsize=8)
    right.tick_params(labelsize=7)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)
