"""CETT thresholds and PPL-k% calibration (SPEC section 1).

Notation for one layer: `a` (N tokens, d_ff) is the input of down_proj, `w_down` (d_model, d_ff) its
weight (columns w_i), y = a @ w_down.T (N, d_model), s = |a| * ||w_i||_2 (N, d_ff) the sizes of the
neurons' contributions, in the units of y. For a threshold t (same units as s),

    CETT_layer(t) = mean over tokens j of || sum_{i: s_ji <= t} a_ji w_i ||_2 / || y_j ||_2

(a token with y_j = 0 counts 0). Kernels here work in float32 whatever the storage dtype.

- `cett`, `candidate_grid`: the definitions.
- `reference_layer_threshold`: the reference per-layer search (16 full products per layer and c).
- `LayerSearch` / `layer_threshold`: ours; the same answer from ~1 full product per layer for the
  first c and almost none for later c (memoised, incremental, sparse updates).
- `calibrate_thresholds`: the PPL-k% search (or a fixed c) on a model -> a v1 `ThresholdFile`;
  `reference_calibrate`: the reference outer search (bisection of c), for the benchmark.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..ffn import FFN, FFNNames, find_ffns, model_fingerprint
from ..masking import SparsityConfig, sparsify_
from ..perplexity import model_device, perplexity
from ..threshold_file import ThresholdFile

NUM_CANDIDATES = 65536  # evenly spaced candidate thresholds per layer (the reference's grid)
QUANTILE = 0.99  # the grid runs from min(s) to this quantile of s
C_TOL = 1e-3  # the reference's tolerance on c in the outer bisection
DEFAULT_MAX_ACTIVATION_MEMORY = 4 * 2**30


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

def _prepare(a: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a as float32 (N, d_ff), W^T float32 (d_ff, d_model), column norms ||w_i|| (d_ff,))."""
    w = w_down.detach().float().to(a.device)
    a2 = a.detach().reshape(-1, w.shape[1]).float()
    return a2, w.t().contiguous(), w.norm(dim=0)


def _mean_ratio(tail_norm: Tensor, y_norm: Tensor) -> float:
    """mean_j ||tail_j|| / ||y_j||, 0 where y_j = 0; accumulated in float64 (a plain float)."""
    ratio = torch.where(y_norm > 0, tail_norm / y_norm.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return float(ratio.double().mean())


def cett(a: Tensor, w_down: Tensor, t: float) -> float:
    """CETT_layer(t): mean over the N tokens of ||sum_{i: s_i <= t} a_i w_i|| / ||y|| (dimensionless).

    a: (..., d_ff) activations entering down_proj (flattened to N tokens); w_down: (d_model, d_ff);
    t: threshold on s_i = |a_i| * ||w_i||_2, in the units of y.
    """
    a2, wt, norms = _prepare(a, w_down)
    s = a2.abs() * norms
    tail = torch.where(s <= t, a2, 0.0) @ wt
    return _mean_ratio(tail.norm(dim=1), (a2 @ wt).norm(dim=1))


def _random_sample(x: Tensor, size: int = 65536) -> Tensor:
    """A fixed pseudo-random sample of the entries of x (same x -> same sample), sorted."""
    flat = x.reshape(-1)
    if flat.numel() <= size:
        return flat.sort().values
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, flat.numel(), (size,), generator=gen).to(flat.device)
    return flat[idx].sort().values


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
        sample = _random_sample(x) if sample is None else sample
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


def reference_layer_threshold(a: Tensor, w_down: Tensor, c: float, num_candidates: int = NUM_CANDIDATES) -> float:
    """The reference per-layer procedure: the largest candidate t with CETT_layer(t) <= c.

    Binary search over the `candidate_grid` indices, each step one full masked (N, d_ff) @ (d_ff, d_model)
    product (16 steps for 65,536 candidates). If no candidate qualifies, returns 0.0 (no masking): the
    seed code silently returns the largest candidate instead, which SPEC calls a bug.
    a: (..., d_ff); w_down: (d_model, d_ff); returns t in the units of s (a float >= 0).
    """
    a2, wt, norms = _prepare(a, w_down)
    s = a2.abs() * norms
    y_norm = (a2 @ wt).norm(dim=1)
    grid = candidate_grid(s, num_candidates)
    lo, hi, best = 0, num_candidates - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        tail = torch.where(s <= grid[mid], a2, 0.0) @ wt
        if _mean_ratio(tail.norm(dim=1), y_norm) <= c:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return float(grid[best]) if best >= 0 else 0.0


# ----------------------------------------------------------------------------------------------
# Our per-layer search
# ----------------------------------------------------------------------------------------------

class LayerSearch:
    """Exact `reference_layer_threshold` answers for one layer, for many c, at a fraction of the cost.

    What it does, and why the answer is the reference's:
    - The same `candidate_grid` and the same test (CETT(grid[k]) <= c), and it ends, like the
      reference's binary search, on adjacent indices lo, lo+1 with CETT(lo) <= c < CETT(lo+1). CETT is
      monotone in t, so that lo is unique: the same index. (On a non-monotone stretch both return a
      crossing, possibly a different one.) Float32 rounding of incremental sums (relative ~1e-6 on
      CETT) can flip a comparison only when c is that close to a CETT value: one grid step, ~1e-5 of t.
    - Memoised CETT values per index survive across c: a new c starts from the tightest bracket the
      memo gives (warm start from the previous c) and usually needs 2-4 cheap steps.
    - Steps interpolate CETT between the bracket ends (the curve is smooth at the scale of the grid),
      with bisection whenever that fails to halve the bracket; with one side known, a slope-based
      extrapolation that overshoots on purpose to bracket the answer. The first c of a layer starts
      from the answer of a `guide` (the same layer on a token subset: default every 8th token), so
      the full data usually needs one dense product, not 16.
    - Incremental tails: tail(t2) = tail(t1) +/- sum over the entries with s in (t1, t2] of a_i w_i, a
      sparse (CSR) product over those entries only. The entries of the current bracket are kept as a
      compact "band" so later steps do not rescan all N x d_ff entries.
    Memory: the activations given (not copied when float32), s (4 B per entry) and the band while
    active, at most 3 tails of N x d_model x 4 B; `release()` frees all but the answer's tail
    (`keep_tail`), which is where the next c starts.
    """

    def __init__(self, a: Tensor, w_down: Tensor, *, y_norm: Tensor | None = None, grid: Tensor | None = None,
                 num_candidates: int = NUM_CANDIDATES, dense_fraction: float = 0.1,
                 guide: "LayerSearch | int | None" = 8, keep_tail: bool = True) -> None:
        w = w_down.detach().float()
        self.d_ff = w.shape[1]
        self.wt = w.t().contiguous()
        self.norms = w.norm(dim=0)
        self.dense_fraction = dense_fraction
        self.keep_tail = keep_tail
        self.memo: dict[int, float] = {}
        self.evaluations = 0
        self.dense_evaluations = 0
        self._tails: dict[int, Tensor] = {}
        self._band: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None  # lo_t, hi_t, flat idx, s, a
        self._s: Tensor | None = None
        self.a: Tensor | None = None
        self.attach(a)
        s = self.sizes()
        self._sample = _random_sample(s)  # sorted: cheap estimates of how many entries lie below t
        self.grid = (candidate_grid(s, num_candidates, sample=self._sample) if grid is None else grid).to(s.device)
        if y_norm is None:
            y_norm = (self._a32() @ self.wt).norm(dim=1)
        self.y_norm = y_norm.float().to(s.device)
        self.guide = guide

    # -- activations ------------------------------------------------------------------------
    def attach(self, a: Tensor) -> None:
        """(Re)attach this layer's activations (N, d_ff); the memo stays valid for the same tokens."""
        self.a = a.detach().reshape(-1, self.d_ff)
        dev = self.a.device
        self.wt, self.norms = self.wt.to(dev), self.norms.to(dev)

    def release(self, drop_activations: bool = False) -> None:
        """Free the working memory (s, band, tails but the answer's tail if keep_tail)."""
        self._s, self._band = None, None
        if not self.keep_tail or drop_activations:
            self._tails.clear()
        if drop_activations:
            self.a = None
            if isinstance(self.guide, LayerSearch):
                self.guide = None  # it viewed these activations

    def _a32(self) -> Tensor:
        return self.a if self.a.dtype == torch.float32 else self.a.float()

    def sizes(self) -> Tensor:
        """s = |a| * ||w_i|| (N, d_ff) float32, cached while active."""
        if self._s is None:
            self._s = self.a.abs().float().mul_(self.norms) if self.a.dtype != torch.float32 \
                else self.a.abs().mul_(self.norms)
        return self._s

    def _count_below(self, t: Tensor) -> float:
        """Estimated number of entries with s <= t (from the sorted sample)."""
        pos = torch.searchsorted(self._sample, t.reshape(1), right=True).item()
        return pos / self._sample.numel() * self.a.numel()

    # -- CETT at one grid index -------------------------------------------------------------
    def cett_at(self, k: int) -> float:
        """CETT(grid[k]) (memoised), from the nearest known tail when cheaper than a dense product."""
        if k in self.memo:
            return self.memo[k]
        t = self.grid[k]
        src, best = None, self.dense_fraction * self.a.numel()
        for kk in self._tails:
            cost = abs(self._count_below(self.grid[kk]) - self._count_below(t))
            if cost < best:
                src, best = kk, cost
        if src is None:
            tail = torch.where(self.sizes() <= t, self._a32(), 0.0) @ self.wt
            self.dense_evaluations += 1
        else:
            lo_t, hi_t = (self.grid[src], t) if src < k else (t, self.grid[src])
            tail = self._add_between(self._tails[src], lo_t, hi_t, 1.0 if src < k else -1.0)
        self.evaluations += 1
        value = _mean_ratio(tail.norm(dim=1), self.y_norm)
        self.memo[k] = value
        self._tails[k] = tail
        return value

    def _scan(self, lo_t: Tensor, hi_t: Tensor) -> tuple[Tensor, Tensor]:
        """(flat indices in row-major order, s values) of all entries with lo_t < s <= hi_t."""
        s = self.sizes().reshape(-1)
        idx = ((s > lo_t) & (s <= hi_t)).nonzero().squeeze(1)
        return idx, s[idx]

    def _add_between(self, tail: Tensor, lo_t: Tensor, hi_t: Tensor, sign: float) -> Tensor:
        """tail + sign * sum of a_i w_i over the entries with lo_t < s <= hi_t, as a new (N, d_model)
        tensor: a scatter-add for a few entries, a CSR product otherwise."""
        band = self._band
        if band is not None and band[0] <= lo_t and hi_t <= band[1]:
            _, _, idx, bs, bv = band
            m = (bs > lo_t) & (bs <= hi_t)
            idx, vals = idx[m], bv[m]
        else:
            idx, _ = self._scan(lo_t, hi_t)
            vals = self.a.reshape(-1)[idx].float()
        rows, cols = idx // self.d_ff, idx % self.d_ff
        if idx.numel() <= 2048:  # sparse kernels have a fixed cost of an O(N) pass; a few rows are cheaper
            return tail.index_add(0, rows, vals[:, None] * self.wt[cols], alpha=sign)
        n = self.a.shape[0]
        crow = torch._convert_indices_from_coo_to_csr(rows, n)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            sparse = torch.sparse_csr_tensor(crow, cols, vals, size=(n, self.d_ff), check_invariants=False)
            return torch.addmm(tail, sparse, self.wt, alpha=sign)

    def _set_band(self, lo: int, hi: int) -> None:
        """Keep the entries with s in (grid[lo], grid[hi]] as a compact list for the next steps."""
        lo_t, hi_t = self.grid[lo], self.grid[hi]
        expected = max(1.0, self._count_below(hi_t) - self._count_below(lo_t))
        band = self._band
        if band is not None and band[0] <= lo_t and hi_t <= band[1]:
            if band[2].numel() <= 4 * expected + 65536:
                return  # tight enough already
            m = (band[3] > lo_t) & (band[3] <= hi_t)
            self._band = (lo_t, hi_t, band[2][m], band[3][m], band[4][m])
            return
        idx, bs = self._scan(lo_t, hi_t)
        self._band = (lo_t, hi_t, idx, bs, self.a.reshape(-1)[idx].float())

    def _keep_tails(self, *keep: int) -> None:
        for k in list(self._tails):
            if k not in keep:
                del self._tails[k]

    # -- the search ----------------------------------------------------------------------------
    def _bracket(self, c: float) -> tuple[int, int]:
        K = len(self.grid)
        hi = min((k for k, v in self.memo.items() if v > c), default=K)
        lo = max((k for k, v in self.memo.items() if v <= c and k < hi), default=-1)
        return lo, hi

    def _slope(self, k: int) -> float | None:
        """dCETT/dk near a memoised k (secant to the nearest memo point at least 1% of k away)."""
        far = [j for j in self.memo if abs(j - k) >= max(2, k // 100)]
        if k in self.memo and far:
            j = min(far, key=lambda j: abs(j - k))
            slope = (self.memo[k] - self.memo[j]) / (k - j)
            return slope if slope > 0 else None
        return None

    def index(self, c: float) -> int:
        """The largest grid index k with CETT(grid[k]) <= c (-1 if none)."""
        K = len(self.grid)
        lo, hi = self._bracket(c)
        wide = lo < 0 or hi >= K or hi - lo > max(64, (hi + lo) // 20)
        guess = self._guess(c) if wide else None
        widths: list[int] = []
        while hi - lo > 1:
            k = self._propose(c, lo, hi, guess, widths)
            if guess is not None:
                guess = (-1, guess[1])  # its index is used once, its slope while one side is unknown
            if self.cett_at(k) <= c:
                lo = k
            else:
                hi = k
            widths.append(hi - lo)
            self._keep_tails(lo, hi)
            if 0 <= lo and hi < K and \
                    self._count_below(self.grid[hi]) - self._count_below(self.grid[lo]) < 0.2 * self.a.numel():
                self._set_band(lo, hi)
        self._keep_tails(lo)
        return lo

    def _propose(self, c: float, lo: int, hi: int, guess: tuple[int, float | None] | None,
                 widths: list[int]) -> int:
        K = len(self.grid)
        if guess is not None and lo < guess[0] < hi:
            return guess[0]
        if lo >= 0 and hi < K:
            if hi - lo <= 2 or (len(widths) >= 3 and widths[-1] > widths[-3] // 2):
                return (lo + hi) // 2  # bisection when interpolation stalls
            v_lo, v_hi = self.memo[lo], self.memo[hi]
            k = lo + (c - v_lo) / max(v_hi - v_lo, 1e-30) * (hi - lo)
            near = lo if k - lo <= hi - k else hi
            if hi - lo > 4 * abs(k - near) + 8:
                # the answer is close to one end: overshoot the estimate by half, so that the far end
                # is replaced (plain interpolation would creep up from one side: regula falsi)
                slope = self._slope(near)
                step = (c - self.memo[near]) / slope if slope else k - near
                k = near + 1.5 * step + (1 if near == lo else -1)
            return min(hi - 1, max(lo + 1, round(k)))
        # one side known: extrapolate with the local slope, overshooting by half to bracket the answer
        known = lo if lo >= 0 else hi
        if known < 0 or known >= K:
            return K // 2
        slope = self._slope(known) or (guess[1] if guess else None)
        if slope:
            step = 1.5 * (c - self.memo[known]) / slope
            step = max(step, known * 0.02 + 1) if lo >= 0 else min(step, -(known * 0.02 + 1))
        else:
            step = (known + 1) if lo >= 0 else -(known + 1) / 2
        return int(min(hi - 1, max(lo + 1, round(known + step))))

    def _guess(self, c: float) -> tuple[int, float | None] | None:
        """(index, slope) of the answer on the guide (a token subset): where the full search starts."""
        guide = self.guide
        if isinstance(guide, int):
            if guide <= 1 or self.a.shape[0] < 64 * guide:
                return None
            guide = self.guide = LayerSearch(self.a[::guide].contiguous(), self.wt.t(), y_norm=self.y_norm[::guide],
                                             grid=self.grid, dense_fraction=self.dense_fraction, guide=None,
                                             keep_tail=self.keep_tail)
        if guide is None:
            return None
        k = guide.index(c)
        slope = None
        if 0 <= k:
            span = max(2, k // 50)
            j = k + span if k + span < len(self.grid) else k - span
            if j >= 0:
                guide.cett_at(j)
                slope = (guide.memo[j] - guide.memo[k]) / (j - k)
        guide.release()
        return (k, slope if slope and slope > 0 else None) if k >= 0 else None

    def threshold(self, c: float) -> float:
        """t for target c: grid[index(c)], or 0.0 when no candidate has CETT <= c."""
        k = self.index(c)
        return float(self.grid[k]) if k >= 0 else 0.0


def layer_threshold(a: Tensor, w_down: Tensor, c: float, *, y_norm: Tensor | None = None,
                    num_candidates: int = NUM_CANDIDATES) -> float:
    """The fast equivalent of `reference_layer_threshold(a, w_down, c)` (see `LayerSearch`).

    a: (..., d_ff); w_down: (d_model, d_ff); y_norm: optional precomputed ||a @ w_down.T|| per token.
    For many c on the same layer keep a `LayerSearch` and call `.threshold(c)` (warm starts).
    """
    search = LayerSearch(a, w_down, y_norm=y_norm, num_candidates=num_candidates, keep_tail=False)
    return search.threshold(c)


# ----------------------------------------------------------------------------------------------
# Dense activations of a model, collected with hooks
# ----------------------------------------------------------------------------------------------

def _y_from_output(ffn: FFN) -> bool:
    """Whether down_proj's own output minus its bias is y = W a (a plain linear / GPT-2 Conv1D)."""
    return isinstance(ffn.down, nn.Linear) or type(ffn.down).__name__ == "Conv1D"


def collect_activations(model: nn.Module, ffns: list[FFN], windows: Tensor, layers: list[int], *,
                        dtype: torch.dtype = torch.float32, y_norms: bool = True, batch_size: int = 1,
                        progress: bool = False, desc: str = "dense pass") -> tuple[dict, dict, dict]:
    """One dense forward over `windows` with read-only hooks: ({layer: a (N, d_ff) in `dtype`},
    {layer: ||y|| (N,) float32, for every layer whose down_proj output gives it in float32},
    perplexity(..., per_window=True) of the dense model). N = n_windows * seq_len, window-major."""
    n = windows.numel()
    acts = {l: torch.empty(n, ffns[l].d_ff, dtype=dtype, device=ffns[l].down_weight().device) for l in layers}
    ys: dict[int, Tensor] = {}
    pos = {l: 0 for l in range(len(ffns))}
    hooks = []

    def pre(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            acts[layer][pos[layer]: pos[layer] + x.shape[0]].copy_(x)
        return hook

    def post(layer: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            p = pos[layer]
            rows = out.numel() // out.shape[-1]
            if out.dtype == torch.float32 and layer in ys:
                y = out.detach().reshape(rows, -1)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    y = y - bias.detach()
                ys[layer][p: p + rows] = y.norm(dim=1)
            pos[layer] = p + rows
        return hook

    try:
        for f in ffns:
            if f.layer in acts:
                hooks.append(f.down.register_forward_pre_hook(pre(f.layer)))
            if y_norms and _y_from_output(f) and f.down_weight().dtype == torch.float32:
                ys[f.layer] = torch.empty(n, dtype=torch.float32, device=f.down_weight().device)
            hooks.append(f.down.register_forward_hook(post(f.layer)))
        ppl = perplexity(model, windows, batch_size, progress=progress, desc=desc, per_window=True)
    finally:
        for h in hooks:
            h.remove()
    bad = [l for l, p in pos.items() if p != n]
    if bad:
        raise RuntimeError(f"FFN hooks saw {pos[bad[0]]} tokens in layer {bad[0]}, expected {n}")
    return acts, ys, ppl


# ----------------------------------------------------------------------------------------------
# PPL-k% calibration
# ----------------------------------------------------------------------------------------------

@dataclass
class _Eval:
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
class _Calibrator:
    """Dense activations collected once (or per layer group beyond the memory budget), one
    LayerSearch per layer with memo surviving across c, sparse PPL passes through the masking core."""

    model: nn.Module
    ffns: list[FFN]
    windows: Tensor
    names: FFNNames | None = None
    batch_size: int = 1
    activation_dtype: torch.dtype = torch.float32
    max_activation_memory: int | None = DEFAULT_MAX_ACTIVATION_MEMORY
    progress: bool = False
    log: Callable[[str], None] = lambda msg: None
    fast: bool = True
    evals: list[_Eval] = field(default_factory=list)
    timing: dict = field(default_factory=lambda: {"collect_s": 0.0, "fit_s": 0.0, "ppl_s": 0.0, "dense_passes": 0})

    def __post_init__(self) -> None:
        L, n = len(self.ffns), self.windows.numel()
        elsize = torch.empty((), dtype=self.activation_dtype).element_size()
        per_layer = [n * f.d_ff * elsize for f in self.ffns]
        tails = [n * f.down_weight().shape[0] * 4 for f in self.ffns]
        budget = self.max_activation_memory
        if budget is not None and max(per_layer) > budget:
            raise UserError(f"--max-activation-memory {_fmt_bytes(budget)} is less than one layer's activations "
                            f"({_fmt_bytes(max(per_layer))} for {n} tokens); raise it, use fewer --tokens or a "
                            f"16-bit --activation-dtype")
        self.keep_tails = self.fast and (budget is None or sum(per_layer) + sum(tails) <= budget)
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
        self._acts: dict[int, Tensor] = {}
        if len(self.groups) > 1:
            self.log(f"activations of {L} layers ({_fmt_bytes(sum(per_layer))}) exceed --max-activation-memory "
                     f"{_fmt_bytes(budget)}: {len(self.groups)} layer groups, one dense pass per group and step")
        start = time.perf_counter()
        acts, self.y_norms, self.dense = collect_activations(
            self.model, self.ffns, self.windows, self.groups[0], dtype=self.activation_dtype,
            batch_size=self.batch_size, progress=self.progress, desc="dense pass (collect activations)")
        self._acts = acts
        self.timing["collect_s"] += time.perf_counter() - start
        self.timing["dense_passes"] += 1
        self.window_nll = self.dense.pop("window_nll")

    # -- thresholds for one c -------------------------------------------------------------
    def _ensure(self, group: list[int]) -> None:
        missing = [l for l in group if l not in self._acts]
        if not missing:
            return
        for l in list(self._acts):  # drop the other group's activations first (the budget)
            if self.searches[l] is not None:
                self.searches[l].release(drop_activations=True)
            self.steer_searches[l] = None
            del self._acts[l]
        start = time.perf_counter()
        self._acts, _, _ = collect_activations(self.model, self.ffns, self.windows, group,
                                               dtype=self.activation_dtype, y_norms=False,
                                               batch_size=self.batch_size, progress=self.progress,
                                               desc="dense pass (layer group)")
        self.timing["collect_s"] += time.perf_counter() - start
        self.timing["dense_passes"] += 1

    def _layer_search(self, l: int, steer_windows: int | None) -> LayerSearch:
        """Layer l's search on all tokens, or on the first `steer_windows` windows' tokens (sharing the
        full grid; it then guides the full search to its first c)."""
        a, w = self._acts[l], self.ffns[l].down_weight()
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
                if not self.fast:
                    out[l] = reference_layer_threshold(self._acts[l], self.ffns[l].down_weight(), c)
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
    def evaluate(self, c: float, thresholds: list[float] | None = None, windows: int | None = None) -> _Eval:
        """Fit at c (unless thresholds are given) and measure the PPL ratio on the first `windows` windows."""
        start = time.perf_counter()
        n_win = self.windows.shape[0] if windows is None else windows
        for ev in self.evals:
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
            summary = _zero_sparsity(self.ffns, n_win * self.windows.shape[1])
        ev = _Eval(c, thresholds, ratio, ppl_value, summary, n_win, fit_s, ppl_s)
        self.evals.append(ev)
        self.log(f"c={c:.5f}: ppl_ratio={ratio:.5f} on {n_win} windows, mean sparsity {summary['mean']:.4f} "
                 f"(fit {fit_s:.1f} s, ppl {ppl_s:.1f} s)")
        return ev


def _zero_sparsity(ffns: list[FFN], tokens: int) -> dict:
    return {"tokens": tokens, "mean": 0.0, "activation_ratio": 1.0, "per_layer": [0.0] * len(ffns)}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


class _Bracket:
    """Evaluated (c, ratio) points of one fidelity: the largest feasible c (`lo`, ratio <= target) and the
    smallest infeasible one (`hi`), and the next c to try."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.points: dict[float, float] = {0.0: 1.0}  # c = 0: all thresholds 0, the dense model itself

    def add(self, c: float, ratio: float) -> None:
        self.points[c] = ratio

    @property
    def hi(self) -> float | None:
        return min((c for c, r in self.points.items() if r > self.target), default=None)

    @property
    def lo(self) -> float:
        hi = self.hi
        return max(c for c, r in self.points.items() if r <= self.target and (hi is None or c < hi))

    def model_root(self, aim: float, beta_prior: float | None, c0: float) -> float:
        """Where a power law ratio - 1 = A c^beta through the evaluated points reaches `aim`: anchored
        at the point nearest `aim` (in log(ratio - 1)); beta from the two points nearest the bracket
        ends (else `beta_prior`, else 1.5). `c0` when there is no point with ratio > 1 yet."""
        pts = sorted((c, r) for c, r in self.points.items() if c > 0 and r > 1)
        if not pts:
            lo = self.lo
            return c0 if lo == 0 else 4 * lo
        beta = None
        if len(pts) >= 2:
            lo, hi = self.lo, self.hi
            below = [p for p in pts if p[0] <= lo]
            above = [p for p in pts if hi is not None and p[0] >= hi]
            if below and above:
                a, b = below[-1], above[0]
            else:
                a, b = sorted(sorted(pts, key=lambda p: abs(math.log((p[1] - 1) / (aim - 1))))[:2])
            if a[0] != b[0] and a[1] != b[1]:
                beta = (math.log(b[1] - 1) - math.log(a[1] - 1)) / (math.log(b[0]) - math.log(a[0]))
                beta = beta if 0 < beta < 50 else None
        beta = beta or beta_prior or 1.5
        anchor = min(pts, key=lambda p: abs(math.log((p[1] - 1) / (aim - 1))))
        return anchor[0] * math.exp(math.log((aim - 1) / (anchor[1] - 1)) / beta)

    def propose(self, aim: float, c_tol: float, beta_prior: float | None, c0: float, n0: int = 1) -> float:
        """The model's root, safeguarded.

        While no infeasible c is known, the root itself, but above the best feasible c (by c_tol / 2,
        then by 5%, then doubling it). Once the bracket [lo, hi] exists, the root is projected as
        in the ITP method (Oliveira & Takahashi 2020) onto a neighbourhood of the bracket's midpoint
        that shrinks with each step, so that the bracket reaches c_tol in at most
        ceil(log2((hi - lo) / c_tol)) + n0 steps (bisection's count + n0), however bad the model."""
        lo, hi = self.lo, self.hi
        c = self.model_root(aim, beta_prior, c0)
        if hi is None:
            self._expansions = getattr(self, "_expansions", 0) + (lo > 0)
            floor = lo * (1.0, 1.0, 1.05)[self._expansions] if self._expansions <= 2 else 2 * lo
            floor += c_tol / 2
            return min(1.0, max(c, floor))
        if getattr(self, "_itp", None) is None:
            self._itp = [0, math.ceil(math.log2(max((hi - lo) / c_tol, 1.0))) + n0]  # [step j, n_max]
        j, n_max = self._itp
        self._itp[0] += 1
        margin = min(0.02 * (hi - lo), c_tol / 4)
        c = min(hi - margin, max(lo + margin, c))
        if lo == 0:
            c = max(c, min(c_tol, hi / 2))  # below c_tol the search cannot tell c from 0 anyway
        half = (lo + hi) / 2
        radius = (c_tol / 2) * 2 ** (n_max - j) - (hi - lo) / 2
        if abs(c - half) > radius:
            c = half + math.copysign(max(radius, 0.0), c - half)
        return c


def _search(cal: _Calibrator, target: float, *, c_tol: float, ratio_tol: float, c0: float,
            steer_windows: int | None, max_steps: int) -> _Eval:
    """The largest c (to c_tol, or with ratio within ratio_tol below target) whose thresholds keep
    PPL(sparse)/PPL(dense) <= target on all calibration windows.

    1. Steering (cheap): up to 4 probes on the first `steer_windows` windows, with thresholds fitted on
       those windows' tokens only, locate where the curve crosses the target and its log-log slope.
    2. All windows, exact thresholds: power-law root estimates from there, ITP-safeguarded once a
       bracket exists (then at most bisection's count + 1 more passes; the reference's bisection
       takes 10); stop once the best feasible c has ratio >= target - ratio_tol or the bracket is
       <= c_tol (the reference's resolution).
    """
    ratio_tol = min(ratio_tol, (target - 1) / 4)
    aim = target - ratio_tol / 2
    beta_prior = None
    if steer_windows and steer_windows < cal.windows.shape[0]:
        steer = _Bracket(target)
        for step in range(4):
            c = steer.propose(aim, c_tol, None, c0)
            steer.add(c, cal.evaluate(c, windows=steer_windows).ratio)
            lo, hi = steer.lo, steer.hi
            if (lo > 0 and steer.points[lo] >= target - 2 * ratio_tol) or lo >= 1.0 or \
                    (hi is not None and hi - lo <= c_tol):
                break
        if sum(1 for c, r in steer.points.items() if c > 0 and r > 1) >= 2:
            beta_prior = _steer_beta(steer, aim)
        c0 = min(1.0, max(c_tol, steer.model_root(aim, beta_prior, c0)))
    full = _Bracket(target)
    results: dict[float, _Eval] = {}
    for step in range(max_steps):
        c = full.propose(aim, c_tol, beta_prior, c0)
        ev = cal.evaluate(c)
        full.add(c, ev.ratio)
        results[c] = ev
        lo, hi = full.lo, full.hi
        if lo > 0 and full.points[lo] >= target - ratio_tol:
            break
        if (hi is not None and hi - lo <= c_tol) or lo >= 1.0 or (hi is None and 1.0 - lo <= c_tol):
            break
    lo, hi = full.lo, full.hi
    if lo == 0.0:
        r_hi = full.points[hi] if hi is not None else float("nan")
        raise UserError(f"--target-ppl-ratio {target:g}: unreachable: the smallest c the search resolves "
                        f"(c={hi:.4g}) already gives PPL ratio {r_hi:.6f}; thresholds would all be 0 (dense). "
                        f"Use a larger ratio or a fixed --cett")
    return results[lo]


def _steer_beta(steer: _Bracket, aim: float) -> float | None:
    """log-log slope of the steering points nearest the target (the prior for the full data)."""
    pts = sorted((c, r) for c, r in steer.points.items() if c > 0 and r > 1)
    a, b = sorted(sorted(pts, key=lambda p: abs(math.log((p[1] - 1) / (aim - 1))))[:2])
    if a[0] == b[0] or a[1] == b[1]:
        return None
    beta = (math.log(b[1] - 1) - math.log(a[1] - 1)) / (math.log(b[0]) - math.log(a[0]))
    return beta if 0 < beta < 50 else None


def check_target(target_ppl_ratio: float | None, cett: float | None) -> None:
    """UserError unless exactly one is given: a PPL ratio target r > 1, or a fixed CETT c in [0, 1]."""
    if (target_ppl_ratio is None) == (cett is None):
        raise UserError("give exactly one of --target-ppl-ratio and --cett")
    if target_ppl_ratio is not None and not (math.isfinite(target_ppl_ratio) and target_ppl_ratio > 1):
        raise UserError(f"--target-ppl-ratio {target_ppl_ratio:g}: must be > 1 (e.g. 1.01 for PPL-1%)")
    if cett is not None and not (math.isfinite(cett) and 0 <= cett <= 1):
        raise UserError(f"--cett {cett:g}: must be in [0, 1]")


def calibrate_thresholds(model: nn.Module, windows: Tensor, target_ppl_ratio: float | None = None,
                         cett: float | None = None, *, names: FFNNames | None = None, batch_size: int = 4,
                         activation_dtype: torch.dtype | str = torch.float32,
                         max_activation_memory: int | None = DEFAULT_MAX_ACTIVATION_MEMORY,
                         c_tol: float = C_TOL, ratio_tol: float = 5e-4, c0: float = 0.1,
                         steer_windows: int | None = -1, max_steps: int = 30, progress: bool = False,
                         log: Callable[[str], None] | None = None, data: dict | None = None) -> ThresholdFile:
    """Per-layer CETT thresholds for `model` fitted on `windows` (LongTensor (n_windows, seq_len)).

    Exactly one of:
    - target_ppl_ratio r > 1 (PPL-k%: r = 1 + k/100): the largest c with PPL(sparse at t(c)) /
      PPL(dense) <= r on these windows, found to within c_tol in c, or earlier once the ratio is within
      ratio_tol below r (the reference bisects c in [0, 1] to 1e-3; the final ratios agree within
      max(ratio_tol, the ratio's change over 1e-3 in c));
    - cett c in [0, 1]: thresholds at that c.
    "Unreachable" target: PPL ratio at c = 0 is exactly 1 (all thresholds 0 = the dense model), so
    any r > 1 is met by c = 0; a target is refused (UserError) when no c >= the resolution c_tol
    found by the search meets it, i.e. the ratio budget is below what masking anything costs.

    How (target mode): one dense pass collects every layer's down_proj input `a` and ||y|| with hooks
    (and the dense per-window NLL); steering probes on a quarter of the windows (thresholds fitted on
    those tokens only) locate the crossing and its log-log slope; then full passes at power-law root
    estimates, ITP-safeguarded (`_search`). Each c is fitted per layer by `LayerSearch` (exact
    reference answers, warm-started across c). On SmolLM2-135M / 8192 tokens: 1 dense + 4 quarter +
    2 full sparse passes, versus 1 + 10 full passes and 16 dense products per layer and step.

    Memory: the activations of all layers, L x N x d_ff x (4 B float32 | 2 B for a 16-bit
    activation_dtype, which rounds them), plus per-layer cached tails L x N x d_model x 4 B when they
    fit, are held at once if within `max_activation_memory` (bytes; None = unbounded); beyond it,
    layers are processed in groups that fit, recollected by a dense pass per group and step (same
    thresholds, slower). Working memory beyond that: about 3 x N x d_ff x 4 B for the layer being
    fitted, plus the model's own forward (batch_size x seq_len x vocab logits). SmolLM2-135M, 8192
    tokens: 1.41 GiB activations + 0.53 GiB tails; process peak RSS about 4 GiB.
    steer_windows: windows used by the cheap first probes (-1: a quarter of them if there are >= 8,
    0/None: no steering).
    Errors (UserError): both/neither of target/cett, r <= 1, c outside [0, 1], no FFNs, no tokens.
    """
    check_target(target_ppl_ratio, cett)
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise UserError(f"too little data: need at least one window of >= 2 tokens, got {tuple(windows.shape)}")
    if isinstance(activation_dtype, str):
        activation_dtype = _DTYPES.get(activation_dtype)
        if activation_dtype is None:
            raise UserError(f"--activation-dtype: one of {', '.join(_DTYPES)}")
    ffns = find_ffns(model, names)
    if not ffns:
        raise UserError(f"{type(model).__name__}: no FFN layers found")
    log = log or (lambda msg: None)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        cal = _Calibrator(model, ffns, windows, names=names, batch_size=batch_size,
                          activation_dtype=activation_dtype, max_activation_memory=max_activation_memory,
                          progress=progress, log=log)
        log(f"dense perplexity {cal.dense['perplexity']:.4f} on {windows.shape[0]} x {windows.shape[1]} tokens")
        if cett is not None:
            final = cal.evaluate(cett)
        else:
            if steer_windows is not None and steer_windows < 0:
                q = max(1, windows.shape[0] // 4)
                steer_windows = q if windows.shape[0] >= 8 else None
            final = _search(cal, target_ppl_ratio, c_tol=c_tol, ratio_tol=ratio_tol, c0=c0,
                            steer_windows=steer_windows, max_steps=max_steps)
    finally:
        model.train(was_training)
    total = time.perf_counter() - start
    evals = [e for e in cal.evals]
    calibration = {
        "method": "cett",
        "cett": final.c,
        "target_ppl_ratio": target_ppl_ratio,
        "ppl_ratio": final.ratio,
        "ppl_dense": cal.dense["perplexity"],
        "ppl_sparse": final.ppl,
        "data": dict(data or {}),
        "tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "search": [{"cett": e.c, "ppl_ratio": e.ratio, "windows": e.windows, "sparsity": e.sparsity["mean"]}
                   for e in evals],
        "timing": {"total_s": round(total, 3), **{k: round(v, 3) for k, v in cal.timing.items()},
                   "sparse_passes": len(evals)},
        "memory": {"activation_dtype": str(activation_dtype).replace("torch.", ""),
                   "activation_bytes": cal.activation_bytes, "layer_groups": len(cal.groups),
                   "max_activation_memory": max_activation_memory, **_peak_memory(model_device(model))},
    }
    sparsity = {"mean": final.sparsity["mean"], "per_layer": final.sparsity["per_layer"],
                "tokens": final.sparsity["tokens"]}
    fingerprint = model_fingerprint(model, ffns)
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return ThresholdFile(thresholds=[float(t) for t in final.thresholds],
                         model={"name_or_path": name or None, **fingerprint},
                         calibration=calibration, sparsity=sparsity)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _peak_memory(device: torch.device) -> dict:
    """Process peak resident memory (CPU) and peak allocated accelerator memory, where measurable."""
    out: dict = {}
    try:
        import resource

        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        pass
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


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
    cal = _Calibrator(model, ffns, windows, names=names, batch_size=batch_size, max_activation_memory=None,
                      progress=progress, log=log or (lambda m: None), fast=False)
    lo, hi = 0.0, 1.0
    best = _Eval(0.0, [0.0] * len(ffns), 1.0, cal.dense["perplexity"], _zero_sparsity(ffns, windows.numel()),
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
        out["activations"] = cal._acts
        out["y_norms"] = cal.y_norms
    return out
