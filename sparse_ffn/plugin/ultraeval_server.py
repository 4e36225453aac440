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

import argparse
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .. import __version__
from ..errors import UserError

from ..model_adapters.sparsity_setup import FFN_ARGS, SparsitySetup, resolve_sparsity

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..masking import SparsityHandle

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5002
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of an oversized body before answering
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}


# ---------------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------------
def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None): cuda if available, else mps, else cpu; anything else must be a usable device."""
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here")
    return dev


def resolve_dtype(dtype: str | None) -> Any:
    """'auto' (the checkpoint's dtype) or a torch dtype named float32 / bfloat16 / float16."""
    import torch

    name = _DTYPE_ALIASES.get(str(dtype or "auto").lower(), str(dtype or "auto").lower())
    if name not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(model_path: str | os.PathLike, dtype: str | None = "auto", device: str | None = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from a local Hugging Face directory; never touches the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(model_path)
    if not path.is_dir():
        raise UserError(f"--model {model_path}: not a local model directory")
    if not (path / "config.json").is_file():
        raise UserError(f"--model {model_path}: no config.json (not a Hugging Face model directory)")
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model_path}: cannot load ({type(e).__name__}: {first})") from None
    model.to(dev).eval()
    # Requests decide sampling; nothing from the checkpoint's generation_config.json (temperature, top_p,
    # repetition penalties, ...) may leak in. Keep only its special-token ids.
    original = model.generation_config
    eos = original.eos_token_id if original.eos_token_id is not None else tokenizer.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=original.bos_token_id, eos_token_id=eos,
                                               pad_token_id=original.pad_token_id)
    return model, tokenizer


def context_length(model: Any, tokenizer: Any) -> int:
    """The longest input the model takes (as lm-eval's HFLM finds it)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**6:
        return value
    return 2048


# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------
class BadRequest(Exception):
    """A client mistake: answered with `status` and {"error": message}; nothing is computed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class GenerationParams:
    """The vLLM SamplingParams we honour (vLLM's defaults)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # vLLM's threshold


def _number(params: dict, key: str, default: Any, *, integer: bool = False, low: float | None = None,
            high: float | None = None, low_open: bool = False, allow_none: bool = False) -> Any:
    value = params.get(key, default)
    if value is None:
        if allow_none:
            return None
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise BadRequest(400, f"params.{key}={value!r}: must be {kind}")
    value = int(value) if integer else float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(400, f"params.{key}={value!r}: must be finite")
    if low is not None and (value <= low if low_open else value < low):
        raise BadRequest(400, f"params.{key}={value!r}: must be {'>' if low_open else '>='} {low:g}")
    if high is not None and value > high:
        raise BadRequest(400, f"params.{key}={value!r}: must be <= {high:g}")
    return value


def parse_generation_params(params: dict) -> GenerationParams:
    stop = params.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise BadRequest(400, f"params.stop={stop!r}: must be a string or a list of strings")
    ids = params.get("stop_token_ids")
    if ids is None:
        stop_ids: tuple[int, ...] = ()
    elif isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        stop_ids = tuple(ids)
    else:
        raise BadRequest(400, f"params.stop_token_ids={ids!r}: must be a list of token ids")
    flags = {}
    for key, default in (("ignore_eos", False), ("skip_special_tokens", True)):
        value = params.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise BadRequest(400, f"params.{key}={value!r}: must be true or false")
        flags[key] = value
    top_k = _number(params, "top_k", -1, integer=True, low=-1)
    return GenerationParams(
        max_tokens=_number(params, "max_tokens", 16, integer=True, low=1, allow_none=True),
        temperature=_number(params, "temperature", 1.0, low=0),
        top_p=_number(params, "top_p", 1.0, low=0, high=1, low_open=True),
        top_k=top_k,
        stop=stops,
        seed=_number(params, "seed", None, integer=True, allow_none=True),
        repetition_penalty=_number(params, "repetition_penalty", 1.0, low=0, low_open=True),
        stop_token_ids=stop_ids,
        n=_number(params, "n", 1, integer=True, low=1),
        **flags,
    )


def parse_request(body: bytes) -> tuple[dict, list[str]]:
    """(params, instances) of an /infer body, or BadRequest naming what is wrong."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        msg = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise BadRequest(400, f"request body is not valid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, f"request body must be a JSON object with 'instances', not a {type(obj).__name__}")
    if "instances" not in obj:
        raise BadRequest(400, "request body has no 'instances' (a list of prompt strings)")
    instances = obj["instances"]
    if not isinstance(instances, list):
        raise BadRequest(400, f"'instances' must be a list of prompt strings, not a {type(instances).__name__}")
    if not instances:
        raise BadRequest(400, "'instances' is empty: send at least one prompt")
    for i, text in enumerate(instances):
        if not isinstance(text, str):
            raise BadRequest(400, f"instances[{i}] is a {type(text).__name__}, not a string")
    params = obj.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(400, f"'params' must be a JSON object, not a {type(params).__name__}")
    return params, instances


def wants_logprobs(params: dict) -> bool:
    value = params.get("prompt_logprobs")
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(400, f"params.prompt_logprobs={value!r}: must be an integer >= 0 (or null)")
    return True


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

    def __init__(self, model: Any, tokenizer: Any, handle: SparsityHandle, info: dict, *, model_name: str,
                 max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_batch < 1:
            raise UserError(f"--max-batch {max_batch}: must be >= 1")
        if max_body_bytes < 1:
            raise UserError(f"--max-body-bytes {max_body_bytes}: must be >= 1")
        self.model, self.tokenizer, self.handle, self.info = model, tokenizer, handle, info
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
    model, tokenizer = load_model(str(setup.pretrained), dtype=dtype, device=device)
    handle, info = setup.apply(model)
    return UltraEvalApp(model, tokenizer, handle, info, model_name=str(setup.pretrained), max_batch=max_batch,
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
                        "sparse_ffn.plugin.ultraeval_server.ENV_VARS)")
    return create_app(
        get("SPARSE_FFN_MODEL"), thresholds=get("SPARSE_FFN_THRESHOLDS"), strategy=get("SPARSE_FFN_STRATEGY"),
        prune_arg=get("SPARSE_FFN_PRUNE_ARG"), dtype=get("SPARSE_FFN_DTYPE") or "auto",
        device=get("SPARSE_FFN_DEVICE") or "auto",
        max_batch=_env_int(env, "SPARSE_FFN_MAX_BATCH", DEFAULT_MAX_BATCH),
        max_body_bytes=_env_int(env, "SPARSE_FFN_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
        experts=get("SPARSE_FFN_EXPERTS"), ffn_args={k: get(f"SPARSE_FFN_{k.upper()}") for k in FFN_ARGS})


def gunicorn_pre_fork(server: Any, worker: Any) -> None:
    """gunicorn hook (master): give the new worker a GPU no live worker holds, from SPARSE_FFN_GPUS
    (default: CUDA_VISIBLE_DEVICES), e.g. "0,1,2,3". Nothing happens when neither is set."""
    gpus = [g.strip() for g in (os.environ.get("SPARSE_FFN_GPUS") or os.environ.get("CUDA_VISIBLE_DEVICES")
                                or "").split(",") if g.strip()]
    if not gpus:
        return
    taken = {getattr(w, "sparse_ffn_gpu", None) for w in getattr(server, "WORKERS", {}).values()}
    free = [g for g in gpus if g not in taken]
    worker.sparse_ffn_gpu = free[0] if free else gpus[(worker.age - 1) % len(gpus)]


def gunicorn_post_fork(server: Any, worker: Any) -> None:
    """gunicorn hook (the worker, before it loads the app and torch): see only its own GPU."""
    gpu = getattr(worker, "sparse_ffn_gpu", None)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        server.log.info(f"sparse-ffn worker {worker.pid}: CUDA_VISIBLE_DEVICES={gpu}")


_APP_LOCK = threading.Lock()


def __getattr__(name: str) -> Any:
    """`app` is built from the environment on first access (gunicorn's `module:app` lookup, in each
    worker), never at import: the CLI and the lm-eval adapter import this module too."""
    if name == "app":
        with _APP_LOCK:
            if "app" not in globals():
                globals()["app"] = create_app_from_env()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------
# The threaded wsgiref server and `sparse-ffn serve`
# ---------------------------------------------------------------------------------------------------
class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref's server, one thread per connection (the app's lock serialises the model)."""

    daemon_threads = True
    allow_reuse_address = True


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


def _cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    started = time.perf_counter()
    app = create_app(args.model, thresholds=args.thresholds, strategy=args.strategy, prune_arg=args.prune_arg,
                     dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                     max_body_bytes=args.max_body_bytes, experts=args.experts,
                     ffn_args={k: getattr(args, k) for k in FFN_ARGS})
    server = make_server(app, args.host, args.port, access_log=args.access_log)
    url = server_url(server)
    strategy = app.info["strategy"] + (f" {app.info['prune_arg']:g}" if app.info["prune_arg"] is not None else "")
    if app.info["thresholds_source"]:
        strategy += f" {app.info['thresholds_source']}"
    print(f"sparse-ffn: serving {app.model_name} ({strategy}; {app.describe()['dtype']} on {app.device}; "
          f"loaded in {time.perf_counter() - started:.1f}s)", file=sys.stderr)
    print(f"sparse-ffn: ready at {url} (stats: {server_url(server, '/stats')}; Ctrl-C stops)",
          file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    s = app.stats()["sparsity"]
    print(f"sparse-ffn: stopped after {app.stats()['requests']} requests (sparsity {s['mean']:.4f} over "
          f"{s['tokens']} tokens)", file=sys.stderr, flush=True)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve", help="serve a dense or sparse model over UltraEval's HTTP protocol (POST /infer)",
        description="Serve a local model with sparse FFNs for UltraEval's `--model general "
                    "--model_args url=http://HOST:PORT/infer`. GET /stats gives the sparsity so far, "
                    "POST /stats/reset restarts counting. The URL is printed to stderr when ready.")
    s.add_argument("--model", metavar="PATH", help="local Hugging Face model directory (optional when the "
                                                   "thresholds file names its model)")
    s.add_argument("--thresholds", metavar="FILE", help="threshold file or list (implies --strategy cett)")
    s.add_argument("--strategy", choices=("dense", "fat", "topk", "cett"), help="default: dense, or cett "
                                                                               "with --thresholds")
    s.add_argument("--prune-arg", type=float, metavar="X", help="eps for fat, kept ratio for topk")
    s.add_argument("--experts", metavar="DIR", help="Sparse Expansion experts (not yet supported)")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; "
                                                        "anything else exposes the model to the network)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    s.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    s.add_argument("--device", default="auto", help="auto (cuda if available, else mps, else cpu), cpu, "
                                                    "cuda, cuda:N, mps")
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"sequences per forward pass (default {DEFAULT_MAX_BATCH})")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"largest request body accepted, else 413 (default {DEFAULT_MAX_BODY_BYTES})")
    s.add_argument("--access-log", action="store_true", help="log every request to stderr")
    for k in FFN_ARGS:
        s.add_argument(f"--{k.replace('_', '-')}", dest=k, metavar="NAME", help=f"FFN module name ({k}=...) "
                       "for an architecture the discovery does not know")
    s.set_defaults(func=_cmd_serve)
