"""What a sparsity request resolves to, shared by the lm-eval adapter and the UltraEval server:
model args (`thresholds`, `strategy`, `prune_arg`, `experts`, `ffn_*`, `pretrained`) -> the Sparse
Expansion experts (if any) and the masking to install.

Imports only the standard library at import time (the CLI builds its parser from modules that use it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ..ffn import FFNNames
    from ..masking import SparsityConfig, SparsityHandle
    from ..threshold_file import ThresholdFile

FFN_ARGS: tuple[str, ...] = ("ffn_layers", "ffn_down", "ffn_act", "ffn_gate", "ffn_up", "ffn_gate_up")


@dataclass
class SparsitySetup:
    """A resolved sparsity request: the config to install and where its pieces came from."""

    config: SparsityConfig
    names: FFNNames | None
    thresholds: ThresholdFile | None
    pretrained: Any  # a path (or, for lm-eval's HFLM, a model object)
    experts: str | None = None  # a Sparse Expansion experts directory
    experts_manifest: dict | None = None

    @property
    def strategy(self) -> str:
        return self.config.strategy

    def apply(self, model: Any) -> tuple[SparsityHandle, dict]:
        """Check the thresholds file against `model`, swap in the experts (if any), install the masking;
        returns (handle, info). The experts' handle is `model._sparse_ffn_experts` (see `experts_of`).

        `info` is what the lm-eval adapter reports under `config.sparse_ffn` (besides `sparsity`).
        """
        from ..atomic import sha256_file
        from ..ffn import find_ffns, model_fingerprint
        from ..masking import sparsify_

        thr = self.thresholds
        fingerprint = model_fingerprint(model, find_ffns(model, self.names))
        if thr is not None:
            thr.check_model(fingerprint)  # before any hook: a wrong file names the file, not the model
        if self.experts is not None:  # first: the masking hooks then sit on the routed modules
            from ..expansion import apply_experts_

            apply_experts_(model, self.experts, self.names)
        handle = sparsify_(model, self.config, self.names)
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
            from ..expansion import MANIFEST

            info["experts_source"] = str(self.experts)
            info["experts_manifest_sha256"] = sha256_file(os.path.join(self.experts, MANIFEST))
            info["experts_settings"] = (self.experts_manifest or {}).get("settings")
        return handle, info


def experts_of(model: Any) -> Any:
    """The ExpertsHandle installed on `model` (None without experts)."""
    return getattr(model, "_sparse_ffn_experts", None)


def ffn_names(ffn_args: dict[str, Any] | None) -> FFNNames | None:
    """`ffn_layers=..., ffn_down=..., ...` (None values ignored) -> FFNNames, or None when none is given."""
    from ..ffn import FFNNames

    given = {k[4:]: v for k, v in (ffn_args or {}).items() if k in FFN_ARGS and v is not None}
    if not given:
        return None
    if "down" not in given:
        raise UserError("ffn_down=... is required when any ffn_* module name is given")
    return FFNNames(**given)


def resolve_sparsity(
    thresholds: str | os.PathLike | list[float] | tuple[float, ...] | None = None,
    strategy: str | None = None,
    prune_arg: float | str | None = None,
    *,
    pretrained: str | None = None,
    ffn_args: dict[str, Any] | None = None,
    model_arg: str = "pretrained=...",
    experts: str | os.PathLike | None = None,
) -> SparsitySetup:
    """The lm-eval adapter's argument logic, shared: thresholds imply cett; `pretrained` may come
    from the thresholds file or the experts manifest; `model_arg` is how the model argument is spelled
    in error messages. A bad experts directory fails here, before the model is loaded."""
    from .. import threshold_file
    from ..masking import SparsityConfig

    names = ffn_names(ffn_args)
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
        from ..expansion import read_manifest

        experts = os.fspath(experts)
        manifest = read_manifest(experts)
    if pretrained is None:
        pretrained = (thr.model.get("name_or_path") if thr is not None else None) or \
            ((manifest.get("model") or {}).get("name_or_path") if manifest is not None else None)
        if not pretrained:
            raise UserError(f"{model_arg} is required (the thresholds/experts file does not name its model)")
    return SparsitySetup(config=config, names=names, thresholds=thr, pretrained=pretrained, experts=experts,
                         experts_manifest=manifest)
