"""Paper-parity perplexity as a task: the number the Sparse Expansion / SparseGPT papers report.

    from sparse_ffn.tasks.paper_ppl import paper_perplexity
    r = paper_perplexity("models/smollm2-135m", "wiki.test.raw", seq_len=2048, experts="experts/")
    r["perplexity"], r["windows"], r["artifact"]

The text (e.g. WikiText-2 raw test, documents joined with "\\n\\n") is tokenised once as one stream
and cut into non-overlapping windows of `seq_len` tokens; perplexity = exp(mean NLL over every
predicted token), each window scored independently (`sparse_ffn.core.perplexity.perplexity`). The model is
dense, or carries Sparse Expansion experts (`experts=DIR`) or CETT thresholds (`thresholds=`), set up
exactly as the lm-eval adapter does (`model_adapters.sparsity_setup.resolve_sparsity`).

Not an lm-eval task on purpose: lm-eval's `loglikelihood_rolling` scores each document separately with
rolling context and its `wikitext` task reports word/byte perplexity, so it cannot give this number
(for lm-eval's own, run the `wikitext_local` task from `tasks/local.py`). `sparse-ffn ppl` is this
function on the command line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from sparse_ffn import __version__
from sparse_ffn.errors import UserError

METRIC = "token-level perplexity (paper parity; not lm-eval's word/byte perplexity)"


def paper_perplexity(model: str | os.PathLike | None, data: str | os.PathLike, seq_len: int, *,
                     experts: str | os.PathLike | None = None, thresholds: str | os.PathLike | list[float] | None = None,
                     tokens: int | None = None, batch_size: int = 1, device: str | None = "auto",
                     dtype: str = "float32", ffn_args: dict[str, Any] | None = None, progress: bool = False,
                     per_window: bool = False, streaming: bool | None = None,
                     max_memory: int | str | None = None) -> dict:
    """Paper-parity perplexity of `model` on `data`; returns the JSON-able record `sparse-ffn ppl` prints.

    model: local Hugging Face directory (None: the one the experts manifest / thresholds file names).
    data: a text file, a .jsonl with "text", or a `datasets` name (see `data.load_text`).
    seq_len: window length in tokens; the last partial window is dropped. tokens: evaluate only the
    first tokens // seq_len windows. batch_size: windows per forward (does not change the number).
    experts / thresholds: at most one. Every user mistake is a one-line UserError, raised before the
    model is loaded where it can be (bad files, flags) and right after otherwise (artifact made for
    another model). per_window=True adds "window_nll": each window's summed NLL (nats), in order.
    streaming / max_memory (experts only): evaluate layer by layer, one layer's experts in memory at a time
    (`model_adapters.streaming`), always (streaming=True) or when the experts exceed max_memory bytes
    (or '4GiB'); the numbers are those of the in-memory model.

    Keys: metric, perplexity, nll (mean, nats), tokens (predicted tokens = windows * (seq_len - 1)),
    seq_len, windows, windows_available, batch_size, seconds (the scoring only), data {path, sha256},
    model {path, dtype, device, fingerprint}, artifact (None, or {kind, path, sha256 of the file /
    manifest, calibration_data_sha256, settings}), sparsity (with thresholds: {mean, activation_ratio,
    per_layer, tokens}), expert_usage (with experts: {tokens, balance}), sparse_ffn_version.
    """
    from sparse_ffn.artifacts.data import load_text, token_windows
    from sparse_ffn.artifacts.provenance import data_record
    from sparse_ffn.model_adapters.sparsity_setup import resolve_sparsity

    if experts is not None and thresholds is not None:
        raise UserError("--experts and --thresholds: give one of them, not both")
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: must be at least 2 (a window predicts seq_len - 1 tokens)")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    if tokens is not None and tokens < seq_len:
        raise UserError(f"--tokens {tokens}: fewer than one window of --seq-len {seq_len}")
    text, data_sha = load_text(str(data))
    setup = resolve_sparsity(thresholds, pretrained=None if model is None else os.fspath(model), ffn_args=ffn_args,
                             model_arg="--model PATH", experts=experts, experts_streaming=streaming,
                             experts_max_memory=max_memory)

    from sparse_ffn.core.perplexity import perplexity
    from sparse_ffn.model_adapters.loading import load_model_and_tokenizer

    net, tokenizer = load_model_and_tokenizer(str(setup.pretrained), dtype=dtype, device=device, seq_len=seq_len)
    windows = token_windows(tokenizer, text, seq_len, where=str(data))
    available = windows.shape[0]
    if tokens is not None:
        if tokens // seq_len > available:
            raise UserError(f"{data}: too little data: {available} windows of {seq_len} tokens, --tokens "
                            f"{tokens} asks for {tokens // seq_len}")
        windows = windows[: tokens // seq_len]
    applied = setup.apply(net)
    info, handle, experts_handle = applied.info, applied.masking, applied.experts
    artifact = _artifact_record(setup, info)
    if artifact and artifact.get("calibration_data_sha256") == data_sha:
        print(f"sparse-ffn: warning: {data} is the very text the artifact was calibrated on (not held out)",
              file=sys.stderr)
    start = time.perf_counter()
    try:
        streamed = None
        if applied.streaming:
            from sparse_ffn.model_adapters.streaming import LayerStream

            stream = LayerStream(net, experts_handle, applied.counters())
            streamed = stream.run([windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)],
                                  progress=progress)
        try:
            out = perplexity(net, windows, batch_size, progress=progress, desc="ppl", per_window=per_window,
                             logits=None if streamed is None else streamed.logits)
        finally:
            if streamed is not None:
                streamed.close()
        sparsity = handle.stats.summary() if setup.thresholds is not None else None
        usage = experts_handle.usage() if experts_handle is not None else None
    finally:
        applied.remove()
    seconds = time.perf_counter() - start

    record = {
        "metric": METRIC,
        "perplexity": out["perplexity"],
        "nll": out["nll"],
        "tokens": out["tokens"],
        "seq_len": seq_len,
        "windows": int(windows.shape[0]),
        "windows_available": int(available),
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "data": data_record(str(data), data_sha),
        "model": {"path": str(Path(str(setup.pretrained)).resolve()), "dtype": str(net.dtype).replace("torch.", ""),
                  "device": str(next(net.parameters()).device), "fingerprint": info["model_fingerprint"]},
        "artifact": artifact,
        "sparsity": sparsity,
        "expert_usage": None if usage is None else {"tokens": usage["tokens"], "balance": usage["balance"]},
        "experts_streaming": applied.streaming if experts_handle is not None else None,
        "sparse_ffn_version": __version__,
    }
    if per_window:
        record["window_nll"] = out["window_nll"]
    return record


def _artifact_record(setup: Any, info: dict) -> dict | None:
    """What identifies the applied artifact: its path and hash, and the hash of its calibration data."""
    if setup.experts is not None:
        m = setup.experts_manifest or {}
        return {"kind": "experts", "path": str(Path(setup.experts).resolve()),
                "manifest_sha256": info.get("experts_manifest_sha256"),
                "calibration_data_sha256": (m.get("data") or {}).get("sha256"), "settings": m.get("settings")}
    thr = setup.thresholds
    if thr is not None:
        inline = thr.source == "<inline>"
        return {"kind": "thresholds", "path": None if inline else str(Path(thr.source).resolve()),
                "sha256": info.get("thresholds_sha256"), "thresholds": list(thr.thresholds) if inline else None,
                "calibration_data_sha256": ((thr.calibration or {}).get("data") or {}).get("sha256")}
    return None
