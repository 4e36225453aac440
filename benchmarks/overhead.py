"""Time overhead of the sparse_ffn adapter (cett thresholds) against lm-eval's own `hf` model.

Three models answer the same lm-eval task's requests (built once by lm-eval from the stock task config)
in this one process: `sparse_ffn`, `hf`, and a second `hf` as an A/A control (two identical models can
time differently by where their weights landed in memory; on this box that alone spans a few percent).
Runs are interleaved with the order reversed every repeat, so machine noise and ordering hit all
alike; we time the model calls only (wall and process CPU time) and report the ratio of the medians
against the mean of the two `hf` models, beside the A/A ratio. Target: at most 1.05.

    python benchmarks/overhead.py --model "$(sparse-ffn models fetch smollm2-135m)" \
        --data-dir ../shared/data --task piqa_local --limit 40 --repeats 3
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from sparse_ffn.model_adapters.lm_eval_adapter import SparseFFNLM
from sparse_ffn.tasks.local import write_task_configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--task", default="piqa_local")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", default="8")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--thresholds", help="thresholds file; default: the same small t for every layer")
    p.add_argument("--threshold", type=float, default=0.05, help="uniform t when no file is given")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tasks_dir = Path(tempfile.mkdtemp(prefix="sparse_ffn_tasks_"))
    write_task_configs(Path(args.data_dir), tasks_dir)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    common = dict(pretrained=args.model, device="cpu", batch_size=args.batch_size, max_length=args.max_length,
                  dtype="float32")
    # sparse first: the control pair hf/hf_control then brackets whatever placement luck it got
    sparse = SparseFFNLM(thresholds=args.thresholds or [args.threshold] * _layers(args.model), **common)
    lms = {"sparse_ffn": sparse, "hf": HFLM(**common), "hf_control": HFLM(**common)}

    task = lm_eval.tasks.get_task_dict([args.task], manager)[args.task]
    task.build_all_requests(limit=args.limit, rank=0, world_size=1)
    requests = task.instances
    kind = requests[0].request_type

    def run(lm) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        getattr(lm, kind)([r for r in requests], disable_tqdm=True)
        return time.perf_counter() - wall, time.process_time() - cpu

    for lm in lms.values():  # warm-up: task building, caches
        run(lm)
    sparse.sparsity.stats.reset()
    wall: dict[str, list[float]] = {k: [] for k in lms}
    cpu: dict[str, list[float]] = {k: [] for k in lms}
    for r in range(args.repeats):
        for name in (list(lms) if r % 2 == 0 else list(lms)[::-1]):
            w, c = run(lms[name])
            wall[name].append(w)
            cpu[name].append(c)
    med = {clock: {k: statistics.median(v) for k, v in times.items()} for clock, times in (("wall", wall), ("cpu", cpu))}
    ratio = {clock: m["sparse_ffn"] / ((m["hf"] + m["hf_control"]) / 2) for clock, m in med.items()}
    control = {clock: m["hf_control"] / m["hf"] for clock, m in med.items()}
    for name in lms:
        print(f"{name:<11} median wall {med['wall'][name]:.2f}s cpu {med['cpu'][name]:.2f}s  "
              f"wall runs {[round(t, 2) for t in wall[name]]}")
    sparsity = sparse.sparsity.stats.summary()["mean"]
    share = _hook_share(lambda: run(sparse))
    print(f"time inside sparse_ffn code (hooks, counting; cProfile, one pass): {100 * share:.1f}% of the sparse run")
    print(f"A/A control hf_control / hf = {control['wall']:.3f} wall, {control['cpu']:.3f} cpu")
    print(f"time ratio sparse_ffn / hf = {ratio['wall']:.3f} wall, {ratio['cpu']:.3f} cpu "
          f"(target <= 1.05) at mean sparsity {sparsity:.3f}")
    print(json.dumps({"task": args.task, "limit": args.limit, "requests": len(requests), "threads": torch.get_num_threads(),
                      "ratio": ratio["wall"], "ratio_cpu": ratio["cpu"], "control": control["wall"],
                      "control_cpu": control["cpu"], "sparsity": sparsity, "hook_share": share, "wall": wall, "cpu": cpu}))


def _hook_share(work) -> float:
    """Fraction of `work()`'s profiled time spent in sparse_ffn's own functions (incl. the torch ops
    they call): a noise-free reading of the overhead that wall-clock ratios measure with noise."""
    prof = cProfile.Profile()
    prof.enable()
    work()
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(tt for (_, _, tt, _, _) in stats.values())
    root = Path(__file__).resolve().parents[1] / "sparse_ffn"
    hooks = tuple(str(root / name) for name in ("masking.py", "counting.py", "expansion.py"))
    ours = {k: v for k, v in stats.items() if k[0].startswith(hooks)}
    # cumulative time of the outermost hook frames (called from outside these modules)
    outer = sum(ct for (_, _, _, ct, callers) in ours.values() if not any(c[0].startswith(hooks) for c in callers))
    for k, (_, _, _, ct, callers) in sorted(ours.items(), key=lambda kv: -kv[1][3])[:8]:
        print(f"  {k[2]:<28} {Path(k[0]).name}:{k[1]:<5} {ct:.3f}s")
    return outer / total if total else 0.0


def _layers(model_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).num_hidden_layers


if __name__ == "__main__":
    main()
