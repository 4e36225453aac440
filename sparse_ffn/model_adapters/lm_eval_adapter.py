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

from ..errors import install_excepthook
from .sparsity_setup import FFN_ARGS, resolve_sparsity


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
        setup = resolve_sparsity(thresholds, strategy, prune_arg, pretrained=pretrained,
                                 ffn_args={k: kwargs.pop(k) for k in FFN_ARGS if k in kwargs})
        super().__init__(pretrained=setup.pretrained, **kwargs)
        self.sparsity, self._sparse_ffn_info = setup.apply(self.model)

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
