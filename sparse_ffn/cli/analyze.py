"""`sparse-ffn analyze neurons`: Neuronal Disentanglement of one FFN linear (SPEC section 3).

    sparse-ffn analyze neurons --model DIR --data wiki.test.raw --calib-data wiki.valid.txt --sparsity 0.9 \\
        --clusters 1,2,4,8,16 --layer 1 --linear up --top 4 --out-dir runs/
    sparse-ffn analyze neurons --model DIR --data wiki.test.raw --experts k1/ k2/ k4/ --layer 1 --linear down_proj ...

For the chosen linear of --layer: its dense outputs over --tokens measured tokens against the same neurons
computed with n experts (from expert artifacts of this model, or calibrated here for this one linear with
the Sparse Expansion router fit, per-cluster Hessians and SparseGPT). The input of the linear is the dense
model's, so only this linear differs. Writes into --out-dir, atomically, at the very end:
`neurons-L<layer>-<module>-s<sparsity>.json` (every number, provenance, which tokens were used for what),
`.png` (dense vs sparse histograms of the chosen neurons, one panel per n) and `-summary.png` (RI at the
largest n against non-Gaussianity; WD against n). Prints one JSON object as the last stdout line.

Token hygiene: measured tokens are never calibration tokens. Calibrated here on the same text as --data,
the calibration takes the first --calib-tokens tokens and the measurement the --tokens after them; on
--calib-data (another text) the first tokens of each. With --experts, the measurement skips the tokens
any artifact calibrated on when its manifest's data sha256 is --data's (the calibration used the first
`data.tokens` tokens); an artifact without a data hash is reported as "unknown".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparse_ffn.cli.options import add_dtype_option, add_placement_options, command_group, log
from sparse_ffn.errors import UserError

DEFAULT_CLUSTERS = "1,2,4,8,16"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = command_group(subparsers, "analyze", "analyses of sparse FFNs (neurons)").add_parser(
        "neurons", help="per-neuron output distributions of one FFN linear, dense vs n sparse experts "
                        "(WD, RI, non-Gaussianity; JSON + PNGs); prints one JSON object",
        description="Neuronal Disentanglement (Sawmya et al.): for one FFN linear, the Wasserstein distance "
                    "between each neuron's dense and sparse output distributions with n = 1, 2, 4, ... "
                    "experts, the relative improvement RI_n = (WD_1 - WD_n) / WD_1, and whether the "
                    "non-Gaussianity of the dense output predicts RI.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help="text to measure on (a text file, .jsonl with \"text\", or "
                                                 "a datasets name)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--experts", nargs="+", metavar="DIR", help="expert artifacts of this model (one per n; "
                                                                 "n = 1 required for RI)")
    src.add_argument("--sparsity", help="calibrate experts for this linear here: fraction in (0, 1) or N:M")
    p.add_argument("--clusters", help=f"with --sparsity: the n to compare, must include 1 (default {DEFAULT_CLUSTERS})")
    p.add_argument("--layer", type=int, required=True, help="decoder layer index (0-based)")
    p.add_argument("--linear", required=True, help="gate, up, down, gate_up, or the module's name (up_proj, fc1, "
                                                   "dense_h_to_4h, c_fc, ...)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--neurons", help="neurons to plot: comma-separated output indices")
    pick.add_argument("--top", type=int, default=4, help="plot the N neurons with the largest RI at the largest n "
                                                         "(default 4)")
    p.add_argument("--tokens", type=int, default=8192, help="measured tokens (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--reservoir", type=int, default=8192, metavar="M",
                   help="per-neuron sample size kept (uniform over the measured tokens, the same tokens for "
                        "dense and every n; default 8192)")
    p.add_argument("--calib-data", metavar="FILE", help="with --sparsity: calibration text (default: --data, "
                                                        "tokens before the measured ones)")
    p.add_argument("--calib-tokens", type=int, default=32768, help="with --sparsity: calibration tokens (default 32768)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pca-reduction", type=int, default=32, metavar="R", help="router PCA to d_in/R dims (default 32)")
    g.add_argument("--no-pca", action="store_true", help="route on the raw inputs")
    p.add_argument("--kmeans-restarts", type=int, default=4, metavar="R", help="k-means++ restarts (default 4)")
    p.add_argument("--seed", type=int, default=0, help="k-means, reservoir and bootstrap seed (default 0)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples (default 1000)")
    add_placement_options(p)
    add_dtype_option(p)
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--out-dir", required=True, help="directory for the JSON and PNGs")
    p.set_defaults(func=_cmd_neurons)


# -- argument parsing ---------------------------------------------------------------------------------

def parse_int_list(text: str, flag: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; UserError naming `flag` for anything else (repeats included)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: must be comma-separated integers") from None
    if not values:
        raise UserError(f"{flag} {text}: empty")
    if len(set(values)) != len(values):
        raise UserError(f"{flag} {text}: repeated values")
    return values


def parse_clusters(text: str) -> list[int]:
    """--clusters "1,2,4" -> sorted [1, 2, 4]: integers >= 1, no repeats, 1 included (RI is relative to it)."""
    ns = parse_int_list(text, "--clusters")
    if min(ns) < 1:
        raise UserError(f"--clusters {text}: every n must be >= 1")
    if 1 not in ns:
        raise UserError(f"--clusters {text}: must include 1 (SparseGPT), the baseline of RI")
    return sorted(ns)


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks before anything is loaded."""
    for flag, value, low in (("--tokens", args.tokens, 1), ("--seq-len", args.seq_len, 2),
                             ("--reservoir", args.reservoir, 1), ("--batch-size", args.batch_size, 1),
                             ("--calib-tokens", args.calib_tokens, 1), ("--bootstrap", args.bootstrap, 0),
                             ("--layer", args.layer, 0), ("--kmeans-restarts", args.kmeans_restarts, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: must be >= {low}")
    if args.neurons is None and args.top < 1:
        raise UserError(f"--top {args.top}: must be >= 1")
    if args.experts is not None:
        for flag in ("clusters", "calib_data"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')}: only with --sparsity (artifacts bring their own)")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {args.out_dir}: exists and is not a directory")


# -- the command -----------------------------------------------------------------------------------------

def _cmd_neurons(args: argparse.Namespace, rest: list[str]) -> int:
    t_start = time.perf_counter()
    check_args(args)
    # -- sparse_ffn dependencies (imported here: the CLI imports this module to build its parser) --
    from sparse_ffn.analysis import neurons as nr
    from sparse_ffn.analysis.neurons_plots import render_histograms, render_summary
    from sparse_ffn.analysis.neurons_sources import (
        artifact_experts,
        cat_cpu,
        linear_inputs,
        resolve_linear,
        span,
        take_windows,
        token_ids,
    )
    from sparse_ffn.artifacts.atomic import atomic_write_bytes, atomic_write_json
    from sparse_ffn.calibrate.experts import ExpertsSettings, parse_sparsity
    from sparse_ffn.artifacts.data import load_text
    from sparse_ffn.artifacts.provenance import created_by
    from sparse_ffn.core.ffn import check_plain_linear, find_ffns, linear_weight, model_fingerprint
    from sparse_ffn.model_adapters.loading import load_model, load_tokenizer, resolve_device

    clusters = settings = None
    if args.sparsity is not None:
        clusters = parse_clusters(args.clusters or DEFAULT_CLUSTERS)
        sparsity, n_m = parse_sparsity(args.sparsity)
        settings = ExpertsSettings(num_clusters=1, sparsity=sparsity, n_m=n_m, kmeans_restarts=args.kmeans_restarts,
                                   pca_reduction=None if args.no_pca else args.pca_reduction, seed=args.seed)
    wanted = parse_int_list(args.neurons, "--neurons") if args.neurons is not None else None
    tokenizer = load_tokenizer(args.model)
    text, sha = load_text(args.data)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device, dtype=args.dtype, seq_len=args.seq_len, tokenizer=tokenizer)
    ffns = find_ffns(model)
    fingerprint = model_fingerprint(model, ffns)
    role, module, module_name = resolve_linear(model, ffns, args.layer, args.linear)
    check_plain_linear(module, f"layer {args.layer} {role}")
    weight = linear_weight(module).detach().float()
    bias = None if module.bias is None else module.bias.detach().float()
    d_out, d_in = weight.shape
    if wanted is not None and not all(0 <= j < d_out for j in wanted):
        raise UserError(f"--neurons {args.neurons}: {module_name} has {d_out} output neurons (0..{d_out - 1})")
    if settings is not None and settings.n_m is not None and d_in % settings.n_m[1]:
        raise UserError(f"--sparsity {args.sparsity}: M does not divide the input width {d_in} of {module_name}")

    ids = token_ids(tokenizer, text)
    calib_spans, t0 = [], time.perf_counter()
    if settings is None:
        experts = artifact_experts(args.experts, args.layer, role, (d_out, d_in), fingerprint)
        shas = [(e.info.get("data") or {}).get("sha256") for e in experts]
        offset = max([int(e.info["data"]["tokens"]) for e, s in zip(experts, shas) if s == sha] or [0])
        disjoint: bool | str = "unknown" if None in shas else True
        if None in shas:
            log("warning: an experts manifest has no data sha256; cannot tell whether its calibration tokens "
                "overlap the measured ones")
        for e, s in zip(experts, shas):
            data = e.info.get("data") or {}
            calib_spans.append({"source": data.get("source"), "sha256": s, "tokens": data.get("tokens"),
                                "range": [0, data.get("tokens")] if s else None,
                                "used_for": f"n={e.clusters}: artifact calibration (routers, Hessians; all layers, "
                                            f"sequential)", "same_text_as_measured": s == sha if s else None})
    else:
        same = args.calib_data is None
        if same:
            calib_ids, calib_sha, calib_src = ids, sha, args.data
        else:
            calib_text, calib_sha = load_text(args.calib_data)
            calib_ids, calib_src = token_ids(tokenizer, calib_text), args.calib_data
        calib = take_windows(calib_ids, 0, args.calib_tokens, args.seq_len, calib_src, "--calib-tokens")
        if max(clusters) > calib.numel():
            raise UserError(f"--clusters {args.clusters}: more clusters than the {calib.numel()} calibration tokens")
        offset = int(calib.numel()) if calib_sha == sha else 0
        disjoint = True
        calib_spans.append(span(calib_src, calib_sha, 0, calib, f"routers (PCA + k-means) and per-cluster Hessians "
                                                                 f"for n = {clusters}, this linear only"))
        log(f"collecting the inputs of layer {args.layer} {module_name} over {calib.numel()} calibration tokens")
        x = cat_cpu(linear_inputs(model, module, calib, args.batch_size))
        experts = nr.calibrate_linear(x, weight, clusters, settings, device=weight.device,
                                      where=f"layer {args.layer} {module_name}", log=log)
        del x
    t_calib = time.perf_counter() - t0
    measured = take_windows(ids, offset, args.tokens, args.seq_len, args.data, "--tokens")
    log(f"measuring {module_name} of layer {args.layer} ({d_out} neurons) on {measured.numel()} tokens "
        f"[{offset}, {offset + measured.numel()}) of {args.data}, n = {[e.clusters for e in experts]}")
    t0 = time.perf_counter()
    m = nr.measure_linear(linear_inputs(model, module, measured, args.batch_size), weight, bias, experts,
                          capacity=args.reservoir, seed=args.seed)
    t_measure = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = nr.neuron_stats(m.dense, m.sparse)
    summary = nr.linear_summary(stats, n_boot=args.bootstrap, seed=args.seed)
    chosen = wanted if wanted is not None else nr.pick_neurons(stats, args.top)
    t_stats = time.perf_counter() - t0

    short = module_name.rsplit(".", 1)[-1]
    sp = experts[0].info["settings"]
    sp_tag = f"{sp['n_m'][0]}:{sp['n_m'][1]}" if sp.get("n_m") else f"{sp['sparsity']:g}"
    stem = f"neurons-L{args.layer}-{short}-s{sp_tag.replace(':', 'of')}"
    title = f"layer {args.layer} {short}, sparsity {sp_tag}{', ' + str(sp['bits']) + ' bits' if sp.get('bits') else ''}"
    out_dir = Path(args.out_dir)
    paths = {k: out_dir / f"{stem}{suffix}" for k, suffix in (("json", ".json"), ("png", ".png"),
                                                               ("summary_png", "-summary.png"))}
    hist_png = render_histograms(m.dense, m.sparse, stats, chosen, title=title) if chosen else None
    summary_png = render_summary(stats, summary, title=title + f": {d_out} neurons, {m.dense.shape[0]} tokens")
    ns = stats.clusters
    report = {
        "format": "sparse-ffn/neurons", "version": 1,
        "layer": args.layer, "linear": {"role": role, "module": module_name, "d_out": d_out, "d_in": d_in,
                                        "bias": bias is not None},
        "clusters": ns, "sparsity": sp_tag,
        "definitions": {
            "wd": "W1(dense, sparse_n) per neuron over the reservoir sample (mean |sorted difference|), output units",
            "ri": "(WD_1 - WD_n) / WD_1", "input": "the dense model's input of this linear (only it is sparse)",
            "non_gaussianity": "exact W1(standardised dense sample (population std), N(0, 1))",
            "kurtosis": "excess kurtosis m4/m2^2 - 3 of the dense sample (population moments)",
            "wd_falls": "fraction of neurons with WD_n < WD_1"},
        "summary": summary,
        "per_neuron": {"wd": {str(n): nr.finite_list(stats.wd[n]) for n in ns},
                       "ri": {str(n): nr.finite_list(stats.ri[n]) for n in ns[1:]},
                       "non_gaussianity": nr.finite_list(stats.non_gaussianity),
                       "kurtosis": nr.finite_list(stats.kurtosis),
                       "mean": nr.finite_list(stats.mean), "std": nr.finite_list(stats.std)},
        "plotted_neurons": [{"neuron": j, "wd": {str(n): nr.finite(stats.wd[n][j]) for n in ns},
                             "ri": {str(n): nr.finite(stats.ri[n][j]) for n in ns[1:]},
                             "non_gaussianity": nr.finite(stats.non_gaussianity[j]),
                             "kurtosis": nr.finite(stats.kurtosis[j])} for j in chosen],
        "plotted_by": "--neurons" if wanted is not None else f"top {args.top} by RI at n={ns[-1]}",
        "measurement": {"tokens_streamed": m.tokens, "sample_size": int(m.dense.shape[0]),
                        "usage": {str(n): u for n, u in m.usage.items()},
                        "rel_output_error": {str(n): nr.finite(v) for n, v in m.rel_error.items()}},
        "tokens": {"measured": {**span(args.data, sha, offset, measured, "WD, RI, non-Gaussianity (never calibration)"),
                                "reservoir": {"capacity": args.reservoir, "kept": int(m.dense.shape[0]),
                                              "seed": args.seed, "method": "Algorithm R over token positions, the "
                                              "same positions for dense and every n"}},
                   "calibration": calib_spans, "disjoint": disjoint},
        "experts": {str(e.clusters): e.info for e in experts},
        "model": {"name_or_path": str(Path(args.model).expanduser().resolve()), "class": type(model).__name__,
                  "model_type": getattr(model.config, "model_type", None), "dtype": args.dtype, **fingerprint},
        "settings": {"device": str(device), "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "bootstrap": args.bootstrap, "seed": args.seed},
        "created_by": created_by(),
        "timing": {"calibration_s": round(t_calib, 3), "measure_s": round(t_measure, 3), "stats_s": round(t_stats, 3),
                   "total_s": round(time.perf_counter() - t_start, 3)},
        "files": {k: str(p.resolve()) for k, p in paths.items() if k != "png" or hist_png is not None},
    }
    atomic_write_json(paths["json"], report)
    if hist_png is not None:
        atomic_write_bytes(paths["png"], hist_png)
    atomic_write_bytes(paths["summary_png"], summary_png)
    top_n = str(ns[-1])
    corr = summary["spearman"].get(top_n, {}).get("non_gaussianity_vs_ri", {})
    log(f"done in {report['timing']['total_s']:.1f} s: median WD " +
        ", ".join(f"n={n} {summary['wd'][str(n)]['median']:.4g}" for n in ns) +
        (f"; Spearman(non-Gaussianity, RI_{top_n}) {corr.get('rho')}" if corr else ""))
    print(json.dumps({"layer": args.layer, "linear": module_name, "neurons": d_out, "clusters": ns,
                      "sparsity": sp_tag, "tokens": m.tokens,
                      "median_wd": {str(n): summary["wd"][str(n)]["median"] for n in ns},
                      "median_ri": {str(n): summary["ri"][str(n)]["median"] for n in ns[1:]},
                      "spearman_ng_ri": {"n": ns[-1], "rho": corr.get("rho"), "ci": corr.get("ci")},
                      "plotted": chosen, **report["files"], "seconds": report["timing"]["total_s"]}))
    return 0
