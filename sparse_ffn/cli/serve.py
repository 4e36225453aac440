"""`sparse-ffn serve`: a dense or sparse model behind UltraEval's HTTP protocol (POST /infer).

    sparse-ffn serve --model DIR --thresholds thr.json            # http://127.0.0.1:5002/infer
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from sparse_ffn.cli.options import add_ffn_options, add_placement_options, ffn_args
from sparse_ffn.model_adapters.ultraeval_server import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES
from sparse_ffn.model_adapters.wsgi_server import DEFAULT_HOST, DEFAULT_PORT


def _cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.model_adapters.ultraeval_server import create_app
    from sparse_ffn.model_adapters.wsgi_server import make_server, server_url

    started = time.perf_counter()
    app = create_app(args.model, thresholds=args.thresholds, strategy=args.strategy, prune_arg=args.prune_arg,
                     dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                     max_body_bytes=args.max_body_bytes, experts=args.experts,
                     ffn_args=ffn_args(args))
    server = make_server(app, args.host, args.port, access_log=args.access_log)
    url = server_url(server)
    strategy = app.info["strategy"] + (f" {app.info['prune_arg']:g}" if app.info["prune_arg"] is not None else "")
    if app.info["thresholds_source"]:
        strategy += f" {app.info['thresholds_source']}"
    print(f"sparse-ffn: serving {app.model_name} ({strategy}; {app.describe()['dtype']} on {app.device}; "
          f"loaded in {time.perf_counter() - started:.1f}s)", file=sys.stderr)
    print(f"sparse-ffn: ready at {url} (stats: {server_url(server, '/stats')}; Ctrl-C stops)",
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
    s = app.stats()["sparsity"]
    print(f"sparse-ffn: stopped after {app.stats()['requests']} requests (sparsity {s['mean']:.4f} over "
          f"{s['tokens']} tokens)", file=sys.stderr, flush=True)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve", help="serve a dense or sparse model over UltraEval's HTTP protocol (POST /infer)",
        description="Serve a local model with sparse FFNs for UltraEval's `--model general "
                    "--model_args url=http://HOST:PORT/infer`. GET /stats gives the sparsity so far, "
                    "POST /stats/reset restarts counting. The URL is printed to stderr when ready.")
    s.add_argument("--model", metavar="PATH", help="local Hugging Face model directory (optional when the "
                                                   "thresholds file names its model)")
    s.add_argument("--thresholds", metavar="FILE", help="threshold file or list (implies --strategy cett)")
    from sparse_ffn.core.masking import STRATEGIES, strategy_help

    s.add_argument("--strategy", choices=tuple(STRATEGIES), help="default: dense, or cett with --thresholds. "
                                                                  + strategy_help())
    s.add_argument("--prune-arg", type=float, metavar="X", help="eps for fat, kept ratio for topk")
    s.add_argument("--experts", metavar="DIR", help="Sparse Expansion experts (not yet supported)")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; "
                                                        "anything else exposes the model to the network)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    s.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    add_placement_options(s)
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"sequences per forward pass (default {DEFAULT_MAX_BATCH})")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"largest request body accepted, else 413 (default {DEFAULT_MAX_BODY_BYTES})")
    s.add_argument("--access-log", action="store_true", help="log every request to stderr")
    add_ffn_options(s)
    s.set_defaults(func=_cmd_serve)
