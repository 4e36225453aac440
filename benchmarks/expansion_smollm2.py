"""Sparse Expansion on SmolLM2-135M: perplexity of dense vs K = 1 (SparseGPT), 2, 4, 8, 16 experts.

Calibration: `sparse-ffn calibrate experts` in a subprocess per K (so its time and peak RSS are its
own), on WikiText-2 valid (or the C4 sample). Evaluation: paper-parity perplexity on WikiText-2 raw
test (whole file tokenised once, non-overlapping windows, mean token NLL, exp), optionally on the first
--eval-windows windows only (a subset: say so when quoting the numbers). Prints a table, writes JSON
and a PNG of perplexity against K.

    nice -n 10 python benchmarks/expansion_smollm2.py --clusters 1,4 --nsamples 16 --seq-len 512 \\
        --eval-windows 8 --threads 1 --out-dir /tmp/expansion_bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_MODEL = "/tmp/zoo/models/smollm2-135m"


def evaluate(model_dir: str, windows: torch.Tensor, experts: Path | None, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    from sparse_ffn.expansion import apply_experts_
    from sparse_ffn.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True).eval()
    handle = apply_experts_(model, experts) if experts else None
    t = time.time()
    out = perplexity(model, windows, batch_size=1, progress=True, desc=f"ppl {experts.name if experts else 'dense'}")
    out["eval_seconds"] = round(time.time() - t, 1)
    if handle is not None:
        out["expert_balance"] = handle.usage()["balance"]
        handle.remove()
    del model
    return out


def calibrate(args: argparse.Namespace, k: int, out: Path) -> dict:
    if not (out / "manifest.json").is_file():
        cmd = [str(Path(sys.executable).parent / "sparse-ffn"), "calibrate", "experts", "--model", args.model,
               "--data", args.calib, "--sparsity", args.sparsity, "--num-clusters", str(k),
               "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len), "--kmeans-restarts",
               str(args.kmeans_restarts), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
               "--out", str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.no_pca:
            cmd.append("--no-pca")
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    m = json.loads((out / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"calib_seconds": m["run"]["seconds"], "peak_rss_gib": m["run"]["peak_rss_bytes"] / 2 ** 30,
            "artifact_mib": size / 2 ** 20, "calib_tokens": m["data"]["tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--calib", default=str(SHARED / "wikitext2_tokens" / "valid.txt"),
                   help="calibration text (default WikiText-2 valid; or c4_validation_sample/*.jsonl)")
    p.add_argument("--eval", default=str(SHARED / "wikitext2_raw" / "wiki.test.raw"))
    p.add_argument("--clusters", default="1,2,4,8,16", help="comma-separated K values")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048, help="calibration window length")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, help="evaluate the first N test windows only (default: all)")
    p.add_argument("--kmeans-restarts", type=int, default=4)
    p.add_argument("--no-pca", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch threads here and in the calibrations")
    p.add_argument("--out-dir", default="expansion_bench", help="artifacts (reused when present), JSON, PNG")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from sparse_ffn.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    text, sha = load_text(args.eval)
    windows = token_windows(tok, text, args.eval_seq_len, where=args.eval)
    total_windows = windows.shape[0]
    if args.eval_windows:
        windows = windows[: args.eval_windows]
    rows: list[dict] = []
    results_path = out_dir / "results.json"
    meta = {"model": args.model, "calib": args.calib, "eval": args.eval, "eval_sha256": sha,
            "eval_windows": windows.shape[0], "eval_windows_total": total_windows, "eval_seq_len": args.eval_seq_len,
            "sparsity": args.sparsity, "nsamples": args.nsamples, "seq_len": args.seq_len,
            "pca": not args.no_pca, "threads": torch.get_num_threads()}

    def save() -> None:
        results_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    if not args.no_dense:
        r = evaluate(args.model, windows, None, torch.float32)
        rows.append({"K": 0, "label": "dense", "perplexity": r["perplexity"], "eval_seconds": r["eval_seconds"]})
        save()
        print(f"dense: ppl {r['perplexity']:.3f}", file=sys.stderr, flush=True)
    for k in [int(x) for x in args.clusters.split(",") if x]:
        art = out_dir / f"experts_s{args.sparsity.replace(':', 'of')}_k{k}_n{args.nsamples}x{args.seq_len}"
        c = calibrate(args, k, art)
        r = evaluate(args.model, windows, art, torch.float32)
        rows.append({"K": k, "label": "SparseGPT" if k == 1 else f"SE K={k}", "perplexity": r["perplexity"],
                     "eval_seconds": r["eval_seconds"], "balance": r.get("expert_balance"), **c})
        save()
        print(f"K={k}: ppl {r['perplexity']:.3f}, calibration {c['calib_seconds']:.0f} s, "
              f"peak RSS {c['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)

    print(f"\nSmolLM2-135M, {args.sparsity} sparsity, calibration {args.nsamples} x {args.seq_len} tokens of "
          f"{Path(args.calib).name}; WikiText-2 test paper-parity perplexity on {windows.shape[0]}/{total_windows} "
          f"windows of {args.eval_seq_len}")
    print(f"{'model':<12} {'ppl':>9} {'calib s':>8} {'peak GiB':>9} {'MiB':>8} {'balance':>8}")
    for r in rows:
        print(f"{r['label']:<12} {r['perplexity']:>9.3f} {r.get('calib_seconds', float('nan')):>8.0f} "
              f"{r.get('peak_rss_gib', float('nan')):>9.2f} {r.get('artifact_mib', float('nan')):>8.1f} "
              f"{(r.get('balance') if r.get('balance') is not None else float('nan')):>8.3f}")
    experts = [r for r in rows if r["K"] > 0]
    if experts:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["K"] for r in experts], [r["perplexity"] for r in experts], "o-", label=f"{args.sparsity} sparse")
        dense = [r for r in rows if r["K"] == 0]
        if dense:
            ax.axhline(dense[0]["perplexity"], color="gray", ls="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts per linear K (1 = SparseGPT)")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title("Sparse Expansion, SmolLM2-135M")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "expansion_smollm2.png", dpi=120)
    save()
    print(results_path.resolve())


if __name__ == "__main__":
    main()
