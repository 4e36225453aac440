"""The UltraEval server's counts, summed over its worker processes.

Each process keeps cumulative counts (never reset in memory) and, after every answered request, writes
them to `<dir>/worker-<pid>-<start>.json` (atomically: a reader sees the old or the new file, never half
of one). `GET /stats` in any worker sums every worker file there, so a multi-worker (multi-GPU) run
reports the whole run, and a restarted worker's predecessor keeps its file: nothing answered is lost.
`POST /stats/reset` writes the sums at that moment to `<dir>/reset.json`; every later `/stats` reports
the sums minus that baseline. Without a directory (one process, e.g. the in-process test server) the
same happens in memory.

Record (one per process): {"pid", "started", "requests", "instances", "truncated_instances",
"truncated_tokens", "sparsity": {"d_ff", "inactive", "tokens"}, "experts": {"counts": {"layer:router":
[tokens per expert]}, "tokens"} or null}. Standard library only at import.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

WORKER_PREFIX = "worker-"
BASELINE = "reset.json"
SCALARS = ("requests", "instances", "truncated_instances", "truncated_tokens")


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def empty_totals(d_ff: list[int]) -> dict:
    return {**{k: 0 for k in SCALARS}, "sparsity": {"d_ff": list(d_ff), "inactive": [0] * len(d_ff), "tokens": 0},
            "experts": None}


def add_totals(a: dict, b: dict, sign: int = 1) -> dict:
    """a + sign * b, exact (integers); experts counts are added slot by slot."""
    out = {k: a.get(k, 0) + sign * b.get(k, 0) for k in SCALARS}
    sa, sb = a["sparsity"], b["sparsity"]
    if len(sa["inactive"]) != len(sb["inactive"]):
        raise ValueError("worker records of different models in one stats directory")
    out["sparsity"] = {"d_ff": sa["d_ff"], "tokens": sa["tokens"] + sign * sb["tokens"],
                       "inactive": [x + sign * y for x, y in zip(sa["inactive"], sb["inactive"])]}
    ea, eb = a.get("experts"), b.get("experts")
    if ea is None and eb is None:
        out["experts"] = None
    else:
        ea, eb = ea or {"counts": {}, "tokens": 0}, eb or {"counts": {}, "tokens": 0}
        counts = {k: list(v) for k, v in ea["counts"].items()}
        for key, vec in eb["counts"].items():
            base = counts.get(key, [0] * len(vec))
            counts[key] = [x + sign * y for x, y in zip(base, vec)]
        out["experts"] = {"counts": counts, "tokens": ea["tokens"] + sign * eb["tokens"]}
    return out


def summarize(totals: dict) -> dict:
    """The /stats view of `totals`: sparsity summary, expert usage summary, request counts."""
    from sparse_ffn.core.experts import usage_summary
    from sparse_ffn.core.masking import sparsity_summary

    s = totals["sparsity"]
    out = {"sparsity": sparsity_summary(s["inactive"], s["tokens"], s["d_ff"]),
           "requests": totals["requests"], "instances": totals["instances"],
           "truncated": {"instances": totals["truncated_instances"], "tokens": totals["truncated_tokens"]}}
    if totals.get("experts") is not None:
        e = totals["experts"]
        counts = {(int(k.split(":")[0]), k.split(":", 1)[1]): v for k, v in e["counts"].items()}
        out["expert_usage"] = usage_summary(counts, e["tokens"])
    return out


class StatsStore:
    """This process's record and (with a directory) every worker's. Thread-safe."""

    def __init__(self, directory: str | os.PathLike | None, d_ff: list[int], *, reader_only: bool = False) -> None:
        self.reader_only = reader_only  # a process that serves nothing (the gunicorn master): no own record
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.d_ff = list(d_ff)
        self._lock = threading.Lock()
        self._pid = None
        self._local = {"pid": os.getpid(), "started": now(), **empty_totals(d_ff)}
        self._baseline = {"since": now(), "totals": empty_totals(d_ff)}

    def _own_name(self) -> str:
        if self._pid != os.getpid():  # first publish in this process (after a fork: a new worker)
            self._pid = os.getpid()
            self._start_ns = time.time_ns()
        return f"{WORKER_PREFIX}{self._pid}-{self._start_ns}.json"

    def publish(self, record: dict) -> None:
        """This process's cumulative record, after each answered request."""
        from sparse_ffn.artifacts.atomic import atomic_write_json

        with self._lock:
            self._local = record
            if self.directory is not None:
                atomic_write_json(self.directory / self._own_name(), record)

    def records(self) -> list[dict]:
        """Every worker's latest record (this process's from memory)."""
        with self._lock:
            own, name = self._local, (self._own_name() if self.directory is not None else None)
        if self.directory is None:
            return [own]
        out = []
        for path in sorted(self.directory.glob(f"{WORKER_PREFIX}*.json")):
            if path.name == name:
                continue
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # removed meanwhile: a reader never sees half a file
                continue
        if self.reader_only:
            return out
        return out + ([own] if own.get("requests") or not out else [])

    def baseline(self) -> dict:
        if self.directory is not None:
            try:
                return json.loads((self.directory / BASELINE).read_text())
            except FileNotFoundError:
                return {"since": None, "totals": empty_totals(self.d_ff)}
        with self._lock:
            return self._baseline

    def totals(self) -> tuple[dict, list[dict], dict]:
        """(sum over workers minus the baseline, the records, the baseline)."""
        records, base = self.records(), self.baseline()
        total = empty_totals(self.d_ff)
        for r in records:
            total = add_totals(total, r)
        return add_totals(total, base["totals"], -1), records, base

    def reset(self) -> dict:
        """Make the current sums the baseline; returns the totals before (minus the old baseline)."""
        from sparse_ffn.artifacts.atomic import atomic_write_json

        before, records, base = self.totals()
        new = {"since": now(), "totals": add_totals(before, base["totals"])}
        if self.directory is not None:
            atomic_write_json(self.directory / BASELINE, new)
        with self._lock:
            self._baseline = new
        return before


def clear(directory: str | os.PathLike) -> None:
    """Remove the stats files of an earlier run from `directory` (only ours: worker-*.json, reset.json)."""
    d = Path(directory)
    for path in [*d.glob(f"{WORKER_PREFIX}*.json"), d / BASELINE]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def directory_totals(directory: str | os.PathLike) -> dict | None:
    """The /stats view summed over every worker file in `directory` minus its baseline (None when no
    worker has written yet). For the gunicorn master, which serves nothing itself."""
    d = Path(directory)
    records = []
    for path in sorted(d.glob(f"{WORKER_PREFIX}*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    return summarize(StatsStore(d, records[0]["sparsity"]["d_ff"], reader_only=True).totals()[0])
