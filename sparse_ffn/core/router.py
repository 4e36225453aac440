"""Sparse Expansion routing at inference: a token goes to the nearest centroid of its PCA projection
(SPEC section 2). Fitting the router (PCA, k-means) is `calibrate.router_fit`.

    router = Router(mean, components, centroids)
    cluster = router.route(x)                        # LongTensor (tokens,)

Torch only, float32 arithmetic, CPU or CUDA; distances in row chunks so memory stays O(chunk * K).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

DIST_CHUNK_ELEMENTS = 1 << 22  # rows per chunk = this / k (16 MiB of float32 distances)


def project(x: Tensor, mean: Tensor, components: Tensor | None) -> Tensor:
    """(x - mean) @ components in float32 ((tokens, r)); x - mean without PCA."""
    x = x.float() - mean.to(x.device)
    return x if components is None else x @ components.to(x.device)


def row_chunks(x: Tensor, rows: int) -> Iterator[Tensor]:
    """Consecutive slices of `rows` rows of x."""
    for i in range(0, x.shape[0], rows):
        yield x[i:i + rows]


def assign(points: Tensor, centroids: Tensor, chunk_elements: int = DIST_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """(nearest centroid index (n,), its squared distance (n,), float32) for every row of points.

    The lowest index wins ties. Row chunks keep the (rows, k) distance matrix bounded."""
    c = centroids.float()
    if points.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.long, device=points.device),
                torch.zeros(0, dtype=torch.float32, device=points.device))
    c2 = (c * c).sum(1)
    rows = max(1, chunk_elements // max(1, c.shape[0]))
    labels, dist = [], []
    for p in row_chunks(points, rows):
        p = p.float()
        d = c2[None, :] - 2.0 * (p @ c.T)  # ||p - c||^2 - ||p||^2
        m, i = d.min(dim=1)
        labels.append(i)
        dist.append((m + (p * p).sum(1)).clamp(min=0))
    return torch.cat(labels), torch.cat(dist)


class Router(nn.Module):
    """route(x) = index of the centroid nearest to the projected token (float32 arithmetic).

    Buffers: mean (d_in,), components (d_in, r) or absent (no PCA), centroids (K, r). K = 1 routes
    everything to 0 without looking at x."""

    def __init__(self, mean: Tensor | None, components: Tensor | None, centroids: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("mean", None if mean is None else mean.float(), persistent=False)
        self.register_buffer("components", None if components is None else components.float(), persistent=False)
        self.register_buffer("centroids", None if centroids is None else centroids.float(), persistent=False)
        self.num_clusters = 1 if centroids is None else int(centroids.shape[0])

    def route(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> LongTensor (...) of cluster indices."""
        lead = x.shape[:-1]
        if self.num_clusters == 1:
            return torch.zeros(lead, dtype=torch.long, device=x.device)
        p = project(x.reshape(-1, x.shape[-1]), self.mean, self.components)
        return assign(p, self.centroids.to(p.device))[0].view(lead)

    def extra_repr(self) -> str:
        r = "none" if self.components is None else self.components.shape[1]
        return f"clusters={self.num_clusters}, pca_dims={r}"
