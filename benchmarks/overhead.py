"""Time overhead of the sparse_ffn adapter (cett thresholds) against lm-eval's own `hf` model.

Both models answer the same lm-eval task's requests (built once by lm-eval from the stock task config)
in this one process, interleaved (hf, sparse, hf, sparse, ...), so machine noise hits both alike; we
time the model calls only and report the ratio of the medians. Target: at most 1.05.

    python benchmarks/overhead.py --model "$(sparse-ffn models fetch smollm2-135m)" \
        --data-dir ../shared/data --task piqa_local --limit 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lm_eval
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
    args = p.parse_args()

    tasks_dir = Path(tempfile.mkdtemp(prefix="sparse_ffn_tasks_"))
    write_task_configs(Path(args.data_dir), tasks_dir)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    common = dict(pretrained=args.model, device="cpu", batch_size=args.batch_size, max_length=args.max_length,
                  dtype="float32")
    hf = HFLM(**common)
    n_layers = hf.model.config.num_hidden_layers
    sparse = SparseFFNLM(thresholds=args.thresholds or [args.threshold] * n_layers, **common)

    task = lm_eval.tasks.get_task_dict([args.task], manager)[args.task]
    task.build_all_requests(limit=args.limit, rank=0, world_size=1)
    requests = task.instances
    kind = requests[0].request_type

    def run(lm) -> float:
        start = time.perf_counter()
        getattr(lm, kind)([r for r in requests], disable_tqdm=True)
        return time.perf_counter() - start

    run(hf), run(sparse)  # warm-up: task building, caches
    sparse.sparsity.stats.reset()
    times: dict[str, list[float]] = {"hf": [], "sparse_ffn": []}
    for _ in range(args.repeats):
        times["hf"].append(run(hf))
        times["sparse_ffn"].append(run(sparse))
    ratio = statistics.median(times["sparse_ffn"]) / statistics.median(times["hf"])
    print(f"hf          median {statistics.median(times['hf']):.2f}s  runs {[round(t, 2) for t in times['hf']]}")
    print(f"sparse_ffn  median {statistics.median(times['sparse_ffn']):.2f}s  runs "
          f"{[round(t, 2) for t in times['sparse_ffn']]}")
    sparsity = sparse.sparsity.stats.summary()["mean"]
    print(f"time ratio sparse_ffn / hf = {ratio:.3f} (target <= 1.05) at mean sparsity {sparsity:.3f}")
    print(json.dumps({"task": args.task, "limit": args.limit, "requests": len(requests), "ratio": ratio, "sparsity": sparsity, **times}))


if __name__ == "__main__":
    main()
