"""Sparse Expansion: SparseGPT against a slow column-by-column OBS, the router, the artifact, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts, parse_sparsity
from sparse_ffn.core.router import Router, assign
from sparse_ffn.calibrate.router_fit import fit_pca, kmeans
from sparse_ffn.calibrate.sparsegpt import SparseGPTError, lowest_k_mask, sparsegpt_prune
from sparse_ffn.cli import main
from sparse_ffn.errors import UserError
from sparse_ffn.core.experts import ExpertLinear
from sparse_ffn.artifacts.experts import apply_experts_, read_manifest
from sparse_ffn.artifacts.expert_files import decode_weight, decode_weight_into, encode_weight
from sparse_ffn.core.ffn import find_ffns
from tiny import ARCHS, CORPUS, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")





# ------------------------------------------------------------------------------------------------
# SparseGPT
# ------------------------------------------------------------------------------------------------


def reference_obs(w, h, sparsity=None, n_m=None, block=128, percdamp=0.01, bits=None):
    """Slow, obvious SparseGPT: column by column, no lazy batching, no Cholesky trick.

    Before pruning column i, F = columns i..end are still free; the inverse Hessian of F is computed
    directly, inv(H[F, F]). Mask: at the start of each block (unstructured) or of each group of M
    columns (N:M), the weights with the smallest w_j^2 / inv(H[F_j, F_j])[0, 0] are chosen, F_j = j..end.
    Then w_i is replaced by its pruned/quantised value q_i and the OBS update spreads the error over
    the free columns: W[:, F] -= (w_i - q_i) / Hinv_F[0, 0] * Hinv_F[0, :].
    """
    w = w.clone().double()
    h = h.clone().double()
    d_out, d_in = w.shape
    if bits:
        maxq = 2 ** bits - 1
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(d_in, dtype=h.dtype)

    def hinv_diag(j):  # [inv(H[j:, j:])]_00
        return torch.linalg.inv(h[j:, j:])[0, 0]

    prune = torch.zeros(d_out, d_in, dtype=torch.bool)
    for i in range(d_in):
        if sparsity is not None and i % block == 0:
            cols = range(i, min(i + block, d_in))
            sal = torch.stack([w[:, j] ** 2 / hinv_diag(j) for j in cols], dim=1)
            k = round(sal.numel() * sparsity)
            flat = sorted(range(sal.numel()), key=lambda t: (float(sal.flatten()[t]), t))[:k]
            for t in flat:
                prune[t // len(cols), i + t % len(cols)] = True
        if n_m is not None and i % n_m[1] == 0:
            for r in range(d_out):
                sal = [(float(w[r, j] ** 2 / hinv_diag(j)), j) for j in range(i, i + n_m[1])]
                for _, j in sorted(sal)[: n_m[0]]:
                    prune[r, j] = True
        hinv = torch.linalg.inv(h[i:, i:])
        q = torch.where(prune[:, i], 0.0, w[:, i])
        if bits:
            q = scale * (torch.clamp(torch.round(q / scale) + zero, 0, maxq) - zero)
        err = (w[:, i] - q) / hinv[0, 0]
        w[:, i:] -= err[:, None] * hinv[0][None, :]
        w[:, i] = q
    return w


def layer_problem(d_out=10, d_in=48, n=200, seed=0, dead=(5, 17)):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / math.sqrt(d_in) + torch.eye(d_in)
    x = (torch.randn(n, d_in, generator=g) @ mix) * torch.linspace(0.2, 3.0, d_in)
    x[:, list(dead)] = 0  # never-active inputs
    w = torch.randn(d_out, d_in, generator=g)
    return w.double(), x.double(), (2 / n) * x.double().T @ x.double()


@pytest.mark.parametrize("kind", ["unstructured", "2:4", "unstructured+4bit"])
def test_sparsegpt_equals_columnwise_obs(kind):
    w, _, h = layer_problem()
    kw = dict(sparsity=None, n_m=(2, 4)) if kind == "2:4" else dict(sparsity=0.5)
    bits = 4 if "4bit" in kind else None
    fast = sparsegpt_prune(w, h, block_size=16, bits=bits, **kw)
    ref = reference_obs(w, h, block=16, bits=bits, **kw)
    assert torch.equal(fast == 0, ref == 0)  # same mask
    assert (fast - ref).abs().max() < 1e-5
    assert fast.dtype == torch.float64 and torch.equal(fast[:, [5, 17]], torch.zeros(10, 2, dtype=torch.float64))
    if kind == "2:4":
        assert ((fast.view(10, -1, 4) == 0).sum(-1) >= 2).all()
    else:  # exactly half of every 16-column block is pruned (kept weights may still round to 0 at 4 bits)
        zeros = [int((fast[:, b:b + 16] == 0).sum()) for b in range(0, 48, 16)]
        assert all(z == 80 for z in zeros) if bits is None else all(z >= 80 for z in zeros)
    # float32 arithmetic gives the same answer up to float32 rounding
    f32 = sparsegpt_prune(w.float(), h.float(), block_size=16, bits=bits, **kw)
    assert f32.dtype == torch.float32 and (f32.double() - ref).abs().max() < 1e-3


def test_lowest_k_mask_is_the_stable_argsort_prefix():
    """The block mask's selection picks exactly the first k of a stable ascending argsort: ties (many,
    from integer values) go to the earlier row-major position, NaN is never picked before a number."""
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        shape = tuple(int(s) for s in torch.randint(1, 30, (2,), generator=g))
        v = torch.randint(0, 4, shape, generator=g).double() if trial % 2 else torch.randn(shape, generator=g)
        if trial % 5 == 0:
            v.view(-1)[-1] = float("nan")
        for k in {0, 1, v.numel() // 2, v.numel() - 1, v.numel()}:
            expected = torch.zeros(v.numel(), dtype=torch.bool)
            expected[torch.argsort(v.flatten(), stable=True)[:k]] = True
            got = lowest_k_mask(v, k)
            assert got.shape == v.shape and int(got.sum()) == k
            assert torch.equal(got.flatten(), expected), (trial, k)


def test_sparsegpt_beats_magnitude_pruning():
    w, x, h = layer_problem(d_out=32, d_in=64, n=400, seed=1, dead=())
    w, x, h = w.float(), x.float(), h.float()
    pruned = sparsegpt_prune(w, h, 0.5)
    assert float((pruned == 0).float().mean()) == 0.5
    mag = w.clone()
    mag.view(-1)[w.abs().flatten().argsort()[: w.numel() // 2]] = 0
    err_sgpt = ((w - pruned) @ x.T).norm()
    err_mag = ((w - mag) @ x.T).norm()
    assert err_sgpt < 0.8 * err_mag, (err_sgpt, err_mag)
    assert not torch.equal(pruned, torch.zeros_like(pruned))


def test_sparsegpt_cholesky_retries_then_raises():
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    h = torch.diag(torch.tensor([1.0, 1.0, -0.05]))  # not PD: 1% dampening is too little, 10% is enough
    _, info = sparsegpt_prune(w, h, 0.5, return_info=True)
    assert info["damp"] == pytest.approx(0.1)
    with pytest.raises(SparseGPTError, match="not positive definite"):
        sparsegpt_prune(w, torch.diag(torch.tensor([1.0, -10.0, 1.0])), 0.5)
    with pytest.raises(ValueError):
        sparsegpt_prune(w, h, 0.5, n_m=(2, 4))


# ------------------------------------------------------------------------------------------------
# Router
# ------------------------------------------------------------------------------------------------


def blobs(seed=0, n_per=200, d=6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[10.0] * d, [-10.0] * d, [10.0] * (d // 2) + [-10.0] * (d - d // 2)])
    x = torch.cat([c + torch.randn(n_per, d, generator=g) for c in centres])
    return x, torch.arange(3).repeat_interleave(n_per)


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    x, truth = blobs()
    km = kmeans(x, 3, seed=0, restarts=3)
    perm = {int(truth[i]): int(km.labels[i]) for i in (0, 200, 400)}
    assert len(set(perm.values())) == 3
    assert torch.equal(km.labels, torch.tensor([perm[int(t)] for t in truth]))
    again = kmeans(x, 3, seed=0, restarts=3)
    assert torch.equal(km.centroids, again.centroids) and km.inertia == again.inertia
    # PCA to 2 dims keeps the cluster structure; the router sends each token to its cluster
    pca = fit_pca(x, reduction=3)
    assert pca.components.shape == (6, 2)
    assert torch.allclose(pca.components.T @ pca.components, torch.eye(2), atol=1e-5)
    assert pca.explained > 0.95
    km2 = kmeans(pca.project(x), 3, seed=0)
    router = Router(pca.mean, pca.components, km2.centroids)
    assert torch.equal(router.route(x), km2.labels)
    assert torch.equal(fit_pca(x, 3).components, pca.components)
    assert fit_pca(x, None).components is None  # --no-pca: identity
    # chunked assignment = unchunked
    lab, dist = assign(x, km.centroids, chunk_elements=7)
    assert torch.equal(lab, km.labels)


def test_weight_encodings_round_trip_and_pick_the_smallest():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(8, 16, generator=g)
    half = dense * (torch.rand(8, 16, generator=g) < 0.5)
    few = torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) < 0.01)
    for w, enc in ((dense, "dense"), (half, "bitmask"), (few, "indices"), (half.bfloat16(), "bitmask")):
        tensors, got = encode_weight("e", w)
        assert got == enc
        assert torch.equal(decode_weight(tensors, "e", tuple(w.shape), got), w)
    # the stored layout, against a plain reading of the format: bit i of byte j is entry 8 j + i (row-major),
    # values in row-major order; indices are the row-major positions, int32
    for w in (half[:, :13], half.bfloat16()):
        flat = [float(v) for v in w.reshape(-1)]
        tensors, _ = encode_weight("e", w)
        want = [sum(1 << i for i in range(8) if 8 * j + i < len(flat) and flat[8 * j + i] != 0)
                for j in range(-(-len(flat) // 8))]
        assert tensors["e.bitmask"].dtype == torch.uint8 and tensors["e.bitmask"].tolist() == want
        assert tensors["e.values"].dtype == w.dtype
        assert tensors["e.values"].float().tolist() == [v for v in flat if v != 0]
    tensors, _ = encode_weight("e", few)
    assert tensors["e.indices"].dtype == torch.int32
    assert tensors["e.indices"].tolist() == [i for i, v in enumerate(few.reshape(-1).tolist()) if v != 0]


def test_decode_into_place_equals_the_plain_decode_and_checks_the_bit_count():
    g = torch.Generator().manual_seed(1)
    for shape, dtype in (((7, 13), torch.float32), ((33, 5), torch.bfloat16)):  # sizes not a multiple of 8
        w = (torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.6)).to(dtype)
        w[0, 0], w[-1, -1] = 1.5, 0.0  # first entry kept, last one pruned
        tensors, enc = encode_weight("e", w)
        assert enc == "bitmask"
        out = torch.full(shape, float("nan"), dtype=dtype)  # whatever was there before is overwritten
        assert torch.equal(decode_weight_into(out, tensors, "e", enc), decode_weight(tensors, "e", shape, enc))
        assert torch.equal(out, w)
        tensors["e.values"] = tensors["e.values"][:-1]  # one value short of the bits set
        with pytest.raises(RuntimeError, match="bits set"):
            decode_weight_into(out, tensors, "e", enc)


# ------------------------------------------------------------------------------------------------
# Calibration on tiny models
# ------------------------------------------------------------------------------------------------

SETTINGS = dict(nsamples=6, seq_len=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("expansion")
    models = {arch: make_tiny_model(arch, root / arch) for arch in ("llama", "gpt2")}
    data = root / "calib.txt"
    data.write_text(CORPUS * 8)
    return root, models, data


def load(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def windows_for(tok, data, nsamples=6, seq_len=32):
    from sparse_ffn.artifacts.data import token_windows

    return token_windows(tok, Path(data).read_text(), seq_len, nsamples * seq_len)


def calibrate(model_dir, data, out, k=4, **kw):
    tok, model = load(model_dir)
    settings = ExpertsSettings(num_clusters=k, **{"sparsity": 0.5, "kmeans_restarts": 2, **kw})
    res = calibrate_experts(model, windows_for(tok, data), settings, out, keep_applied=True, progress=False,
                            batch_size=4)
    return tok, model, res


IDS = torch.tensor([[5, 40, 77, 100, 9, 200, 31, 64, 12, 3, 150, 17]])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibrate_reload_apply_equals_in_memory(tiny, arch):
    root, models, data = tiny
    tok, model, res = calibrate(models[arch], data, root / f"{arch}_k4")
    with torch.no_grad():
        expanded = model(IDS).logits
    res.handle.remove()
    with torch.no_grad():
        dense = model(IDS).logits
    m = read_manifest(res.path)
    assert m["format"] == "sparse-ffn/experts" and m["settings"]["num_clusters"] == 4 and len(m["layers"]) == 3
    _, fresh = load(models[arch])
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, dense)  # calibration left the model dense after remove()
    handle = apply_experts_(fresh, res.path)
    assert isinstance(find_ffns(fresh)[0].down, ExpertLinear)
    with torch.no_grad():
        reloaded = fresh(IDS).logits
    assert torch.equal(reloaded, expanded)
    assert not torch.allclose(expanded, dense)
    usage = handle.usage()
    assert usage["tokens"] == IDS.numel()
    assert all(sum(layer["in"]) == IDS.numel() and len(layer["down"]) == 4 for layer in usage["per_layer"])
    handle.remove()
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, dense)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("llama", "gpt2")])
def test_other_families_calibrate_and_reload(tiny, arch):
    root, _, data = tiny
    model_dir = make_tiny_model(arch, root / arch)
    _, model, res = calibrate(model_dir, data, root / f"{arch}_k2", k=2)
    with torch.no_grad():
        expanded = model(IDS[:, :8]).logits
    res.handle.remove()
    _, fresh = load(model_dir)
    handle = apply_experts_(fresh, res.path)
    with torch.no_grad():
        assert torch.equal(fresh(IDS[:, :8]).logits, expanded)
    assert handle.usage()["tokens"] == 8
    handle.remove()


def test_peft_wrapped_linears_are_refused(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    root, models, data = tiny
    tok, model = load(models["llama"])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["down_proj"]))
    with pytest.raises(UserError, match="merge_and_unload"):
        calibrate_experts(lora, windows_for(tok, data), ExpertsSettings(num_clusters=1, sparsity=0.5),
                          tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_calibration_is_byte_identical_and_resumes(tiny, monkeypatch):
    root, models, data = tiny
    _, _, a = calibrate(models["llama"], data, root / "det_a")
    _, _, b = calibrate(models["llama"], data, root / "det_b")
    files = sorted(p.name for p in a.path.glob("*.safetensors"))
    assert files == ["layer_000.safetensors", "layer_001.safetensors", "layer_002.safetensors"]
    for f in files:
        assert (a.path / f).read_bytes() == (b.path / f).read_bytes()
    # a run killed after layer 1 resumes from layer 2 and ends with the same bytes
    from sparse_ffn.artifacts.experts import ArtifactWriter

    real = ArtifactWriter.write_layer

    def dies_at_layer_2(self, layer, *args, **kw):
        if layer == 2:
            raise KeyboardInterrupt
        return real(self, layer, *args, **kw)

    monkeypatch.setattr(ArtifactWriter, "write_layer", dies_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        calibrate(models["llama"], data, root / "det_c")
    assert not (root / "det_c").exists() and (root / "det_c.partial" / "layer_001.safetensors").is_file()
    monkeypatch.setattr(ArtifactWriter, "write_layer", real)
    _, _, c = calibrate(models["llama"], data, root / "det_c")
    assert c.resumed_from == 2 and not (root / "det_c.partial").exists()
    for f in files:
        assert (a.path / f).read_bytes() == (c.path / f).read_bytes()


@pytest.mark.parametrize("arch", ["llama", "opt"])  # OPT flattens (batch, seq) inside its FFN
def test_padded_batch_equals_one_by_one(tiny, arch):
    root, models, data = tiny
    model_dir = models.get(arch) or make_tiny_model(arch, root / arch)
    tok, model, res = calibrate(model_dir, data, root / f"batch_k4_{arch}")
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital", "Hi",
             "Water boils at one hundred degrees at sea level and more", "She put the cup on the table",
             "Numbers such as 1, 2, 3", "Good morning! How are you today?", "In 1874 a ship was built"]
    assert tok.padding_side == "right"
    stats = res.handle.stats
    with torch.no_grad():
        stats.reset()
        enc = tok(texts, return_tensors="pt", padding=True)
        batch = model(**enc).logits
        counts_batch = stats.counts()
        stats.reset()
        singles = [model(**tok([t], return_tensors="pt")).logits[0] for t in texts]
        counts_single = stats.counts()
    assert counts_batch == counts_single  # the same tokens went to the same experts
    assert counts_batch[1] == int(enc.attention_mask.sum())  # padding is not counted
    for row, single in zip(batch, singles):
        assert torch.allclose(row[: single.shape[0]], single, rtol=0, atol=1e-5)
    res.handle.remove()


def test_k1_is_sequential_sparsegpt_with_full_hessian(tiny):
    root, models, data = tiny
    tok, _, res = calibrate(models["llama"], data, root / "k1", k=1)
    res.handle.remove()
    # our own sequential SparseGPT: the full model runs with layers < l already pruned; the inputs of
    # layer l's gate/up and down come from one dense pass of layer l; H = 2/n X^T X over all tokens
    _, model = load(models["llama"])
    windows = windows_for(tok, data)
    ffns = find_ffns(model)
    m = read_manifest(res.path)
    from sparse_ffn.artifacts.expert_files import load_layer_file

    for f in ffns:
        seen = {"x": [], "a": []}
        hooks = [f.gate.register_forward_pre_hook(lambda mod, a: seen["x"].append(a[0].reshape(-1, a[0].shape[-1]))),
                 f.down.register_forward_pre_hook(lambda mod, a: seen["a"].append(a[0].reshape(-1, a[0].shape[-1])))]
        with torch.no_grad():
            for i in range(0, windows.shape[0], 4):
                model(windows[i:i + 4], use_cache=False)
        for hk in hooks:
            hk.remove()
        x, a = torch.cat(seen["x"]).double(), torch.cat(seen["a"]).double()
        hx, ha = (2 / x.shape[0] * x.T @ x).float(), (2 / a.shape[0] * a.T @ a).float()
        _, experts, _ = load_layer_file(res.path / m["layers"][f.layer]["file"])
        for role, h in (("gate", hx), ("up", hx), ("down", ha)):
            lin = getattr(f, role)
            pruned = sparsegpt_prune(lin.weight.detach(), h, 0.5)
            assert experts[role].shape[0] == 1
            assert torch.equal(experts[role][0] == 0, pruned == 0), (f.layer, role)
            assert (experts[role][0] - pruned).abs().max() < 1e-5, (f.layer, role)
            with torch.no_grad():
                lin.weight.copy_(pruned)


def test_lm_eval_adapter_with_experts(tiny):
    """Runs once the lm-eval adapter takes experts=DIR (see the Sparse Expansion patch)."""
    import inspect

    from lm_eval.api.instance import Instance

    from sparse_ffn.model_adapters.lm_eval_adapter import SparseFFNLM

    if "experts" not in inspect.signature(SparseFFNLM.__init__).parameters:
        pytest.skip("the lm-eval adapter does not take experts= yet")
    root, models, data = tiny
    _, _, res = calibrate(models["llama"], data, root / "adapter_k4")
    res.handle.remove()
    pairs = [("The sun rises in the", " east"), ("Paris is the capital of", " France"), ("Hello", " world"),
             ("Water boils at one hundred", " degrees at sea level")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    batched = SparseFFNLM(experts=str(res.path), device="cpu", batch_size=4, max_length=128)  # model from manifest
    single = SparseFFNLM(pretrained=str(models["llama"]), experts=str(res.path), device="cpu", batch_size=1,
                         max_length=128)
    lb, ls = batched.loglikelihood(reqs), single.loglikelihood(reqs)
    assert all(abs(a[0] - b[0]) < 1e-4 and a[1] == b[1] for a, b in zip(lb, ls))
    info = batched.get_model_info()["sparse_ffn"]
    assert info["expert_usage"]["tokens"] == info["sparsity"]["tokens"] > 0
    assert info["expert_usage"] == single.get_model_info()["sparse_ffn"]["expert_usage"]


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def test_parse_sparsity():
    assert parse_sparsity("0.5") == (0.5, None) and parse_sparsity("2:4") == (None, (2, 4))
    for bad in ("0", "1", "1.5", "-0.1", "4:2", "0:4", "a:b", "x", "2:4:8"):
        with pytest.raises(UserError):
            parse_sparsity(bad)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "--sparsity 1.5"),
    (["--sparsity", "0"], "--sparsity 0"),
    (["--sparsity", "3:2"], "N:M"),
    (["--sparsity", "2:5"], "M must divide"),
    (["--num-clusters", "100000"], "more clusters than the"),
    (["--data", "/nonexistent/calib.txt"], "not found"),
])
def test_cli_errors_exit_2_with_one_line_and_write_nothing(tiny, capsys, args, message):
    root, models, data = tiny
    out = root / "cli_err"
    base = {"--model": str(models["llama"]), "--data": str(data), "--sparsity": "0.5", "--num-clusters": "2",
            "--nsamples": "2", "--seq-len": "32", "--out": str(out)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["calibrate", "experts", "--quiet"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparse-ffn: error: ") and message in err[0], err
    assert not out.exists() and not out.with_name("cli_err.partial").exists()


def test_cli_writes_and_prints_the_directory(tiny, capsys):
    root, models, data = tiny
    out = root / "cli_ok"
    argv = ["calibrate", "experts", "--quiet", "--model", str(models["gpt2"]), "--data", str(data), "--sparsity",
            "2:4", "--num-clusters", "2", "--no-pca", "--bits", "4", "--nsamples", "2", "--seq-len", "32",
            "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out.resolve())
    assert "peak RSS" in captured.err
    m = read_manifest(out)
    assert m["settings"]["n_m"] == [2, 4] and m["settings"]["pca_reduction"] is None and m["settings"]["bits"] == 4
    assert m["layout"]["modules"] == {"up": "mlp.c_fc", "down": "mlp.c_proj"}
    assert main(argv) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_run_end_line_with_experts_and_model_name_from_the_manifest(tiny, capsys):
    """get_model_info (lm-eval calls it once, when it assembles the results) logs one line with the
    experts' K and balance; the model the manifest names is the one the next lm-eval run is filed under."""
    from lm_eval.api.instance import Instance
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    from sparse_ffn.model_adapters.lm_eval_adapter import SparseFFNLM

    root, models, data = tiny
    _, _, res = calibrate(models["llama"], data, root / "run_end_k4")
    res.handle.remove()
    lm = SparseFFNLM(experts=str(res.path), device="cpu", batch_size=2, max_length=128)
    tracker = GeneralConfigTracker()
    tracker.log_experiment_args(model_source="sparse_ffn", model_args={"experts": str(res.path)},
                                system_instruction=None, chat_template=None, fewshot_as_multiturn=False)
    assert tracker.model_name == str(models["llama"]) == lm.model.name_or_path
    again = GeneralConfigTracker()  # taken once: a later run that names no model is lm-eval's own business
    again.log_experiment_args(model_source="hf", model_args={}, system_instruction=None, chat_template=None,
                              fewshot_as_multiturn=False)
    assert again.model_name != str(models["llama"])
    capsys.readouterr()
    lm.loglikelihood([Instance("loglikelihood", {}, ("The sun rises in the", " east"), 0),
                      Instance("loglikelihood", {}, ("Hello", " world"), 1)])
    info = lm.get_model_info()["sparse_ffn"]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sparse-ffn: run done:")]
    usage, sp = info["expert_usage"], info["sparsity"]
    assert 0.0 < usage["balance"] <= 1.0 and usage["tokens"] == sp["tokens"] > 0
    assert lines == [f"sparse-ffn: run done: model {models['llama']}; strategy dense (counts exact zeros); "
                     f"mean FFN sparsity {sp['mean']:.4f} over {len(sp['per_layer'])} layers "
                     f"({min(sp['per_layer']):.3f}-{max(sp['per_layer']):.3f}); {sp['tokens']} tokens counted; "
                     f"experts K=4, balance {usage['balance']:.3f} (1 = uniform) over {usage['tokens']} tokens"]
