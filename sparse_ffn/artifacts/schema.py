"""Type checks of artifact metadata: a tiny schema language, so that every field of a threshold file
or an experts manifest that parses but has the wrong type is a one-line UserError naming the file and
the key (`thr.json: 'calibration' must be an object, not str`), never a traceback later.

    schema = Obj({"layer": Field(INT, required=True), "file": Field(STR)})
    check(obj, schema, "manifest.json", "layers[0]")

A schema is a tuple of kinds (INT, NUM, STR, BOOL, NULL, DICT, LIST: the value must be one of them;
NUM accepts ints too, INT refuses bools), an `Obj` (a JSON object whose listed keys are checked; other
keys are allowed, for forward compatibility) or a `ListOf` (a JSON array whose items are checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from sparse_ffn.errors import UserError

INT, NUM, STR, BOOL, NULL, DICT, LIST = "an integer", "a number", "a string", "a boolean", "null", "an object", \
    "an array"
_NAMES = {type(None): NULL, bool: BOOL, int: INT, float: NUM, str: STR, dict: DICT, list: LIST}


@dataclass(frozen=True)
class Obj:
    """A JSON object: `fields` maps a key to its Field; `values`, when given, checks every value."""

    fields: dict[str, "Field"] = field(default_factory=dict)
    values: "Schema | None" = None
    nullable: bool = False


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose items match `item` (with at least `min_len` of them)."""

    item: "Schema"
    min_len: int = 0
    nullable: bool = False


@dataclass(frozen=True)
class Field:
    """One key: its schema, whether it must be present, and an extra check (value -> problem or None)."""

    schema: "Schema"
    required: bool = False
    rule: Callable[[Any], str | None] | None = None


Schema = Union[tuple, Obj, ListOf]


def kind(value: Any) -> str:
    """The JSON kind of a parsed value ('an integer', 'a string', ...)."""
    return _NAMES.get(type(value), type(value).__name__)


def _matches(value: Any, kinds: tuple) -> bool:
    k = kind(value)
    return k in kinds or (k == INT and NUM in kinds)


def _key(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if isinstance(key, str) and prefix else (f"{prefix}[{key}]" if prefix else str(key))


def _alts(kinds: tuple) -> str:
    return " or ".join(kinds)


def check(value: Any, schema: Schema, where: str, key: str) -> Any:
    """`value` if it matches `schema`; else UserError "<where>: '<key>' must be ..., not ..."."""
    if isinstance(schema, tuple):
        if not _matches(value, schema):
            shown = repr(value) if kind(value) == NUM else kind(value)
            raise UserError(f"{where}: '{key}' must be {_alts(schema)}, not {shown}")
        return value
    if value is None and schema.nullable:
        return value
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            raise UserError(f"{where}: '{key}' must be an array, not {kind(value)}")
        if len(value) < schema.min_len:
            raise UserError(f"{where}: '{key}' must have at least {schema.min_len} item(s), has {len(value)}")
        for i, item in enumerate(value):
            check(item, schema.item, where, _key(key, i))
        return value
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{key}' must be an object, not {kind(value)}")
    for name, f in schema.fields.items():
        sub = _key(key, name)
        if name not in value:
            if f.required:
                raise UserError(f"{where}: '{sub}' is missing")
            continue
        check(value[name], f.schema, where, sub)
        problem = f.rule(value[name]) if f.rule is not None else None
        if problem:
            raise UserError(f"{where}: '{sub}' {problem}")
    if schema.values is not None:
        for name, v in value.items():
            if name not in schema.fields:
                check(v, schema.values, where, _key(key, name))
    return value


def check_fields(obj: dict, fields: dict[str, Field], where: str) -> dict:
    """Check the top-level keys of a parsed file (`obj` already known to be a dict)."""
    return check(obj, Obj(fields), where, "")


def at_least(lo: float) -> Callable[[Any], str | None]:
    """A rule: value >= lo (None passes)."""
    return lambda v: None if v is None or v >= lo else f"must be >= {lo}, not {v!r}"


def one_of(*choices: Any) -> Callable[[Any], str | None]:
    """A rule: value in choices."""
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}, not {v!r}"


CREATED_BY = Obj({"package": Field((STR,)), "version": Field((STR,)), "created": Field((STR,)),
                  "torch": Field((STR, NULL)), "transformers": Field((STR, NULL))})  # `provenance.created_by`
