"""Fitting the Sparse Expansion router: PCA, then k-means (SPEC section 2); routing is `core.router`.

    pca = fit_pca(x, reduction=32)                   # mean + top d_in/32 principal directions
    km = kmeans(pca.project(x), k=16, seed=0, restarts=4)
    router = Router(pca.mean, pca.components, km.centroids)   # core.router

Torch only, CPU or CUDA, deterministic for a seed (same inputs, same device -> the same bits).
- PCA: eigendecomposition of the covariance of x, accumulated in float64 over row chunks (so x can be
  much larger than memory allows for an SVD); components are sorted by explained variance, each with
  the sign that makes its largest-magnitude entry positive. `reduction=None` = no PCA (identity).
- k-means: k-means++ initialisation (first centre uniform, then D^2 sampling, draws from a seeded
  CPU generator, so CPU and CUDA pick the same points for the same distances), Lloyd iterations until
  the centroid shift is below tol * mean feature variance, an empty cluster takes the point farthest
  from its centroid; the best of `restarts` runs (lowest inertia) wins. Distances are computed in row
  chunks so memory stays O(chunk * k), not O(n * k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparse_ffn.core.router import DIST_CHUNK_ELEMENTS, assign, project, row_chunks

GRAM_CHUNK_ROWS = 8192


@dataclass
class PCA:
    mean: Tensor  # (d_in,) float32
    components: Tensor | None  # (d_in, r) float32, None = identity (no PCA)
    explained: float = 1.0  # fraction of the total variance the components keep

    def project(self, x: Tensor) -> Tensor:
        return project(x, self.mean, self.components)


def fit_pca(x: Tensor, reduction: int | None, device: torch.device | str | None = None) -> PCA:
    """Mean and the top max(1, d_in // reduction) principal directions of the rows of x (tokens, d_in).

    x may live on the CPU and the work on `device` (default: x's device), one chunk of rows at a time.
    """
    device = torch.device(device) if device is not None else x.device
    n, d = x.shape
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for c in row_chunks(x, GRAM_CHUNK_ROWS):
        total += c.to(device, torch.float64).sum(0)
    mean64 = total / n
    mean = mean64.float()
    if reduction is None:
        return PCA(mean, None, 1.0)
    r = max(1, d // int(reduction))
    cov = torch.zeros(d, d, dtype=torch.float64, device=device)
    for c in row_chunks(x, GRAM_CHUNK_ROWS):
        c64 = c.to(device, torch.float64)
        c64 = c64.sub_(mean64) if c64.data_ptr() != c.data_ptr() else c64 - mean64  # in place unless a view of x
        cov += c64.T @ c64
        del c64
    cov /= max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    comp = evecs[:, :r]
    big = comp.abs().argmax(dim=0)
    comp = comp * torch.sign(comp[big, torch.arange(r, device=device)])[None, :]
    tot = float(evals.clamp(min=0).sum())
    explained = float(evals[:r].clamp(min=0).sum()) / tot if tot > 0 else 1.0
    return PCA(mean, comp.float().contiguous(), explained)


def _kmeanspp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = assign(x, x[first][None])[1].double().cpu()
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # every point sits on a centre already: any point will do
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            u = float(torch.rand(1, generator=gen, dtype=torch.float64)) * total
            idx = min(int(torch.searchsorted(torch.cumsum(d2, 0), torch.tensor([u], dtype=torch.float64))), n - 1)
        centres.append(x[idx])
        d2 = torch.minimum(d2, assign(x, x[idx][None])[1].double().cpu())
    return torch.stack(centres).float()


def _centroid_sums(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums (k, r) in float64 and counts (k,), deterministic on CPU and CUDA (one-hot matmuls)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    rows = max(1, DIST_CHUNK_ELEMENTS // max(1, k))
    for i in range(0, x.shape[0], rows):
        onehot = nn.functional.one_hot(labels[i:i + rows], k).double()
        sums += onehot.T @ x[i:i + rows].double()
    counts = torch.bincount(labels, minlength=k)
    return sums, counts


@dataclass
class KMeansResult:
    centroids: Tensor  # (k, r) float32
    labels: Tensor  # (n,) int64
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int  # Lloyd iterations of the winning restart
    restart: int  # which restart won


def kmeans(x: Tensor, k: int, *, seed: int = 0, restarts: int = 4, max_iter: int = 100, tol: float = 1e-4,
           device: torch.device | str | None = None) -> KMeansResult:
    """k-means++ / Lloyd on the rows of x (n, r); best of `restarts` by inertia. Deterministic for a seed."""
    device = torch.device(device) if device is not None else x.device
    x = x.to(device, torch.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} clusters for {n} points")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    thresh = tol * float(x.double().var(dim=0, unbiased=False).mean()) if n > 1 else 0.0
    best: KMeansResult | None = None
    for run in range(max(1, int(restarts))):
        c = _kmeanspp(x, k, gen).to(device)
        it = 0
        for it in range(1, max_iter + 1):
            labels, dist = assign(x, c)
            sums, counts = _centroid_sums(x, labels, k)
            empty = (counts == 0).nonzero().flatten().tolist()
            if empty:  # the farthest points (from their own centroid) each seed one empty cluster
                far = torch.argsort(dist, descending=True, stable=True)[: len(empty)]
                for e, j in zip(empty, far.tolist()):
                    old = int(labels[j])
                    sums[old] -= x[j].double()
                    counts[old] -= 1
                    sums[e] = x[j].double()
                    counts[e] = 1
            new = (sums / counts.clamp(min=1)[:, None].double()).float()
            new = torch.where((counts == 0)[:, None], c, new)
            shift = float(((new - c) ** 2).sum())
            c = new
            if shift <= thresh:
                break
        labels, dist = assign(x, c)
        inertia = float(dist.double().sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(c, labels, inertia, it, run)
    return best
