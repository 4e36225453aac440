"""Calibration / evaluation text: load it from a file (or a `datasets` name) and cut it into token windows.

    text, sha = load_text("wiki.valid.txt")        # a text file: its bytes, decoded as UTF-8
    text, sha = load_text("c4_sample.jsonl")       # JSON lines with a "text" field, joined with "\\n\\n"
    text, sha = load_text("wikitext:wikitext-2-raw-v1:test")   # a `datasets` name (when reachable)
    windows = token_windows(tokenizer, text, seq_len=512, max_tokens=8192)   # LongTensor (16, 512)

`sha` is the sha256 of the source bytes (for a `datasets` name: of the joined text, UTF-8), recorded in
artifacts so a calibration can be traced to its data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sparse_ffn.errors import UserError

# Suffixes that mark a spec as a file path even when the file is missing (then: "not found", not a
# confusing attempt to fetch a dataset of that name).
_FILE_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".tokens", ".md", ".csv")


def load_text(spec: str) -> tuple[str, str]:
    """(text, sha256 hex of the source bytes) for a text file, a .jsonl file or a `datasets` name.

    - a file ending in `.jsonl`: one JSON object per line, documents = their "text" fields, joined
      with "\\n\\n" (blank lines skipped);
    - any other file: the whole file as UTF-8 text;
    - otherwise `NAME[:CONFIG[:SPLIT]]` for `datasets.load_dataset(NAME, CONFIG, split=SPLIT)` (split
      default "test"), rows' "text" joined with "\\n\\n" (paper-parity WikiText-2 form). Works only
      where the dataset is reachable (cached, or online without HF_DATASETS_OFFLINE).
    Every failure is a one-line UserError naming `spec`.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise UserError(f"{spec}: is a directory, not a text or .jsonl file")
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"{spec}: cannot read data file ({e.strerror or type(e).__name__})") from None
        sha = hashlib.sha256(data).hexdigest()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{spec}: not UTF-8 text (byte {e.start})") from None
        if path.suffix.lower() == ".jsonl":
            text = _join_jsonl(text, spec)
        return text, sha
    if path.suffix.lower() in _FILE_SUFFIXES or "/" in spec or "\\" in spec or spec.startswith("."):
        raise UserError(f"{spec}: data file not found")
    return _load_dataset(spec)


def _join_jsonl(text: str, where: str) -> str:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{where}: line {n} has no string field \"text\"")
        docs.append(obj["text"])
    return "\n\n".join(docs)


def _load_dataset(spec: str) -> tuple[str, str]:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as e:  # noqa: BLE001 - any failure to reach the dataset is the user's to fix
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{spec}: no such data file, and not a reachable `datasets` name "
                        f"NAME[:CONFIG[:SPLIT]] ({type(e).__name__}: {msg[:200]})") from None
    if "text" not in ds.column_names:
        raise UserError(f"{spec}: dataset has no \"text\" column (columns: {', '.join(ds.column_names)})")
    text = "\n\n".join(ds["text"])
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None,
                  *, where: str = "data") -> torch.Tensor:
    """Tokenise `text` once (as one stream, the tokenizer's default special tokens) and cut it into
    non-overlapping windows: LongTensor (n_windows, seq_len), n_windows = min(tokens, max_tokens) // seq_len.

    Raises UserError when the text gives fewer than `max_tokens` tokens (when given) or less than one
    window. The remainder after the last full window is dropped.
    """
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: must be at least 2 (a window predicts seq_len - 1 tokens)")
    if max_tokens is not None and max_tokens < seq_len:
        raise UserError(f"--tokens {max_tokens}: fewer than one window of --seq-len {seq_len}")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    n = len(ids)
    if max_tokens is not None and n < max_tokens:
        raise UserError(f"{where}: too little data: {n} tokens, --tokens asks for {max_tokens}")
    if n < seq_len:
        raise UserError(f"{where}: too little data: {n} tokens, less than one window of --seq-len {seq_len}")
    use = min(n, max_tokens) if max_tokens is not None else n
    n_windows = use // seq_len
    return torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
