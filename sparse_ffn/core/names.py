"""Explicit FFN module names, for an architecture `core.ffn.find_ffns` does not know. Standard library
only: the CLI and the adapters' argument parsing use it before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sparse_ffn.errors import UserError


@dataclass(frozen=True)
class FFNNames:
    """Explicit module names for an architecture `find_ffns` does not know.

    `layers` is the dotted path of the decoder-layer ModuleList from the model root (optional: found
    automatically); the others are dotted paths relative to one decoder layer.
    """

    down: str
    act: str | None = None
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    layers: str | None = None


FFN_NAME_FIELDS: tuple[str, ...] = ("layers", "down", "act", "gate", "up", "gate_up")


FFN_ARGS: tuple[str, ...] = tuple(f"ffn_{field}" for field in FFN_NAME_FIELDS)  # the adapters' model args


def ffn_names(given: dict[str, str | None],
              spell: Callable[[str], str] = lambda field: f"ffn_{field}=...") -> FFNNames | None:
    """{field: module name} (fields of FFN_NAME_FIELDS, None values ignored) -> FFNNames, or None when
    none is given. `spell(field)` is how the option is written in the error (model arg or CLI flag)."""
    names = {k: v for k, v in given.items() if k in FFN_NAME_FIELDS and v}
    if not names:
        return None
    if "down" not in names:
        raise UserError(f"{spell('down')} is required when any FFN module name is given")
    return FFNNames(**names)
