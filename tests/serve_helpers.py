"""Helpers for tests of `sparse-ffn serve` on loopback: start the real command (gunicorn), talk HTTP."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from conftest import BIN, subprocess_env


def http(url: str, body: object = None, *, raw: bytes | None = None, method: str | None = None,
         timeout: float = 60) -> tuple[int, object, dict]:
    """(status, JSON answer, headers)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@contextmanager
def serving(args: list[str], *, ready_timeout: float = 120, env: dict | None = None) -> Iterator[tuple[str, list[str]]]:
    """Run `sparse-ffn serve ARGS --port 0 --device cpu` (gunicorn) until the block ends; yields (base
    URL, the stderr lines so far: a live list). Stopped with SIGINT; must exit 0."""
    cmd = [str(BIN / "sparse-ffn"), "serve", *args, "--port", "0", "--host", "127.0.0.1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**subprocess_env(), "OMP_NUM_THREADS": "1", **(env or {})})
    lines: list[str] = []
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.append(line)
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline, url = time.monotonic() + ready_timeout, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if "ready at " in line:
                url = line.split("ready at ")[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:") and url.endswith("/infer"), "".join(lines)
        yield url[: -len("/infer")], lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, "".join(lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def in_thread(app) -> Iterator[str]:  # noqa: ANN001
    """Serve the WSGI `app` from a thread on a free loopback port until the block ends; yields the base URL."""
    from sparse_ffn.model_adapters.wsgi_server import make_server, server_url

    srv = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server_url(srv, "")
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
