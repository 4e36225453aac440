"""A threaded wsgiref server for the UltraEval app: `sparse-ffn serve --server wsgiref` and in-process
tests (`sparse-ffn serve` runs gunicorn by default: `sparse_ffn.plugin.gunicorn_conf`)."""

from __future__ import annotations

import socket
import socketserver
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from sparse_ffn.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5002


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref's server, one thread per connection (the app's lock serialises the model)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the listen backlog (socketserver's default of 5 resets bursts)


class _Handler(WSGIRequestHandler):
    timeout = 300  # seconds a client may take to send its request; a stuck client frees its thread
    access_log = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.access_log:
            super().log_message(format, *args)


def make_server(app: Callable, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                access_log: bool = False) -> ThreadingWSGIServer:
    """A threaded wsgiref server for `app`, bound (port 0: a free port; see `server.server_address`)."""
    handler = type("Handler", (_Handler,), {"access_log": access_log})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (ThreadingWSGIServer,), {"address_family": family})
    try:
        server = server_class((host, port), handler)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
    server.set_app(app)
    return server


def server_url(server: ThreadingWSGIServer, path: str = "/infer") -> str:
    host, port = server.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
