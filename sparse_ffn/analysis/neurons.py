"""Neuronal Disentanglement (SPEC section 3): how far each output neuron of one FFN linear moves when the
linear is computed sparsely with n = 1, 2, 4, ... experts, and whether non-Gaussian neurons gain most.

    experts = calibrate_linear(x_calib, weight, [1, 2, 4], ExpertsSettings(num_clusters=1, sparsity=0.9))
    m = measure_linear(chunks, weight, bias, experts, capacity=8192, seed=0)   # chunks of inputs (t, d_in)
    stats = neuron_stats(m.dense, m.sparse)        # per neuron: WD_n, RI_n, non-Gaussianity, kurtosis
    summary = linear_summary(stats, n_boot=1000, seed=0)   # distributions over neurons, Spearman + CI

Definitions, per output neuron j, over the same measured tokens (never calibration tokens):
- dense sample d = W[j, :] x + b_j; sparse sample s^n = E^n_c(x)[j, :] x + b_j, c(x) the token's cluster
  under the n-cluster router, E^n_k that cluster's SparseGPT-pruned copy of W (n = 1: plain SparseGPT).
  Both see the same input x (only this linear differs), in float32, in the linear's output units.
- WD_n = W1(d, s^n); for equal sizes m exactly mean_k |d_(k) - s^n_(k)| over the sorted samples
  (`wasserstein_1d`, all neurons at once, float64).
- RI_n = (WD_1 - WD_n) / WD_1 (NaN where WD_1 = 0; RI_1 = 0).
- non-Gaussianity = W1(z, N(0, 1)) of the standardised dense sample z = (d - mean) / std (population
  std), computed exactly (not against m sample quantiles): the empirical quantile function is z_(k) on
  u in ((k-1)/m, k/m], so W1 = sum_k int_{a_k}^{b_k} |z_(k) - t| phi(t) dt with a_k = Phi^-1((k-1)/m),
  b_k = Phi^-1(k/m); with c = clip(z_(k), a_k, b_k) each term is
      z_(k) (2 Phi(c) - (2k - 1)/m) + 2 phi(c) - phi(a_k) - phi(b_k)          (phi(+-inf) = 0).
  Excess kurtosis = m4 / m2^2 - 3 (population moments, scipy's default). Both NaN for a constant neuron.

Memory is bounded by `capacity` (`PairedReservoir`): Algorithm R with a seeded generator keeps a
uniform sample of `capacity` token positions of the stream, the same positions for the dense and every
sparse sample and for every neuron, so all samples have the same size m = min(tokens, capacity) and are
paired token by token. Memory: capacity x d_out x (1 + number of n) float32.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

# -- sparse_ffn dependencies (the Sparse Expansion calibration pieces) ---------------------------------
from sparse_ffn.calibrate.experts import ExpertsSettings, cluster_hessians, fit_router, prune_experts
from sparse_ffn.core.router import Router

WD_CHUNK_COLUMNS = 512  # neurons sorted at once: bounds the float64 working copies to m x 512


# ------------------------------------------------------------------------------------------------
# Distances and shape statistics, all neurons (columns) at once
# ------------------------------------------------------------------------------------------------

def sort_columns(x: Tensor) -> Tensor:
    """Each column of x (m, N) sorted, as the rows of a float64 (N, m) CPU tensor (sorting contiguous rows
    is ~5x faster than sorting along dim 0 of a strided view)."""
    out = torch.empty(x.shape[1], x.shape[0], dtype=torch.float64)
    for i in range(0, x.shape[1], WD_CHUNK_COLUMNS):
        # sort in the input dtype (float32 -> float64 is exact and monotone), then widen
        out[i:i + WD_CHUNK_COLUMNS] = torch.sort(x[:, i:i + WD_CHUNK_COLUMNS].T.contiguous().cpu(), dim=1).values.double()
    return out


def wasserstein_1d(a: Tensor, b: Tensor) -> Tensor:
    """W1 between column j of `a` and column j of `b` for every j: a, b (m, N), equal sizes -> (N,) float64.

    Exact for equal sizes: the mean absolute difference of the sorted columns."""
    if a.dim() != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"need two non-empty (m, N) samples of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = torch.empty(a.shape[1], dtype=torch.float64)
    for i in range(0, a.shape[1], WD_CHUNK_COLUMNS):
        j = slice(i, i + WD_CHUNK_COLUMNS)
        out[j] = (sort_columns(a[:, j]) - sort_columns(b[:, j])).abs().mean(1)
    return out


def standardise(x: Tensor) -> Tensor:
    """(x - column mean) / column std (population), float64 (m, N); constant columns become NaN."""
    x = x.double()
    std = x.std(0, unbiased=False)
    return (x - x.mean(0)) / torch.where(std > 0, std, torch.full_like(std, math.nan))


def _phi(t: Tensor) -> Tensor:
    return torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def normal_wasserstein(z: Tensor) -> Tensor:
    """Exact W1 between the empirical distribution of each column of z (m, N) and N(0, 1) -> (N,) float64.

    Closed form per quantile interval (module docstring); a NaN column gives NaN."""
    if z.dim() != 2 or z.shape[0] == 0:
        raise ValueError(f"need a non-empty (m, N) sample, got {tuple(z.shape)}")
    return normal_wasserstein_sorted(sort_columns(z))


def normal_wasserstein_sorted(zs: Tensor) -> Tensor:
    """`normal_wasserstein` of samples given as sorted rows: zs (N, m), each row ascending -> (N,) float64."""
    m = zs.shape[1]
    k = torch.arange(1, m + 1, dtype=torch.float64)
    lo = torch.special.ndtri((k - 1) / m)  # -inf for k = 1
    hi = torch.special.ndtri(k / m)  # +inf for k = m
    mid = (2 * k - 1) / m
    ends = _phi(lo) + _phi(hi)
    out = torch.empty(zs.shape[0], dtype=torch.float64)
    for i in range(0, zs.shape[0], WD_CHUNK_COLUMNS):
        z = zs[i:i + WD_CHUNK_COLUMNS].double()
        c = torch.maximum(torch.minimum(z, hi), lo)
        out[i:i + WD_CHUNK_COLUMNS] = (z * (2 * torch.special.ndtr(c) - mid) + 2 * _phi(c) - ends).sum(1)
    return out


def excess_kurtosis(x: Tensor) -> Tensor:
    """m4 / m2^2 - 3 per column of x (m, N) (population moments, as scipy.stats.kurtosis) -> (N,) float64."""
    d = x.double() - x.double().mean(0)
    m2 = (d * d).mean(0)
    m4 = (d ** 4).mean(0)
    return torch.where(m2 > 0, m4 / (m2 * m2) - 3.0, torch.full_like(m2, math.nan)).cpu()


# ------------------------------------------------------------------------------------------------
# Streaming: one reservoir of token positions shared by every sample
# ------------------------------------------------------------------------------------------------

class PairedReservoir:
    """A uniform sample of `capacity` tokens of a stream (Algorithm R, seeded), for several named samples.

    `add(dense=..., n2=...)` takes one chunk per name (t, width each, the same t tokens); every name keeps
    the same token positions, so the samples stay equal in size and paired. Token i (0-based) fills slot
    i while i < capacity, later it replaces slot j = floor(u (i + 1)) if j < capacity (u ~ U[0, 1) from a
    CPU generator seeded with `seed`, one draw per token past the capacity, in stream order: the sample
    does not depend on how the stream is chunked). Buffers are float32 on the CPU.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity {capacity}: must be >= 1")
        self.capacity = int(capacity)
        self.seen = 0
        self.positions = torch.full((self.capacity,), -1, dtype=torch.long)  # stream index held by each slot
        self.buffers: dict[str, Tensor] = {}
        self._gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def next_slots(self, t: int) -> Tensor:
        """The slot of each of the next t tokens (-1: not kept); advances the stream."""
        i = torch.arange(self.seen, self.seen + t, dtype=torch.long)
        slot = i.clone()
        late = i >= self.capacity
        n_late = int(late.sum())
        if n_late:
            u = torch.rand(n_late, generator=self._gen, dtype=torch.float64)
            j = torch.floor(u * (i[late] + 1).double()).long()
            slot[late] = torch.where(j < self.capacity, j, torch.full_like(j, -1))
        self.seen += t
        return slot

    def add(self, **chunks: Tensor) -> None:
        """Offer the next t tokens: one (t, width) tensor per name (the same names every time)."""
        if not chunks:
            raise ValueError("nothing to add")
        t = next(iter(chunks.values())).shape[0]
        if any(v.dim() != 2 or v.shape[0] != t for v in chunks.values()):
            raise ValueError("every chunk must be (t, width) for the same t")
        if self.buffers and set(chunks) != set(self.buffers):
            raise ValueError(f"names {sorted(chunks)} differ from the first chunk's {sorted(self.buffers)}")
        for name, v in chunks.items():
            if name not in self.buffers:
                self.buffers[name] = torch.zeros(self.capacity, v.shape[1], dtype=torch.float32)
        start = self.seen
        slot = self.next_slots(t)
        keep = slot >= 0
        if not bool(keep.any()):
            return
        winner = torch.full((self.capacity,), -1, dtype=torch.long)  # last token of the chunk per slot wins
        winner.scatter_reduce_(0, slot[keep], torch.arange(t)[keep], reduce="amax")
        dest = (winner >= 0).nonzero().flatten()
        src = winner[dest]
        self.positions[dest] = start + src
        for name, v in chunks.items():
            self.buffers[name][dest] = v.detach()[src.to(v.device)].float().cpu()

    def samples(self) -> dict[str, Tensor]:
        """{name: (m, width)} with m = min(tokens seen, capacity), rows paired across names."""
        m = min(self.seen, self.capacity)
        return {k: b[:m] for k, b in self.buffers.items()}


# ------------------------------------------------------------------------------------------------
# Sparse computation of one linear with n experts
# ------------------------------------------------------------------------------------------------

@dataclass
class LinearExperts:
    """n pruned copies of one linear's weight and the router that picks one per token."""

    clusters: int
    router: Router
    experts: Tensor  # (n, d_out, d_in) float32
    info: dict = field(default_factory=dict)  # provenance: source, settings, router and pruning stats


def routed_linear(x: Tensor, lin: LinearExperts, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out (t, d_out) float32, cluster (t,)): out[i] = experts[c_i] x_i + bias, c_i = router(x_i)."""
    x = x.float()
    ex = lin.experts.to(x.device)
    b = None if bias is None else bias.to(x.device).float()
    clusters = lin.router.to(x.device).route(x)
    if lin.clusters == 1:
        return torch.nn.functional.linear(x, ex[0], b), clusters
    out = x.new_empty(x.shape[0], ex.shape[1])
    for k in range(lin.clusters):
        idx = (clusters == k).nonzero().flatten()
        if idx.numel():
            out[idx] = torch.nn.functional.linear(x[idx], ex[k], b)
    return out, clusters


def calibrate_linear(x: Tensor, weight: Tensor, clusters: Sequence[int], settings: ExpertsSettings, *,
                     device: torch.device | str = "cpu", where: str = "linear",
                     log: Callable[[str], None] | None = None) -> list[LinearExperts]:
    """For each n in `clusters`: a router fitted on the calibration inputs x (tokens, d_in) (PCA + k-means;
    none for n = 1), per-cluster Hessians 2/n_k X_k^T X_k and SparseGPT copies of `weight` (d_out, d_in):
    what `calibrate experts` does for this one linear (`settings` with num_clusters replaced by n)."""
    device = torch.device(device)
    out = []
    for n in clusters:
        t0 = time.perf_counter()
        s = dataclasses.replace(settings, num_clusters=int(n))
        router, labels, rstats = fit_router(x, s, device)
        hessians = cluster_hessians(x, labels, s.num_clusters, device)
        rstats["tokens_per_cluster"] = [c for _, c in hessians]
        w, estats = prune_experts(weight.detach().float().to(device), hessians, s, f"{where}, n={n}")
        del hessians
        seconds = round(time.perf_counter() - t0, 3)
        out.append(LinearExperts(s.num_clusters, router, w.float().cpu(),
                                 {"source": "calibrated here", "settings": s.to_json(), "router": rstats,
                                  "experts": estats, "seconds": seconds}))
        if log is not None:
            log(f"{where}: n={n} calibrated in {seconds:.1f} s (tokens per cluster {rstats['tokens_per_cluster']})")
    return out


@dataclass
class Measurement:
    """Paired samples of one linear's outputs over the measured tokens (rows: the same tokens)."""

    dense: Tensor  # (m, d_out) float32
    sparse: dict[int, Tensor]  # n -> (m, d_out) float32
    tokens: int  # tokens streamed (m = min(tokens, capacity))
    positions: Tensor  # (m,) stream index of each kept token
    usage: dict[int, list[int]]  # n -> measured tokens per expert (all streamed tokens)
    rel_error: dict[int, float]  # n -> sum (s - d)^2 / sum d^2 over all streamed tokens and neurons


def measure_linear(chunks: Iterable[Tensor], weight: Tensor, bias: Tensor | None, experts: Sequence[LinearExperts],
                   capacity: int, seed: int = 0, device: torch.device | str | None = None) -> Measurement:
    """Stream the inputs (chunks of (t, d_in)) of one linear with weight (d_out, d_in) through the dense
    weight and every `experts` entry; keep a paired reservoir sample of the outputs (module docstring)."""
    ns = [e.clusters for e in experts]
    if len(set(ns)) != len(ns):
        raise ValueError(f"cluster counts {ns} repeat")
    res = PairedReservoir(capacity, seed)
    usage = {n: torch.zeros(n, dtype=torch.long) for n in ns}
    err = {n: 0.0 for n in ns}
    ref = 0.0
    for x in chunks:
        dev = torch.device(device) if device is not None else x.device
        x = x.to(dev).float().reshape(-1, weight.shape[1])
        w = weight.to(dev).float()
        dense = torch.nn.functional.linear(x, w, None if bias is None else bias.to(dev).float())
        out = {"dense": dense}
        ref += float((dense.double() ** 2).sum())
        for e in experts:
            s, c = routed_linear(x, e, bias)
            usage[e.clusters] += torch.bincount(c.cpu(), minlength=e.clusters)
            err[e.clusters] += float(((s.double() - dense.double()) ** 2).sum())
            out[f"n{e.clusters}"] = s
        res.add(**out)
    if res.seen == 0:
        raise ValueError("no tokens measured")
    got = res.samples()
    m = min(res.seen, res.capacity)
    return Measurement(dense=got["dense"], sparse={n: got[f"n{n}"] for n in ns}, tokens=res.seen,
                       positions=res.positions[:m].clone(), usage={n: u.tolist() for n, u in usage.items()},
                       rel_error={n: err[n] / ref if ref > 0 else math.nan for n in ns})


# ------------------------------------------------------------------------------------------------
# Per-neuron and per-linear statistics
# ------------------------------------------------------------------------------------------------

@dataclass
class NeuronStats:
    """Per output neuron (N = d_out): all float64 (N,) tensors; NaN where undefined."""

    clusters: list[int]  # the n, ascending (1 first)
    wd: dict[int, Tensor]  # n -> WD(dense, sparse_n), output units
    ri: dict[int, Tensor]  # n -> (WD_1 - WD_n) / WD_1
    non_gaussianity: Tensor  # W1(standardised dense, N(0, 1)), standard deviations
    kurtosis: Tensor  # excess kurtosis of the dense sample
    mean: Tensor  # dense mean
    std: Tensor  # dense std (population)


def neuron_stats(dense: Tensor, sparse: dict[int, Tensor]) -> NeuronStats:
    """Everything per neuron from paired samples dense (m, N) and sparse {n: (m, N)} (n = 1 required)."""
    if 1 not in sparse:
        raise ValueError("RI needs the n = 1 (SparseGPT) sample")
    ns = sorted(sparse)
    if any(sparse[n].shape != dense.shape for n in ns) or dense.dim() != 2 or dense.shape[0] == 0:
        raise ValueError("dense and every sparse sample must be the same non-empty (m, N)")
    ds = sort_columns(dense)  # (N, m), sorted once for every n and the non-Gaussianity
    wd = {n: (ds - sort_columns(sparse[n])).abs().mean(1) for n in ns}
    base = wd[1]
    nan = torch.full_like(base, math.nan)
    ri = {n: torch.where(base > 0, (base - wd[n]) / torch.where(base > 0, base, 1.0), nan) for n in ns}
    d = dense.double().cpu()
    mean, std = d.mean(0), d.std(0, unbiased=False)
    zs = (ds - mean[:, None]) / torch.where(std > 0, std, torch.full_like(std, math.nan))[:, None]  # still sorted
    return NeuronStats(clusters=ns, wd=wd, ri=ri, non_gaussianity=normal_wasserstein_sorted(zs),
                       kurtosis=excess_kurtosis(d), mean=mean, std=std)


def distribution(values: Tensor | np.ndarray) -> dict:
    """Summary of the finite values: {"count", "nan", "mean", "std", "min", "p10", "p25", "median", "p75",
    "p90", "max"} (None where there is no finite value)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = v[np.isfinite(v)]
    out: dict = {"count": int(ok.size), "nan": int(v.size - ok.size)}
    keys = ("min", "p10", "p25", "median", "p75", "p90", "max")
    if not ok.size:
        return {**out, "mean": None, "std": None, **{k: None for k in keys}}
    q = np.quantile(ok, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
    return {**out, "mean": float(ok.mean()), "std": float(ok.std()), **{k: float(x) for k, x in zip(keys, q)}}


def spearman_bootstrap(x: Tensor | np.ndarray, y: Tensor | np.ndarray, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """Spearman's rho between x and y (N,) over the neurons where both are finite, with scipy's p-value and
    a percentile bootstrap CI: `n_boot` resamples of the neurons with replacement (numpy generator
    seeded with `seed`), ranks recomputed per resample (average ranks for ties)."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    out: dict = {"rho": None, "p_value": None, "ci": [None, None], "level": level, "n": n, "n_boot": n_boot,
                 "seed": seed, "method": "percentile bootstrap over neurons"}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    r = stats.spearmanr(x, y)
    rng = np.random.default_rng(seed)
    rhos = []
    for start in range(0, n_boot, 256):
        idx = rng.integers(0, n, size=(min(256, n_boot - start), n))
        rx, ry = stats.rankdata(x[idx], axis=1), stats.rankdata(y[idx], axis=1)
        rx -= rx.mean(1, keepdims=True)
        ry -= ry.mean(1, keepdims=True)
        den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            rhos.append(np.where(den > 0, (rx * ry).sum(1) / den, np.nan))
    boot = np.concatenate(rhos) if rhos else np.array([np.nan])
    lo, hi = (np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)]) if np.isfinite(boot).any()
              else (np.nan, np.nan))
    return {**out, "rho": float(r.statistic), "p_value": float(r.pvalue), "ci": [finite(lo), finite(hi)]}


def finite(v: float) -> float | None:
    """v as a float, None when NaN or infinite (JSON has no NaN)."""
    v = float(v)
    return v if math.isfinite(v) else None


def finite_list(t: Tensor | np.ndarray) -> list[float | None]:
    """A 1-D tensor/array as a JSON-safe list (NaN -> None)."""
    return [finite(v) for v in np.asarray(t, dtype=np.float64).ravel().tolist()]


def linear_summary(stats: NeuronStats, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per linear: distributions over neurons of WD_n, RI_n, non-Gaussianity and kurtosis; Spearman
    correlation (bootstrap CI) of non-Gaussianity and of kurtosis with RI_n for every n > 1."""
    corr = {}
    for n in stats.clusters[1:]:
        corr[str(n)] = {"non_gaussianity_vs_ri": spearman_bootstrap(stats.non_gaussianity, stats.ri[n], n_boot, seed),
                        "kurtosis_vs_ri": spearman_bootstrap(stats.kurtosis, stats.ri[n], n_boot, seed)}
    return {"wd": {str(n): distribution(stats.wd[n]) for n in stats.clusters},
            "ri": {str(n): distribution(stats.ri[n]) for n in stats.clusters[1:]},
            "non_gaussianity": distribution(stats.non_gaussianity),
            "kurtosis": distribution(stats.kurtosis),
            "spearman": corr,
            "wd_falls": {str(n): finite(float((stats.wd[n] < stats.wd[1]).double().mean()))
                         for n in stats.clusters[1:]}}


def pick_neurons(stats: NeuronStats, top: int) -> list[int]:
    """The `top` neurons with the largest RI at the largest n (finite RI only; ties: lower index first)."""
    ri = stats.ri[stats.clusters[-1]].numpy()
    idx = [int(i) for i in np.argsort(-np.nan_to_num(ri, nan=-np.inf), kind="stable") if np.isfinite(ri[i])]
    return idx[:top]
