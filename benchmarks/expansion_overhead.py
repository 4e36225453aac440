"""Inference cost of Sparse Expansion (K experts per FFN linear, routed) against the dense model.

Both models score the same paper-parity perplexity windows (WikiText-2 raw test) in this one process,
interleaved (dense, experts, dense, experts, ...) so machine noise hits both alike; we time the
forward passes only and report the ratio of the medians (target: at most 1.3) and the memory each
holds. The experts default to K = 16 at 50% unstructured sparsity, calibrated once (small nsamples)
into a cache directory when missing; or pass --experts DIR.

    nice -n 10 python benchmarks/expansion_overhead.py --threads 1 --windows 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (expert stacks included), each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="default: `sparse-ffn models fetch smollm2-135m`")
    p.add_argument("--experts", help="experts directory (default: calibrate K=16 at 50%% into --cache-dir once)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "sparse-ffn" / "bench"))
    p.add_argument("--num-clusters", type=int, default=16)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows when calibrating (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--data", default=str(SHARED / "wikitext2_raw" / "wiki.test.raw"), help="text to score")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2, help="windows per timed run (default 2)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_ffn.artifacts.data import load_text, token_windows
    from sparse_ffn.artifacts.experts import apply_experts_
    from sparse_ffn.core.perplexity import perplexity

    if not args.model:
        from sparse_ffn.model_adapters.model_zoo import fetch_model

        args.model = str(fetch_model("smollm2-135m"))
    experts = Path(args.experts) if args.experts else None
    if experts is None:
        from expansion_smollm2 import Config, calibrate

        cfg = Config("0.5", None, args.num_clusters)
        experts = cfg.artifact(Path(args.cache_dir), args.nsamples, args.calib_seq_len)
        calib = argparse.Namespace(model=args.model, calib=str(SHARED / "wikitext2_tokens" / "valid.txt"),
                                   nsamples=args.nsamples, seq_len=args.calib_seq_len, kmeans_restarts=4, seed=0,
                                   batch_size=8, threads=args.threads, no_pca=False)
        calibrate(calib, cfg, experts)

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    text, _ = load_text(args.data)
    windows = token_windows(tok, text, args.seq_len, args.windows * args.seq_len, where=args.data)

    def run(model: torch.nn.Module) -> tuple[float, float]:
        start = time.perf_counter()
        ppl = perplexity(model, windows, args.batch_size)["perplexity"]
        return time.perf_counter() - start, ppl

    # Peak RSS is process-wide and never falls: load and warm up the dense model first, then the experts.
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
    ppl = {"dense": run(dense)[1]}
    peak_dense = peak_rss_bytes()
    sparse = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
    handle = apply_experts_(sparse, experts)
    k = handle.manifest["settings"]["num_clusters"]
    ppl["experts"] = run(sparse)[1]
    peak_both = peak_rss_bytes()
    times: dict[str, list[float]] = {"dense": [], "experts": []}
    for _ in range(args.repeats):
        for name, model in (("dense", dense), ("experts", sparse)):
            t, value = run(model)
            assert value == ppl[name], "perplexity changed between runs"
            times[name].append(t)
    ratio = statistics.median(times["experts"]) / statistics.median(times["dense"])
    gib = 2 ** 30
    for name in times:
        print(f"{name:8s} median {statistics.median(times[name]):.2f} s  runs {[round(t, 2) for t in times[name]]}  "
              f"ppl {ppl[name]:.3f}")
    print(f"time ratio experts (K={k}) / dense = {ratio:.3f} (target <= 1.3); weights + buffers: dense "
          f"{tensor_bytes(dense) / gib:.2f} GiB, experts {tensor_bytes(sparse) / gib:.2f} GiB; peak RSS: dense "
          f"alone {peak_dense / gib:.2f} GiB, with the experts model too {peak_both / gib:.2f} GiB")
    print(json.dumps({"experts": str(experts), "K": k, "windows": args.windows, "seq_len": args.seq_len,
                      "threads": torch.get_num_threads(), "ratio": ratio, "times": times, "perplexity": ppl,
                      "tensor_bytes": {"dense": tensor_bytes(dense), "experts": tensor_bytes(sparse)},
                      "peak_rss_bytes": {"dense_alone": peak_dense, "with_experts": peak_both}}))


if __name__ == "__main__":
    main()
