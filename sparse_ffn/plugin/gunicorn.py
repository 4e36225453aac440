"""gunicorn hooks and runner for the UltraEval server (settings: `sparse_ffn.plugin.gunicorn_conf`).

One worker per GPU: each worker gets its own CUDA_VISIBLE_DEVICES from SPARSE_FFN_GPUS before it loads
the app (no NVML: the list is taken as given). The workers share their counts through a directory
(SPARSE_FFN_STATS_DIR; a temporary one made at start when unset) so any worker's /stats sums them all.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any, Callable

STATS_ENV = "SPARSE_FFN_STATS_DIR"


def gpu_list() -> list[str]:
    """SPARSE_FFN_GPUS (default: CUDA_VISIBLE_DEVICES), e.g. "0,1,2,3" -> ["0", "1", "2", "3"]."""
    return [g.strip() for g in (os.environ.get("SPARSE_FFN_GPUS") or os.environ.get("CUDA_VISIBLE_DEVICES")
                                or "").split(",") if g.strip()]


def gunicorn_pre_fork(server: Any, worker: Any) -> None:
    """gunicorn hook (master): give the new worker a GPU no live worker holds, from SPARSE_FFN_GPUS
    (default: CUDA_VISIBLE_DEVICES), e.g. "0,1,2,3". Nothing happens when neither is set."""
    gpus = gpu_list()
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


def gunicorn_on_starting(server: Any) -> None:
    """gunicorn hook (master, before any worker): the shared stats directory, exported to the workers;
    an existing one is cleared of an earlier run's files."""
    from sparse_ffn.model_adapters.serve_stats import clear

    directory = (os.environ.get(STATS_ENV) or "").strip()
    if directory:
        os.makedirs(directory, exist_ok=True)
        clear(directory)
        server.sparse_ffn_stats_tmp = None
    else:
        directory = tempfile.mkdtemp(prefix="sparse-ffn-stats-")
        server.sparse_ffn_stats_tmp = directory
    os.environ[STATS_ENV] = directory


def gunicorn_post_worker_init(worker: Any) -> None:
    """gunicorn hook (a worker, its app loaded): say where it serves, on stderr."""
    app = getattr(worker, "wsgi", None)
    host, port = worker.sockets[0].getsockname()[:2] if worker.sockets else ("?", 0)
    url = f"http://{f'[{host}]' if ':' in str(host) else host}:{port}"
    what = ""
    if hasattr(app, "describe"):
        d = app.describe()
        what = f"{d['model']} ({d['strategy']}; {d['dtype']} on {d['device']}), "
    print(f"sparse-ffn: worker {os.getpid()} serving {what}ready at {url}/infer (stats: {url}/stats)",
          file=sys.stderr, flush=True)


def gunicorn_on_exit(server: Any) -> None:
    """gunicorn hook (master, stopping): the whole run's counts on stderr; a temporary stats directory
    is removed."""
    from sparse_ffn.model_adapters.serve_stats import directory_totals

    directory = os.environ.get(STATS_ENV)
    totals = directory_totals(directory) if directory and os.path.isdir(directory) else None
    if totals is None:
        print("sparse-ffn: stopped after 0 requests", file=sys.stderr, flush=True)
    else:
        s = totals["sparsity"]
        print(f"sparse-ffn: stopped after {totals['requests']} requests (sparsity {s['mean']:.4f} over "
              f"{s['tokens']} tokens; {totals['truncated']['instances']} prompts truncated)",
              file=sys.stderr, flush=True)
    tmp = getattr(server, "sparse_ffn_stats_tmp", None)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def run_gunicorn(load: Callable[[], Any], overrides: dict[str, Any]) -> int:
    """Run gunicorn in this process with the settings of `gunicorn_conf` updated by `overrides`;
    `load()` gives the WSGI app in each worker (it may return an object built before the fork).
    Returns gunicorn's exit status (0 after Ctrl-C or SIGTERM)."""
    from gunicorn.app.base import BaseApplication

    from sparse_ffn.plugin import gunicorn_conf

    settings = {k: v for k, v in vars(gunicorn_conf).items() if k in gunicorn_conf.SETTINGS}
    settings.update(overrides)
    settings.pop("wsgi_app", None)

    class Application(BaseApplication):
        def load_config(self) -> None:
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return load()

    try:
        Application().run()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
