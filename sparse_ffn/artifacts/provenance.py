"""Provenance, once for every artifact and report: who made it (`created_by`), for which model
(`check_fingerprint`), in which format (`check_header`), at what memory cost (`peak_memory`), from
which data (`data_record`)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from sparse_ffn import __version__
from sparse_ffn.errors import UserError


def created_by(*, timestamp: bool = True) -> dict:
    """{"package", "version", "torch", "transformers" (when loaded), "created" (UTC, ISO 8601)}.
    timestamp=False leaves out "created" (for artifacts that must be byte-identical across runs)."""
    out: dict[str, Any] = {"package": "sparse-ffn", "version": __version__}
    for name in ("torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", None)
    if timestamp:
        out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return out


def check_header(obj: Any, fmt: str, version: int, where: str, kind: str) -> dict:
    """`obj` as a dict whose "format" is `fmt` and "version" is `version`; else a one-line UserError
    naming `where` (a file) and `kind` (what it should have been, e.g. "thresholds file")."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{where}: not a sparse-ffn {kind} (format={found!r}, expected {fmt!r})")
    if obj.get("version") != version:
        raise UserError(f"{where}: {kind} version {obj.get('version')!r} is not supported "
                        f"(this sparse-ffn reads version {version})")
    return obj


def check_fingerprint(recorded: Any, fingerprint: dict, where: str, made_for: str = "made for") -> None:
    """Refuse an artifact whose recorded model fingerprint (`num_layers`, `d_ff`) differs from the
    model's; warn when only the weight hash differs (other weights or dtype)."""
    if not isinstance(recorded, dict):
        raise UserError(f"{where}: the model fingerprint must be an object, not {type(recorded).__name__}")
    for key in ("num_layers", "d_ff"):
        if recorded.get(key) is not None and recorded[key] != fingerprint[key]:
            raise UserError(f"{where}: {made_for} {key}={recorded[key]}, but the model has {key}={fingerprint[key]}")
    if recorded.get("weight_hash") and recorded["weight_hash"] != fingerprint["weight_hash"]:
        warnings.warn(f"{where}: weight hash differs from the model's (calibrated on other weights or dtype?)",
                      stacklevel=3)


def peak_memory(device: Any = None) -> dict:
    """{"peak_rss_bytes": process peak resident memory, "peak_cuda_bytes": peak allocated on a CUDA
    `device`} where measurable (ru_maxrss is KiB on Linux, bytes on macOS)."""
    out: dict[str, int] = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        pass
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux /proc; None where not readable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _glibc() -> Any:
    """The C library when it is glibc (has malloc_trim and mallopt), else None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand memory freed by the program back to the OS (glibc's malloc_trim; a no-op elsewhere), so that a
    resident-memory reading that follows measures what is live, not what the allocator keeps."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc mallopt parameters, and the values its dynamic thresholds reach on 64-bit (mmap 32 MiB, trim 2x that)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DYNAMIC_MMAP_CEILING = 32 << 20


@contextlib.contextmanager
def malloc_thresholds(mmap_bytes: int, trim_bytes: int | None = None) -> Iterator[bool]:
    """glibc's malloc thresholds within the block (process-wide): an allocation of at least `mmap_bytes`
    that the heap has no free room for gets a mapping of its own (returned to the OS when freed); with
    `trim_bytes`, free memory at the heap's top is kept up to that size instead of being returned.
    On exit the thresholds are those glibc's dynamic ones settle at on tensor workloads (mmap 32 MiB,
    trim 64 MiB) and, if `trim_bytes` was given, the kept memory is returned. Yields False (and does
    nothing) without glibc."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    mallopt = libc.mallopt
    mallopt(_M_MMAP_THRESHOLD, int(mmap_bytes))
    if trim_bytes is not None:
        mallopt(_M_TRIM_THRESHOLD, int(trim_bytes))
    try:
        yield True
    finally:
        mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_CEILING)
        mallopt(_M_TRIM_THRESHOLD, 2 * _DYNAMIC_MMAP_CEILING)
        if trim_bytes is not None:
            return_freed_memory()


def large_blocks_mapped(threshold_bytes: int = 1 << 20) -> contextlib.AbstractContextManager[bool]:
    """Long layer-by-layer runs (experts calibration) grow and fragment the heap: blocks of changing
    sizes freed around live ones leave holes, and the peak RSS grows with the number of layers. Within
    this block every large block the heap has no room for is mapped on its own (`malloc_thresholds`)."""
    return malloc_thresholds(threshold_bytes)


def freed_blocks_kept(trim_bytes: int = 1 << 30, mmap_bytes: int = 64 << 20) -> contextlib.AbstractContextManager[bool]:
    """Repeated forward passes (threshold calibration) allocate and free the same tensor sizes over and
    over; by default glibc hands the heap's freed top back after each and page-faults it in again
    (SmolLM2, 4 x 1024 tokens: 550k faults a batch). Within this block blocks below 64 MiB come from
    the heap and up to `trim_bytes` of freed memory is kept for the next pass (`malloc_thresholds`)."""
    return malloc_thresholds(mmap_bytes, trim_bytes)


def reset_peak_rss() -> bool:
    """Restart the process's peak-RSS count (ru_maxrss, VmHWM) from its resident memory now, so that
    `peak_memory` then measures one phase; Linux only (/proc/self/clear_refs), False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def data_record(spec: str, sha256: str, windows: Any = None) -> dict:
    """Provenance of a text: its path (resolved when a file) or `datasets` name, sha256, and with
    `windows` (LongTensor (n, seq_len)) the tokens, seq_len and window count used."""
    out: dict[str, Any] = {"path": str(Path(spec).resolve()) if Path(spec).is_file() else spec, "sha256": sha256}
    if windows is not None:
        out.update(tokens=int(windows.numel()), seq_len=int(windows.shape[1]), windows=int(windows.shape[0]))
    return out
