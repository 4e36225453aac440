"""`sparse-ffn analyze neurons` (Neuronal Disentanglement, SPEC section 3): the kernels against scipy and
closed forms, the reservoir, a synthetic mixture-vs-Gaussian linear, and the CLI on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from sparse_ffn.analysis import neurons as nr
from sparse_ffn.calibrate.experts import ExpertsSettings, cluster_hessians, fit_router, prune_experts
from sparse_ffn.cli import main
from tiny import make_tiny_model

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
    torch.testing.assert_close(s.non_gaussianity, nr.normal_wasserstein(nr.standardise(m.dense)))  # sorted-once path
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


# ------------------------------------------------------------------------------------------------
# The command on a tiny model
# ------------------------------------------------------------------------------------------------

def _run(capsys, args: list[str]) -> tuple[int, list[str], list[str]]:
    rc = main(["analyze", "neurons", *args])
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def _module_io(model_dir: Path, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of layer `layer`'s down_proj for windows `ids`, from a full HF forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    got = {}
    mod = model.model.layers[layer].mlp.down_proj
    h = mod.register_forward_hook(lambda m, a, o: got.update(x=a[0].reshape(-1, a[0].shape[-1]),
                                                                y=o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        xs, ys = [], []
        for w in ids:
            model(input_ids=w[None])
            xs.append(got["x"]), ys.append(got["y"])
    h.remove()
    return torch.cat(xs), torch.cat(ys)


def test_cli_calibrated_here(model_dir, text_file, capsys, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    rc, stdout, stderr = _run(capsys, [
        "--model", str(model_dir), "--data", str(text_file), "--sparsity", "0.5", "--clusters", "2,1",
        "--layer", "1", "--linear", "down", "--tokens", "256", "--seq-len", "64", "--calib-tokens", "512",
        "--reservoir", "256", "--top", "2", "--bootstrap", "50", "--device", "cpu", "--out-dir", str(out)])
    assert rc == 0, stderr
    last = json.loads(stdout[-1])
    assert last["clusters"] == [1, 2] and last["neurons"] == 64 and last["tokens"] == 256
    rep = json.loads(Path(last["json"]).read_text())
    assert Path(last["json"]).name == "neurons-L1-down_proj-s0.5.json"
    for key in ("png", "summary_png"):
        assert Path(last[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["tokens"]["calibration"][0]["range"] == [0, 512]
    assert rep["tokens"]["measured"]["range"] == [512, 768] and rep["tokens"]["disjoint"] is True
    assert rep["model"]["weight_hash"].startswith("sha256:") and len(rep["tokens"]["measured"]["sha256"]) == 64
    wd1, wd2 = (np.array(rep["per_neuron"]["wd"][k], dtype=float) for k in ("1", "2"))
    np.testing.assert_allclose(rep["per_neuron"]["ri"]["2"], (wd1 - wd2) / wd1, rtol=1e-12)
    assert len(rep["plotted_neurons"]) == 2 and rep["plotted_neurons"][0]["ri"]["2"] == max(rep["per_neuron"]["ri"]["2"])
    assert rep["summary"]["wd"]["2"]["median"] == pytest.approx(float(np.median(wd2)))

    # independently: the dense outputs over tokens 512..767 (a full HF forward with a hook) ...
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tok(text_file.read_text())["input_ids"])
    x_cal, _ = _module_io(model_dir, ids[:512].view(8, 64), 1)
    x, y = _module_io(model_dir, ids[512:768].view(4, 64), 1)
    np.testing.assert_allclose(rep["per_neuron"]["mean"], y.double().mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(rep["per_neuron"]["kurtosis"], stats.kurtosis(y.double().numpy(), axis=0), atol=1e-3)
    # ... and SparseGPT (n = 1) calibrated on tokens 0..511 only: WD_1 as scipy computes it
    settings = ExpertsSettings(num_clusters=1, sparsity=0.5)
    router, labels, _ = fit_router(x_cal, settings, torch.device("cpu"))
    from transformers import AutoModelForCausalLM

    w = AutoModelForCausalLM.from_pretrained(model_dir).model.layers[1].mlp.down_proj.weight.detach()
    pruned, _ = prune_experts(w, cluster_hessians(x_cal, labels, 1, torch.device("cpu")), settings, "t")
    y1 = (x @ pruned[0].T).double().numpy()
    want = [stats.wasserstein_distance(y.double().numpy()[:, j], y1[:, j]) for j in range(64)]
    np.testing.assert_allclose(wd1, want, atol=1e-5)


def test_cli_with_artifacts_skips_their_tokens(model_dir, text_file, capsys, tmp_path):
    arts = []
    for k in (1, 2):
        d = tmp_path / f"k{k}"
        rc = main(["calibrate", "experts", "--model", str(model_dir), "--data", str(text_file), "--sparsity", "0.5",
                   "--num-clusters", str(k), "--nsamples", "4", "--seq-len", "32", "--kmeans-restarts", "1",
                   "--quiet", "--out", str(d)])
        assert rc == 0
        arts.append(str(d))
    capsys.readouterr()
    out = tmp_path / "out"
    rc, stdout, stderr = _run(capsys, ["--model", str(model_dir), "--data", str(text_file), "--experts", *arts[::-1],
                                       "--layer", "0", "--linear", "gate_proj", "--tokens", "192", "--seq-len", "64",
                                       "--neurons", "0,127", "--bootstrap", "20", "--out-dir", str(out)])
    assert rc == 0, stderr
    rep = json.loads(Path(json.loads(stdout[-1])["json"]).read_text())
    assert rep["linear"]["role"] == "gate" and rep["linear"]["d_out"] == 128 and rep["clusters"] == [1, 2]
    assert rep["tokens"]["measured"]["range"] == [128, 320]  # after the 4 x 32 calibration tokens
    assert rep["tokens"]["disjoint"] is True and [c["same_text_as_measured"] for c in rep["tokens"]["calibration"]] == [True, True]
    assert rep["experts"]["2"]["source"] == str(Path(arts[1]).resolve()) and rep["experts"]["2"]["settings"]["num_clusters"] == 2
    assert [p["neuron"] for p in rep["plotted_neurons"]] == [0, 127]
    assert sum(rep["measurement"]["usage"]["2"]) == 192 and rep["measurement"]["sample_size"] == 192
    assert all(len(v) == 128 for v in rep["per_neuron"]["wd"].values())

    other = make_tiny_model("llama", tmp_path / "other", seed=1, initializer_range=0.1)
    capsys.readouterr()
    for args, needle in (
        (["--experts", *arts, "--layer", "3", "--linear", "up"], "--layer 3: the model has 3 layers"),
        (["--experts", *arts, "--layer", "0", "--linear", "fc9"], "--linear fc9: layer 0 has gate (gate_proj)"),
        (["--experts", *arts, "--layer", "0", "--linear", "up", "--neurons", "0,128"], "--neurons 0,128"),
        (["--experts", arts[1], "--layer", "0", "--linear", "up"], "RI needs an n = 1"),
        (["--experts", *arts, "--layer", "0", "--linear", "up", "--clusters", "1,2"], "--clusters: only with --sparsity"),
        (["--sparsity", "0.5", "--clusters", "2,4", "--layer", "0", "--linear", "up"], "must include 1"),
        (["--sparsity", "0.5", "--clusters", "1,1", "--layer", "0", "--linear", "up"], "repeated"),
        (["--sparsity", "0.5", "--clusters", "1,x", "--layer", "0", "--linear", "up"], "comma-separated integers"),
        (["--sparsity", "0.5", "--clusters", "0,1", "--layer", "0", "--linear", "up"], ">= 1"),
        (["--sparsity", "1.5", "--layer", "0", "--linear", "up"], "--sparsity 1.5"),
    ):
        rc, _, err = _run(capsys, ["--model", str(model_dir), "--data", str(text_file), *args, "--tokens", "64",
                                   "--out-dir", str(tmp_path / "bad")])
        assert rc == 2 and len(err) == 1 and err[0].startswith("sparse-ffn: error: ") and needle in err[0], (args, err)
    rc, _, err = _run(capsys, ["--model", str(other), "--data", str(text_file), "--experts", *arts, "--layer", "0",
                               "--linear", "up", "--tokens", "64", "--out-dir", str(tmp_path / "bad")])
    assert rc == 2 and len(err) == 1 and "made for another model (weight_hash" in err[0], err
    assert not (tmp_path / "bad").exists()
