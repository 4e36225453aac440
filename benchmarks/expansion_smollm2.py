"""Sparse Expansion on SmolLM2-135M: paper-parity perplexity of dense vs SparseGPT (K = 1) vs K experts.

Calibration: `sparse-ffn calibrate experts` in a subprocess per (sparsity, bits, K) (so its time and
peak RSS are its own), on WikiText-2 valid (or the C4 sample); never on the test text. Evaluation:
`sparse_ffn.tasks.paper_ppl.paper_perplexity` (what `sparse-ffn ppl` prints) on WikiText-2 raw test,
whole file tokenised once, non-overlapping windows, optionally the first --eval-windows only (a subset:
say so when quoting). Everything is cached in --out-dir (artifacts, one eval JSON per model), so
running the same command again only regenerates the table (table.md) and the PNG. With --jobs 2 the
next calibration runs while the previous model is evaluated.

    nice -n 10 python benchmarks/expansion_smollm2.py --run 0.5=1,2,4,8,16 --run 2:4=1,16 \\
        --run 2:4+4bit=1,16 --nsamples 64 --seq-len 512 --eval-windows 16 --threads 1 --jobs 2 \\
        --out-dir /tmp/expansion_repro --png docs/expansion_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Config:
    """One calibrated model: sparsity ("0.5" or "2:4"), quantisation bits (None = none), K experts."""

    sparsity: str
    bits: int | None
    k: int

    @property
    def family(self) -> str:
        """e.g. "50%", "2:4 + 4-bit": the sparsity (and bits) without K."""
        pretty = f"{float(self.sparsity):.0%}" if ":" not in self.sparsity else self.sparsity
        return f"{pretty}{f' + {self.bits}-bit' if self.bits else ''}"

    @property
    def label(self) -> str:
        return f"{self.family} {'SparseGPT' if self.k == 1 else f'SE K={self.k}'}"

    def artifact(self, out_dir: Path, nsamples: int, seq_len: int) -> Path:
        bits = f"_b{self.bits}" if self.bits else ""
        return out_dir / f"experts_s{self.sparsity.replace(':', 'of')}{bits}_k{self.k}_n{nsamples}x{seq_len}"


def parse_runs(specs: list[str]) -> list[Config]:
    """["0.5=1,2,4", "2:4+4bit=1,16"] -> Configs in the given order."""
    out = []
    for spec in specs:
        m = re.fullmatch(r"([0-9.]+|\d+:\d+)(?:\+(\d+)bit)?=([\d,]+)", spec.replace(" ", ""))
        if not m:
            raise SystemExit(f"--run {spec!r}: expected SPARSITY[+BITSbit]=K1,K2,... (e.g. 2:4+4bit=1,16)")
        out += [Config(m.group(1), int(m.group(2)) if m.group(2) else None, int(k)) for k in m.group(3).split(",") if k]
    return out


def calibrate(args: argparse.Namespace, cfg: Config, out: Path) -> dict:
    """Run `sparse-ffn calibrate experts` for cfg into `out` unless it is there; its cost from the manifest."""
    partial = out.with_name(out.name + ".partial")
    while not (out / "manifest.json").is_file() and partial.is_dir() and \
            time.time() - max(f.stat().st_mtime for f in [partial, *partial.iterdir()]) < 900:
        log(f"{partial}: another calibration is writing it; waiting")  # never two writers on one artifact
        time.sleep(60)
    if not (out / "manifest.json").is_file():
        cmd = [str(Path(sys.executable).parent / "sparse-ffn"), "calibrate", "experts", "--model", args.model,
               "--data", args.calib, "--sparsity", cfg.sparsity, "--num-clusters", str(cfg.k),
               "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len), "--kmeans-restarts",
               str(args.kmeans_restarts), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
               "--out", str(out), "--quiet"]
        if cfg.bits:
            cmd += ["--bits", str(cfg.bits)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.no_pca:
            cmd.append("--no-pca")
        log(f"$ {' '.join(cmd)}")
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    m = json.loads((out / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"calib_seconds": m["run"]["seconds"], "peak_rss_gib": m["run"]["peak_rss_bytes"] / 2 ** 30,
            "artifact_mib": size / 2 ** 20, "calib_tokens": m["data"]["tokens"]}


def evaluate(args: argparse.Namespace, experts: Path | None, cache: Path) -> dict:
    """Paper-parity perplexity of the dense model or `experts` on the first --eval-windows test windows."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from sparse_ffn.artifacts.atomic import atomic_write_json
    from sparse_ffn.tasks.paper_ppl import paper_perplexity

    tokens = args.eval_windows * args.eval_seq_len if args.eval_windows else None
    r = paper_perplexity(args.model, args.eval, args.eval_seq_len, experts=experts, tokens=tokens,
                         batch_size=1, device="cpu", dtype="float32", progress=not args.quiet,
                         per_window=True)
    atomic_write_json(cache, r)
    return r


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="default: `sparse-ffn models fetch smollm2-135m`")
    p.add_argument("--calib", default=str(SHARED / "wikitext2_tokens" / "valid.txt"),
                   help="calibration text (default WikiText-2 valid; or c4_validation_sample/*.jsonl)")
    p.add_argument("--eval", default=str(SHARED / "wikitext2_raw" / "wiki.test.raw"))
    p.add_argument("--run", action="append", metavar="SPARSITY[+Bbit]=K,...",
                   help="models to calibrate, in this order, e.g. 0.5=1,2,4,8,16 or 2:4+4bit=1,16 (repeatable; "
                        "default 0.5=1,2,4,8,16)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=2048, help="calibration window length")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, help="evaluate the first N test windows only (default: all)")
    p.add_argument("--kmeans-restarts", type=int, default=4)
    p.add_argument("--no-pca", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per layer call")
    p.add_argument("--threads", type=int, help="torch threads here and in the calibrations")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                   help="2: calibrate the next model while evaluating the previous one")
    p.add_argument("--out-dir", default="expansion_bench", help="artifacts and eval JSONs (reused), table, PNG")
    p.add_argument("--png", help="also copy the PNG here (e.g. docs/expansion_smollm2.png)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--report-only", action="store_true", help="table and PNG from what is cached; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model:
        from sparse_ffn.model_adapters.model_zoo import fetch_model

        args.model = str(fetch_model("smollm2-135m"))
    configs = parse_runs(args.run or ["0.5=1,2,4,8,16"])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    win = f"w{args.eval_windows or 'all'}x{args.eval_seq_len}"
    arts = {c: c.artifact(out_dir, args.nsamples, args.seq_len) for c in configs}

    rows: list[dict] = []
    pool = ThreadPoolExecutor(max_workers=1) if args.jobs == 2 and not args.report_only else None
    futures: dict[Config, Future] = {}
    if pool is not None:  # calibrations in order, one at a time, beside the evaluations
        futures = {c: pool.submit(calibrate, args, c, arts[c]) for c in configs}
    try:
        if not args.no_dense:
            cache = out_dir / f"eval_dense_{win}.json"
            if cache.is_file() or not args.report_only:
                log("evaluating dense")
                r = evaluate(args, None, cache)
                rows.append({"config": None, "label": "dense", "K": 0, "perplexity": r["perplexity"],
                             "eval_seconds": r["seconds"], "windows": r["windows"],
                             "windows_available": r["windows_available"]})
        for c in configs:
            cache = out_dir / f"eval_{arts[c].name}_{win}.json"
            if args.report_only and not (cache.is_file() and (arts[c] / "manifest.json").is_file()):
                continue
            cost = futures[c].result() if c in futures else calibrate(args, c, arts[c])
            log(f"{c.label}: calibrated in {cost['calib_seconds']:.0f} s; evaluating")
            r = evaluate(args, arts[c], cache)
            rows.append({"config": c, "label": c.label, "K": c.k, "perplexity": r["perplexity"],
                         "eval_seconds": r["seconds"], "windows": r["windows"],
                         "windows_available": r["windows_available"], "window_nll": r.get("window_nll"),
                         "balance": (r.get("expert_usage") or {}).get("balance"), **cost})
            log(f"{c.label}: ppl {r['perplexity']:.3f}")
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    report(args, rows, out_dir)


def report(args: argparse.Namespace, rows: list[dict], out_dir: Path) -> None:
    """Print the markdown table (also table.md), write results.json and the PNG."""
    from sparse_ffn.artifacts.atomic import atomic_write_bytes, atomic_write_json

    if not rows:
        print("nothing evaluated yet", file=sys.stderr)
        return
    families = list(dict.fromkeys(r["config"].family for r in rows if r["config"]))
    rows = sorted(rows, key=lambda r: (-1, 0) if r["config"] is None else (families.index(r["config"].family), r["K"]))
    w = rows[0]
    head = (f"SmolLM2-135M, calibration {args.nsamples} x {args.seq_len} tokens of {Path(args.calib).name}; "
            f"WikiText-2 raw test, paper-parity perplexity on the first {w['windows']} of {w['windows_available']} "
            f"windows of {args.eval_seq_len} tokens")
    lines = [head, "", "| model | K | perplexity | windows better than K=1 | calibration s | peak RSS GiB | "
                       "artifact MiB | balance |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x: float | None, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    def better(r: dict) -> str:
        """On how many windows this model's NLL is below SparseGPT's (same sparsity): a paired view."""
        base = next((b for b in rows if b["config"] and r["config"] and b["config"].family == r["config"].family
                     and b["K"] == 1), None)
        if r["K"] <= 1 or base is None or not r.get("window_nll") or not base.get("window_nll"):
            return ""
        pairs = list(zip(r["window_nll"], base["window_nll"]))
        return f"{sum(a < b for a, b in pairs)}/{len(pairs)}"

    for r in rows:
        lines.append(f"| {r['label']} | {r['K'] or ''} | {r['perplexity']:.3f} | {better(r)} | "
                     f"{f(r.get('calib_seconds'), '.0f')} | {f(r.get('peak_rss_gib'), '.2f')} | "
                     f"{f(r.get('artifact_mib'), '.0f')} | {f(r.get('balance'), '.3f')} |")
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_bytes(out_dir / "table.md", table.encode())
    meta = {k: getattr(args, k) for k in ("model", "calib", "eval", "nsamples", "seq_len", "eval_seq_len",
                                          "eval_windows", "kmeans_restarts", "seed", "batch_size", "threads")}
    meta["pca"] = not args.no_pca
    atomic_write_json(out_dir / "results.json", {"meta": meta, "rows": [
        {k: v for k, v in r.items() if k not in ("config", "window_nll")} | ({"sparsity": r["config"].sparsity, "bits": r["config"].bits}
                                                          if r["config"] else {}) for r in rows]})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for family in dict.fromkeys(r["config"].family for r in rows if r["config"]):
        pts = sorted((r["K"], r["perplexity"]) for r in rows if r["config"] and r["config"].family == family)
        ax.plot([k for k, _ in pts], [v for _, v in pts], "o-", label=family)
    dense = [r for r in rows if r["config"] is None]
    if dense:
        ax.axhline(dense[0]["perplexity"], color="gray", ls="--", label="dense")
    ax.set_xscale("log", base=2)
    ks = sorted({r["K"] for r in rows if r["config"]})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("experts per linear K (1 = SparseGPT)")
    ax.set_ylabel("WikiText-2 perplexity (paper parity)")
    ax.set_title(f"Sparse Expansion, SmolLM2-135M ({w['windows']} x {args.eval_seq_len} test tokens)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out_dir / "expansion_smollm2.png"
    fig.savefig(png, dpi=100)
    if args.png:
        atomic_write_bytes(args.png, png.read_bytes())
    print((out_dir / "results.json").resolve())


if __name__ == "__main__":
    main()
