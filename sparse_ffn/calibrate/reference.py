"""The reference CETT procedure (the Sparsing Law code's), plainly: the oracle that the benchmark and
the tests compare our fast search against. Never used by the calibration itself."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn

from sparse_ffn.core.ffn import FFNNames, find_ffns
from sparse_ffn.calibrate.calibrator import Calibrator, Eval, zero_sparsity
from sparse_ffn.calibrate.cett_kernels import NUM_CANDIDATES, candidate_grid, mean_ratio, prepare_layer
from sparse_ffn.calibrate.ppl_search import C_TOL


def reference_layer_threshold(a: Tensor, w_down: Tensor, c: float, num_candidates: int = NUM_CANDIDATES) -> float:
    """The reference per-layer procedure: the largest candidate t with CETT_layer(t) <= c.

    Binary search over the `candidate_grid` indices, each step one full masked (N, d_ff) @ (d_ff, d_model)
    product (16 steps for 65,536 candidates). If no candidate qualifies, returns 0.0 (no masking): the
    seed code silently returns the largest candidate instead, which SPEC calls a bug.
    a: (..., d_ff); w_down: (d_model, d_ff); returns t in the units of s (a float >= 0).
    """
    a2, wt, norms = prepare_layer(a, w_down)
    s = a2.abs() * norms
    y_norm = (a2 @ wt).norm(dim=1)
    grid = candidate_grid(s, num_candidates)
    lo, hi, best = 0, num_candidates - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        tail = torch.where(s <= grid[mid], a2, 0.0) @ wt
        if mean_ratio(tail.norm(dim=1), y_norm) <= c:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return float(grid[best]) if best >= 0 else 0.0



def reference_calibrate(model: nn.Module, windows: Tensor, target_ppl_ratio: float, *,
                        names: FFNNames | None = None, batch_size: int = 4, c_tol: float = C_TOL,
                        progress: bool = False, log: Callable[[str], None] | None = None,
                        keep_activations: bool = False) -> dict:
    """The reference PPL-k% search, plainly: bisection of c in [0, 1] until the bracket is <= c_tol,
    each step refitting every layer with `reference_layer_threshold` and one sparse pass over all
    windows; the answer is the last c that met the target (SPEC; the seed returns the bracket's
    midpoint, unmeasured). Dense activations are collected once (the seed re-collects them every
    step: this is the cheaper form of it).

    Returns {"cett", "thresholds", "ppl_ratio", "sparsity", "steps", "dense_ppl", "timing", "evals":
    [{"cett", "thresholds", "ppl_ratio"}] per step, and "activations": {layer: a} if keep_activations}.
    """
    ffns = find_ffns(model, names)
    start = time.perf_counter()
    cal = Calibrator(model, ffns, windows, names=names, batch_size=batch_size, max_activation_memory=None,
                     progress=progress, log=log or (lambda m: None), layer_fit=reference_layer_threshold)
    lo, hi = 0.0, 1.0
    best = Eval(0.0, [0.0] * len(ffns), 1.0, cal.dense["perplexity"], zero_sparsity(ffns, windows.numel()),
                 windows.shape[0], 0.0, 0.0)
    while hi - lo > c_tol:
        mid = (lo + hi) / 2
        ev = cal.evaluate(mid)
        if ev.ratio <= target_ppl_ratio:
            lo, best = mid, ev
        else:
            hi = mid
    out = {"cett": best.c, "thresholds": best.thresholds, "ppl_ratio": best.ratio, "sparsity": best.sparsity,
           "steps": len(cal.evals), "dense_ppl": cal.dense["perplexity"],
           "timing": {"total_s": time.perf_counter() - start, **cal.timing},
           "evals": [{"cett": e.c, "thresholds": e.thresholds, "ppl_ratio": e.ratio} for e in cal.evals]}
    if keep_activations:
        out["activations"] = cal.activations
        out["y_norms"] = cal.y_norms
    return out
