"""PPL-k% sparsity of every checkpoint of a training run (the seed's calc_sparsity.sh; `sparse-ffn sweep`).

One CETT value c for the whole run (SPEC section 1): the largest c whose per-checkpoint thresholds keep
the MEAN over the last `--last` (5) checkpoints of PPL(sparse)/PPL(dense) <= R, found by the same
search as `calibrate thresholds` (`ppl_search.search_c`, ITP-safeguarded root finding on c), each checkpoint
fitting its own per-layer thresholds t_l(c) (`calibrator.Calibrator`: dense activations collected once,
warm-started per-layer searches). Then every checkpoint's sparsity (and PPL ratio) at that c: the
activation-ratio-vs-training curve. Writes sweep.csv, sweep.json (with provenance) and sweep.png into
--out-dir at the very end, atomically; prints one JSON object as the last stdout line.

Memory: the last `--last` checkpoints are held at once (models and their collected activations; the
--max-activation-memory cap is shared among them); the earlier ones are loaded one at a time.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from sparse_ffn.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from sparse_ffn.core.ffn import FFNNames

LAST = 5  # checkpoints whose mean PPL ratio chooses c (the reference's choice)
_STEP = re.compile(r"^(?:.*?(?:checkpoint|ckpt|step|iter)[-_]?)?(\d+)$", re.IGNORECASE)
CSV_COLUMNS: tuple[str, ...] = ("checkpoint", "step", "c", "sparsity", "activation_ratio", "ppl_ratio",
                                "ppl_dense", "ppl_sparse", "in_mean")


# -- checkpoints ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """A model directory of a training run and its step (None when the name gives none)."""

    path: Path
    step: int | None


def parse_step(name: str) -> int | None:
    """Training step from a directory name: checkpoint-200, step_200, ckpt200, iter-200, 200 -> 200."""
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_checkpoints(specs: Sequence[str | Path]) -> list[Checkpoint]:
    """Model directories in training order. A directory without config.json stands for its model
    subdirectories. Sorted by step when every name gives one (and no step repeats), else in the order given.
    UserError for a missing path or a directory with no model in or below it."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise UserError(f"--checkpoints {spec}: not a directory")
        if _is_model_dir(path):
            found.append(path)
            continue
        subs = [p for p in path.iterdir() if p.is_dir() and _is_model_dir(p)]
        if not subs:
            raise UserError(f"--checkpoints {spec}: no model checkpoint (config.json) in it or its subdirectories")
        found += sorted(subs, key=lambda p: (parse_step(p.name) is None, parse_step(p.name) or 0, p.name))
    checkpoints = [Checkpoint(p, parse_step(p.name)) for p in found]
    steps = [c.step for c in checkpoints]
    if None not in steps and len(set(steps)) == len(steps):
        checkpoints.sort(key=lambda c: c.step)
    return checkpoints


# -- the sweep --------------------------------------------------------------------------------------------

@dataclass
class CheckpointResult:
    """One checkpoint at the run's c: per-layer thresholds t_l(c), PPLs on the windows, and the masking
    core's sparsity summary {"tokens", "mean", "activation_ratio", "per_layer"}."""

    checkpoint: str
    step: int | None
    c: float
    thresholds: list[float]
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float
    sparsity: dict
    in_mean: bool

    @property
    def activation_ratio(self) -> float:
        return 1.0 - float(self.sparsity["mean"])


@dataclass
class SweepResult:
    """The chosen c, the mean PPL ratio over the last `last` checkpoints at c, one row per checkpoint (in
    training order) and the search trace [{"cett", "mean_ppl_ratio", "ppl_ratios"}]."""

    c: float
    target_ppl_ratio: float | None
    mean_ppl_ratio: float
    last: int
    rows: list[CheckpointResult]
    search: list[dict] = field(default_factory=list)


@dataclass
class _MeanEval:
    c: float
    ratio: float
    evals: list


class _MeanCalibration:
    """Several checkpoints' calibrators seen as one: PPL ratio(c) = the mean of theirs (each checkpoint
    fits its own thresholds at c). Has what `ppl_search.search_c` needs (`evaluate`)."""

    def __init__(self, calibrators: list) -> None:
        self.calibrators = calibrators
        self.trace: list[dict] = []

    def evaluate(self, c: float, windows: int | None = None) -> _MeanEval:
        evals = [cal.evaluate(c) for cal in self.calibrators]  # cached per c by each calibrator
        ev = _MeanEval(c, sum(e.ratio for e in evals) / len(evals), evals)
        if all(step["cett"] != c for step in self.trace):
            self.trace.append({"cett": c, "mean_ppl_ratio": ev.ratio, "ppl_ratios": [e.ratio for e in evals],
                               "sparsity": [e.sparsity["mean"] for e in evals]})
        return ev


def sweep_checkpoints(checkpoints: Sequence[Checkpoint], load: Callable[[Path], nn.Module], windows: Tensor, *,
                      target_ppl_ratio: float | None = None, cett: float | None = None, last: int = LAST,
                      names: FFNNames | None = None, batch_size: int = 4,
                      max_activation_memory: int | None = None, c_tol: float | None = None,
                      ratio_tol: float | None = None, max_steps: int = 30, progress: bool = False,
                      log: Callable[[str], None] | None = None) -> SweepResult:
    """Choose one c for the run and measure every checkpoint at it.

    checkpoints: in training order; load(path) -> the model (eval mode, on its device); windows:
    LongTensor (n_windows, seq_len), the same for every checkpoint. Exactly one of target_ppl_ratio R > 1
    (c = the largest c, to c_tol (default the reference's 1e-3), whose mean PPL ratio over the last `last`
    checkpoints is <= R, or with that mean within ratio_tol (default `ppl_search.RATIO_TOL`, 1e-3) below R;
    refused when even the smallest resolvable c exceeds it) or cett = a fixed c in
    [0, 1]. max_activation_memory: bytes for all held checkpoints' activations together (None: no cap).
    """
    from sparse_ffn.calibrate.calibrator import Calibrator
    from sparse_ffn.calibrate.ppl_search import C_TOL, RATIO_TOL, check_target, search_c
    from sparse_ffn.core.ffn import find_ffns

    check_target(target_ppl_ratio, cett)
    if not checkpoints:
        raise UserError("--checkpoints: none given")
    if last < 1:
        raise UserError(f"--last {last}: must be >= 1")
    log = log or (lambda msg: None)
    bar = _bar(progress)
    tail = list(checkpoints[-last:])
    head = list(checkpoints[: len(checkpoints) - len(tail)])
    budget = None if max_activation_memory is None else max_activation_memory // len(tail)

    def calibrator(ck: Checkpoint):
        model = load(ck.path)
        return Calibrator(model, find_ffns(model, names), windows, names=names, batch_size=batch_size,
                          max_activation_memory=budget, progress=progress)

    cals = [calibrator(ck) for ck in bar(tail, desc="dense passes (last checkpoints)")]
    mean = _MeanCalibration(cals)
    if cett is None:
        log(f"searching c: mean PPL ratio over the last {len(tail)} checkpoints <= {target_ppl_ratio:g}")
        c = search_c(mean, target_ppl_ratio, c_tol=C_TOL if c_tol is None else c_tol,
                     ratio_tol=RATIO_TOL if ratio_tol is None else ratio_tol, c0=0.1, steer_windows=None,
                     max_steps=max_steps).c
    else:
        c = cett
    at_c = mean.evaluate(c)
    log(f"c={c:.5f}: mean PPL ratio {at_c.ratio:.5f} over the last {len(tail)} checkpoints")
    rows = {ck.path: _row(ck, cal, ev, True) for ck, cal, ev in zip(tail, cals, at_c.evals)}
    del cals, mean.calibrators, at_c  # free the held models before loading the others
    for ck in bar(head, desc=f"checkpoints at c={c:.4f}"):
        cal = calibrator(ck)
        rows[ck.path] = _row(ck, cal, cal.evaluate(c), False)
        del cal
    return SweepResult(c=c, target_ppl_ratio=target_ppl_ratio,
                       mean_ppl_ratio=sum(rows[ck.path].ppl_ratio for ck in tail) / len(tail), last=len(tail),
                       rows=[rows[ck.path] for ck in checkpoints], search=mean.trace)


def _row(ck: Checkpoint, cal, ev, in_mean: bool) -> CheckpointResult:
    return CheckpointResult(str(ck.path), ck.step, ev.c, list(ev.thresholds), cal.dense["perplexity"], ev.ppl,
                            ev.ratio, dict(ev.sparsity), in_mean)


def _bar(progress: bool) -> Callable:
    def wrap(items: list, desc: str):
        if not progress or not items:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="ckpt", leave=False, dynamic_ncols=True)

    return wrap


# -- outputs ----------------------------------------------------------------------------------------------

def x_values(rows: Sequence[CheckpointResult]) -> tuple[list[float], str]:
    """(x per row, axis label): the steps when every row has one, else the checkpoint index."""
    if all(r.step is not None for r in rows):
        return [float(r.step) for r in rows], "training step"
    return [float(i) for i in range(len(rows))], "checkpoint (index, in order)"


def csv_text(result: SweepResult) -> str:
    """The CSV: one row per checkpoint, columns CSV_COLUMNS (floats at full precision; step empty when unknown)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in result.rows:
        w.writerow([r.checkpoint, "" if r.step is None else r.step, r.c, r.sparsity["mean"], r.activation_ratio,
                    r.ppl_ratio, r.ppl_dense, r.ppl_sparse, int(r.in_mean)])
    return buf.getvalue()


def render_curves(curves: dict[str, Sequence[CheckpointResult]], title: str) -> bytes:
    """PNG bytes: activation ratio (1 - sparsity) against training step, one line per run (label ->
    rows in training order); the checkpoints that chose c are drawn filled, the others hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xlabel = "training step"
    for i, (label, rows) in enumerate(curves.items()):
        xs, xlabel = x_values(rows)
        color = f"C{i}"
        ax.plot(xs, [r.activation_ratio for r in rows], "-", color=color, label=label)
        for x, r in zip(xs, rows):
            ax.plot([x], [r.activation_ratio], "o", color=color, markersize=5,
                    markerfacecolor=color if r.in_mean else "white")
    ax.plot([], [], "o", color="gray", label="filled: the checkpoints that chose c")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("activation ratio (1 - sparsity)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def sweep_title(result: SweepResult) -> str:
    goal = f"PPL ratio <= {result.target_ppl_ratio:g} (mean of last {result.last})" \
        if result.target_ppl_ratio is not None else "fixed c"
    return f"sparsity sweep: c={result.c:.4g}, {goal}; mean ratio {result.mean_ppl_ratio:.4f}"


def report(result: SweepResult, provenance: dict) -> dict:
    """sweep.json: the choice, the search trace, every checkpoint with per-layer sparsity and thresholds."""
    return {
        "format": "sparse-ffn/sweep", "version": 1,
        "cett": result.c, "target_ppl_ratio": result.target_ppl_ratio, "mean_ppl_ratio": result.mean_ppl_ratio,
        "last": result.last, "search": result.search,
        "checkpoints": [{"checkpoint": r.checkpoint, "step": r.step, "in_mean": r.in_mean,
                         "sparsity": r.sparsity["mean"], "activation_ratio": r.activation_ratio,
                         "per_layer": r.sparsity["per_layer"], "tokens": r.sparsity["tokens"],
                         "ppl_dense": r.ppl_dense, "ppl_sparse": r.ppl_sparse, "ppl_ratio": r.ppl_ratio,
                         "thresholds": r.thresholds} for r in result.rows],
        **provenance,
    }


def write_outputs(result: SweepResult, out_dir: str | Path, provenance: dict,
                  label: str = "activation ratio") -> dict[str, Path]:
    """Write sweep.csv, sweep.json and sweep.png into out_dir (each atomically; the PNG is rendered
    first so that a plotting failure writes nothing). Returns {"csv", "json", "png"} paths."""
    from sparse_ffn.artifacts.atomic import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    png = render_curves({label: result.rows}, sweep_title(result))
    paths = {"csv": out / "sweep.csv", "json": out / "sweep.json", "png": out / "sweep.png"}
    atomic_write_bytes(paths["csv"], csv_text(result).encode())
    atomic_write_json(paths["json"], report(result, provenance))
    atomic_write_bytes(paths["png"], png)
    return paths
