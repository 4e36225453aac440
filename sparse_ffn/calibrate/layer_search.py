"""Our per-layer CETT threshold search: the reference's answer (`calibrate.reference`) at a fraction of
its cost (see `LayerSearch`)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from sparse_ffn.calibrate.cett_kernels import NUM_CANDIDATES, candidate_grid, mean_ratio, random_sample


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
        self._sample = random_sample(s)  # sorted: cheap estimates of how many entries lie below t
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
        value = mean_ratio(tail.norm(dim=1), self.y_norm)
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
