"""gunicorn hooks for one worker per GPU (`gunicorn -c` config or `--pre-fork`-style settings):
each worker gets its own CUDA_VISIBLE_DEVICES from SPARSE_FFN_GPUS before it loads the app."""

from __future__ import annotations

import os
from typing import Any


def gunicorn_pre_fork(server: Any, worker: Any) -> None:
    """gunicorn hook (master): give the new worker a GPU no live worker holds, from SPARSE_FFN_GPUS
    (default: CUDA_VISIBLE_DEVICES), e.g. "0,1,2,3". Nothing happens when neither is set."""
    gpus = [g.strip() for g in (os.environ.get("SPARSE_FFN_GPUS") or os.environ.get("CUDA_VISIBLE_DEVICES")
                                or "").split(",") if g.strip()]
    if not gpus:
        return
    taken = {getattr(w, "sparse_ffn_gpu", None) for w in getattr(server, "WORKERS", {}).values()}
    free = [g for g in gpus if g not in taken]
    worker.sparse_ffn_gpu = free[0] if free else gpus[(worker.age - 1) % len(gpus)]


def gunicorn_post_fork(server: Any, worker: Any) -> None:
    """gunicorn hook (the worker, before it loads the app and torch): see only its own GPU."""
    gpu = getattr(worker, "sparse_ffn_gpu", None)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        server.log.info(f"sparse-ffn worker {worker.pid}: CUDA_VISIBLE_DEVICES={gpu}")
