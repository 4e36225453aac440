"""Sparse Expansion speed (issue #13, item 3): calibration at K=1 and K=16 against a floor, and
layer-streamed against in-memory evaluation, measured side by side in one process.

Calibration: `calibrate_experts` at each K on the same model, windows and threads. The floor is the time
of the dense layer passes that any one-shot calibration of this kind must make: every layer run twice
over all calibration tokens (once to record its FFN inputs, once to produce the next layer's inputs),
measured here with the same layer runner, batches and threads. Targets: K=16 within 1.5x of K=1 and
within 2x of the floor. Per-phase seconds of each calibration (dense/output passes, routers, Hessians,
SparseGPT) come from a profile of the calibration's own functions.

Evaluation: `paper_perplexity` (what `sparse-ffn ppl` runs) of the K=16 artifact, in memory and
layer-streamed, interleaved `--repeats` times (machine noise hits both alike); the ratio of the median
scoring times (target at most 1.3) and whether the NLLs are identical.

    nice -n 10 python benchmarks/expansion_speed.py --threads 1 --nsamples 16 --seq-len 128

The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHASES = {  # (file, function) of the calibration -> phase; "layer runs" includes the dense passes' runs
    ("calibrate/experts.py", "_dense_pass"): "dense passes", ("calibrate/experts.py", "fit_router"): "routers",
    ("calibrate/experts.py", "iter_cluster_hessians"): "Hessians",
    ("calibrate/experts.py", "prune_expert_into"): "SparseGPT",
    ("artifacts/experts.py", "write_layer"): "layer files", ("calibrate/layer_runner.py", "run"): "layer runs",
}


def phase_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of the calibration's phase functions (see PHASES)."""
    stats = pstats.Stats(profile)
    out: dict[str, float] = {}
    for (path, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for (suffix, fn), phase in PHASES.items():
            if name == fn and path.replace(os.sep, "/").endswith("sparse_ffn/" + suffix):
                out[phase] = out.get(phase, 0.0) + cumulative
    return {k: round(v, 2) for k, v in sorted(out.items())}


def floor_seconds(model, windows, batch_size: int) -> float:
    """Two dense passes of every layer over all windows (the inputs of layer l+1 = outputs of layer l)."""
    import torch

    from sparse_ffn.calibrate.layer_runner import LayerRunner
    from sparse_ffn.core.ffn import decoder_layers

    _, layers = decoder_layers(model)
    runner = LayerRunner(model, layers)
    device = next(model.parameters()).device
    with torch.inference_mode():
        hidden = [runner.capture(windows[i:i + batch_size].to(device)) for i in range(0, windows.shape[0], batch_size)]
        start = time.perf_counter()
        for l in range(len(layers)):
            for h in hidden:
                runner.run(l, h)  # the dense pass (FFN inputs recorded here in a calibration)
            hidden = [runner.run(l, h) for h in hidden]  # the output pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="default: `sparse-ffn models fetch smollm2-135m`")
    p.add_argument("--data", default=str(SHARED / "wikitext2_tokens" / "valid.txt"), help="calibration text")
    p.add_argument("--eval-data", default=str(SHARED / "wikitext2_raw" / "wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--clusters", default="1,16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", default="2,16",
                   help="windows per scoring call, a comma list: streaming pays a fixed cost per call (each layer's "
                        "experts read and decoded once), so the ratio falls as calls grow")
    p.add_argument("--experts", help="evaluate this K-expert artifact and skip the calibration part")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", help="keep the artifacts here (default: a temporary directory)")
    p.add_argument("--device", default="cpu", help="torch device of calibration and evaluation (cpu, cuda, cuda:1)")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_ffn.artifacts.data import load_text, token_windows
    from sparse_ffn.artifacts.provenance import peak_memory
    from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts
    from sparse_ffn.tasks.paper_ppl import paper_perplexity

    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from sparse_ffn.model_adapters.model_zoo import fetch_model

        model_dir = str(fetch_model("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(args.device)
    text, sha = load_text(args.data)
    windows = token_windows(tok, text, args.seq_len, args.nsamples * args.seq_len, where=args.data)
    print(f"{model_dir}: {windows.shape[0]} x {windows.shape[1]} calibration tokens, sparsity {args.sparsity}, "
          f"threads {torch.get_num_threads()}, batch {args.batch_size}, device {args.device}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="expansion_speed_")
    root = Path(args.out_dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)

    summary: dict = {"tokens": int(windows.numel()), "threads": args.threads, "batch_size": args.batch_size,
                     "sparsity": args.sparsity, "device": args.device}
    if args.experts is None:
        floor_seconds(model, windows[:1], 1)  # warm-up
        floor = floor_seconds(model, windows, args.batch_size)
        print(f"floor (2 dense passes of every layer): {floor:.1f} s", flush=True)
        calib: dict[int, dict] = {}
        for k in (int(x) for x in args.clusters.split(",")):
            out = root / f"k{k}"
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.enable()
            calibrate_experts(model, windows, ExpertsSettings(num_clusters=k, sparsity=args.sparsity), out,
                              data={"path": args.data, "sha256": sha}, batch_size=args.batch_size, overwrite=True,
                              progress=False, threads=args.threads)
            profile.disable()
            seconds = time.perf_counter() - start
            run = json.loads((out / "manifest.json").read_text())["run"]
            calib[k] = {"seconds": round(seconds, 2), "vs_floor": round(seconds / floor, 2), "path": str(out),
                        "phases": phase_seconds(profile),
                        **{key: run[key] for key in ("peak_rss_bytes", "peak_cuda_bytes") if key in run}}
            gpu = f"; peak GPU {run['peak_cuda_bytes'] / 2**30:.2f} GiB" if "peak_cuda_bytes" in run else ""
            print(f"K={k}: {seconds:.1f} s = {seconds / floor:.2f}x the floor; phases {calib[k]['phases']}{gpu}",
                  flush=True)
        ks = sorted(calib)
        summary.update(floor_s=round(floor, 2), calibration=calib)
        if len(ks) >= 2:
            summary["k_ratio"] = round(calib[ks[-1]]["seconds"] / calib[ks[0]]["seconds"], 2)
            print(f"K={ks[-1]} / K={ks[0]}: {summary['k_ratio']:.2f}x (target <= 1.5); K={ks[-1]} / floor: "
                  f"{calib[ks[-1]]['vs_floor']:.2f}x (target <= 2)", flush=True)

    experts = args.experts or calib[max(calib)]["path"]
    clusters = json.loads((Path(experts) / "manifest.json").read_text())["settings"]["num_clusters"]
    summary["evaluation"] = []
    cuda = torch.device(args.device).type == "cuda"
    for n_windows in (int(x) for x in args.eval_windows.split(",")):
        tokens = n_windows * args.eval_seq_len
        times: dict[bool, list[float]] = {False: [], True: []}
        nll: dict[bool, float] = {}
        peak_gpu: dict[bool, int] = {}
        for _ in range(args.repeats):
            for streaming in (False, True):
                if cuda:
                    torch.cuda.reset_peak_memory_stats(args.device)
                r = paper_perplexity(model_dir, args.eval_data, args.eval_seq_len, experts=experts, tokens=tokens,
                                     device=args.device, streaming=streaming)
                times[streaming].append(r["seconds"])
                nll[streaming] = r["nll"]
                if cuda:  # the benchmark's own dense model stays on the GPU: counted in both modes alike
                    peak = peak_memory(torch.device(args.device))["peak_cuda_bytes"]
                    peak_gpu[streaming] = max(peak_gpu.get(streaming, 0), peak)
        ratio = statistics.median(times[True]) / statistics.median(times[False])
        summary["evaluation"].append({"in_memory_s": times[False], "streamed_s": times[True], "ratio": round(ratio, 3),
                                      "nll_identical": nll[True] == nll[False], "tokens": tokens, "clusters": clusters,
                                      **({"peak_cuda_bytes": {"in_memory": peak_gpu[False], "streamed": peak_gpu[True]}}
                                         if cuda else {})})
        print(f"evaluation K={clusters} on {tokens} tokens in one call: streamed / in-memory = {ratio:.2f}x "
              f"(target <= 1.3), medians of {args.repeats} ({statistics.median(times[True]):.1f} s / "
              f"{statistics.median(times[False]):.1f} s); NLL identical: {nll[True] == nll[False]}"
              + (f"; peak GPU in memory {peak_gpu[False] / 2**30:.2f} GiB, streamed {peak_gpu[True] / 2**30:.2f} GiB"
                 if cuda else ""), flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
