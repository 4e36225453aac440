"""`sparse-ffn analyze neurons` (Neuronal Disentanglement, SPEC section 3): the kernels against scipy and
closed forms, the reservoir, a synthetic mixture-vs-Gaussian linear, and the CLI on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from sparse_ffn.analysis import neurons as nr
from sparse_ffn.calibrate.experts import ExpertsSettings

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

def test_wasserstein_matches_scipy_for_every_neuron():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(777, 9, generator=g)
    b = torch.cat([torch.randn(777, 3, generator=g) ** 3, torch.rand(777, 3, generator=g) * 5,
                   torch.randint(0, 4, (777, 3), generator=g).float()], dim=1)  # heavy tails, uniform, ties
    got = nr.wasserstein_1d(a, b)
    want = [stats.wasserstein_distance(a[:, j].double().numpy(), b[:, j].double().numpy()) for j in range(9)]
    assert got.dtype == torch.float64 and got.shape == (9,)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    assert float(nr.wasserstein_1d(a, a + 0.25).max()) == pytest.approx(0.25, abs=1e-6)  # a shift moves W1 by it
    # chunking over neurons does not change anything
    nr_chunk, nr.WD_CHUNK_COLUMNS = nr.WD_CHUNK_COLUMNS, 2
    try:
        np.testing.assert_array_equal(nr.wasserstein_1d(a, b).numpy(), got.numpy())
    finally:
        nr.WD_CHUNK_COLUMNS = nr_chunk
    with pytest.raises(ValueError):
        nr.wasserstein_1d(a, b[:-1])


def _w1_to_normal_by_quadrature(z: np.ndarray) -> float:
    zs, m = np.sort(z), len(z)
    return sum(integrate.quad(lambda u: abs(zs[k] - stats.norm.ppf(u)), k / m, (k + 1) / m, epsabs=1e-13,
                              limit=200)[0] for k in range(m))


def test_normal_wasserstein_is_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.rand(40, generator=g, dtype=torch.float64),
                     torch.randn(40, generator=g, dtype=torch.float64).exp()], 1)
    z = nr.standardise(x)
    got = nr.normal_wasserstein(z)
    want = [_w1_to_normal_by_quadrature(z[:, j].numpy()) for j in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)  # quadrature error near u = 0, 1
    # +-1 with equal mass (already standardised): W1 = E|Z - sign Z| = 2 (2 Phi(1) - 3/2 - phi(0) + 2 phi(1))
    two_point = torch.tensor([-1.0, 1.0] * 50, dtype=torch.float64)[:, None]
    closed = 2 * (2 * stats.norm.cdf(1) - 1.5 - stats.norm.pdf(0) + 2 * stats.norm.pdf(1))
    assert float(nr.normal_wasserstein(nr.standardise(two_point))[0]) == pytest.approx(closed, abs=1e-12)
    big = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    assert float(nr.normal_wasserstein(nr.standardise(big))[0]) < 0.02  # a Gaussian sample is near N(0, 1)
    assert math.isnan(float(nr.normal_wasserstein(nr.standardise(torch.ones(10, 1)))[0]))  # constant neuron


def test_excess_kurtosis_matches_scipy():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(5000, 1, generator=g), torch.randn(5000, 1, generator=g) ** 3,
                   torch.sign(torch.randn(5000, 1, generator=g))], 1)
    got = nr.excess_kurtosis(x)
    np.testing.assert_allclose(got.numpy(), stats.kurtosis(x.double().numpy(), axis=0), rtol=1e-9, atol=1e-9)
    assert float(got[2]) == pytest.approx(-2.0, abs=1e-2)  # a two-point distribution


def _algorithm_r(n_tokens: int, capacity: int, seed: int) -> list[int]:
    """Textbook Algorithm R, one token at a time (token i replaces slot floor(u (i + 1)) if < capacity)."""
    gen = torch.Generator().manual_seed(seed)
    slots = []
    for i in range(n_tokens):
        if i < capacity:
            slots.append(i)
            continue
        j = int(math.floor(float(torch.rand(1, generator=gen, dtype=torch.float64)) * (i + 1)))
        if j < capacity:
            slots[j] = i
    return slots


def test_reservoir_is_algorithm_r_paired_and_chunk_independent():
    tokens, cap = 1000, 64
    ref = _algorithm_r(tokens, cap, seed=3)
    kept = {}
    for sizes in ((1000,), (7, 93, 300, 600), (1,) * 1000):
        r = nr.PairedReservoir(cap, seed=3)
        start = 0
        for t in sizes:
            idx = torch.arange(start, start + t, dtype=torch.float32)[:, None]
            r.add(dense=idx.repeat(1, 3), n2=-idx)  # both names carry the token index
            start += t
        s = r.samples()
        assert r.positions.tolist() == ref
        assert s["dense"][:, 0].long().tolist() == ref and (s["n2"][:, 0] == -s["dense"][:, 0]).all()
        kept[sizes] = s["dense"].clone()
    assert all(torch.equal(v, kept[(1000,)]) for v in kept.values())
    small = nr.PairedReservoir(10, seed=0)
    small.add(a=torch.arange(6.0)[:, None])
    assert small.samples()["a"].flatten().tolist() == [0, 1, 2, 3, 4, 5]  # fewer tokens than slots: all, in order


def test_spearman_bootstrap():
    g = np.random.default_rng(0)
    x = g.normal(size=300)
    y = x + g.normal(size=300)
    out = nr.spearman_bootstrap(x, y, n_boot=400, seed=5)
    assert out["rho"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    lo, hi = out["ci"]
    assert lo < out["rho"] < hi and hi - lo < 0.2
    assert nr.spearman_bootstrap(x, y, n_boot=400, seed=5) == out  # seeded
    noise = nr.spearman_bootstrap(x, g.normal(size=300), n_boot=400, seed=5)
    assert noise["ci"][0] < 0 < noise["ci"][1]
    with_nan = nr.spearman_bootstrap(np.r_[x, np.nan], np.r_[y, 1.0], n_boot=10)
    assert with_nan["n"] == 300


# ------------------------------------------------------------------------------------------------
# Acceptance: a mixture neuron gains from two experts, a Gaussian one does not
# ------------------------------------------------------------------------------------------------

def _two_cluster_linear(seed: int = 0):
    """A 2 x 64 linear and a sampler of its inputs. Dims 0..31 are shared N(0, 1) in every token; dims
    32..47 are active (N(mu_A, I)) only in cluster 0, dims 48..63 (N(mu_B, I)) only in cluster 1. Neuron 0
    reads the cluster dims, with means putting its output at +3 in cluster 0 and -3 in cluster 1 (a
    two-component mixture); neuron 1 reads the shared dims only (Gaussian, the same in both clusters)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(2, 64)
    w[0, 32:] = torch.randn(32, generator=g) / 4
    w[1, :32] = torch.randn(32, generator=g) / 4
    mu_a = 3.0 * w[0, 32:48] / w[0, 32:48].norm() ** 2
    mu_b = -3.0 * w[0, 48:] / w[0, 48:].norm() ** 2

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.randint(2, (n,), generator=g)
        x = 0.01 * torch.randn(n, 64, generator=g)
        x[:, :32] += torch.randn(n, 32, generator=g)
        x[:, 32:48] += (torch.randn(n, 16, generator=g) + mu_a) * (c == 0)[:, None]
        x[:, 48:] += (torch.randn(n, 16, generator=g) + mu_b) * (c == 1)[:, None]
        return x, c

    return w, sample


def test_mixture_neuron_gains_from_clusters_gaussian_does_not():
    w, sample = _two_cluster_linear()
    bias = torch.tensor([0.5, -0.25])
    x_cal, _ = sample(6000)
    x_meas, c_meas = sample(6000)  # other tokens than the calibration's
    experts = nr.calibrate_linear(x_cal, w, [1, 2], ExpertsSettings(num_clusters=1, sparsity=0.9, kmeans_restarts=2))
    assert [e.clusters for e in experts] == [1, 2] and experts[1].experts.shape == (2, 2, 64)
    assert all(float((e.experts == 0).float().mean()) == pytest.approx(0.9, abs=0.01) for e in experts)
    m = nr.measure_linear(x_meas.split(500), w, bias, experts, capacity=4000, seed=0)
    assert m.tokens == 6000 and m.dense.shape == (4000, 2) and m.sparse[2].shape == (4000, 2)
    # the reservoir rows are the measured tokens at m.positions, dense and sparse alike
    torch.testing.assert_close(m.dense, x_meas[m.positions] @ w.T + bias)
    _, c2 = nr.routed_linear(x_meas[m.positions], experts[1], bias)
    torch.testing.assert_close(m.sparse[2], torch.einsum("toi,ti->to", experts[1].experts[c2], x_meas[m.positions]) + bias)
    agree = float((c2 == c_meas[m.positions]).float().mean())
    assert max(agree, 1 - agree) > 0.99  # the router found the two input clusters
    assert sum(m.usage[2]) == 6000

    s = nr.neuron_stats(m.dense, m.sparse)
    for n in (1, 2):
        want = [stats.wasserstein_distance(m.dense[:, j].double().numpy(), m.sparse[n][:, j].double().numpy())
                for j in range(2)]
        np.testing.assert_allclose(s.wd[n].numpy(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(s.ri[2], (s.wd[1] - s.wd[2]) / s.wd[1])
    assert s.ri[1].abs().max() == 0
    mix, gauss = 0, 1
    drop = s.wd[1] - s.wd[2]
    assert float(drop[mix]) > 0.1 and float(drop[mix]) > 5 * abs(float(drop[gauss]))
    assert float(s.ri[2][mix]) > 0.4 and abs(float(s.ri[2][gauss])) < 0.25
    # the mixture neuron is the non-Gaussian one
    assert float(s.kurtosis[mix]) < -1.2 and abs(float(s.kurtosis[gauss])) < 0.2
    assert float(s.non_gaussianity[mix]) > 0.15 > 0.03 > float(s.non_gaussianity[gauss])
    summary = nr.linear_summary(s, n_boot=20)
    assert summary["wd_falls"]["2"] in (0.5, 1.0) and summary["wd"]["1"]["count"] == 2
    assert nr.pick_neurons(s, 1) == [mix]
