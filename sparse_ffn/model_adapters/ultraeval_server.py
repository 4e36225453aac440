"""Serve a dense or sparse causal LM over UltraEval's HTTP protocol (its `GeneralModel` client).

    sparse-ffn serve --model DIR --thresholds thr.json            # gunicorn, http://127.0.0.1:5002/infer
    SPARSE_FFN_MODEL=DIR SPARSE_FFN_THRESHOLDS=thr.json gunicorn -c python:sparse_ffn.plugin.gunicorn_conf

Protocol. `POST /infer` with `{"params": {...}, "instances": ["prompt", ...]}`. With `prompt_logprobs`
set (not null) the answer is one list per instance holding the log-probability of every prompt token
except the first (vLLM's `prompt_logprobs[1:]`); otherwise one generated string per instance, or a list
of `n` strings when n > 1 (vLLM's SamplingParams: see `ultraeval_protocol` and `ultraeval_generate`;
a vLLM parameter we do not implement is a 400 naming it, never ignored). Prompts are tokenised like vLLM
does (the tokenizer's special tokens, e.g. BOS, included).

Which problem gets what (the rule): anything wrong with the request itself (the body, its JSON, a
parameter, an instance that is not a non-empty string) refuses the whole request with a 4xx and
`{"error": "..."}` naming it, before anything runs, and nothing is counted. The one
per-instance problem, a prompt longer than the model's context, is answered in its own slot: by default
(`overlong="truncate"`) its tokens are cut from the left, as UltraEval's own transformers server does
(log-probs: the last `context` tokens, so that instance's list is shorter than its prompt; generation: the
last `context - min(max_tokens, context // 2)` tokens, so there is room to generate); the answer's
`X-Sparse-FFN-Truncated` header lists `[{"instance", "tokens", "kept"}]`, the log says so, and `/stats`
counts `truncated`. `overlong="refuse"` answers such a request with a 400 instead. Unknown params keys are
ignored and named in `X-Sparse-FFN-Ignored-Params`.

Log-probabilities run the prompts right-padded with an attention mask and forward each distinct input
`tokens[:-1]` once per request (options that differ only in their last token share one row), which is
exactly what lm-eval's `hf`/`sparse_ffn` models forward for `(context, continuation)`; so values and
the sparsity (and expert usage, with experts) counted match the lm-eval adapter. Generation runs
`model.generate` on left-padded batches. Counting: the masking core's "auto" mode (attention mask 1).

`GET /stats` gives the counts so far summed over every worker process (`serve_stats`), `POST
/stats/reset` starts counting afresh (answers the counts before the reset). One lock serialises the
model; `GET /stats` never waits for it. Request bodies: at most `max_body_bytes` (413 from the
Content-Length, before the body is read) and JSON nested at most `MAX_JSON_DEPTH` levels (400).

This module imports only the standard library at import time (the `sparse-ffn` CLI imports it to
build its parser); torch and transformers are imported when a model is loaded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable, Iterable

from sparse_ffn import __version__
from sparse_ffn.core.names import FFN_ARGS
from sparse_ffn.errors import UserError
from sparse_ffn.model_adapters.loading import context_length, load_model_and_tokenizer
from sparse_ffn.model_adapters.serve_stats import StatsStore, now, summarize
from sparse_ffn.model_adapters.sparsity_setup import resolve_sparsity
from sparse_ffn.model_adapters.ultraeval_protocol import BadRequest, GenerationParams, chunks, \
    parse_generation_params, parse_request, unknown_params, wants_logprobs

if TYPE_CHECKING:  # pragma: no cover
    from sparse_ffn.model_adapters.sparsity_setup import Applied

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
OVERLONG = ("truncate", "refuse")
_DRAIN_LIMIT = 1 << 20  # an oversized body up to this size is read (and dropped) so the client sees the 413


# ---------------------------------------------------------------------------------------------------
# The WSGI application
# ---------------------------------------------------------------------------------------------------
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
            413: "Payload Too Large", 500: "Internal Server Error"}
_INFER_PATHS = ("/infer", "/", "/vllm-url-infer")


class UltraEvalApp:
    """WSGI application serving one (sparsified) model. Build it with `create_app`."""

    def __init__(self, model: Any, tokenizer: Any, applied: Applied, *, model_name: str,
                 max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 overlong: str = "truncate", stats_dir: str | os.PathLike | None = None) -> None:
        if max_batch < 1:
            raise UserError(f"--max-batch {max_batch}: must be >= 1")
        if max_body_bytes < 1:
            raise UserError(f"--max-body-bytes {max_body_bytes}: must be >= 1")
        if overlong not in OVERLONG:
            raise UserError(f"--overlong {overlong}: must be one of {', '.join(OVERLONG)}")
        self.model, self.tokenizer, self.applied, self.info = model, tokenizer, applied, applied.info
        self.handle = applied.masking
        self.model_name = model_name
        self.max_batch, self.max_body_bytes, self.overlong = max_batch, max_body_bytes, overlong
        self.context_length = context_length(model, tokenizer)
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        eos = model.generation_config.eos_token_id
        self.eos_ids: tuple[int, ...] = tuple(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self.model_lock = threading.Lock()      # the model, its hooks and the counters
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share between threads
        self.count_lock = threading.Lock()      # the request counts and the last raw counters
        self.started = now()
        for counter in applied.counters():
            counter.mode = "auto"
            counter.reset()
        self.counts = {"requests": 0, "instances": 0, "truncated_instances": 0, "truncated_tokens": 0}
        self.store = StatsStore(stats_dir, self.handle.stats.d_ff)
        self._raw = self._read_raw()
        self._raw_seq = self._published_seq = 0  # order of the counter snapshots (taken under the model lock)

    # -- stats ---------------------------------------------------------------------------------------
    def _read_raw(self) -> dict:
        """The counters' cumulative raw counts (call with the model lock held, or before serving)."""
        inactive, tokens = self.handle.stats.counts()
        raw: dict[str, Any] = {"sparsity": {"d_ff": list(self.handle.stats.d_ff), "inactive": inactive,
                                            "tokens": tokens}, "experts": None}
        if self.applied.experts is not None:
            counts, e_tokens = self.applied.experts.stats.counts()
            raw["experts"] = {"counts": {f"{layer}:{router}": c for (layer, router), c in counts.items()},
                              "tokens": e_tokens}
        return raw

    def _publish(self, raw: dict | None = None, seq: int = 0, **add: int) -> None:
        """Add `add` to the request counts and keep `raw` (the counters' snapshot number `seq`) unless a
        later snapshot was kept already: two requests may publish in the other order than they ran."""
        with self.count_lock:
            if raw is not None and seq > self._published_seq:
                self._raw, self._published_seq = raw, seq
            for k, v in add.items():
                self.counts[k] += v
            record = {"pid": os.getpid(), "started": self.started, **self.counts, **self._raw}
            self.store.publish(record)

    def share_stats(self, directory: str | os.PathLike) -> None:
        """Count in `directory` from now on (a worker forked from a process that built the app)."""
        self.store = StatsStore(directory, self.handle.stats.d_ff)

    def stats(self) -> dict:
        """The counts of every worker since the last reset (never waits for a running request)."""
        totals, records, base = self.store.totals()
        return {"model": self.model_name, **self.info, **summarize(totals), "since": base["since"] or self.started,
                "workers": [{"pid": r["pid"], "started": r["started"], "requests": r["requests"]} for r in records],
                "pid": os.getpid()}

    def reset_stats(self) -> dict:
        """Start counting afresh (in every worker); returns the counts before the reset."""
        before = self.stats()
        self.store.reset()
        return before

    # -- inference -----------------------------------------------------------------------------------
    def tokenize(self, instances: list[str], gen: GenerationParams) -> tuple[list[list[int]], list[dict]]:
        """Token ids per instance (vLLM's `truncate_prompt_tokens` applied) and the over-long ones
        truncated from the left: [{"instance", "tokens", "kept"}] (or BadRequest with overlong=refuse)."""
        with self.tokenizer_lock:
            ids = self.tokenizer(instances)["input_ids"]  # special tokens as vLLM adds them
        truncated = []
        logprobs = gen is None
        ctx = self.context_length
        for i, seq in enumerate(ids):
            if not seq:
                raise BadRequest(400, f"instances[{i}] is empty (no tokens)")
            if not logprobs and gen.truncate_prompt_tokens is not None and len(seq) > gen.truncate_prompt_tokens:
                ids[i] = seq = seq[-gen.truncate_prompt_tokens:]
            if len(seq) > ctx:
                if self.overlong == "refuse":
                    raise BadRequest(400, f"instances[{i}] has {len(seq)} tokens, longer than the model's context "
                                          f"of {ctx}")
                reserve = 0 if logprobs else min(ctx // 2 if gen.max_tokens is None else gen.max_tokens, ctx // 2)
                keep = max(1, ctx - reserve)
                truncated.append({"instance": i, "tokens": len(seq), "kept": keep})
                ids[i] = seq[-keep:]
        return ids, truncated

    def infer(self, params: dict, instances: list[str]) -> tuple[list, list[tuple[str, str]]]:
        """Answer one /infer request: (answers, extra headers); BadRequest for a client mistake, before
        anything runs."""
        logprobs = wants_logprobs(params)
        gen = parse_generation_params(params)  # checked in both modes, as vLLM builds SamplingParams
        ids, truncated = self.tokenize(instances, None if logprobs else gen)
        with self.model_lock:
            saved = [(c, c.checkpoint()) for c in self.applied.counters()]
            try:
                result = self._prompt_logprobs(ids) if logprobs else self._generate(ids, gen)
            except BaseException:
                for counter, state in saved:
                    counter.restore(state)  # a failed request leaves the counts as they were
                raise
            raw = self._read_raw()
            self._raw_seq += 1
            seq = self._raw_seq
        self._publish(raw, seq, requests=1, instances=len(instances), truncated_instances=len(truncated),
                      truncated_tokens=sum(t["tokens"] - t["kept"] for t in truncated))
        headers = []
        if truncated:
            headers.append(("X-Sparse-FFN-Truncated", json.dumps(truncated)))
            for t in truncated:
                print(f"sparse-ffn: instances[{t['instance']}] has {t['tokens']} tokens, over the context of "
                      f"{self.context_length}: kept its last {t['kept']}", file=sys.stderr, flush=True)
        ignored = unknown_params(params)
        if ignored:
            headers.append(("X-Sparse-FFN-Ignored-Params", ",".join(ignored)))
        return result, headers

    def _prompt_logprobs(self, ids: list[list[int]]) -> list[list[float]]:
        """vLLM prompt_logprobs[1:]: log p(t_i | t_<i) for i >= 1. Each distinct input t[:-1] runs once."""
        import torch

        results: list[list[float] | None] = [[] if len(seq) == 1 else None for seq in ids]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, seq in enumerate(ids):
            if len(seq) > 1:
                groups.setdefault(tuple(seq[:-1]), []).append(i)
        inputs = sorted(groups, key=len, reverse=True)  # similar lengths share a batch: less padding
        with torch.inference_mode():
            for batch in chunks(inputs, self.max_batch):
                width = len(batch[0])
                tokens = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, inp in enumerate(batch):
                    tokens[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                    mask[row, :len(inp)] = 1
                logits = self.model(input_ids=tokens.to(self.device), attention_mask=mask.to(self.device),
                                    use_cache=False).logits
                for row, inp in enumerate(batch):
                    row_logits = logits[row, :len(inp)].float()
                    norm = torch.logsumexp(row_logits, dim=-1)
                    for i in groups[inp]:
                        target = torch.tensor(ids[i][1:], dtype=torch.long, device=row_logits.device)
                        results[i] = (row_logits.gather(-1, target[:, None])[:, 0] - norm).tolist()
        return results  # type: ignore[return-value]

    def decode(self, tokens: list[int], skip_special: bool) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special)

    def decode_new(self, prompt: list[int], new: list[int], skip_special: bool) -> str:
        """The text the new tokens add after the prompt (decoded in context, as vLLM's detokenizer does:
        SentencePiece drops a leading space when a piece is decoded alone)."""
        with self.tokenizer_lock:
            head = self.tokenizer.decode(prompt, skip_special_tokens=skip_special)
            full = self.tokenizer.decode(list(prompt) + list(new), skip_special_tokens=skip_special)
            if full.startswith(head):
                return full[len(head):]
            return self.tokenizer.decode(new, skip_special_tokens=skip_special)

    def _generate(self, ids: list[list[int]], p: GenerationParams) -> list:
        from sparse_ffn.model_adapters.ultraeval_generate import generate

        return generate(self, ids, p)

    # -- HTTP ----------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"service": "sparse-ffn UltraEval server", "version": __version__, "model": self.model_name,
                "strategy": self.info.get("strategy"), "prune_arg": self.info.get("prune_arg"),
                "thresholds_source": self.info.get("thresholds_source"),
                "experts_source": self.info.get("experts_source"), "device": str(self.device),
                "dtype": str(self.model.dtype).replace("torch.", ""), "context_length": self.context_length,
                "max_batch": self.max_batch, "max_body_bytes": self.max_body_bytes, "overlong": self.overlong,
                "started": self.started, "pid": os.getpid(),
                "endpoints": {"POST /infer": "UltraEval GeneralModel protocol", "GET /stats": "counts so far",
                              "POST /stats/reset": "start counting afresh"}}

    def _read_body(self, environ: dict) -> bytes:
        if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            raise BadRequest(411, "chunked bodies are not supported: send a Content-Length")
        length = environ.get("CONTENT_LENGTH") or ""
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(411, "missing or bad Content-Length: send the JSON body with its length") from None
        if size < 0:
            raise BadRequest(400, f"Content-Length {size}: must be >= 0")
        stream = environ["wsgi.input"]
        if size > self.max_body_bytes:  # answered from the header: a stalled or huge body is never waited for
            if size <= _DRAIN_LIMIT:
                _drain(stream, size)  # a small one is read, so the client reads our answer, not a reset
            raise BadRequest(413, f"request body is {size} bytes, over this server's limit of "
                                  f"{self.max_body_bytes} (--max-body-bytes)")
        try:
            body = stream.read(size) if size else b""
        except OSError as e:
            raise BadRequest(400, f"could not read the request body ({type(e).__name__})") from None
        if len(body) < size:
            raise BadRequest(400, f"request body ended after {len(body)} of {size} bytes (Content-Length)")
        return body

    def handle_request(self, method: str, path: str, environ: dict) -> tuple[int, Any, list]:
        path = "/" + path.strip("/")
        if path in _INFER_PATHS and method == "POST":
            params, instances = parse_request(self._read_body(environ))
            return (200, *self.infer(params, instances))
        if path == "/stats" and method in ("GET", "HEAD"):
            return 200, self.stats(), []
        if path == "/stats/reset" and method == "POST":
            return 200, {"reset": True, "before": self.reset_stats()}, []
        if path in ("/", "/health") and method in ("GET", "HEAD"):
            return 200, {"status": "ok", **self.describe()}, []
        known = {"/infer": "POST", "/vllm-url-infer": "POST", "/stats": "GET", "/stats/reset": "POST", "/health": "GET"}
        if path in known:
            raise BadRequest(405, f"{method} {path}: use {known[path]}")
        raise BadRequest(404, f"{path}: no such endpoint (POST /infer, GET /stats, POST /stats/reset)")

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        extra: list = []
        try:
            status, body, extra = self.handle_request(method, environ.get("PATH_INFO") or "/", environ)
        except BadRequest as e:
            status, body = e.status, {"error": e.message}
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the log gets the traceback
            traceback.print_exc(file=sys.stderr)
            status, body = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
        data = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *extra]
        if status == 405:
            headers.append(("Allow", "GET, POST"))
        start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
        return [b""] if method == "HEAD" else [data]


def _drain(stream: Any, size: int) -> None:
    left = min(size, _DRAIN_LIMIT)
    try:
        while left > 0:
            chunk = stream.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
    except OSError:
        pass


def create_app(
    model_path: str | os.PathLike | None,
    thresholds: str | os.PathLike | list[float] | None = None,
    strategy: str | None = None,
    prune_arg: float | str | None = None,
    dtype: str | None = "auto",
    device: str | None = "auto",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    experts: str | os.PathLike | None = None,
    ffn_args: dict[str, Any] | None = None,
    overlong: str = "truncate",
    stats_dir: str | os.PathLike | None = None,
) -> UltraEvalApp:
    """Load `model_path` (a local HF directory; may come from the thresholds file or the experts
    manifest), swap in the Sparse Expansion experts (if any), apply the sparsity with the masking core
    and return the WSGI application (counts written to `stats_dir` when given: see `serve_stats`)."""
    if overlong not in OVERLONG:
        raise UserError(f"--overlong {overlong}: must be one of {', '.join(OVERLONG)}")
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be >= 1")
    if max_body_bytes < 1:
        raise UserError(f"--max-body-bytes {max_body_bytes}: must be >= 1")
    setup = resolve_sparsity(thresholds, strategy, prune_arg, pretrained=None if model_path is None else str(model_path),
                             ffn_args=ffn_args, model_arg="--model PATH (or SPARSE_FFN_MODEL)", experts=experts)
    model, tokenizer = load_model_and_tokenizer(str(setup.pretrained), dtype=dtype, device=device)
    applied = setup.apply(model)
    return UltraEvalApp(model, tokenizer, applied, model_name=str(setup.pretrained), max_batch=max_batch,
                        max_body_bytes=max_body_bytes, overlong=overlong, stats_dir=stats_dir)


# ---------------------------------------------------------------------------------------------------
# `app` for gunicorn, from environment variables
# ---------------------------------------------------------------------------------------------------
ENV_VARS = {
    "SPARSE_FFN_MODEL": "model directory",
    "SPARSE_FFN_THRESHOLDS": "thresholds file or list (implies cett)",
    "SPARSE_FFN_STRATEGY": "dense | fat | topk | cett",
    "SPARSE_FFN_PRUNE_ARG": "eps (fat) or kept ratio (topk)",
    "SPARSE_FFN_DTYPE": "auto | float32 | bfloat16 | float16",
    "SPARSE_FFN_DEVICE": "auto | cpu | cuda | cuda:N | mps",
    "SPARSE_FFN_MAX_BATCH": f"sequences per forward (default {DEFAULT_MAX_BATCH})",
    "SPARSE_FFN_MAX_BODY_BYTES": f"largest request body (default {DEFAULT_MAX_BODY_BYTES})",
    "SPARSE_FFN_EXPERTS": "Sparse Expansion experts directory",
    "SPARSE_FFN_OVERLONG": "truncate (default: cut over-long prompts from the left) | refuse (400)",
    "SPARSE_FFN_STATS_DIR": "directory the workers share their counts in (the gunicorn conf makes one)",
    **{f"SPARSE_FFN_{k.upper()}": f"module name ({k}=)" for k in FFN_ARGS},
}


def _env_int(env: dict, name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r}: not an integer") from None


def create_app_from_env(env: dict | None = None) -> UltraEvalApp:
    """`create_app` with arguments from SPARSE_FFN_* environment variables (see ENV_VARS)."""
    env = dict(os.environ if env is None else env)
    get = lambda name: (env.get(name) or "").strip() or None  # noqa: E731
    if get("SPARSE_FFN_MODEL") is None and get("SPARSE_FFN_THRESHOLDS") is None and get("SPARSE_FFN_EXPERTS") is None:
        raise UserError("SPARSE_FFN_MODEL is not set (the model directory to serve; see "
                        "sparse_ffn.model_adapters.ultraeval_server.ENV_VARS)")
    return create_app(
        get("SPARSE_FFN_MODEL"), thresholds=get("SPARSE_FFN_THRESHOLDS"), strategy=get("SPARSE_FFN_STRATEGY"),
        prune_arg=get("SPARSE_FFN_PRUNE_ARG"), dtype=get("SPARSE_FFN_DTYPE") or "auto",
        device=get("SPARSE_FFN_DEVICE") or "auto",
        max_batch=_env_int(env, "SPARSE_FFN_MAX_BATCH", DEFAULT_MAX_BATCH),
        max_body_bytes=_env_int(env, "SPARSE_FFN_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
        experts=get("SPARSE_FFN_EXPERTS"), ffn_args={k: get(f"SPARSE_FFN_{k.upper()}") for k in FFN_ARGS},
        overlong=get("SPARSE_FFN_OVERLONG") or "truncate", stats_dir=get("SPARSE_FFN_STATS_DIR"))
