"""The calibration state of one model on one set of windows: dense activations, per-layer searches,
sparse evaluations at a CETT value c (thresholds fitted per layer, PPL ratio measured)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from sparse_ffn.core.ffn import FFN, FFNNames
from sparse_ffn.core.masking import SparsityConfig, sparsify_
from sparse_ffn.core.perplexity import perplexity
from sparse_ffn.errors import UserError
from sparse_ffn.calibrate.activations import collect_activations
from sparse_ffn.calibrate.layer_search import LayerSearch

DEFAULT_MAX_ACTIVATION_MEMORY = 4 * 2**30


@dataclass
class Eval:
    """One sparse evaluation: c, thresholds, PPL ratio on the windows used, masking-core sparsity."""

    c: float
    thresholds: list[float]
    ratio: float
    ppl: float
    sparsity: dict
    windows: int
    fit_s: float
    ppl_s: float


@dataclass
class Calibrator:
    """Dense activations collected once (or per layer group beyond the memory budget), one
    LayerSearch per layer with memo surviving across c, sparse PPL passes through the masking core.
    `evaluate(c)` is what the PPL-k% search (`ppl_search.search_c`) calls."""

    model: nn.Module
    ffns: list[FFN]
    windows: Tensor
    names: FFNNames | None = None
    batch_size: int = 1
    activation_dtype: torch.dtype = torch.float32
    max_activation_memory: int | None = DEFAULT_MAX_ACTIVATION_MEMORY
    progress: bool = False
    log: Callable[[str], None] = lambda msg: None
    layer_fit: Callable[[Tensor, Tensor, float], float] | None = None  # None: LayerSearch; else (a, w, c) -> t
    evals: list[Eval] = field(default_factory=list)
    timing: dict = field(default_factory=lambda: {"collect_s": 0.0, "fit_s": 0.0, "ppl_s": 0.0, "dense_passes": 0})

    def __post_init__(self) -> None:
        L, n = len(self.ffns), self.windows.numel()
        elsize = torch.empty((), dtype=self.activation_dtype).element_size()
        per_layer = [n * f.d_ff * elsize for f in self.ffns]
        tails = [n * f.down_weight().shape[0] * 4 for f in self.ffns]
        budget = self.max_activation_memory
        if budget is not None and max(per_layer) > budget:
            raise UserError(f"--max-activation-memory {format_bytes(budget)} is less than one layer's activations "
                            f"({format_bytes(max(per_layer))} for {n} tokens); raise it, use fewer --tokens or a "
                            f"16-bit --activation-dtype")
        self.keep_tails = self.layer_fit is None and (budget is None or sum(per_layer) + sum(tails) <= budget)
        self.groups: list[list[int]] = []
        group: list[int] = []
        used = 0
        for l in range(L):
            if group and budget is not None and used + per_layer[l] > budget:
                self.groups.append(group)
                group, used = [], 0
            group.append(l)
            used += per_layer[l]
        self.groups.append(group)
        self.activation_bytes = max(sum(per_layer[l] for l in g) for g in self.groups)
        self.searches: list[LayerSearch | None] = [None] * L
        self.steer_searches: list[LayerSearch | None] = [None] * L
        self.activations: dict[int, Tensor] = {}
        self._fresh_from = 0  # evaluations before this index are not reused (see restart_searches)
        if len(self.groups) > 1:
            self.log(f"activations of {L} layers ({format_bytes(sum(per_layer))}) exceed --max-activation-memory "
                     f"{format_bytes(budget)}: {len(self.groups)} layer groups, one dense pass per group and step")
        start = time.perf_counter()
        acts, self.y_norms, self.dense = collect_activations(
            self.model, self.ffns, self.windows, self.groups[0], dtype=self.activation_dtype,
            batch_size=self.batch_size, progress=self.progress, desc="dense pass (collect activations)")
        self.activations = acts
        self.timing["collect_s"] += time.perf_counter() - start
        self.timing["dense_passes"] += 1
        self.window_nll = self.dense.pop("window_nll")

    def restart_searches(self) -> None:
        """Forget the per-layer searches and the evaluations so far (the dense activations stay): what
        follows computes exactly what a new Calibrator would. Where CETT(t) is not monotone (a norm of
        a sum can fall as entries join it), a search's answer can depend on the c it fitted before, so
        a second target of one run starts here to get the single-target file."""
        for search in self.searches:
            if search is not None:
                search.release(drop_activations=True)
        self.searches = [None] * len(self.ffns)
        self.steer_searches = [None] * len(self.ffns)
        self._fresh_from = len(self.evals)

    # -- thresholds for one c -------------------------------------------------------------
    def _ensure(self, group: list[int]) -> None:
        missing = [l for l in group if l not in self.activations]
        if not missing:
            return
        for l in list(self.activations):  # drop the other group's activations first (the budget)
            if self.searches[l] is not None:
                self.searches[l].release(drop_activations=True)
            self.steer_searches[l] = None
            del self.activations[l]
        start = time.perf_counter()
        self.activations, _, _ = collect_activations(self.model, self.ffns, self.windows, group,
                                               dtype=self.activation_dtype, y_norms=False,
                                               batch_size=self.batch_size, progress=self.progress,
                                               desc="dense pass (layer group)")
        self.timing["collect_s"] += time.perf_counter() - start
        self.timing["dense_passes"] += 1

    def _layer_search(self, l: int, steer_windows: int | None) -> LayerSearch:
        """Layer l's search on all tokens, or on the first `steer_windows` windows' tokens (sharing the
        full grid; it then guides the full search to its first c)."""
        a, w = self.activations[l], self.ffns[l].down_weight()
        full = self.searches[l]
        if full is None:
            full = self.searches[l] = LayerSearch(a, w, y_norm=self.y_norms.get(l), keep_tail=self.keep_tails)
        elif full.a is None:
            full.attach(a)
        if not steer_windows or steer_windows >= self.windows.shape[0]:
            return full
        steer = self.steer_searches[l]
        if steer is None:
            n = steer_windows * self.windows.shape[1]
            y = full.y_norm[:n]
            steer = self.steer_searches[l] = LayerSearch(a[:n], w, y_norm=y, grid=full.grid,
                                                         keep_tail=self.keep_tails)
            full.release()
            full.guide = steer
        return steer

    def fit(self, c: float, steer_windows: int | None = None) -> list[float]:
        """Per-layer thresholds t_l(c), all layers (fitted on the first `steer_windows` windows only
        when given: the cheap, approximate fits of the steering probes)."""
        start = time.perf_counter()
        out: list[float] = [0.0] * len(self.ffns)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.ffns), desc=f"fit thresholds c={c:.4f}", unit="layer", leave=False,
                       dynamic_ncols=True)
        for group in self.groups:
            self._ensure(group)
            for l in group:
                if self.layer_fit is not None:
                    out[l] = self.layer_fit(self.activations[l], self.ffns[l].down_weight(), c)
                else:
                    search = self._layer_search(l, steer_windows)
                    out[l] = search.threshold(c)
                    search.release()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        self.timing["fit_s"] += time.perf_counter() - start
        return out

    # -- sparse evaluation ------------------------------------------------------------------
    def evaluate(self, c: float, thresholds: list[float] | None = None, windows: int | None = None) -> Eval:
        """Fit at c (unless thresholds are given) and measure the PPL ratio on the first `windows` windows."""
        start = time.perf_counter()
        n_win = self.windows.shape[0] if windows is None else windows
        for ev in self.evals[self._fresh_from:]:
            if thresholds is None and ev.c == c and ev.windows == n_win:
                return ev
        steer = n_win if n_win < self.windows.shape[0] and len(self.groups) == 1 else None
        thresholds = self.fit(c, steer) if thresholds is None else thresholds
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        if all(t == 0.0 for t in thresholds) and n_win == self.windows.shape[0]:
            ratio, ppl_value = 1.0, self.dense["perplexity"]  # thresholds 0 = the dense model, bit for bit
            summary = None
        else:
            handle = sparsify_(self.model, SparsityConfig("cett", thresholds=tuple(thresholds)), self.names)
            try:
                sub = self.windows[:n_win]
                r = perplexity(self.model, sub, self.batch_size, progress=self.progress,
                               desc=f"sparse pass c={c:.4f}")
                summary = handle.stats.summary()
            finally:
                handle.remove()
            dense_nll = sum(self.window_nll[:n_win]) / (n_win * (self.windows.shape[1] - 1))
            ratio, ppl_value = math.exp(r["nll"] - dense_nll), r["perplexity"]
        ppl_s = time.perf_counter() - start
        self.timing["ppl_s"] += ppl_s
        if summary is None:
            summary = zero_sparsity(self.ffns, n_win * self.windows.shape[1])
        ev = Eval(c, thresholds, ratio, ppl_value, summary, n_win, fit_s, ppl_s)
        self.evals.append(ev)
        self.log(f"c={c:.5f}: ppl_ratio={ratio:.5f} on {n_win} windows, mean sparsity {summary['mean']:.4f} "
                 f"(fit {fit_s:.1f} s, ppl {ppl_s:.1f} s)")
        return ev


def zero_sparsity(ffns: list[FFN], tokens: int) -> dict:
    return {"tokens": tokens, "mean": 0.0, "activation_ratio": 1.0, "per_layer": [0.0] * len(ffns)}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
