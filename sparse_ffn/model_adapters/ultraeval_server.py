"""Serve a dense or sparse causal LM over UltraEval's HTTP protocol (its `GeneralModel` client).

    sparse-ffn serve --model DIR --thresholds thr.json            # http://127.0.0.1:5002/infer
    SPARSE_FFN_MODEL=DIR SPARSE_FFN_THRESHOLDS=thr.json gunicorn -w 1 -b 127.0.0.1:5002 \
        'sparse_ffn.plugin.ultraeval_server:app'

Protocol. `POST /infer` with `{"params": {...}, "instances": ["prompt", ...]}`; unknown params keys
are ignored. With `prompt_logprobs` set (not null) the answer is one list per instance holding the
log-probability of every prompt token except the first (vLLM's `prompt_logprobs[1:]`); otherwise one
generated string per instance (vLLM's `max_tokens`, `temperature` (0: greedy), `top_p`, `top_k` (-1:
none), `stop`, `seed`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, `skip_special_tokens`;
`n` is accepted and one continuation is returned, as UltraEval's own vLLM server does). Prompts are
tokenised like vLLM does (the tokenizer's special tokens, e.g. BOS, included).

Log-probabilities run the prompts right-padded with an attention mask and forward each distinct input
`tokens[:-1]` once per request (options that differ only in their last token share one row), which is
exactly what lm-eval's `hf`/`sparse_ffn` models forward for `(context, continuation)`; so values and
the sparsity counted match the lm-eval adapter. Generation runs `model.generate` on left-padded
batches. Sparsity is counted by the masking core's "auto" mode: positions whose attention mask is 1.

`GET /stats` gives the sparsity so far, `POST /stats/reset` starts counting afresh (answers the counts
before the reset). Bad requests get a 4xx and `{"error": "..."}` naming the problem, and change
nothing. One lock serialises the model; `GET /stats` never waits for it.

This module imports only the standard library at import time (the `sparse-ffn` CLI imports it to
build its parser); torch and transformers are imported when a model is loaded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from sparse_ffn import __version__
from sparse_ffn.core.names import FFN_ARGS
from sparse_ffn.errors import UserError
from sparse_ffn.model_adapters.loading import context_length, load_model_and_tokenizer
from sparse_ffn.model_adapters.sparsity_setup import resolve_sparsity
from sparse_ffn.model_adapters.ultraeval_protocol import BadRequest, GenerationParams, parse_generation_params, \
    parse_request, wants_logprobs

if TYPE_CHECKING:  # pragma: no cover
    from sparse_ffn.model_adapters.sparsity_setup import Applied

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of an oversized body before answering



# ---------------------------------------------------------------------------------------------------
# The WSGI application
# ---------------------------------------------------------------------------------------------------
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
            413: "Payload Too Large", 500: "Internal Server Error"}
_INFER_PATHS = ("/infer", "/", "/vllm-url-infer")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class UltraEvalApp:
    """WSGI application serving one (sparsified) model. Build it with `create_app`."""

    def __init__(self, model: Any, tokenizer: Any, applied: Applied, *, model_name: str,
                 max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_batch < 1:
            raise UserError(f"--max-batch {max_batch}: must be >= 1")
        if max_body_bytes < 1:
            raise UserError(f"--max-body-bytes {max_body_bytes}: must be >= 1")
        self.model, self.tokenizer, self.applied, self.info = model, tokenizer, applied, applied.info
        self.handle = applied.masking
        self.model_name = model_name
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.context_length = context_length(model, tokenizer)
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        eos = model.generation_config.eos_token_id
        self.eos_ids: tuple[int, ...] = tuple(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self.model_lock = threading.Lock()      # the model, its hooks and the sparsity counts
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share between threads
        self._snapshot_lock = threading.Lock()
        self.started = _now()
        self.handle.stats.mode = "auto"
        self.handle.stats.reset()
        self._requests = self._instances = 0
        self._since = self.started
        self._snapshot = self._read_stats()

    # -- stats ---------------------------------------------------------------------------------------
    def _read_stats(self) -> dict:
        """Call with the model lock held (or before serving)."""
        return {"model": self.model_name, **self.info, "sparsity": self.handle.stats.summary(),
                "requests": self._requests, "instances": self._instances, "since": self._since,
                "pid": os.getpid()}  # each gunicorn worker counts its own

    def stats(self) -> dict:
        """The counts as of the last finished request (never waits for a running one)."""
        with self._snapshot_lock:
            return json.loads(json.dumps(self._snapshot))

    def reset_stats(self) -> dict:
        """Start counting afresh; returns the counts before the reset."""
        with self.model_lock:
            before = self._read_stats()
            self.handle.stats.reset()
            self._requests = self._instances = 0
            self._since = _now()
            snapshot = self._read_stats()
            with self._snapshot_lock:
                self._snapshot = snapshot
        return before

    # -- inference -----------------------------------------------------------------------------------
    def tokenize(self, instances: list[str]) -> list[list[int]]:
        with self.tokenizer_lock:
            ids = self.tokenizer(instances)["input_ids"]  # special tokens as vLLM adds them
        for i, seq in enumerate(ids):
            if not seq:
                raise BadRequest(400, f"instances[{i}] is empty (no tokens)")
            if len(seq) > self.context_length:
                raise BadRequest(400, f"instances[{i}] has {len(seq)} tokens, longer than the model's context "
                                      f"of {self.context_length}")
        return ids

    def infer(self, params: dict, instances: list[str]) -> list:
        """Answer one /infer request (BadRequest for a client mistake, before anything runs)."""
        logprobs = wants_logprobs(params)
        gen = None if logprobs else parse_generation_params(params)
        ids = self.tokenize(instances)
        with self.model_lock:
            stats = self.handle.stats
            saved = stats.checkpoint()
            try:
                result = self._prompt_logprobs(ids) if logprobs else self._generate(ids, gen)
            except BaseException:
                stats.restore(saved)  # a failed request leaves the counts as they were
                raise
            self._requests += 1
            self._instances += len(instances)
            snapshot = self._read_stats()
            with self._snapshot_lock:
                self._snapshot = snapshot
        return result

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
            for batch in _chunks(inputs, self.max_batch):
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

    def _decode(self, tokens: list[int], skip_special: bool) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special)

    def _decode_new(self, prompt: list[int], new: list[int], skip_special: bool) -> str:
        """The text the new tokens add after the prompt (decoded in context, as vLLM's detokenizer does:
        SentencePiece drops a leading space when a piece is decoded alone)."""
        with self.tokenizer_lock:
            head = self.tokenizer.decode(prompt, skip_special_tokens=skip_special)
            full = self.tokenizer.decode(list(prompt) + list(new), skip_special_tokens=skip_special)
            if full.startswith(head):
                return full[len(head):]
            return self.tokenizer.decode(new, skip_special_tokens=skip_special)

    def _generate(self, ids: list[list[int]], p: GenerationParams) -> list[str]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        app = self
        eos = () if p.ignore_eos else tuple(dict.fromkeys(self.eos_ids + p.stop_token_ids))
        outputs: list[str] = [""] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch

        class StopStrings(StoppingCriteria):
            """A row is done once its new text holds a stop string (decoding only the recent tail)."""

            def __init__(self, width: int) -> None:
                self.width = width
                self.tail = 4 * max(len(s) for s in p.stop) + 8

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                done = []
                for row in input_ids[:, self.width:].tolist():
                    text = app._decode(row[-self.tail:], p.skip_special_tokens)
                    done.append(any(s in text for s in p.stop))
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        with torch.inference_mode():
            for batch in _chunks(order, self.max_batch):
                width = max(len(ids[i]) for i in batch)
                room = self.context_length - width
                max_new = room if p.max_tokens is None else min(p.max_tokens, room)
                if max_new <= 0:
                    continue
                tokens = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # left padding
                    tokens[row, width - len(ids[i]):] = torch.tensor(ids[i], dtype=torch.long)
                    mask[row, width - len(ids[i]):] = 1
                sampling = {} if p.greedy else dict(temperature=p.temperature, top_p=p.top_p,
                                                        top_k=p.top_k if p.top_k > 0 else 0)
                config = GenerationConfig(
                    max_new_tokens=max_new, min_new_tokens=0, num_beams=1, num_return_sequences=1,
                    do_sample=not p.greedy, **sampling, repetition_penalty=p.repetition_penalty,
                    pad_token_id=self.pad_id, eos_token_id=list(eos) if eos else None,
                    bos_token_id=self.model.generation_config.bos_token_id)
                criteria = StoppingCriteriaList([StopStrings(width)] if p.stop else [])
                if p.seed is not None:
                    torch.manual_seed(p.seed)
                out = self.model.generate(input_ids=tokens.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=config, stopping_criteria=criteria)
                for row, i in enumerate(batch):
                    new = out[row, width:].tolist()
                    for k, tok in enumerate(new):
                        if tok in eos:
                            new = new[:k]
                            break
                    text = self._decode_new(ids[i], new, p.skip_special_tokens)
                    cuts = [text.find(s) for s in p.stop if s in text]
                    outputs[i] = text[:min(cuts)] if cuts else text
        return outputs

    # -- HTTP ----------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"service": "sparse-ffn UltraEval server", "version": __version__, "model": self.model_name,
                "strategy": self.info.get("strategy"), "prune_arg": self.info.get("prune_arg"),
                "thresholds_source": self.info.get("thresholds_source"), "device": str(self.device),
                "dtype": str(self.model.dtype).replace("torch.", ""), "context_length": self.context_length,
                "max_batch": self.max_batch, "max_body_bytes": self.max_body_bytes, "started": self.started,
                "endpoints": {"POST /infer": "UltraEval GeneralModel protocol", "GET /stats": "sparsity so far",
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
        if size > self.max_body_bytes:
            _drain(stream, size)  # so the client reads our answer instead of a reset connection
            raise BadRequest(413, f"request body is {size} bytes, over this server's limit of "
                                  f"{self.max_body_bytes} (--max-body-bytes)")
        try:
            body = stream.read(size) if size else b""
        except OSError as e:
            raise BadRequest(400, f"could not read the request body ({type(e).__name__})") from None
        if len(body) < size:
            raise BadRequest(400, f"request body ended after {len(body)} of {size} bytes (Content-Length)")
        return body

    def handle_request(self, method: str, path: str, environ: dict) -> tuple[int, Any]:
        path = "/" + path.strip("/")
        if path in _INFER_PATHS and method == "POST":
            params, instances = parse_request(self._read_body(environ))
            return 200, self.infer(params, instances)
        if path == "/stats" and method in ("GET", "HEAD"):
            return 200, self.stats()
        if path == "/stats/reset" and method == "POST":
            return 200, {"reset": True, "before": self.reset_stats()}
        if path in ("/", "/health") and method in ("GET", "HEAD"):
            return 200, {"status": "ok", **self.describe()}
        known = {"/infer": "POST", "/vllm-url-infer": "POST", "/stats": "GET", "/stats/reset": "POST", "/health": "GET"}
        if path in known:
            raise BadRequest(405, f"{method} {path}: use {known[path]}")
        raise BadRequest(404, f"{path}: no such endpoint (POST /infer, GET /stats, POST /stats/reset)")

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        try:
            status, body = self.handle_request(method, environ.get("PATH_INFO") or "/", environ)
        except BadRequest as e:
            status, body = e.status, {"error": e.message}
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the log gets the traceback
            traceback.print_exc(file=sys.stderr)
            status, body = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
        data = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
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
) -> UltraEvalApp:
    """Load `model_path` (a local HF directory; may come from the thresholds file), apply the sparsity
    with the masking core and return the WSGI application."""
    if experts is not None:
        raise UserError(f"--experts {experts}: serving Sparse Expansion experts is not yet supported "
                        "(serve the dense or thresholded model meanwhile)")
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be >= 1")
    if max_body_bytes < 1:
        raise UserError(f"--max-body-bytes {max_body_bytes}: must be >= 1")
    setup = resolve_sparsity(thresholds, strategy, prune_arg, pretrained=None if model_path is None else str(model_path),
                             ffn_args=ffn_args, model_arg="--model PATH (or SPARSE_FFN_MODEL)")
    model, tokenizer = load_model_and_tokenizer(str(setup.pretrained), dtype=dtype, device=device)
    applied = setup.apply(model)
    return UltraEvalApp(model, tokenizer, applied, model_name=str(setup.pretrained), max_batch=max_batch,
                        max_body_bytes=max_body_bytes)


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
    "SPARSE_FFN_EXPERTS": "Sparse Expansion experts (not yet supported)",
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
    if get("SPARSE_FFN_MODEL") is None and get("SPARSE_FFN_THRESHOLDS") is None:
        raise UserError("SPARSE_FFN_MODEL is not set (the model directory to serve; see "
                        "sparse_ffn.model_adapters.ultraeval_server.ENV_VARS)")
    return create_app(
        get("SPARSE_FFN_MODEL"), thresholds=get("SPARSE_FFN_THRESHOLDS"), strategy=get("SPARSE_FFN_STRATEGY"),
        prune_arg=get("SPARSE_FFN_PRUNE_ARG"), dtype=get("SPARSE_FFN_DTYPE") or "auto",
        device=get("SPARSE_FFN_DEVICE") or "auto",
        max_batch=_env_int(env, "SPARSE_FFN_MAX_BATCH", DEFAULT_MAX_BATCH),
        max_body_bytes=_env_int(env, "SPARSE_FFN_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
        experts=get("SPARSE_FFN_EXPERTS"), ffn_args={k: get(f"SPARSE_FFN_{k.upper()}") for k in FFN_ARGS})
