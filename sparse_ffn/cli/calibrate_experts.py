"""`sparse-ffn calibrate experts`: one-shot Sparse Expansion calibration; prints the artifact directory.

    sparse-ffn calibrate experts --model DIR --data valid.txt --sparsity 0.5 --num-clusters 16 --out experts/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_ffn.cli.options import (
    add_data_options,
    add_batch_size_option,
    add_dtype_option,
    add_ffn_options,
    add_model_option,
    add_placement_options,
    add_threads_option,
    calibrate_subparsers,
    check_out_dir,
    check_positive,
    ffn_names_from,
    log,
    parse_bytes,
)
from sparse_ffn.errors import UserError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    sub = calibrate_subparsers(subparsers)
    p = sub.add_parser(
        "experts", help="Sparse Expansion: K SparseGPT experts per FFN linear, routed by PCA + k-means",
        description="Sparse Expansion (Sawmya et al.): block by block, fit a router per FFN input (PCA + "
                    "k-means) and prune one copy of each FFN linear per cluster with SparseGPT. Writes an "
                    "experts directory (use it with lm_eval --model sparse_ffn --model_args experts=DIR) and "
                    "prints its path as the last line. --num-clusters 1 is FFN-only SparseGPT.")
    add_model_option(p)
    add_data_options(p, what="calibration text", tokens=None, seq_len=None)
    p.add_argument("--sparsity", required=True, help="fraction in (0, 1) (unstructured, e.g. 0.5) or N:M (e.g. 2:4)")
    p.add_argument("--num-clusters", type=int, required=True, metavar="K", help="experts per linear (1 = SparseGPT)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pca-reduction", type=int, default=32, metavar="R",
                   help="route on the top d_in/R principal components (default 32)")
    g.add_argument("--no-pca", action="store_true", help="route on the raw inputs (no PCA)")
    p.add_argument("--bits", type=int, metavar="B", help="also quantise the kept weights to B bits (per row, min-max)")
    p.add_argument("--nsamples", type=int, default=128, metavar="N", help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=2048, metavar="L", help="tokens per window (default 2048)")
    p.add_argument("--kmeans-restarts", type=int, default=4, metavar="R", help="k-means++ restarts (default 4)")
    p.add_argument("--kmeans-iters", type=int, default=100, metavar="I", help="max Lloyd iterations (default 100)")
    p.add_argument("--seed", type=int, default=0)
    add_placement_options(p, device_map=True, extra_map_help="; not with offloaded (disk) layers")
    add_dtype_option(p)
    add_batch_size_option(p, 8, "windows per layer call")
    add_threads_option(p, "torch CPU threads of the whole run, k-means and SparseGPT included (default: torch's "
                          "choice; k-means and SparseGPT then run on 1 thread, faster on a busy CPU)")
    add_ffn_options(p)
    p.add_argument("--max-memory", default="none", metavar="SIZE",
                   help="layer-input cache (hidden states + one layer's FFN inputs) above SIZE goes to "
                        "memory-mapped temporary files (e.g. 8GiB; default none: in RAM)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and a stale --out.partial)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate_experts)


def _cmd_calibrate_experts(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from sparse_ffn.artifacts.data import load_text, token_windows
    from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts, check_model_for_experts, \
        parse_sparsity
    from sparse_ffn.core.ffn import find_ffns
    from sparse_ffn.model_adapters.loading import load_model, load_tokenizer, parse_device_map, resolve_device

    sparsity, n_m = parse_sparsity(args.sparsity)
    max_memory = parse_bytes(args.max_memory, "--max-memory")
    settings = ExpertsSettings(num_clusters=args.num_clusters, sparsity=sparsity, n_m=n_m,
                               pca_reduction=None if args.no_pca else args.pca_reduction, bits=args.bits,
                               kmeans_restarts=args.kmeans_restarts, kmeans_max_iter=args.kmeans_iters,
                               seed=args.seed)
    check_positive(nsamples=args.nsamples, batch_size=args.batch_size, threads=args.threads)
    names = ffn_names_from(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = check_out_dir(args.out, "--out")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    device, device_map = resolve_device(args.device), parse_device_map(args.device_map)
    text, sha = load_text(args.data)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, device=device, dtype=args.dtype, device_map=device_map, seq_len=args.seq_len,
                       tokenizer=tok)
    windows = token_windows(tok, text, args.seq_len, None, where=args.data)
    if windows.shape[0] < args.nsamples:
        log(f"warning: {args.data} gives {windows.shape[0]} windows of {args.seq_len} tokens, fewer than "
            f"--nsamples {args.nsamples}; using them all")
    windows = windows[: args.nsamples]
    check_model_for_experts(find_ffns(model, names), settings)
    result = calibrate_experts(model, windows, settings, out, names=names,
                               data={"source": str(args.data), "sha256": sha}, batch_size=args.batch_size,
                               overwrite=args.overwrite, progress=not args.quiet,
                               model_info={"name_or_path": str(Path(args.model).expanduser().resolve())},
                               threads=args.threads, max_memory=max_memory)
    gib = result.peak_rss_bytes / 2 ** 30
    note = f", resumed after layer {result.resumed_from - 1}" if result.resumed_from else ""
    log(f"experts K={settings.num_clusters} for {windows.numel()} tokens in {result.seconds:.1f} s, "
        f"peak RSS {gib:.2f} GiB{note}")
    print(result.path.resolve())
    return 0
