"""The `sparse_ffn` lm-eval model: HFLM with masked FFN activations and measured sparsity.

    lm_eval --model sparse_ffn --model_args thresholds=thr.json --tasks piqa
    lm_eval --model sparse_ffn --model_args pretrained=DIR,strategy=fat,prune_arg=0.01 --tasks piqa

Like lm-eval's own `hf_steered.SteeredModel`: pop our arguments, let HFLM load the model, then
install the masking hooks on `self.model`. Sparsity is counted over the tokens lm-eval scores:
each batch row's real prefix for loglikelihood requests (no padding), the attention mask during
generation, never the auto-batch-size probes. It lands in the results JSON under
`config.sparse_ffn` (lm-eval merges `get_model_info()` there).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import __version__
from ..atomic import sha256_file
from ..errors import UserError, install_excepthook
from ..ffn import FFNNames, find_ffns, model_fingerprint
from ..masking import SparsityConfig, sparsify_
from .. import threshold_file

_FFN_ARGS = ("ffn_layers", "ffn_down", "ffn_act", "ffn_gate", "ffn_up", "ffn_gate_up")


def _ffn_names(kwargs: dict[str, Any]) -> FFNNames | None:
    given = {k[4:]: kwargs.pop(k) for k in _FFN_ARGS if k in kwargs}
    if not given:
        return None
    if "down" not in given:
        raise UserError("ffn_down=... is required when any ffn_* module name is given")
    return FFNNames(**given)


@register_model("sparse_ffn")
class SparseFFNLM(HFLM):
    """HFLM whose FFN activations are masked by a strategy (dense, fat, topk, cett)."""

    def __init__(
        self,
        pretrained: str | None = None,
        thresholds: str | list[float] | None = None,
        strategy: str | None = None,
        prune_arg: float | None = None,
        **kwargs: Any,
    ) -> None:
        install_excepthook()
        names = _ffn_names(kwargs)
        thr = threshold_file.resolve(thresholds) if thresholds is not None else None
        strategy = strategy or ("cett" if thr is not None else "dense")
        if thr is not None and strategy != "cett":
            raise UserError(f"strategy={strategy}: thresholds= only goes with strategy=cett")
        config = SparsityConfig(
            strategy=strategy,
            arg=None if prune_arg is None else float(prune_arg),
            thresholds=tuple(thr.thresholds) if thr is not None else None,
        )
        if pretrained is None:
            pretrained = (thr.model.get("name_or_path") if thr is not None else None)
            if not pretrained:
                raise UserError("pretrained=... is required (the thresholds file does not name its model)")
        super().__init__(pretrained=pretrained, **kwargs)

        fingerprint = model_fingerprint(self.model, find_ffns(self.model, names))
        if thr is not None:
            thr.check_model(fingerprint)  # before any hook: a wrong file names the file, not the model
        self.sparsity = sparsify_(self.model, config, names)
        self._sparse_ffn_info = {
            "version": __version__,
            "strategy": strategy,
            "prune_arg": config.arg,
            "thresholds_source": thr.source if thr is not None else None,
            "thresholds_sha256": sha256_file(thr.source) if thr is not None and thr.source != "<inline>" else None,
            "thresholds_calibration": thr.calibration if thr is not None else None,
            "model_fingerprint": fingerprint,
        }

    # -- counting only real tokens -------------------------------------------------------------
    @contextlib.contextmanager
    def _counting(self, mode: str) -> Iterator[None]:
        stats = self.sparsity.stats
        previous = stats.mode
        stats.flush()
        stats.mode = mode
        try:
            yield
        finally:
            stats.flush()
            stats.mode = previous

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):  # noqa: ANN001
        with self._counting("rows"):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _select_cont_toks(self, logits, contlen=None, inplen=None):  # noqa: ANN001
        # Called once per batch row, in order, right after the forward: `inplen` real tokens.
        if inplen is not None:
            self.sparsity.stats.mark_row(inplen)
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):  # noqa: ANN001
        with self._counting("auto"):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _detect_batch_size(self, requests=None, pos: int = 0):  # noqa: ANN001
        stats = self.sparsity.stats
        stats.flush()
        stats.enabled = False
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            stats.flush()
            stats.enabled = True

    # -- reporting -----------------------------------------------------------------------------
    def sparsity_summary(self) -> dict:
        return {**self._sparse_ffn_info, "sparsity": self.sparsity.stats.summary()}

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "sparse_ffn": self.sparsity_summary()}
