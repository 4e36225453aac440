"""PPL-k% calibration of CETT thresholds (SPEC section 1): `calibrate_thresholds(model, windows, ...)`
-> a v1 `ThresholdFile`; `calibrate_targets` for several targets sharing one dense pass. The kernels are `cett_kernels`, the per-layer search `layer_search`, the
calibration state `calibrator`, the outer search on c `ppl_search`; the reference procedure, for the
benchmark and the tests, is `reference`.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from sparse_ffn.artifacts.provenance import freed_blocks_kept, peak_memory
from sparse_ffn.artifacts.thresholds import ThresholdFile
from sparse_ffn.core.ffn import FFNNames, find_ffns, model_fingerprint
from sparse_ffn.core.perplexity import model_device
from sparse_ffn.errors import UserError
from sparse_ffn.calibrate.calibrator import DEFAULT_MAX_ACTIVATION_MEMORY, Calibrator, Eval
from sparse_ffn.calibrate.ppl_search import C_TOL, RATIO_TOL, check_target, effective_ratio_tol, search_c

ACTIVATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




class TargetRecorder:
    """What one target's search sees of a shared `Calibrator`: the same `evaluate` and `windows`, with
    the evaluations this target asked for recorded in order (cached ones included) and how many of them
    were new sparse passes."""

    def __init__(self, cal: Calibrator) -> None:
        self.cal, self.windows, self.evals, self.new_passes = cal, cal.windows, [], 0

    def evaluate(self, c: float, thresholds: list[float] | None = None, windows: int | None = None) -> Eval:
        before = len(self.cal.evals)
        ev = self.cal.evaluate(c, thresholds, windows=windows)
        self.new_passes += len(self.cal.evals) - before
        self.evals.append(ev)
        return ev


def check_targets(targets: Sequence[float]) -> list[float]:
    """The targets, each checked like one --target-ppl-ratio (r > 1), without repeats, in the given order."""
    if not targets:
        raise UserError("--target-ppl-ratio: give at least one target (e.g. 1.01,1.05,1.10)")
    seen: list[float] = []
    for r in targets:
        check_target(r, None)
        if r in seen:
            raise UserError(f"--target-ppl-ratio {r:g}: given twice")
        seen.append(r)
    return seen


def calibrate_thresholds(model: nn.Module, windows: Tensor, target_ppl_ratio: float | None = None,
                         cett: float | None = None, **kwargs) -> ThresholdFile:
    """Per-layer CETT thresholds for `model` fitted on `windows` (LongTensor (n_windows, seq_len)).

    Exactly one of:
    - target_ppl_ratio r > 1 (PPL-k%: r = 1 + k/100): the largest c with PPL(sparse at t(c)) /
      PPL(dense) <= r on these windows, found to within c_tol in c, or earlier once the ratio is within
      ratio_tol below r (the reference bisects c in [0, 1] to 1e-3; the final ratios agree within
      max(ratio_tol, the ratio's change over 1e-3 in c));
    - cett c in [0, 1]: thresholds at that c.
    "Unreachable" target: PPL ratio at c = 0 is exactly 1 (all thresholds 0 = the dense model), so
    any r > 1 is met by c = 0; a target is refused (UserError) when no c >= the resolution c_tol
    found by the search meets it, i.e. the ratio budget is below what masking anything costs.

    How (target mode): one dense pass collects every layer's down_proj input `a` and ||y|| with hooks
    (and the dense per-window NLL); steering probes on a quarter of the windows (thresholds fitted on
    those tokens only) locate the crossing and its log-log slope; then full passes at power-law root
    estimates, ITP-safeguarded (`ppl_search.search_c`). Each c is fitted per layer by `LayerSearch` (exact
    reference answers, warm-started across c). On SmolLM2-135M / 8 x 1024 tokens: 1 dense + 3 quarter +
    3 full sparse passes, versus 1 + 10 full passes and 16 dense products per layer and step.
    Keyword options: those of `calibrate_targets`.
    """
    check_target(target_ppl_ratio, cett)
    if cett is not None:
        return calibrate_targets(model, windows, [], cett=cett, **kwargs)[cett]
    return calibrate_targets(model, windows, [target_ppl_ratio], **kwargs)[target_ppl_ratio]


def calibrate_targets(model: nn.Module, windows: Tensor, targets: Sequence[float], *, cett: float | None = None,
                      names: FFNNames | None = None, batch_size: int = 4,
                      activation_dtype: torch.dtype | str = torch.float32,
                      max_activation_memory: int | None = DEFAULT_MAX_ACTIVATION_MEMORY,
                      c_tol: float = C_TOL, ratio_tol: float = RATIO_TOL, c0: float = 0.1,
                      steer_windows: int | None = -1, max_steps: int = 30, progress: bool = False,
                      log: Callable[[str], None] | None = None,
                      data: dict | None = None) -> dict[float, ThresholdFile]:
    """{target r: its v1 ThresholdFile} for several PPL-ratio targets in one run (or {c: file} for a
    fixed `cett` with no targets), sharing the dense pass and the activations.

    Each target runs the very search `calibrate_thresholds` runs for it alone, from the same state
    (`Calibrator.restart_searches` between targets: where CETT(t) is not monotone a layer's answer can
    depend on the c fitted before), so each file's thresholds, c and PPL ratio are those of a
    single-target run, bit for bit. Each file's `calibration.search` lists the evaluations that
    target's search used and `timing.sparse_passes` their count (`new_sparse_passes` the same);
    `calibration.shared` names all targets of the run and the dense passes they shared.

    Memory: the activations of all layers, L x N x d_ff x (4 B float32 | 2 B for a 16-bit
    activation_dtype, which rounds them), plus per-layer cached tails L x N x d_model x 4 B when they
    fit, are held at once if within `max_activation_memory` (bytes; None = unbounded); beyond it,
    layers are processed in groups that fit, recollected by a dense pass per group and step (same
    thresholds, slower). Working memory beyond that: about 3 x N x d_ff x 4 B for the layer being
    fitted, plus the model's own forward (batch_size x seq_len x vocab logits). SmolLM2-135M, 8192
    tokens: 1.41 GiB activations + 0.53 GiB tails; process peak RSS about 4 GiB.
    steer_windows: windows used by the cheap first probes (-1: a quarter of them if there are >= 8,
    0/None: no steering).
    Errors (UserError): no/repeated targets, r <= 1, c outside [0, 1], no FFNs, no tokens.
    """
    if cett is not None:
        check_target(None, cett)
        if targets:
            raise UserError("give exactly one of --target-ppl-ratio and --cett")
    else:
        targets = check_targets(targets)
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise UserError(f"too little data: need at least one window of >= 2 tokens, got {tuple(windows.shape)}")
    if isinstance(activation_dtype, str):
        activation_dtype = ACTIVATION_DTYPES.get(activation_dtype)
        if activation_dtype is None:
            raise UserError(f"--activation-dtype: one of {', '.join(ACTIVATION_DTYPES)}")
    ffns = find_ffns(model, names)
    if not ffns:
        raise UserError(f"{type(model).__name__}: no FFN layers found")
    log = log or (lambda msg: None)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    finals: dict[float, tuple[Eval, TargetRecorder]] = {}
    # passes allocate and free the same sizes: the heap keeps them (no page faults; 14% faster passes)
    with freed_blocks_kept():
        try:
            cal = Calibrator(model, ffns, windows, names=names, batch_size=batch_size,
                              activation_dtype=activation_dtype, max_activation_memory=max_activation_memory,
                              progress=progress, log=log)
            log(f"dense perplexity {cal.dense['perplexity']:.4f} on {windows.shape[0]} x {windows.shape[1]} tokens")
            if steer_windows is not None and steer_windows < 0:
                q = max(1, windows.shape[0] // 4)
                steer_windows = q if windows.shape[0] >= 8 else None
            if cett is not None:
                rec = TargetRecorder(cal)
                finals[cett] = rec.evaluate(cett), rec
            for i, target in enumerate(targets):
                if i:
                    cal.restart_searches()
                rec = TargetRecorder(cal)
                if len(targets) > 1:
                    log(f"target PPL ratio {target:g}")
                finals[target] = search_c(rec, target, c_tol=c_tol, ratio_tol=ratio_tol, c0=c0,
                                          steer_windows=steer_windows, max_steps=max_steps), rec
        finally:
            model.train(was_training)
    total = time.perf_counter() - start
    fingerprint = model_fingerprint(model, ffns)
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    memory = {"activation_dtype": str(activation_dtype).replace("torch.", ""),
              "activation_bytes": cal.activation_bytes, "layer_groups": len(cal.groups),
              "max_activation_memory": max_activation_memory, **peak_memory(model_device(model))}
    out: dict[float, ThresholdFile] = {}
    for key, (final, rec) in finals.items():
        calibration = {
            "method": "cett",
            "cett": final.c,
            "target_ppl_ratio": None if cett is not None else key,
            "ppl_ratio": final.ratio,
            "ppl_dense": cal.dense["perplexity"],
            "ppl_sparse": final.ppl,
            "data": dict(data or {}),
            "tokens": int(windows.numel()),
            "seq_len": int(windows.shape[1]),
            "windows": int(windows.shape[0]),
            "tolerance": {"cett": c_tol, "ppl_ratio": None if cett is not None else effective_ratio_tol(key, ratio_tol)},
            "search": [{"cett": e.c, "ppl_ratio": e.ratio, "windows": e.windows, "sparsity": e.sparsity["mean"]}
                       for e in rec.evals],
            "timing": {"total_s": round(total, 3), **{k: round(v, 3) for k, v in cal.timing.items()},
                       "sparse_passes": len(rec.evals), "new_sparse_passes": rec.new_passes},
            "memory": dict(memory),
        }
        if len(finals) > 1:
            calibration["shared"] = {"targets": list(finals), "sparse_passes": len(cal.evals),
                                     "dense_passes": cal.timing["dense_passes"]}
        sparsity = {"mean": final.sparsity["mean"], "per_layer": final.sparsity["per_layer"],
                    "tokens": final.sparsity["tokens"]}
        out[key] = ThresholdFile(thresholds=[float(t) for t in final.thresholds],
                                 model={"name_or_path": name or None, **fingerprint},
                                 calibration=calibration, sparsity=sparsity)
    return out


def parse_targets(text: str, flag: str = "--target-ppl-ratio") -> list[float]:
    """'1.01,1.05,1.10' -> [1.01, 1.05, 1.1], each checked (r > 1, no repeats); UserError naming `flag`
    for an entry that is not a number."""
    targets = []
    for item in (s.strip() for s in text.split(",")):
        try:
            targets.append(float(item))
        except ValueError:
            raise UserError(f"{flag} {text}: unknown target {item!r} (a PPL ratio > 1, e.g. 1.01 for PPL-1%)") \
                from None
    try:
        return check_targets(targets)
    except UserError as e:
        raise UserError(str(e).replace("--target-ppl-ratio", flag)) from None


def target_file_name(target: float) -> str:
    """The file of one target in an --out-dir: 'ppl-1.01.json', 'ppl-1.10.json', 'ppl-1.005.json'."""
    return f"ppl-{target:.2f}.json" if round(target, 2) == target else f"ppl-{target:g}.json"
