"""UltraEval's HTTP protocol, the request side: parsing `POST /infer` bodies and vLLM SamplingParams.

`BadRequest(status, message)` is a client mistake: answered with `status` and {"error": message}.
Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


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
