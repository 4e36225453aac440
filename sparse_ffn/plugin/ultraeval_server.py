"""The gunicorn entry of the UltraEval server (registration only; the server is
`sparse_ffn.model_adapters.ultraeval_server`):

    SPARSE_FFN_MODEL=DIR SPARSE_FFN_THRESHOLDS=thr.json gunicorn -w 1 -b 127.0.0.1:5002 \
        'sparse_ffn.plugin.ultraeval_server:app'

`app` is built from the SPARSE_FFN_* environment on first access (gunicorn's `module:app` lookup, in
each worker), never at import: the CLI imports the server module too.
"""

from __future__ import annotations

import threading
from typing import Any

from sparse_ffn.model_adapters.ultraeval_server import ENV_VARS, create_app_from_env
from sparse_ffn.plugin.gunicorn import gunicorn_post_fork, gunicorn_pre_fork

__all__ = ["ENV_VARS", "create_app_from_env", "gunicorn_post_fork", "gunicorn_pre_fork"]  # and `app`, lazily

_APP_LOCK = threading.Lock()


def __getattr__(name: str) -> Any:
    if name == "app":
        with _APP_LOCK:
            if "app" not in globals():
                globals()["app"] = create_app_from_env()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
