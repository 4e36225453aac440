"""The UltraEval HTTP server on loopback: real sockets, urllib, against lm-eval's adapter and `generate`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from conftest import BIN, subprocess_env
from serve_helpers import in_thread
from sparse_ffn.core.ffn import find_ffns, model_fingerprint
from sparse_ffn.artifacts.thresholds import ThresholdFile

THRESHOLD = 5e-4  # s_i = |a_i| * ||w_i|| is of order 1e-3 on the tiny random model: about half masked
MAX_BODY = 64 * 1024

# (context, continuation) pairs whose whole-text tokenisation splits at the boundary (checked below)
PAIRS = [
    ("The sun rises in the", " east"),
    ("Paris is the capital of", " France"),
    ("Question: What do plants need to grow? Answer:", " Plants need water, air, light and soil."),
    ("She put the cup on the table, poured some tea, and read", " the morning paper by the window."),
    ("Question: Which of these is a source of light? Answer:", " The sun"),  # same input as the next
    ("Question: Which of these is a source of light? Answer:", " The water"),  # (one-token difference)
]
GEN_PROMPTS = ["The quick brown fox", "Good morning! How are you today?", "In 1874 a ship was built in",
               "Water boils at", "Hello"]


# -- helpers ------------------------------------------------------------------------------------------
def http(url: str, body: object = None, *, raw: bytes | None = None, method: str | None = None,
         timeout: float = 60) -> tuple[int, object]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def logprobs(base: str, prompts: list[str]) -> list[list[float]]:
    status, out = http(base + "/infer", {"params": {"prompt_logprobs": 0, "max_tokens": 1}, "instances": prompts})
    assert status == 200, out
    return out


def generate(base: str, prompts: list[str], **params) -> list[str]:
    status, out = http(base + "/infer", {"params": {"temperature": 0, **params}, "instances": prompts})
    assert status == 200, out
    return out


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def thresholds_file(tiny_llama_dir, tmp_path_factory):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ffns = find_ffns(model)
    path = tmp_path_factory.mktemp("thr") / "thr.json"
    ThresholdFile(thresholds=[THRESHOLD] * len(ffns),
                  model={"name_or_path": str(tiny_llama_dir), **model_fingerprint(model, ffns)}).save(path)
    return path


@pytest.fixture(scope="module")
def server(thresholds_file):
    """The real server in a thread on a free loopback port; the model comes from the thresholds file."""
    from sparse_ffn.model_adapters.ultraeval_server import create_app

    app = create_app(None, thresholds=str(thresholds_file), dtype="float32", device="cpu", max_batch=3,
                     max_body_bytes=MAX_BODY, overlong="refuse")  # the strict rule; truncation: test_ultraeval_client.py
    with in_thread(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def adapter(thresholds_file):
    from sparse_ffn.model_adapters.lm_eval_adapter import SparseFFNLM

    return SparseFFNLM(thresholds=str(thresholds_file), device="cpu", batch_size=4, max_length=512, dtype="float32")


# -- tests --------------------------------------------------------------------------------------------
def test_logprobs_and_sparsity_equal_the_lm_eval_adapter(server, adapter):
    from lm_eval.api.instance import Instance

    base, app = server
    for ctx, cont in PAIRS:  # texts where lm-eval's (context, continuation) split is the whole text's
        whole, ctx_enc = adapter.tok_encode(ctx + cont), adapter.tok_encode(ctx)
        assert whole[:len(ctx_enc)] == ctx_enc and app.tokenizer(ctx + cont)["input_ids"] == whole
    http(base + "/stats/reset", {})
    adapter.sparsity.stats.reset()

    served = logprobs(base, [c + x for c, x in PAIRS])
    reference = adapter.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)])

    for (ctx, cont), values, (ll, _) in zip(PAIRS, served, reference):
        assert len(values) == len(adapter.tok_encode(ctx + cont)) - 1
        n_cont = len(adapter.tok_encode(ctx + cont)) - len(adapter.tok_encode(ctx))
        assert math.isclose(sum(values[-n_cont:]), ll, abs_tol=1e-5), (ctx, cont)

    # the same tokens were counted (each distinct input (ctx+cont)[:-1] once) and masked alike
    stats = http(base + "/stats")[1]
    expected = adapter.sparsity_summary()["sparsity"]
    assert stats["sparsity"]["tokens"] == expected["tokens"]
    assert stats["sparsity"]["tokens"] == sum(len(adapter.tok_encode(c + x)) - 1 for c, x in PAIRS[:-1])
    assert stats["sparsity"]["per_layer"] == pytest.approx(expected["per_layer"], abs=1e-12)
    assert 0.2 < stats["sparsity"]["mean"] < 0.8
    assert stats["strategy"] == "cett" and stats["model"] == app.model_name and stats["version"]
    assert stats["requests"] == 1 and stats["instances"] == len(PAIRS)

    # every prompt token but the first, against the adapter's own (sparsified) model, token by token
    ids = torch.tensor([adapter.tok_encode(PAIRS[2][0] + PAIRS[2][1])])
    with torch.no_grad():
        per_token = torch.log_softmax(adapter.model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])
    assert served[2] == pytest.approx(per_token[:, 0].tolist(), abs=1e-5)


def test_options_sharing_a_prefix_get_identical_prefix_values(server):
    base, _ = server
    prefix = "Question: What do plants need to grow? Answer:"
    options = [" Plants need water.", " Light", " Soil and air, and a little light.", " Plants"]
    values = logprobs(base, [prefix + o for o in options])
    n_prefix = len(server[1].tokenizer(prefix)["input_ids"]) - 1
    for v in values[1:]:
        assert v[:n_prefix] == values[0][:n_prefix]  # bit-identical: right padding + attention mask
    assert len({len(v) for v in values}) > 1
    single = logprobs(base, ["Hello"])
    assert single == [[]] or len(single[0]) == len(server[1].tokenizer("Hello")["input_ids"]) - 1


def test_greedy_generation_equals_model_generate(server, adapter):
    base, app = server
    served = generate(base, GEN_PROMPTS, max_tokens=12)  # 5 prompts: batches of 3 and 2, left-padded
    tok = adapter.tokenizer
    for prompt, text in zip(GEN_PROMPTS, served):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = adapter.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                         do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        assert text == tok.decode(new, skip_special_tokens=True), prompt
    # stop strings cut the continuation before their first occurrence
    full = served[0]
    stop = full[3:5]
    assert stop and generate(base, GEN_PROMPTS[:1], max_tokens=12, stop=[stop, "never-there"]) == [
        full[:full.find(stop)]]
    assert generate(base, GEN_PROMPTS[:1], max_tokens=12, stop=stop) == [full[:full.find(stop)]]
    # sampling with a seed is reproducible; vLLM's keys we do not use are ignored
    sampled = generate(base, GEN_PROMPTS[:2], max_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=3,
                       n=1, best_of=None, use_beam_search=False, logprobs=None)
    assert sampled == generate(base, GEN_PROMPTS[:2], max_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=3)
    assert all(isinstance(s, str) for s in sampled)


def test_bad_requests_get_4xx_and_change_nothing(server):
    base, app = server
    logprobs(base, ["The sun rises in the east"])  # something counted already
    before = http(base + "/stats")[1]
    assert before["sparsity"]["tokens"] > 0
    too_long = "The quick brown fox jumps over the lazy dog. " * 200  # >> 512 tokens
    cases = [
        (dict(raw=b"{not json"), 400, "JSON"),
        (dict(raw=b"\xff\xfe\x00garbage"), 400, "JSON"),
        (dict(body=["a", "b"]), 400, "object"),
        (dict(body={"params": {}}), 400, "instances"),
        (dict(body={"instances": "one prompt"}), 400, "list"),
        (dict(body={"instances": []}), 400, "empty"),
        (dict(body={"instances": ["ok", 3]}), 400, "instances[1]"),
        (dict(body={"instances": ["ok", None]}), 400, "instances[1]"),
        (dict(body={"instances": ["ok", ""]}), 400, "instances[1] is empty"),
        (dict(body={"instances": ["ok", too_long]}), 400, "context"),
        (dict(body={"params": {"prompt_logprobs": 0}, "instances": [too_long]}), 400, "context"),
        (dict(body={"instances": ["x" * (MAX_BODY + 10)]}), 413, "--max-body-bytes"),
        (dict(body={"params": "greedy", "instances": ["ok"]}), 400, "params"),
        (dict(body={"params": {"max_tokens": 0}, "instances": ["ok"]}), 400, "max_tokens"),
        (dict(body={"params": {"temperature": "hot"}, "instances": ["ok"]}), 400, "temperature"),
        (dict(body={"params": {"top_p": 1.5}, "instances": ["ok"]}), 400, "top_p"),
        (dict(body={"params": {"stop": 5}, "instances": ["ok"]}), 400, "stop"),
        (dict(body={"params": {"prompt_logprobs": "yes"}, "instances": ["ok"]}), 400, "prompt_logprobs"),
    ]
    for kwargs, status, needle in cases:
        got, answer = http(base + "/infer", **kwargs)
        assert got == status and needle in answer["error"], (str(kwargs)[:100], got, answer)
        assert http(base + "/stats") == (200, before)  # still answering; nothing counted or lost
    assert http(base + "/infer", method="GET")[0] == 405
    assert http(base + "/nowhere")[0] == 404
    assert http(base + "/")[0] == 200  # UltraEval's readiness probe: any answer
    assert http(base + "/stats") == (200, before)
    logprobs(base, ["Paris is the capital of France"])  # and it still computes
    after = http(base + "/stats")[1]
    assert after["sparsity"]["tokens"] > before["sparsity"]["tokens"] and after["requests"] == before["requests"] + 1


def test_counts_survive_requests_that_publish_out_of_order(server, monkeypatch):
    """Two requests run one after the other (the model lock) but may publish their counter snapshots in
    the other order; the later snapshot must win (a 16-thread load once lost a request's tokens so)."""
    base, app = server
    http(base + "/stats/reset", {})
    publish, calls, second_done = app._publish, [], threading.Event()

    def out_of_order(*args, **kw):
        calls.append(1)
        if len(calls) == 1:  # the first to finish computing publishes last
            assert second_done.wait(timeout=30)
            return publish(*args, **kw)
        publish(*args, **kw)
        second_done.set()

    monkeypatch.setattr(app, "_publish", out_of_order)
    prompts = [[PAIRS[0][0] + PAIRS[0][1]], [PAIRS[2][0] + PAIRS[2][1]]]
    threads = [threading.Thread(target=logprobs, args=(base, p)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stats = http(base + "/stats")[1]
    assert len(calls) == 2 and stats["requests"] == 2
    assert stats["sparsity"]["tokens"] == sum(len(app.tokenizer(p[0])["input_ids"]) - 1 for p in prompts)


def test_concurrent_clients_get_the_sequential_answers_and_reset(server):
    base, _ = server
    prompts = [[c + x] for c, x in PAIRS[:4]]
    expected = [logprobs(base, p) for p in prompts]
    results: dict[int, list] = {}

    def client(k: int) -> None:
        results[k] = [logprobs(base, prompts[(k + j) % 4]) for j in range(3)]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for k in range(4):
        assert results[k] == [expected[(k + j) % 4] for j in range(3)]
    status, reset = http(base + "/stats/reset", {})
    assert status == 200 and reset["reset"] and reset["before"]["sparsity"]["tokens"] > 0
    now = http(base + "/stats")[1]
    assert now["sparsity"]["tokens"] == 0 and now["requests"] == 0


def test_cli_serve_subprocess_answers_and_stops_on_ctrl_c(tiny_llama_dir):
    cmd = [str(BIN / "sparse-ffn"), "serve", "--model", str(tiny_llama_dir), "--strategy", "fat",
           "--prune-arg", "0.01", "--port", "0", "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline, url, lines = time.monotonic() + 60, None, []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "ready at " in line:
                url = line.split("ready at ")[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:") and url.endswith("/infer"), "".join(lines)
        base = url[: -len("/infer")]
        out = generate(base, ["Hello"], max_tokens=4)
        assert len(out) == 1 and isinstance(out[0], str)
        stats = http(base + "/stats")[1]
        assert stats["strategy"] == "fat" and stats["prune_arg"] == 0.01 and stats["sparsity"]["tokens"] > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_user_errors(tiny_llama_dir, capsys):
    from sparse_ffn.cli import main

    assert main(["serve", "--model", str(tiny_llama_dir), "--experts", "experts/"]) == 2  # served since #12:
    assert "experts" in capsys.readouterr().err  # a missing directory is one line naming it
    assert main(["serve", "--model", str(tiny_llama_dir), "--thresholds", "0,0,0", "--strategy", "fat",
                 "--prune-arg", "0.1"]) == 2
    assert "only goes with strategy=cett" in capsys.readouterr().err
    assert main(["serve", "--thresholds", "0,0,0"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_llama_dir / "nope")]) == 2
    assert "not a local model directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_llama_dir), "--thresholds", "0,0"]) == 2
    assert "2 thresholds" in capsys.readouterr().err


def test_module_app_is_built_from_the_environment_lazily(tiny_llama_dir, monkeypatch):
    import importlib

    mod = importlib.import_module("sparse_ffn.plugin.ultraeval_server")
    assert "app" not in vars(mod)  # importing loads nothing
    monkeypatch.setenv("SPARSE_FFN_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("SPARSE_FFN_STRATEGY", "topk")
    monkeypatch.setenv("SPARSE_FFN_PRUNE_ARG", "0.5")
    monkeypatch.setenv("SPARSE_FFN_DEVICE", "cpu")
    monkeypatch.setenv("SPARSE_FFN_MAX_BATCH", "2")
    try:
        try:
            from gunicorn.util import import_app  # what `gunicorn module:app` does in each worker
        except ImportError:
            app = mod.app
        else:
            app = import_app("sparse_ffn.plugin.ultraeval_server:app")
        assert app is mod.app and app.max_batch == 2 and app.info["strategy"] == "topk"
        status = []
        body = app({"REQUEST_METHOD": "GET", "PATH_INFO": "/stats"}, lambda s, h: status.append(s))
        assert status == ["200 OK"] and json.loads(b"".join(body))["sparsity"]["tokens"] == 0
        monkeypatch.setenv("SPARSE_FFN_MAX_BATCH", "two")
        with pytest.raises(Exception, match="SPARSE_FFN_MAX_BATCH"):
            mod.create_app_from_env()
        monkeypatch.delenv("SPARSE_FFN_MODEL")
        with pytest.raises(Exception, match="SPARSE_FFN_MODEL"):
            mod.create_app_from_env()
    finally:
        vars(mod).pop("app", None)


def test_gunicorn_hooks_give_each_worker_its_own_gpu(monkeypatch):
    from types import SimpleNamespace

    from sparse_ffn.plugin.gunicorn import gunicorn_post_fork, gunicorn_pre_fork

    monkeypatch.setenv("SPARSE_FFN_GPUS", "0,1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # restored after the test
    server = SimpleNamespace(WORKERS={}, log=SimpleNamespace(info=lambda msg: None))
    workers = []
    for age in (1, 2, 3):  # the third replaces the first after it died
        w = SimpleNamespace(age=age, pid=100 + age)
        gunicorn_pre_fork(server, w)
        workers.append(w)
        server.WORKERS[w.pid] = w
        if age == 2:
            del server.WORKERS[101]
    assert [w.sparse_ffn_gpu for w in workers] == ["0", "1", "0"]
    gunicorn_post_fork(server, workers[1])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
