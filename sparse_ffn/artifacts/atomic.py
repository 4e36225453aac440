"""Atomic file writes: an artifact is either absent or complete, never half-written; written with the
mode the umask gives (0666 & ~umask, as `open` would), and a failed write (full disk, no permission,
a parent that is a file) is one UserError naming the path. `check_writable` finds the last two before
any work is done."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

from sparse_ffn.errors import UserError


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | os.PathLike, e: OSError) -> UserError:
    """A one-line UserError for an OSError met while writing `path`."""
    reason = e.strerror or type(e).__name__
    name = errno.errorcode.get(e.errno or 0)
    hint = {errno.ENOSPC: " (disk full; nothing was written)", errno.EDQUOT: " (quota exceeded; nothing was written)",
            errno.EROFS: " (read-only file system)", errno.EEXIST: " (a parent is a file, not a directory)",
            errno.ENOTDIR: " (a parent is a file, not a directory)"}.get(e.errno or 0, "")
    return UserError(f"{path}: cannot write ({reason}{f', {name}' if name else ''}){hint}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`. Returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp made it 0600
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_writable(path: str | os.PathLike, flag: str, *, directory: bool = False) -> Path:
    """UserError (before any work) unless `path` can be written: a file path that is not a directory
    (`directory=False`) or a directory path that is not a file, whose nearest existing ancestor is a
    directory where a file can really be created (probed with an unnamed temp file: right for root,
    read-only mounts and ACLs alike). Nothing is created."""
    path = Path(path)
    if not directory and path.is_dir():
        raise UserError(f"{flag} {path}: is a directory")
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    probe = path if directory and path.is_dir() else path.parent
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise UserError(f"{flag} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {probe} ({e.strerror or type(e).__name__})") from None
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
