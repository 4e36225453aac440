"""gunicorn settings for the UltraEval server (what `sparse-ffn serve` runs, and for plain gunicorn):

    SPARSE_FFN_MODEL=DIR SPARSE_FFN_THRESHOLDS=thr.json gunicorn -c python:sparse_ffn.plugin.gunicorn_conf
    SPARSE_FFN_GPUS=0,1,2,3 SPARSE_FFN_MODEL=DIR gunicorn -c python:sparse_ffn.plugin.gunicorn_conf  # 4 workers

- `timeout` 600 s (gunicorn's 30 s kills a long generation request; UltraEval's own conf uses 300), and
  the gthread worker keeps its heartbeat while a request runs;
- `backlog` 2048 connections waiting to be accepted (wsgiref's was 5: bursts got resets);
- one worker per GPU in SPARSE_FFN_GPUS (or CUDA_VISIBLE_DEVICES; SPARSE_FFN_WORKERS overrides), each
  with its own CUDA_VISIBLE_DEVICES (the `pre_fork`/`post_fork` hooks; no NVML); 1 worker otherwise;
- 4 threads per worker: /stats and /health answer while the model (one lock) works;
- workers share their counts in SPARSE_FFN_STATS_DIR (made at start when unset), so /stats is the run's.
Command-line flags (`-b 0.0.0.0:5002`, `-w 2`, `--timeout`) override these as usual.
"""

from __future__ import annotations

import os

from sparse_ffn.plugin.gunicorn import gpu_list, gunicorn_on_exit, gunicorn_on_starting, gunicorn_post_fork, \
    gunicorn_post_worker_init, gunicorn_pre_fork

wsgi_app = "sparse_ffn.plugin.ultraeval_server:app"
bind = [os.environ.get("SPARSE_FFN_BIND", "127.0.0.1:5002")]
workers = int(os.environ.get("SPARSE_FFN_WORKERS") or 0) or max(1, len(gpu_list()))
worker_class = "gthread"
threads = 4
timeout = 600
graceful_timeout = 30
keepalive = 5
backlog = 2048
proc_name = "sparse-ffn-serve"
preload_app = False  # each worker loads its model after its GPU is chosen

on_starting = gunicorn_on_starting
pre_fork = gunicorn_pre_fork
post_fork = gunicorn_post_fork
post_worker_init = gunicorn_post_worker_init
on_exit = gunicorn_on_exit

SETTINGS = ("wsgi_app", "bind", "workers", "worker_class", "threads", "timeout", "graceful_timeout", "keepalive",
            "backlog", "proc_name", "preload_app", "on_starting", "pre_fork", "post_fork", "post_worker_init",
            "on_exit")
