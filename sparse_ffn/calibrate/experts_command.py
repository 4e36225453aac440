"""`sparse-ffn calibrate experts`: one-shot Sparse Expansion calibration; prints the artifact directory.

    sparse-ffn calibrate experts --model DIR --data valid.txt --sparsity 0.5 --num-clusters 16 --out experts/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from . import calibrate_subparsers
from .inspect_command import DEVICE_MAP_HELP


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    sub = calibrate_subparsers(subparsers)
    p = sub.add_parser(
        "experts", help="Sparse Expansion: K SparseGPT experts per FFN linear, routed by PCA + k-means",
        description="Sparse Expansion (Sawmya et al.): block by block, fit a router per FFN input (PCA + "
                    "k-means) and prune one copy of each FFN linear per cluster with SparseGPT. Writes an "
                    "experts directory (use it with lm_eval --model sparse_ffn --model_args experts=DIR) and "
                    "prints its path as the last line. --num-clusters 1 is FFN-only SparseGPT.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help="calibration text: a text file, a .jsonl with \"text\", or a "
                                                 "datasets name NAME[:CONFIG[:SPLIT]]")
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
    place = p.add_mutually_exclusive_group()
    place.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    place.add_argument("--device-map", metavar="SPEC", help=DEVICE_MAP_HELP + "; not with offloaded (disk) layers")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model and expert dtype during calibration (default float32)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per layer call (default 8)")
    p.add_argument("--threads", type=int, metavar="T", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and a stale --out.partial)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate_experts)


def _cmd_calibrate_experts(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from ..data import load_text, token_windows
    from .experts import ExpertsSettings, calibrate_experts, check_model_for_experts, parse_sparsity

    sparsity, n_m = parse_sparsity(args.sparsity)
    settings = ExpertsSettings(num_clusters=args.num_clusters, sparsity=sparsity, n_m=n_m,
                               pca_reduction=None if args.no_pca else args.pca_reduction, bits=args.bits,
                               kmeans_restarts=args.kmeans_restarts, kmeans_max_iter=args.kmeans_iters,
                               seed=args.seed)
    if args.nsamples < 1:
        raise UserError(f"--nsamples {args.nsamples}: must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    from .inspect_command import load_model, parse_device_map, torch_device

    device, device_map = torch_device(args.device), parse_device_map(args.device_map)
    text, sha = load_text(args.data)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {args.model}: not a local model directory (no config.json)")

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # keep stderr to our own lines (one line on a user error)
    try:
        try:
            tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {args.model}: cannot load ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
        model = load_model(model_dir, device, args.dtype, device_map=device_map)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos and args.seq_len > max_pos:
        raise UserError(f"--seq-len {args.seq_len}: longer than the model's {max_pos} positions")
    windows = token_windows(tok, text, args.seq_len, None, where=args.data)
    if windows.shape[0] < args.nsamples:
        print(f"sparse-ffn: warning: {args.data} gives {windows.shape[0]} windows of {args.seq_len} tokens, "
              f"fewer than --nsamples {args.nsamples}; using them all", file=sys.stderr)
    windows = windows[: args.nsamples]
    if settings.num_clusters > windows.numel():
        raise UserError(f"--num-clusters {settings.num_clusters}: more clusters than the {windows.numel()} "
                        f"calibration tokens")
    from ..ffn import find_ffns

    check_model_for_experts(find_ffns(model), settings)
    result = calibrate_experts(model, windows, settings, out, data={"source": str(args.data), "sha256": sha},
                               batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.quiet,
                               model_info={"name_or_path": str(model_dir.resolve())})
    gib = result.peak_rss_bytes / 2 ** 30
    note = f", resumed after layer {result.resumed_from - 1}" if result.resumed_from else ""
    print(f"sparse-ffn: experts K={settings.num_clusters} for {windows.numel()} tokens in {result.seconds:.1f} s, "
          f"peak RSS {gib:.2f} GiB{note}", file=sys.stderr)
    print(result.path.resolve())
    return 0
