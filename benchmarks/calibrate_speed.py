"""PPL-k% threshold calibration: the reference procedure vs ours, side by side on the same model and tokens.

Reference (SPEC section 1, reimplemented plainly in `reference_calibrate`): bisection of c in [0, 1] to
1e-3, each step refitting every layer by binary search over 65,536 candidates (16 dense products per
layer) and one sparse pass over all calibration windows. Ours: `calibrate_thresholds`. Both collect the
dense activations once, use the same perplexity and masking code, the same batch size and threads.

Prints: per-layer max relative difference of the thresholds (ours vs reference, at every c the
reference visited), both final PPL ratios and sparsities, both times and the speed ratio; the last line
is one JSON object with all of it.

    python benchmarks/calibrate_speed.py --model /tmp/zoo/models/smollm2-135m \\
        --data ../shared/data/wikitext2_tokens/valid.txt --tokens 8192 --seq-len 512 --threads 1

On a shared machine, use --threads equal to the cores actually free: two OpenMP threads on one free core
stall at every barrier and make both methods (the small sparse ops of ours most) several times slower.
--ref-tokens / --ref-layers run the reference on a subset (said so in the output) when it is too slow.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/zoo/models/smollm2-135m", help="local model directory")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                         "wikitext2_tokens" / "valid.txt"))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--target", type=float, default=1.01, help="target PPL ratio (1.01 = PPL-1%%)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", default=None,
                   help="torch intra-op threads for both, or a comma list (e.g. 1,2): the whole comparison at each "
                        "(default: torch's choice)")
    p.add_argument("--ref-tokens", type=int, help="reference on the first N tokens only (subset; says so)")
    p.add_argument("--ref-layers", type=int,
                   help="per-layer agreement on the first N layers only (the outer reference search always "
                        "fits all layers)")
    p.add_argument("--skip-reference", action="store_true", help="only ours (timing, no comparison)")
    p.add_argument("--device", default="cpu", help="torch device of the model and both searches (cpu, cuda, cuda:1)")
    p.add_argument("--json", help="also write the JSON summary to this file")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_ffn.calibrate.layer_search import LayerSearch
    from sparse_ffn.calibrate.thresholds import calibrate_thresholds
    from sparse_ffn.calibrate.reference import reference_calibrate
    from sparse_ffn.artifacts.data import load_text, token_windows
    from sparse_ffn.core.ffn import find_ffns

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(args.device)
    text, sha = load_text(args.data)
    windows = token_windows(tok, text, args.seq_len, args.tokens, where=args.data)
    ffns = find_ffns(model)
    print(f"model {args.model}: {len(ffns)} layers, d_ff {ffns[0].d_ff}; {windows.shape[0]} x {windows.shape[1]} "
          f"tokens of {args.data}; target {args.target}; batch {args.batch_size}; threads {torch.get_num_threads()}; "
          f"device {args.device}",
          flush=True)

    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    results = [compare(args, model, windows, ffns, sha, t, agreement=(i == 0)) for i, t in enumerate(thread_counts)]
    for r in results:
        if "speed_ratio_wall" in r:
            o, ref = r["ours"], r["reference"]
            print(f"threads {r['threads']}: reference {ref['wall_s']:.1f} s / ours {o['wall_s']:.1f} s = "
                  f"{r['speed_ratio_wall']:.2f}x wall ({r['speed_ratio_cpu']:.2f}x CPU); passes: ours 1 dense + "
                  f"{o['full_passes']} full + {o['steer_passes']} steering sparse (= {o['full_equivalent']:.2f} full); "
                  f"reference 1 dense + {ref['steps']} full; floor 1 dense + ~2 full; ppl ratio difference "
                  f"{r['ppl_ratio_difference']:.5f}; max per-layer threshold difference "
                  f"{max(r.get('threshold_max_rel_diff_per_layer', [float('nan')])):.1e} (at the reference's c values); final thresholds differ by at most {r['final_threshold_max_rel_diff']:.1e}", flush=True)
    out = {"runs": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


def compare(args, model, windows, ffns, sha, threads, agreement: bool) -> dict:
    """Ours vs the reference at `threads` torch threads (both on the same model and windows)."""
    import torch
    from sparse_ffn.calibrate.layer_search import LayerSearch
    from sparse_ffn.calibrate.thresholds import calibrate_thresholds
    from sparse_ffn.artifacts.provenance import freed_blocks_kept, peak_memory
    from sparse_ffn.calibrate.reference import reference_calibrate

    torch.set_num_threads(threads)
    print(f"== threads {torch.get_num_threads()} ==", flush=True)
    with torch.inference_mode():  # warm-up at the passes' batch shape: neither pays the first-forward costs
        model(input_ids=windows[:args.batch_size].to(args.device), use_cache=False)

    def log(prefix: str, t0: float):
        return lambda msg: print(f"  [{prefix} {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    cuda = torch.device(args.device).type == "cuda"

    def peak_cuda() -> dict:  # {"peak_cuda_bytes"} allocated on the GPU since the last call (then reset)
        if not cuda:
            return {}
        peak = {"peak_cuda_bytes": peak_memory(torch.device(args.device))["peak_cuda_bytes"]}
        torch.cuda.reset_peak_memory_stats(args.device)
        return peak

    # -- ours --------------------------------------------------------------------------------------
    peak_cuda()
    t0, c0 = time.perf_counter(), time.process_time()
    thr = calibrate_thresholds(model, windows, target_ppl_ratio=args.target, batch_size=args.batch_size,
                               log=log("ours", t0), data={"path": args.data, "sha256": sha})
    ours_gpu = peak_cuda()
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cal = thr.calibration
    full_passes = sum(1 for s in cal["search"] if s["windows"] == windows.shape[0])
    print(f"ours: c={cal['cett']:.5f} ppl_ratio={cal['ppl_ratio']:.5f} sparsity={thr.sparsity['mean']:.4f} "
          f"in {ours_s:.1f} s wall ({ours_cpu:.1f} s CPU): {full_passes} full + "
          f"{len(cal['search']) - full_passes} steering sparse passes; timing {cal['timing']}; "
          f"peak RSS {ours_rss / 2**30:.2f} GiB (activations {cal['memory']['activation_bytes'] / 2**30:.2f} GiB)"
          + (f"; peak GPU {ours_gpu['peak_cuda_bytes'] / 2**30:.2f} GiB" if ours_gpu else ""),
          flush=True)
    summary = {"model": args.model, "tokens": int(windows.numel()), "seq_len": args.seq_len, "target": args.target,
               "threads": torch.get_num_threads(), "batch_size": args.batch_size, "device": args.device,
               "ours": {"cett": cal["cett"], "ppl_ratio": cal["ppl_ratio"], "sparsity": thr.sparsity["mean"],
                        "wall_s": ours_s, "cpu_s": ours_cpu, "timing": cal["timing"], "search": cal["search"],
                        "peak_rss_bytes": ours_rss, **ours_gpu, "activation_bytes": cal["memory"]["activation_bytes"],
                        "thresholds": thr.thresholds, "full_passes": full_passes,
                        "steer_passes": len(cal["search"]) - full_passes,
                        "full_equivalent": sum(e["windows"] for e in cal["search"]) / windows.shape[0]}}
    if args.skip_reference:
        return summary

    # -- reference -----------------------------------------------------------------------------------
    ref_windows = windows
    if args.ref_tokens and args.ref_tokens < windows.numel():
        ref_windows = windows[: max(1, args.ref_tokens // args.seq_len)]
        print(f"NOTE: reference on a subset: {ref_windows.numel()} of {windows.numel()} tokens", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    with freed_blocks_kept():  # the allocator setting `calibrate_thresholds` runs under, for the same passes
        ref = reference_calibrate(model, ref_windows, args.target, batch_size=args.batch_size, log=log("ref", t0),
                                  keep_activations=True)
    ref_gpu = peak_cuda()
    ref_s, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"reference: c={ref['cett']:.5f} ppl_ratio={ref['ppl_ratio']:.5f} sparsity={ref['sparsity']['mean']:.4f} "
          f"in {ref_s:.1f} s wall ({ref_cpu:.1f} s CPU): {ref['steps']} sparse passes; "
          f"timing { {k: round(v, 1) for k, v in ref['timing'].items()} }"
          + (f"; peak GPU {ref_gpu['peak_cuda_bytes'] / 2**30:.2f} GiB" if ref_gpu else ""), flush=True)

    # -- per-layer agreement: our search at every c the reference visited (first thread count only) ----
    layers = range(0 if not agreement else len(ffns) if not args.ref_layers else min(args.ref_layers, len(ffns)))
    worst = []
    t_fit = time.perf_counter()
    for l in layers:
        search = LayerSearch(ref["activations"][l], ffns[l].down_weight(), y_norm=ref["y_norms"].get(l))
        diffs = []
        for e in ref["evals"]:
            mine, theirs = search.threshold(e["cett"]), e["thresholds"][l]
            search.release()
            diffs.append(abs(mine - theirs) / theirs if theirs > 0 else (0.0 if mine == 0 else float("inf")))
        worst.append(max(diffs))
    fit_s = time.perf_counter() - t_fit
    print("per-layer max relative threshold difference (ours vs reference, over its "
          f"{len(ref['evals'])} c values): " + " ".join(f"{d:.1e}" for d in worst), flush=True)
    if worst:
        print(f"  max over layers {max(worst):.2e}; {sum(d == 0 for d in worst)}/{len(worst)} layers identical; "
              f"our fits for all those c took {fit_s:.1f} s", flush=True)
    subset = ref_windows.numel() != windows.numel()
    ratio = ref_s / ours_s
    print(f"final PPL ratio: ours {cal['ppl_ratio']:.5f} (c={cal['cett']:.5f}), reference {ref['ppl_ratio']:.5f} "
          f"(c={ref['cett']:.5f}), difference {abs(cal['ppl_ratio'] - ref['ppl_ratio']):.5f}"
          + (" [reference on a token subset: not comparable]" if subset else ""), flush=True)
    print(f"speed: reference {ref_s:.1f} s / ours {ours_s:.1f} s = {ratio:.2f}x wall, "
          f"{ref_cpu / ours_cpu:.2f}x CPU" + (" [reference on a token subset]" if subset else ""), flush=True)
    summary["reference"] = {"cett": ref["cett"], "ppl_ratio": ref["ppl_ratio"], "sparsity": ref["sparsity"]["mean"],
                            "wall_s": ref_s, "cpu_s": ref_cpu, "steps": ref["steps"], **ref_gpu,
                            "timing": ref["timing"], "tokens": int(ref_windows.numel()), "subset": subset,
                            "search": [{"cett": e["cett"], "ppl_ratio": e["ppl_ratio"]} for e in ref["evals"]],
                            "thresholds": ref["thresholds"]}
    if worst:
        summary["threshold_max_rel_diff_per_layer"] = worst
    # the final thresholds themselves, ours vs the reference's (same c only when both land on it)
    summary["final_threshold_max_rel_diff"] = max(
        abs(a - b) / b if b > 0 else (0.0 if a == 0 else float("inf")) for a, b in zip(thr.thresholds, ref["thresholds"]))
    summary["speed_ratio_wall"] = ratio
    summary["speed_ratio_cpu"] = ref_cpu / ours_cpu
    summary["ppl_ratio_difference"] = abs(cal["ppl_ratio"] - ref["ppl_ratio"])
    return summary


if __name__ == "__main__":
    sys.exit(main())
