"""Byte sizes as users write them ('4GiB', '512M', '1.5G', '2000000000'; binary units). Standard library
only: the CLI options and the adapters' model args both parse sizes with it."""

from __future__ import annotations

import re

from sparse_ffn.errors import UserError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value: int | float | str, where: str) -> int | None:
    """Bytes of `value` (a number, or a size with K/M/G/T binary units); 'none'/'unlimited'/'inf' -> None.
    `where` names the option in the one-line UserError (e.g. "--max-memory 4XB")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value)
    if text.strip().lower() in ("none", "unlimited", "inf"):
        return None
    m = _SIZE.match(text)
    if not m:
        raise UserError(f"{where}: not a size (e.g. 4GiB, 512MiB, 2000000000)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))
