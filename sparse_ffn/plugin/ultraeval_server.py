"""The gunicorn entry of the UltraEval server (registration only; the server is
`sparse_ffn.model_adapters.ultraeval_server`):

    SPARSE_FFN_MODEL=DIR SPARSE_FFN_THRESHOLDS=thr.json gunicorn -w 1 -b 127.0.0.1:5002 \
        'sparse_ffn.plugin.ultraeval_server:app'

`app` is built from the SPARSE_FFN_* environment on first access, in each worker, never at import.
"""

from __future__ import annotations

from typing import Any

from sparse_ffn.plugin.gunicorn import gunicorn_post_fork, gunicorn_pre_fork  # noqa: F401 - gunicorn config names them here

def __getattr__(name: str) -> Any:
    if name == "app":
        from sparse_ffn.model_adapters import ultraeval_server

        return ultraeval_server.app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
