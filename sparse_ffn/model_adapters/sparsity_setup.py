"""What a sparsity request resolves to, shared by the lm-eval adapter and the UltraEval server:
model args (`thresholds`, `strategy`, `prune_arg`, `experts`, `ffn_*`, `pretrained`) -> the Sparse
Expansion experts (if any) and the masking to install.

Imports only the standard library at import time (the CLI builds its parser from modules that use it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparse_ffn import __version__
from sparse_ffn.core.names import FFN_ARGS, ffn_names
from sparse_ffn.core.sizes import parse_size
from sparse_ffn.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from sparse_ffn.core.experts import ExpertsHandle
    from sparse_ffn.core.names import FFNNames
    from sparse_ffn.core.masking import SparsityConfig, SparsityHandle
    from sparse_ffn.artifacts.thresholds import ThresholdFile



@dataclass
class SparsitySetup:
    """A resolved sparsity request: the config to install and where its pieces came from."""

    config: SparsityConfig
    names: FFNNames | None
    thresholds: ThresholdFile | None
    pretrained: Any  # a path (or, for lm-eval's HFLM, a model object)
    experts: str | None = None  # a Sparse Expansion experts directory
    experts_manifest: dict | None = None
    experts_streaming: bool | None = None  # True: layer-streamed; None: streamed when over experts_max_memory
    experts_max_memory: int | None = None  # bytes

    @property
    def strategy(self) -> str:
        return self.config.strategy

    def apply(self, model: Any) -> Applied:
        """Check the thresholds file against `model`, swap in the experts (if any), install the masking.

        `Applied.info` is what the lm-eval adapter reports under `config.sparse_ffn` (besides the counts).
        """
        from sparse_ffn.artifacts.atomic import sha256_file
        from sparse_ffn.core.ffn import find_ffns, model_fingerprint
        from sparse_ffn.core.masking import sparsify_

        thr = self.thresholds
        ffns = find_ffns(model, self.names)
        fingerprint = model_fingerprint(model, ffns)
        if thr is not None:
            thr.check_model(fingerprint)  # before any hook: a wrong file names the file, not the model
        experts, streaming, need = None, False, None
        if self.experts is not None:  # first: the masking hooks then sit on the routed modules
            experts, streaming, need = self._apply_experts(model, ffns)
        try:
            masking = sparsify_(model, self.config, self.names, ffns=ffns)
        except BaseException:
            if experts is not None:
                experts.remove()
            raise
        info = {
            "version": __version__,
            "strategy": self.config.strategy,
            "prune_arg": self.config.arg,
            "thresholds_source": thr.source if thr is not None else None,
            "thresholds_sha256": sha256_file(thr.source) if thr is not None and thr.source != "<inline>" else None,
            "thresholds_calibration": thr.calibration if thr is not None else None,
            "model_fingerprint": fingerprint,
        }
        if self.experts is not None:
            from sparse_ffn.artifacts.experts import MANIFEST

            info["experts_source"] = str(self.experts)
            info["experts_manifest_sha256"] = sha256_file(os.path.join(self.experts, MANIFEST))
            info["experts_settings"] = (self.experts_manifest or {}).get("settings")
            info["experts_streaming"] = streaming
            info["experts_memory_bytes"] = need
        return Applied(masking=masking, experts=experts, info=info, streaming=streaming)

    def _apply_experts(self, model: Any, ffns: list) -> tuple[ExpertsHandle, bool, int | None]:
        """(handle, streamed?, the experts' in-memory bytes): in memory unless experts_streaming=True or
        the experts exceed experts_max_memory (then only the routers are loaded)."""
        from sparse_ffn.artifacts.experts import (
            apply_experts_,
            apply_experts_streamed_,
            experts_memory_bytes,
            load_layer_experts,
        )

        if not self.experts_streaming and (self.experts_streaming is False or self.experts_max_memory is None):
            handle = apply_experts_(model, self.experts, self.names, ffns=ffns)
            return handle, False, experts_memory_bytes(handle)
        handle = apply_experts_streamed_(model, self.experts, self.names, ffns=ffns)
        need = experts_memory_bytes(handle)
        if self.experts_streaming or need > self.experts_max_memory:
            return handle, True, need
        try:  # fits: load every layer (the in-memory mode)
            for layer in range(len(ffns)):
                load_layer_experts(handle, layer)
        except BaseException:
            handle.remove()
            raise
        return handle, False, need


@dataclass
class Applied:
    """What `SparsitySetup.apply` installed: the masking handle (always; `dense` counts natural
    sparsity), the experts handle (with experts=DIR, else None) and the provenance `info`."""

    masking: SparsityHandle
    experts: ExpertsHandle | None
    info: dict
    streaming: bool = False  # the experts are loaded layer by layer (`model_adapters.streaming`)

    def counters(self) -> list:
        """The counters that follow the real-token protocol: sparsity, and expert usage with experts."""
        return [self.masking.stats] + ([self.experts.stats] if self.experts is not None else [])

    def remove(self) -> None:
        """Back to the dense model: masking off, dense linears back."""
        self.masking.remove()
        if self.experts is not None:
            self.experts.remove()


def resolve_sparsity(
    thresholds: str | os.PathLike | list[float] | tuple[float, ...] | None = None,
    strategy: str | None = None,
    prune_arg: float | str | None = None,
    *,
    pretrained: str | None = None,
    ffn_args: dict[str, Any] | None = None,
    model_arg: str = "pretrained=...",
    experts: str | os.PathLike | None = None,
    experts_streaming: bool | str | None = None,
    experts_max_memory: int | str | None = None,
) -> SparsitySetup:
    """The lm-eval adapter's argument logic, shared: thresholds imply cett; `pretrained` may come
    from the thresholds file or the experts manifest; `model_arg` is how the model argument is spelled
    in error messages. A bad experts directory fails here, before the model is loaded."""
    from sparse_ffn.artifacts import thresholds as threshold_file
    from sparse_ffn.core.masking import SparsityConfig

    names = ffn_names({k[4:]: v for k, v in (ffn_args or {}).items() if k in FFN_ARGS})
    thr = threshold_file.resolve(thresholds) if thresholds is not None else None
    strategy = strategy or ("cett" if thr is not None else "dense")
    if thr is not None and strategy != "cett":
        raise UserError(f"strategy={strategy}: thresholds= only goes with strategy=cett")
    arg = None
    if prune_arg is not None:
        try:
            arg = float(prune_arg)
        except (TypeError, ValueError):
            raise UserError(f"prune_arg={prune_arg!r}: not a number") from None
    config = SparsityConfig(strategy=strategy, arg=arg,
                            thresholds=tuple(thr.thresholds) if thr is not None else None)
    manifest = None
    if experts is not None:
        from sparse_ffn.artifacts.experts import read_manifest

        experts = os.fspath(experts)
        manifest = read_manifest(experts)
    if pretrained is None:
        pretrained = (thr.model.get("name_or_path") if thr is not None else None) or \
            ((manifest.get("model") or {}).get("name_or_path") if manifest is not None else None)
        if not pretrained:
            raise UserError(f"{model_arg} is required (the thresholds/experts file does not name its model)")
    streaming = _flag(experts_streaming, "experts_streaming")
    max_memory = None if experts_max_memory is None else size_bytes(experts_max_memory, "experts_max_memory")
    if experts is None and (streaming or max_memory is not None):
        raise UserError("experts_streaming / experts_max_memory: only with experts=DIR")
    return SparsitySetup(config=config, names=names, thresholds=thr, pretrained=pretrained, experts=experts,
                         experts_manifest=manifest, experts_streaming=streaming, experts_max_memory=max_memory)


def _flag(value: bool | str | None, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserError(f"{name}={value!r}: must be True or False")


def size_bytes(value: int | float | str, name: str) -> int:
    """A model-arg size: bytes (int) or '4GiB', '512MB', '1.5G' (binary units) -> bytes."""
    size = parse_size(value, f"{name}={value!r}")
    if size is None:
        raise UserError(f"{name}={value!r}: give a size (e.g. 4GiB), not unlimited")
    return size
