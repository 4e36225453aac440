"""`sparse-ffn serve`: a dense or sparse model behind UltraEval's HTTP protocol (POST /infer), on gunicorn.

    sparse-ffn serve --model DIR --thresholds thr.json            # http://127.0.0.1:5002/infer
    sparse-ffn serve --experts EXPERTS_DIR                         # Sparse Expansion
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from sparse_ffn.cli.options import add_ffn_options, add_placement_options, ffn_args
from sparse_ffn.errors import UserError
from sparse_ffn.model_adapters.ultraeval_server import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, OVERLONG
from sparse_ffn.model_adapters.wsgi_server import DEFAULT_HOST, DEFAULT_PORT


def _app_kwargs(args: argparse.Namespace) -> dict:
    return dict(thresholds=args.thresholds, strategy=args.strategy, prune_arg=args.prune_arg, dtype=args.dtype,
                device=args.device, max_batch=args.max_batch, max_body_bytes=args.max_body_bytes,
                experts=args.experts, ffn_args=ffn_args(args), overlong=args.overlong)


def _describe(app: Any, started: float) -> str:
    strategy = app.info["strategy"] + (f" {app.info['prune_arg']:g}" if app.info["prune_arg"] is not None else "")
    if app.info["thresholds_source"]:
        strategy += f" {app.info['thresholds_source']}"
    if app.info.get("experts_source"):
        strategy += f" + experts {app.info['experts_source']}"
    return (f"sparse-ffn: serving {app.model_name} ({strategy}; {app.describe()['dtype']} on {app.device}; "
            f"loaded in {time.perf_counter() - started:.1f}s)")


def _cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.model_adapters.ultraeval_server import create_app

    if args.server == "wsgiref":
        return _serve_wsgiref(args)
    try:
        from sparse_ffn.plugin.gunicorn import STATS_ENV, gpu_list, run_gunicorn
    except ImportError:  # pragma: no cover - gunicorn is a dependency (Linux and macOS)
        raise UserError("--server gunicorn: gunicorn is not installed (pip install gunicorn, or --server "
                        "wsgiref)") from None
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    workers = args.workers or max(1, len(gpu_list()))
    started = time.perf_counter()
    kwargs = _app_kwargs(args)
    if args.stats_dir:
        os.environ[STATS_ENV] = args.stats_dir
    else:
        os.environ.pop(STATS_ENV, None)  # on_starting makes a temporary one
    preload = workers == 1 and not str(args.device).startswith("cuda") and not gpu_list()
    if preload:  # one CPU worker: load here, so a mistake is one line and exit 2; the worker inherits it
        app = create_app(args.model, **kwargs)
        print(_describe(app, started), file=sys.stderr, flush=True)

        def load() -> Any:
            app.share_stats(os.environ[STATS_ENV])  # the directory made at start
            return app
    else:  # each worker loads its own model after its GPU is chosen; check the arguments here first
        from sparse_ffn.model_adapters.loading import model_dir
        from sparse_ffn.model_adapters.sparsity_setup import resolve_sparsity

        setup = resolve_sparsity(args.thresholds, args.strategy, args.prune_arg,
                                 pretrained=args.model, ffn_args=ffn_args(args), experts=args.experts,
                                 model_arg="--model PATH")
        model_dir(str(setup.pretrained))

        def load() -> Any:
            return create_app(args.model, **kwargs, stats_dir=os.environ[STATS_ENV])
    host = f"[{args.host}]" if ":" in args.host else args.host
    rc = run_gunicorn(load, {"bind": [f"{host}:{args.port}"], "workers": workers, "timeout": args.timeout,
                             "accesslog": "-" if args.access_log else None,
                             "loglevel": "info" if args.access_log else "warning"})
    return 0 if rc == 0 else 2


def _serve_wsgiref(args: argparse.Namespace) -> int:
    """The standard library's server (threaded, backlog 1024): for platforms without gunicorn."""
    from sparse_ffn.model_adapters.ultraeval_server import create_app
    from sparse_ffn.model_adapters.wsgi_server import make_server, server_url

    started = time.perf_counter()
    app = create_app(args.model, **_app_kwargs(args), stats_dir=args.stats_dir)
    server = make_server(app, args.host, args.port, access_log=args.access_log)
    print(_describe(app, started), file=sys.stderr)
    print(f"sparse-ffn: ready at {server_url(server)} (stats: {server_url(server, '/stats')}; Ctrl-C stops)",
          file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    stats = app.stats()
    print(f"sparse-ffn: stopped after {stats['requests']} requests (sparsity {stats['sparsity']['mean']:.4f} over "
          f"{stats['sparsity']['tokens']} tokens)", file=sys.stderr, flush=True)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve", help="serve a dense or sparse model over UltraEval's HTTP protocol (POST /infer)",
        description="Serve a local model with sparse FFNs for UltraEval's `--model general "
                    "--model_args url=http://HOST:PORT/infer`, on gunicorn (settings: "
                    "sparse_ffn.plugin.gunicorn_conf). GET /stats gives the counts so far (every worker), "
                    "POST /stats/reset restarts counting. The URL is printed to stderr when ready.")
    s.add_argument("--model", metavar="PATH", help="local Hugging Face model directory (optional when the "
                                                   "thresholds file or experts manifest names its model)")
    s.add_argument("--thresholds", metavar="FILE", help="threshold file or list (implies --strategy cett)")
    from sparse_ffn.core.masking import STRATEGIES, strategy_help

    s.add_argument("--strategy", choices=tuple(STRATEGIES), help="default: dense, or cett with --thresholds. "
                                                                  + strategy_help())
    s.add_argument("--prune-arg", type=float, metavar="X", help="eps for fat, kept ratio for topk")
    s.add_argument("--experts", metavar="DIR", help="Sparse Expansion experts directory (usage in /stats)")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; "
                                                        "anything else exposes the model to the network)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    s.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    add_placement_options(s)
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"sequences per forward pass (default {DEFAULT_MAX_BATCH})")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"largest request body accepted, else 413 (default {DEFAULT_MAX_BODY_BYTES})")
    s.add_argument("--overlong", choices=OVERLONG, default="truncate",
                   help="a prompt over the model's context: truncate it from the left (default; said in the "
                        "X-Sparse-FFN-Truncated header and counted in /stats) or refuse the request (400)")
    s.add_argument("--server", choices=("gunicorn", "wsgiref"), default="gunicorn",
                   help="gunicorn (default; Linux, macOS) or the standard library's threaded server")
    s.add_argument("--workers", type=int, metavar="N",
                   help="gunicorn workers (default: one per GPU in SPARSE_FFN_GPUS, else 1)")
    s.add_argument("--timeout", type=int, default=600, metavar="S",
                   help="gunicorn worker timeout in seconds (default 600)")
    s.add_argument("--stats-dir", metavar="DIR", help="directory the workers share their counts in (default: "
                                                      "a temporary one, removed at exit)")
    s.add_argument("--access-log", action="store_true", help="log every request to stderr")
    add_ffn_options(s)
    s.set_defaults(func=_cmd_serve)
