"""The one model/tokenizer loader of every command, with one device and dtype resolution.

    device = resolve_device("auto")                     # cuda if available, else mps, else cpu
    model, tokenizer = load_model_and_tokenizer(DIR, device=device, dtype="float32", seq_len=512)
    model = load_model(DIR, device_map="auto")          # spread by accelerate (CPU/disk offload too)

Local directories only: nothing is fetched from the Hugging Face hub. Every failure is a one-line
UserError naming the flag (`--model`, `--checkpoints`, ...) and the path. The model comes back in eval
mode with a neutral generation config (requests decide sampling; only its special-token ids are kept).
(lm-eval's HFLM loads its own model; the lm-eval adapter uses only the sparsity setup.)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}
PLACEMENTS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_HELP = ("spread the model over devices instead of --device: auto | balanced | balanced_low_0 | "
                   "sequential (accelerate's placements over the visible GPUs, then CPU memory), or a JSON file "
                   "{module name: device} (0, \"cuda:1\", \"cpu\", or \"disk\": offloaded to a temporary folder)")


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters), for one-line errors."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def resolve_device(spec: str | None, flag: str = "--device") -> torch.device:
    """'auto' (or None): cuda if available, else mps, else cpu; anything else must be a usable device."""
    import torch

    if spec in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag} {spec!r}: not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {spec}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {spec}: only {torch.cuda.device_count()} CUDA device(s) visible "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {spec}: MPS is not available here")
    return dev


def resolve_dtype(spec: str | None, flag: str = "--dtype") -> Any:
    """'auto' (the checkpoint's dtype) or the torch dtype named float32 / bfloat16 / float16."""
    import torch

    name = str(spec or "auto").lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise UserError(f"{flag} {spec!r}: must be one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def parse_device_map(spec: str | None, flag: str = "--device-map") -> str | dict | None:
    """A placement name, or the {module name: device} object of a JSON file (None: unset)."""
    if spec is None or spec in PLACEMENTS:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} {spec}: neither {', '.join(PLACEMENTS)} nor a JSON file")
    try:
        device_map = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {spec}: not valid JSON ({first_line(e)})") from None
    if not isinstance(device_map, dict) or not device_map:
        raise UserError(f"{flag} {spec}: must be a JSON object {{module name: device}}")
    return device_map


def model_dir(path: str | os.PathLike, flag: str = "--model") -> Path:
    """`path` as a local Hugging Face model directory (it holds config.json), else UserError."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{flag} {path}: not a local model directory")
    if not (p / "config.json").is_file():
        raise UserError(f"{flag} {path}: not a local model directory (no config.json)")
    return p


@contextlib.contextmanager
def quiet_hub_progress() -> Iterator[None]:
    """No transformers progress bars meanwhile (stderr keeps to our own lines: one line on an error)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | os.PathLike, flag: str = "--model") -> Any:
    """The tokenizer of a local model directory; UserError naming `flag` if it cannot be loaded."""
    from transformers import AutoTokenizer

    p = model_dir(path, flag)
    try:
        with quiet_hub_progress():
            return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's to fix
        raise UserError(f"{flag} {path}: cannot load its tokenizer ({first_line(e)})") from None


def offload_folder() -> str:
    """A temporary folder for "disk" entries of a device map, removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="sparse-ffn-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def context_length(model: Any, tokenizer: Any = None) -> int:
    """The longest input the model takes (as lm-eval's HFLM finds it): the config's position limit,
    else the tokenizer's model_max_length, else 2048."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**6:
        return value
    return 2048


def load_model(path: str | os.PathLike, *, device: Any = "auto", dtype: str | None = "float32",
               device_map: str | dict | None = None, seq_len: int | None = None, flag: str = "--model",
               tokenizer: Any = None) -> nn.Module:
    """A local causal LM directory -> the model in eval mode, on `device` (a torch.device or a spec for
    `resolve_device`) or spread by accelerate over `device_map` (see `parse_device_map`). Refuses a
    `seq_len` beyond its context length. UserError naming `flag` on any failure."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    p = model_dir(path, flag)
    torch_dtype = resolve_dtype(dtype)
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = device_map
        if isinstance(device_map, dict) and "disk" in device_map.values():
            placement["offload_folder"] = offload_folder()
    else:
        device = resolve_device(device) if device is None or isinstance(device, str) else device
    try:
        with quiet_hub_progress():
            model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype, local_files_only=True, **placement)
    except Exception as e:  # noqa: BLE001 - a bad directory or placement is the user's to fix
        where = f" with --device-map {device_map}" if device_map is not None else ""
        raise UserError(f"{flag} {path}: cannot load the model{where} ({first_line(e)})") from None
    limit = context_length(model, tokenizer)
    if seq_len is not None and seq_len > limit:
        raise UserError(f"--seq-len {seq_len}: longer than the model's context of {limit} tokens ({path})")
    if device_map is None:
        model.to(device)
    # Requests decide sampling; nothing from the checkpoint's generation_config.json (temperature, top_p,
    # repetition penalties, ...) may leak in. Keep only its special-token ids.
    original = model.generation_config
    eos = original.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=original.bos_token_id, eos_token_id=eos,
                                               pad_token_id=original.pad_token_id)
    return model.eval()


def load_model_and_tokenizer(path: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a local directory; `kwargs` as for `load_model` (the tokenizer first, so a
    bad directory is reported before the weights are read)."""
    tokenizer = load_tokenizer(path, kwargs.get("flag", "--model"))
    return load_model(path, tokenizer=tokenizer, **kwargs), tokenizer


def placement_text(model: nn.Module, device: Any) -> str:
    """Where the model sits, for a log line: the device, or the devices of its accelerate device map."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or len(set(map(str, device_map.values()))) < 2:
        return str(device) if not device_map else str(next(iter(device_map.values())))
    return "spread over " + ", ".join(sorted(set(map(str, device_map.values()))))
