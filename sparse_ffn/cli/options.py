"""Options shared by the commands, spelled alike everywhere: --model, data (--data, --tokens,
--seq-len), placement (--device, --device-map), --dtype, --batch-size, --threads, the --ffn-* group,
byte sizes, and the checks of their values before anything is loaded.

Standard library only at import time: the CLI imports every command module to build its parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..core.sizes import parse_size
from ..core.names import FFN_NAME_FIELDS, FFNNames, ffn_names
from ..errors import UserError

DATA_HELP = ("a text file, a .jsonl with a \"text\" field, or a datasets name NAME[:CONFIG[:SPLIT]] when "
             "reachable")
DTYPE_CHOICES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def log(msg: str) -> None:
    """One progress/info line on stderr."""
    print(f"sparse-ffn: {msg}", file=sys.stderr, flush=True)


def command_group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The sub-commands of `sparse-ffn NAME` (created by whichever command module comes first)."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help)
        return parser.add_subparsers(dest=f"{name}_command", required=True)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def calibrate_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of `sparse-ffn calibrate`."""
    return command_group(subparsers, "calibrate", "calibrate sparsity artifacts (thresholds, experts)")


def add_model_option(p: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    p.add_argument("--model", required=required, metavar="DIR",
                   help=help or "local Hugging Face model directory")


def add_data_options(p: argparse.ArgumentParser, *, what: str = "text", tokens: int | None = 8192,
                     seq_len: int | None = 512) -> None:
    """--data (required), --tokens and --seq-len (with these defaults; None: not offered)."""
    p.add_argument("--data", required=True, help=f"{what}: {DATA_HELP}")
    if tokens is not None:
        p.add_argument("--tokens", type=int, default=tokens, help=f"tokens to use (default {tokens})")
    if seq_len is not None:
        p.add_argument("--seq-len", type=int, default=seq_len, help=f"window length in tokens (default {seq_len})")


def add_placement_options(p: argparse.ArgumentParser, *, device_map: bool = False, extra_map_help: str = "") -> None:
    """--device (default auto: cuda if available, else mps, else cpu) and, optionally, --device-map."""
    from ..model_adapters.loading import DEVICE_MAP_HELP

    group = p.add_mutually_exclusive_group() if device_map else p
    group.add_argument("--device", default="auto",
                       help="auto (default: cuda if available, else mps, else cpu), cpu, cuda, cuda:1, mps")
    if device_map:
        group.add_argument("--device-map", metavar="SPEC", help=DEVICE_MAP_HELP + extra_map_help)


def add_dtype_option(p: argparse.ArgumentParser, default: str = "float32", auto: bool = False) -> None:
    choices = DTYPE_CHOICES + (("auto",) if auto else ())
    p.add_argument("--dtype", default=default, choices=choices,
                   help=f"model dtype (default {default}" + ("; auto = the checkpoint's)" if auto else ")"))


def add_batch_size_option(p: argparse.ArgumentParser, default: int, what: str = "windows per forward pass") -> None:
    p.add_argument("--batch-size", type=int, default=default, metavar="B", help=f"{what} (default {default})")


def add_threads_option(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--threads", type=int, metavar="T", help=help or "torch CPU threads (default: torch's choice)")


def add_ffn_options(p: argparse.ArgumentParser) -> None:
    """--ffn-layers, --ffn-down, --ffn-act, --ffn-gate, --ffn-up, --ffn-gate-up (dest ffn_<field>)."""
    for name in FFN_NAME_FIELDS:
        p.add_argument(f"--ffn-{name.replace('_', '-')}", dest=f"ffn_{name}", metavar="NAME",
                       help="explicit FFN module name for an architecture the discovery does not know "
                            "(layers: path of the decoder-layer list; the others relative to one layer)")


def ffn_args(args: argparse.Namespace) -> dict[str, Any]:
    """The --ffn-* options as the adapters' model args {ffn_<field>: name}."""
    return {f"ffn_{k}": getattr(args, f"ffn_{k}", None) for k in FFN_NAME_FIELDS}


def ffn_names_from(args: argparse.Namespace) -> FFNNames | None:
    """The --ffn-* options as FFNNames (None when none is given)."""
    return ffn_names({k: getattr(args, f"ffn_{k}", None) for k in FFN_NAME_FIELDS},
                     spell=lambda field: f"--ffn-{field.replace('_', '-')}")


def check_positive(**flags: int | None) -> None:
    """UserError for the first value < 1 ({'--tokens': 0} -> "--tokens 0: must be >= 1"); None is skipped."""
    for flag, value in flags.items():
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be >= 1")


def apply_threads(threads: int | None) -> None:
    """--threads: torch's CPU thread count for the whole command (None: torch's choice)."""
    if threads is None:
        return
    check_positive(threads=threads)
    import torch

    torch.set_num_threads(threads)


def parse_bytes(text: str, flag: str = "--max-activation-memory") -> int | None:
    """'4GiB', '512M', '1.5G', '1000000' -> bytes; 'none'/'unlimited' -> None (binary units)."""
    return parse_size(text, f"{flag} {text!r}")


def check_out_dir(path: str, flag: str = "--out-dir") -> Path:
    """--out-dir must be a directory or not exist yet, and be writable (`artifacts.atomic.check_writable`)."""
    from ..artifacts.atomic import check_writable

    return check_writable(path, flag, directory=True)


def check_out_file(path: str, flag: str = "--out") -> Path:
    """--out must be a file path (not an existing directory) that can be written."""
    from ..artifacts.atomic import check_writable

    return check_writable(path, flag)
