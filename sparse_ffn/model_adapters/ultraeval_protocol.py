"""UltraEval's HTTP protocol, the request side: parsing `POST /infer` bodies and vLLM SamplingParams.

`BadRequest(status, message)` is a client mistake: answered with `status` and {"error": message}.
Every vLLM SamplingParams key is either honoured with vLLM's semantics and checks (`GenerationParams`)
or refused with a 400 naming it when set to anything but its default (`UNSUPPORTED`); UltraEval's own
keys (`sampling_num`, `batch_size`, which its client piles into every request) are ignored, and any
other key is ignored but named in the answer (`unknown_params`). Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

MAX_JSON_DEPTH = 32  # nesting levels; a request needs 3 (body -> params -> stop list)
SAMPLING_EPS = 1e-5  # vLLM's: temperature below this is greedy


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
    """The vLLM SamplingParams we honour (vLLM's defaults). `best_of` None means `n`."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    truncate_prompt_tokens: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS and not self.use_beam_search

    @property
    def candidates(self) -> int:
        """Sequences generated per prompt (vLLM's best_of): the best `n` of them are answered."""
        return self.best_of if self.best_of is not None else self.n


# key -> its default: refused (400) when set to anything else (None counts as the default)
UNSUPPORTED: dict[str, Any] = {
    "logprobs": None, "logits_processors": None, "logit_bias": None, "allowed_token_ids": None,
    "bad_words": None, "guided_decoding": None, "spaces_between_special_tokens": True, "detokenize": True,
}
HANDLED = set(GenerationParams.__dataclass_fields__) | {"prompt_logprobs"}
ULTRAEVAL_KEYS = {"sampling_num", "batch_size"}  # UltraEval's client sends them; its own business


def unknown_params(params: dict) -> list[str]:
    """Keys that are neither vLLM's nor UltraEval's: ignored, and named in the answer's headers."""
    return sorted(k for k in params if k not in HANDLED and k not in UNSUPPORTED and k not in ULTRAEVAL_KEYS)


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


def _flag(params: dict, key: str, default: bool) -> bool:
    value = params.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(400, f"params.{key}={value!r}: must be true or false")
    return value


def parse_generation_params(params: dict) -> GenerationParams:
    """vLLM's SamplingParams from `params`, with vLLM's checks (BadRequest naming the parameter)."""
    for key, default in UNSUPPORTED.items():
        value = params.get(key)
        if value is not None and value != default and not (isinstance(value, (list, dict)) and not value):
            raise BadRequest(400, f"params.{key}={value!r}: not supported by this server (leave it at "
                                  f"{json.dumps(default)})")
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
    early = params.get("early_stopping", False)
    if early is None:
        early = False
    if early not in (True, False, "never") or isinstance(early, (int, float)) and not isinstance(early, bool):
        raise BadRequest(400, f"params.early_stopping={early!r}: must be true, false or \"never\"")
    top_k = _number(params, "top_k", -1, integer=True, low=-1)
    if top_k == 0:
        raise BadRequest(400, "params.top_k=0: must be -1 (disable) or at least 1")
    p = GenerationParams(
        max_tokens=_number(params, "max_tokens", 16, integer=True, low=1, allow_none=True),
        temperature=_number(params, "temperature", 1.0, low=0),
        top_p=_number(params, "top_p", 1.0, low=0, high=1, low_open=True),
        top_k=top_k,
        min_p=_number(params, "min_p", 0.0, low=0, high=1),
        stop=stops,
        seed=_number(params, "seed", None, integer=True, allow_none=True),
        repetition_penalty=_number(params, "repetition_penalty", 1.0, low=0, low_open=True),
        presence_penalty=_number(params, "presence_penalty", 0.0, low=-2, high=2),
        frequency_penalty=_number(params, "frequency_penalty", 0.0, low=-2, high=2),
        stop_token_ids=stop_ids,
        ignore_eos=_flag(params, "ignore_eos", False),
        skip_special_tokens=_flag(params, "skip_special_tokens", True),
        include_stop_str_in_output=_flag(params, "include_stop_str_in_output", False),
        min_tokens=_number(params, "min_tokens", 0, integer=True, low=0),
        n=_number(params, "n", 1, integer=True, low=1),
        best_of=_number(params, "best_of", None, integer=True, low=1, allow_none=True),
        use_beam_search=_flag(params, "use_beam_search", False),
        length_penalty=_number(params, "length_penalty", 1.0),
        early_stopping=early,
        truncate_prompt_tokens=_number(params, "truncate_prompt_tokens", None, integer=True, low=1,
                                       allow_none=True),
    )
    _check_like_vllm(p)
    return p


def _check_like_vllm(p: GenerationParams) -> None:
    """vLLM's SamplingParams cross-checks (its messages), so a combination vLLM refuses is refused."""
    if p.best_of is not None and p.best_of < p.n:
        raise BadRequest(400, f"params.best_of={p.best_of}: must be >= n (n={p.n})")
    if p.max_tokens is not None and p.min_tokens > p.max_tokens:
        raise BadRequest(400, f"params.min_tokens={p.min_tokens}: must be <= max_tokens ({p.max_tokens})")
    if p.use_beam_search:
        if p.candidates == 1:
            raise BadRequest(400, "params.best_of: must be > 1 with use_beam_search (the beam width; "
                                  "default n)")
        if p.temperature > SAMPLING_EPS:
            raise BadRequest(400, f"params.temperature={p.temperature:g}: must be 0 with use_beam_search")
        if p.top_p < 1 - SAMPLING_EPS or p.top_k != -1 or p.min_p > SAMPLING_EPS:
            raise BadRequest(400, "params.top_p/top_k/min_p: must be left at 1/-1/0 with use_beam_search")
    else:
        if p.early_stopping is not False:
            raise BadRequest(400, f"params.early_stopping={p.early_stopping!r}: only with use_beam_search "
                                  "(must be false otherwise)")
        if abs(p.length_penalty - 1.0) > SAMPLING_EPS:
            raise BadRequest(400, f"params.length_penalty={p.length_penalty:g}: only with use_beam_search "
                                  "(must be 1 otherwise)")
        if p.temperature < SAMPLING_EPS and p.candidates > 1:
            raise BadRequest(400, f"params.best_of/n={p.candidates}: must be 1 with greedy sampling "
                                  "(temperature 0)")


def chunks(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of `items` of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (iterative: no recursion)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_request(body: bytes) -> tuple[dict, list[str]]:
    """(params, instances) of an /infer body, or BadRequest naming what is wrong."""
    try:
        obj = json.loads(body)
    except RecursionError:
        raise BadRequest(400, f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:
        msg = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise BadRequest(400, f"request body is not valid JSON ({msg})") from None
    if _depth(obj) > MAX_JSON_DEPTH:
        raise BadRequest(400, f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
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
