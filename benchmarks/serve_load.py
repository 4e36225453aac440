"""Bounded loopback load test of `sparse-ffn serve` (UltraEval's HTTP protocol).

Starts the real server as a subprocess on 127.0.0.1 (a free port) on the given model, or on a tiny
random Llama written to a temporary directory; records one reference answer per distinct request;
then CLIENTS threads each send REQUESTS requests (UltraEval-style: 4-option log-probability requests
and greedy generation requests, alternating) and every answer must equal its reference exactly.
Prints throughput (requests/s, instances/s, tokens/s as counted by the server's /stats) and latency
percentiles; the last line is one JSON object. Stops by itself: after the requests, or at
--max-seconds, whichever comes first; the server is stopped with SIGINT (killed if it lingers).

    python benchmarks/serve_load.py                                   # tiny model, 8 x 50 requests
    python benchmarks/serve_load.py --model DIR --thresholds thr.json --clients 4 --requests 20
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREFIXES = [
    "Question: What do plants need to grow? Answer:",
    "Question: Which of these is a source of light? Answer:",
    "The capital of France is",
    "To keep bread fresh, you should",
    "The children walked to school along the",
    "Water boils at one hundred degrees at",
]
OPTIONS = [" water and light", " the sun", " Paris", " a cool, dry place"]
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The sun rises in the",
    "Good morning! How are you today? I am fine, thank you. Let us meet at",
    "In 1874 a ship was built in England; it sailed to",
    "She put the cup on the table, poured some tea, and",
]


def build_requests() -> list[tuple[str, dict]]:
    """The distinct requests: ('logprobs', body) and ('generate', body)."""
    reqs = []
    for i, prefix in enumerate(PREFIXES):
        reqs.append(("logprobs", {"params": {"prompt_logprobs": 0, "max_tokens": 1},
                                  "instances": [prefix + o for o in OPTIONS]}))
        prompt = PROMPTS[i % len(PROMPTS)]
        reqs.append(("generate", {"params": {"temperature": 0, "max_tokens": 16, "stop": ["\n\n"]},
                                  "instances": [prompt, prompt + " and"]}))
    return reqs


def post(url: str, body: dict | None, timeout: float) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def start_server(args: argparse.Namespace, model: str | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "sparse_ffn.cli", "serve", "--port", "0", "--host", "127.0.0.1",
           "--device", args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch)]
    if model is not None:
        cmd += ["--model", model]
    for flag in ("thresholds", "strategy", "prune_arg"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if args.server_threads:  # torch's intra-op threads; 1 avoids OpenMP spinning on a busy shared CPU
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + args.start_timeout
    seen = []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if "ready at " in line:
            return proc, line.split("ready at ")[1].split()[0]
    stop_server(proc)
    sys.exit("server did not start:\n" + "".join(seen[-20:]))


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model directory (default: a tiny random Llama in a temp dir)")
    p.add_argument("--thresholds")
    p.add_argument("--strategy")
    p.add_argument("--prune-arg", type=float)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="per client")
    p.add_argument("--max-seconds", type=float, default=300, help="hard stop for the load phase")
    p.add_argument("--timeout", type=float, default=120, help="per request")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--server-threads", type=int, help="OMP_NUM_THREADS for the server (default: torch's own)")
    args = p.parse_args()
    tmp_holder: list[str] = []  # temporary model directories to remove at the end
    try:
        run(args, tmp_holder)
    finally:
        for path in tmp_holder:
            shutil.rmtree(path, ignore_errors=True)


def run(args: argparse.Namespace, tmp_holder: list[str]) -> None:
    if args.model is None and args.thresholds is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tiny_model

        tmp = tempfile.mkdtemp(prefix="sparse_ffn_serve_load_")
        tmp_holder.append(tmp)
        model = str(make_tiny_model("llama", Path(tmp) / "tiny_llama"))
        if args.strategy is None:
            args.thresholds = "5e-4,5e-4,5e-4"  # about half of the tiny model's activations masked
    else:
        model = args.model

    proc, url = start_server(args, model)
    base = url[: -len("/infer")]
    failures: list[str] = []
    try:
        requests = build_requests()
        references = []
        for kind, body in requests:  # warm-up and the answer every later identical request must get
            status, answer = post(url, body, args.timeout)
            if status != 200:
                sys.exit(f"reference request failed: {status} {answer}")
            references.append(answer)
        post(base + "/stats/reset", {}, args.timeout)

        latencies: dict[str, list[float]] = {"logprobs": [], "generate": []}
        counts = {"requests": 0, "instances": 0}
        lock = threading.Lock()
        deadline = time.monotonic() + args.max_seconds

        def client(k: int) -> None:
            for j in range(args.requests):
                if time.monotonic() > deadline:
                    return
                idx = (k * 7 + j) % len(requests)
                kind, body = requests[idx]
                t0 = time.perf_counter()
                try:
                    status, answer = post(url, body, args.timeout)
                except OSError as e:
                    status, answer = -1, repr(e)
                dt = time.perf_counter() - t0
                with lock:
                    if status != 200 or answer != references[idx]:
                        failures.append(f"client {k} request {j} ({kind}): status {status}, answer differs"
                                        if status == 200 else f"client {k} request {j} ({kind}): {status} {answer}")
                        continue
                    latencies[kind].append(dt)
                    counts["requests"] += 1
                    counts["instances"] += len(body["instances"])

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + args.timeout)
        wall = time.perf_counter() - start
        stats = post(base + "/stats", None, args.timeout)[1]
        info = post(base + "/", None, args.timeout)[1]
    finally:
        rc = stop_server(proc)

    every = latencies["logprobs"] + latencies["generate"]
    planned = args.clients * args.requests
    tokens = stats["sparsity"]["tokens"]
    result = {
        "model": stats["model"], "strategy": stats["strategy"], "device": info["device"], "dtype": info["dtype"],
        "server_threads": args.server_threads, "clients": args.clients, "planned": planned,
        "ok": counts["requests"], "failed": len(failures), "wall_s": round(wall, 3),
        "requests_per_s": round(counts["requests"] / wall, 2), "instances_per_s": round(counts["instances"] / wall, 2),
        "tokens_per_s": round(tokens / wall, 1), "tokens": tokens, "server_requests": stats["requests"],
        "sparsity_mean": round(stats["sparsity"]["mean"], 4),
        "latency_ms": {kind: {f"p{q}": round(1000 * pct(v, q), 1) for q in (50, 90, 99)} | {"max": round(1000 * max(v), 1)}
                       for kind, v in (("all", every), *latencies.items()) if v},
        "server_exit": rc,
    }
    print(f"{counts['requests']}/{planned} requests ok, {len(failures)} failed, in {wall:.2f}s "
          f"({args.clients} clients; server exit {rc})", file=sys.stderr)
    print(f"throughput: {result['requests_per_s']} requests/s, {result['instances_per_s']} instances/s, "
          f"{result['tokens_per_s']} tokens/s (real tokens through the model, per the server's /stats)",
          file=sys.stderr)
    for kind, lat in result["latency_ms"].items():
        print(f"latency {kind:>8}: " + ", ".join(f"{k} {v} ms" for k, v in lat.items()), file=sys.stderr)
    for line in failures[:10]:
        print("FAIL " + line, file=sys.stderr)
    print(json.dumps(result))
    if failures or counts["requests"] < planned or stats["requests"] != counts["requests"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
