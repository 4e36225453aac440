"""`sparse-ffn serve` on gunicorn under load, on loopback (127.0.0.1 only, bounded counts and timeouts):
bursts of simultaneous connections, a mixed good/bad load with exact /stats, body and JSON limits
answered promptly, counts summed over two workers and kept across a worker restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import http.client as httpclient
from urllib.parse import urlparse

import pytest

from serve_helpers import http, serving

PROMPTS = ["The sun rises in the east", "Paris is the capital of France", "Hello world, how are you?",
           "Water boils at one hundred degrees"]


def post_raw(base: str, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    u = urlparse(base)
    conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/infer", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def expected_tokens(tok, prompts: list[str]) -> int:
    return sum(len(x) for x in {tuple(tok(p)["input_ids"][:-1]) for p in prompts})


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_bursts_mixed_load_and_limits(tiny_llama_dir, tok):
    args = ["--model", str(tiny_llama_dir), "--strategy", "topk", "--prune-arg", "0.5", "--dtype", "float32",
            "--max-body-bytes", "300000"]
    with serving(args) as (base, _):
        # 5 rounds x 64 simultaneous connections: no reset, every answer right
        good = json.dumps({"params": {"prompt_logprobs": 0}, "instances": PROMPTS[:1]}).encode()
        reference = post_raw(base, good)
        errors, answers = [], []
        for _ in range(5):
            barrier = threading.Barrier(64)

            def one() -> None:
                barrier.wait(timeout=30)
                try:
                    answers.append(post_raw(base, good))
                except OSError as e:
                    errors.append(repr(e))

            threads = [threading.Thread(target=one) for _ in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        assert errors == [] and len(answers) == 320 and all(a == reference for a in answers)

        # 16 threads x 30 requests, good and bad mixed: /stats counts exactly the good ones
        http(base + "/stats/reset", {})
        bad = [b"{not json", b"[" * 100000 + b"]" * 100000, json.dumps({"instances": []}).encode(),
               json.dumps({"params": {"use_beam_search": True, "temperature": 0.5}, "instances": ["x"]}).encode(),
               json.dumps({"params": {"logprobs": 2}, "instances": ["x"]}).encode()]
        statuses: list[int] = []
        lock = threading.Lock()
        sent_good: list[list[str]] = []

        def client(k: int) -> None:
            for j in range(30):
                if (k + j) % 2:
                    status, _ = post_raw(base, bad[(k + j) % len(bad)])
                    with lock:
                        statuses.append(status)
                else:
                    prompts = [PROMPTS[(k + j) % 4], PROMPTS[(k + j + 1) % 4]]
                    status, out = post_raw(base, json.dumps({"params": {"prompt_logprobs": 0},
                                                             "instances": prompts}).encode())
                    with lock:
                        statuses.append(status)
                        if status == 200 and len(out) == 2:
                            sent_good.append(prompts)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(statuses) == 480 and statuses.count(200) == 240 and statuses.count(400) == 240
        stats = http(base + "/stats")[1]
        assert stats["requests"] == len(sent_good) == 240 and stats["instances"] == 480
        assert stats["sparsity"]["tokens"] == sum(expected_tokens(tok, p) for p in sent_good)
        assert stats["sparsity"]["mean"] == pytest.approx(0.5, abs=0.02)

        # limits: deep JSON is a 400 (not a 500), a 1 GB Content-Length with a stalled body a prompt 413
        t0 = time.monotonic()
        status, body = post_raw(base, b"[" * 100000 + b"]" * 100000)
        assert status == 400 and "nested too deeply" in body["error"]
        u = urlparse(base)
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000000\r\n\r\n{\"instances\": [")  # and nothing more
            head = ""
            while "--max-body-bytes" not in head:  # headers and body may come in separate packets
                chunk = s.recv(65536).decode()
                if not chunk:
                    break
                head += chunk
        assert head.startswith("HTTP/1.1 413") and "--max-body-bytes" in head
        assert time.monotonic() - t0 < 30  # not gunicorn's or the client's timeout (bounded, not a benchmark)
        assert http(base + "/stats")[1]["requests"] == 240  # nothing counted


def test_two_workers_share_their_counts_and_a_restart_loses_nothing(tiny_llama_dir, tok):
    args = ["--model", str(tiny_llama_dir), "--strategy", "fat", "--prune-arg", "0.01", "--dtype", "float32",
            "--workers", "2"]
    with serving(args) as (base, lines):
        deadline = time.monotonic() + 120
        while sum("ready at" in line for line in lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        sent = []
        pids = set()
        for j in range(24):
            prompts = [PROMPTS[j % 4]]
            assert http(base + "/infer", {"params": {"prompt_logprobs": 0}, "instances": prompts})[0] == 200
            sent.append(prompts)
            pids.add(http(base + "/health")[1]["pid"])
        stats = http(base + "/stats")[1]
        assert stats["requests"] == 24 and stats["sparsity"]["tokens"] == sum(expected_tokens(tok, p) for p in sent)
        assert sum(w["requests"] for w in stats["workers"]) == 24
        victim = stats["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)  # gunicorn starts a new worker; the dead one's file stays
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                after = http(base + "/stats", timeout=10)[1]
                if after["pid"] != victim:
                    break
            except OSError:
                time.sleep(0.2)
        assert after["requests"] == 24 and after["sparsity"] == stats["sparsity"]
