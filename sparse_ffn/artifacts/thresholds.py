"""Threshold file format v1: per-layer CETT thresholds t_l and where they came from.

    {
      "format": "sparse-ffn/thresholds", "version": 1,
      "strategy": "cett",
      "thresholds": [t_0, ..., t_{L-1}],          # float >= 0; mask |a_i| < t_l / ||W_down[:, i]||
      "model": {"name_or_path": str|null, "num_layers": L, "d_ff": int, "weight_hash": "sha256:..."},
      "calibration": {"method": "cett", "cett": c, "target_ppl_ratio": r, "ppl_ratio": r',
                      "data": {"path": str, "sha256": str}, "tokens": int, "seq_len": int} | {},
      "sparsity": {"mean": float, "per_layer": [float], "tokens": int} | null,
      "created_by": {"package": "sparse-ffn", "version": str, "created": iso8601}
    }

Also accepted where a thresholds argument is taken: a Python list of floats, or Sparsing Law's
comma-separated string ("0.01,0.02,...", optionally bracketed).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparse_ffn.errors import UserError
from sparse_ffn.artifacts.atomic import atomic_write_json
from sparse_ffn.artifacts import provenance
from sparse_ffn.artifacts.provenance import check_fingerprint, check_header
from sparse_ffn.artifacts.schema import CREATED_BY, DICT, INT, LIST, NULL, NUM, STR, Field, ListOf, Obj, \
    check_fields

FORMAT = "sparse-ffn/thresholds"
VERSION = 1
FIELDS = {  # the types of every documented field (thresholds themselves: `_check_values`)
    "strategy": Field((STR,)),
    "model": Field(Obj({"name_or_path": Field((STR, NULL)), "num_layers": Field((INT,)), "d_ff": Field((INT,)),
                        "weight_hash": Field((STR, NULL))})),
    "calibration": Field(Obj({
        "method": Field((STR,)), "cett": Field((NUM,)), "target_ppl_ratio": Field((NUM, NULL)),
        "ppl_ratio": Field((NUM,)), "ppl_dense": Field((NUM,)), "ppl_sparse": Field((NUM,)),
        "data": Field(Obj({"path": Field((STR,)), "sha256": Field((STR, NULL))})), "tokens": Field((INT,)),
        "seq_len": Field((INT,)), "windows": Field((INT,)), "search": Field((LIST,)), "timing": Field((DICT,)),
        "tolerance": Field((DICT,)), "memory": Field((DICT,)), "eval": Field((DICT,))})),
    "sparsity": Field(Obj({"mean": Field((NUM,)), "per_layer": Field(ListOf((NUM,))), "tokens": Field((INT,))},
                          nullable=True)),
    "created_by": Field(CREATED_BY),
}


@dataclass
class ThresholdFile:
    """In-memory form of a v1 threshold file; `source` is where it was read from (not saved)."""

    thresholds: list[float]
    model: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    sparsity: dict | None = None
    strategy: str = "cett"
    created_by: dict = field(default_factory=provenance.created_by)
    source: str = "<inline>"

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return {"format": FORMAT, "version": VERSION, **d}

    def save(self, path: str | os.PathLike) -> Path:
        """Validate, then write atomically."""
        _check_values(self.thresholds, str(path))
        return atomic_write_json(path, self.to_json())

    def check_model(self, fingerprint: dict) -> None:
        """Refuse a file made for another shape of model; warn when only the weights differ."""
        check_fingerprint(self.model, fingerprint, self.source)
        if len(self.thresholds) != fingerprint["num_layers"]:
            raise UserError(f"{self.source}: {len(self.thresholds)} thresholds, but the model has "
                            f"{fingerprint['num_layers']} FFN layers")


def _check_values(values: list, where: str) -> list[float]:
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: 'thresholds' must be a non-empty list of numbers")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{where}: threshold {i} is {v!r}, not a number")
        if not math.isfinite(v) or v < 0:
            raise UserError(f"{where}: threshold {i} is {v!r}; thresholds must be finite and >= 0")
    return [float(v) for v in values]


def parse_threshold_list(text: str, where: str = "thresholds") -> list[float]:
    """Sparsing Law's form: floats separated by commas (or ; or whitespace), optionally in brackets."""
    items = [s for s in re.split(r"[,;\s]+", text.strip().strip("[]()")) if s]
    try:
        values = [float(s) for s in items]
    except ValueError as e:
        raise UserError(f"{where}: not a list of numbers ({e})") from None
    return _check_values(values, where)


def load(path: str | os.PathLike) -> ThresholdFile:
    """Read and validate a v1 file (or a plain text file holding a comma-separated list)."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{where}: thresholds file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read thresholds file ({type(e).__name__})") from None
    stripped = text.strip()
    if not stripped.startswith("{"):
        if re.fullmatch(r"[\[\]()0-9eE+\-.,;\s]+", stripped or "x"):
            return ThresholdFile(thresholds=parse_threshold_list(stripped, where), source=where)
        raise UserError(f"{where}: not JSON and not a comma-separated list of thresholds")
    try:
        obj = json.loads(stripped, parse_constant=lambda c: float(c))
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    check_header(obj, FORMAT, VERSION, where, "thresholds file")
    check_fields(obj, FIELDS, where)
    if obj.get("strategy", "cett") != "cett":
        raise UserError(f"{where}: strategy {obj.get('strategy')!r} is not 'cett'")
    values = _check_values(obj.get("thresholds"), where)
    known = {k: obj[k] for k in ("model", "calibration", "sparsity", "created_by") if k in obj}
    if not isinstance(known.get("model", {}), dict):
        raise UserError(f"{where}: 'model' must be an object")
    return ThresholdFile(thresholds=values, source=where, **known)


def resolve(spec: str | os.PathLike | list | tuple) -> ThresholdFile:
    """A thresholds argument as users give it: a file path, a list, or a comma-separated string."""
    if isinstance(spec, (list, tuple)):
        return ThresholdFile(thresholds=_check_values(list(spec), "thresholds"))
    if isinstance(spec, (int, float)):
        return ThresholdFile(thresholds=_check_values([spec], "thresholds"))
    text = str(spec)
    if Path(text).exists() or not re.fullmatch(r"[\[\]()0-9eE+\-.,;\s]+", text):
        return load(text)
    return ThresholdFile(thresholds=parse_threshold_list(text))
