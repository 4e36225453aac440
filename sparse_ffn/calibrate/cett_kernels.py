"""CETT kernels (SPEC section 1): pure functions on one layer's activations, float32 whatever the storage.

Notation for one layer: `a` (N tokens, d_ff) is the input of down_proj, `w_down` (d_model, d_ff) its
weight (columns w_i), y = a @ w_down.T (N, d_model), s = |a| * ||w_i||_2 (N, d_ff) the sizes of the
neurons' contributions, in the units of y. For a threshold t (same units as s),

    CETT_layer(t) = mean over tokens j of || sum_{i: s_ji <= t} a_ji w_i ||_2 / || y_j ||_2

(a token with y_j = 0 counts 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NUM_CANDIDATES = 65536  # evenly spaced candidate thresholds per layer (the reference's grid)
QUANTILE = 0.99  # the grid runs from min(s) to this quantile of s


def prepare_layer(a: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a as float32 (N, d_ff), W^T float32 (d_ff, d_model), column norms ||w_i|| (d_ff,))."""
    w = w_down.detach().float().to(a.device)
    a2 = a.detach().reshape(-1, w.shape[1]).float()
    return a2, w.t().contiguous(), w.norm(dim=0)


def mean_ratio(tail_norm: Tensor, y_norm: Tensor) -> float:
    """mean_j ||tail_j|| / ||y_j||, 0 where y_j = 0; accumulated in float64 (a plain float)."""
    ratio = torch.where(y_norm > 0, tail_norm / y_norm.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return float(ratio.double().mean())


def cett(a: Tensor, w_down: Tensor, t: float) -> float:
    """CETT_layer(t): mean over the N tokens of ||sum_{i: s_i <= t} a_i w_i|| / ||y|| (dimensionless).

    a: (..., d_ff) activations entering down_proj (flattened to N tokens); w_down: (d_model, d_ff);
    t: threshold on s_i = |a_i| * ||w_i||_2, in the units of y.
    """
    a2, wt, norms = prepare_layer(a, w_down)
    s = a2.abs() * norms
    tail = torch.where(s <= t, a2, 0.0) @ wt
    return mean_ratio(tail.norm(dim=1), (a2 @ wt).norm(dim=1))


def random_sample(x: Tensor, size: int = 65536) -> Tensor:
    """A fixed pseudo-random sample of the entries of x (same x -> same sample), sorted."""
    flat = x.reshape(-1)
    if flat.numel() <= size:
        return sorted_values(flat)
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, flat.numel(), (size,), generator=gen).to(flat.device)
    return sorted_values(flat[idx])


def sorted_values(x: Tensor) -> Tensor:
    """x (1-D) sorted ascending. On CPU by numpy, whose vectorised sort is about 20x torch's there
    (65,536 floats: 0.2 against 4.3 ms; the values, hence the result, are the same)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        import numpy as np

        return torch.from_numpy(np.sort(x.detach().numpy()))
    return x.sort().values


def quantile(x: Tensor, q: float, sample: Tensor | None = None) -> Tensor:
    """Linear-interpolation quantile of all entries of x (numpy's default; float64 rank arithmetic).

    Exact, on any number of elements (torch.quantile stops at 2**24): the two order statistics are
    selected among the entries between two values of a sorted sample that bracket them (verified by
    counting; else a plain kthvalue over everything). `sample`: a sorted sample of x, if at hand.
    """
    x = x.reshape(-1)
    n = x.numel()
    pos = q * (n - 1)
    i = min(int(math.floor(pos)), n - 1)
    frac = pos - i
    need = 1 if frac == 0 or i + 1 >= n else 2  # order statistics i+1 (and i+2), 1-based
    pair = None
    if n > 1 << 20:
        sample = random_sample(x) if sample is None else sample
        m = sample.numel()
        margin = int(6 * math.sqrt(m * q * (1 - q))) + 16
        lo_v = sample[max(0, int(q * m) - margin)]
        hi_v = sample[min(m - 1, int(q * m) + margin)]
        below = int(torch.count_nonzero(x < lo_v))
        inside = x[(x >= lo_v) & (x <= hi_v)]
        k = i - below  # 0-based rank of order statistic i+1 within `inside`
        if 0 <= k and k + need <= inside.numel():
            pair = inside.kthvalue(k + 1).values, inside.kthvalue(k + need).values
    if pair is None:
        lo = torch.kthvalue(x, i + 1).values
        hi = torch.kthvalue(x, i + 2).values if need == 2 else lo
        pair = lo, hi
    lo, hi = pair
    return lo + (hi - lo) * frac if need == 2 else lo


def candidate_grid(s: Tensor, num_candidates: int = NUM_CANDIDATES, q: float = QUANTILE,
                   sample: Tensor | None = None) -> Tensor:
    """The reference's candidate thresholds: `num_candidates` evenly spaced float32 values from min(s)
    to the q-quantile of s (torch.linspace), on s's device."""
    lo = s.min().float()
    hi = quantile(s, q, sample).float()
    return torch.linspace(float(lo), float(hi), num_candidates, dtype=torch.float32, device=s.device)
