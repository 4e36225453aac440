"""The `sparse_ffn` lm-eval model: HFLM with masked FFN activations and measured sparsity.

    lm_eval --model sparse_ffn --model_args thresholds=thr.json --tasks piqa
    lm_eval --model sparse_ffn --model_args pretrained=DIR,strategy=fat,prune_arg=0.01 --tasks piqa
    lm_eval --model sparse_ffn --model_args experts=EXPERTS_DIR --tasks piqa    # Sparse Expansion

Like lm-eval's own `hf_steered.SteeredModel`: pop our arguments, let HFLM load the model, then
install the masking hooks on `self.model`. Sparsity is counted over the tokens lm-eval scores:
each batch row's real prefix for loglikelihood requests (no padding), the attention mask during
generation, never the auto-batch-size probes. It lands in the results JSON under
`config.sparse_ffn` (lm-eval merges `get_model_info()` there); with experts=DIR, so does the number
of (real) tokens routed to each expert, counted the same way (`expert_usage`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import install_excepthook
from .sparsity_setup import FFN_ARGS, experts_of, resolve_sparsity


@register_model("sparse_ffn")
class SparseFFNLM(HFLM):
    """HFLM whose FFN activations are masked by a strategy (dense, fat, topk, cett)."""

    def __init__(
        self,
        pretrained: str | None = None,
        thresholds: str | list[float] | None = None,
        strategy: str | None = None,
        prune_arg: float | None = None,
        experts: str | None = None,
        **kwargs: Any,
    ) -> None:
        install_excepthook()
        setup = resolve_sparsity(thresholds, strategy, prune_arg, pretrained=pretrained,
                                 ffn_args={k: kwargs.pop(k) for k in FFN_ARGS if k in kwargs}, experts=experts)
        super().__init__(pretrained=setup.pretrained, **kwargs)
        self.sparsity, self._sparse_ffn_info = setup.apply(self.model)
        self.experts = experts_of(self.model)

    def _all_stats(self) -> list:
        """The counters that follow the real-token protocol: sparsity, and expert usage with experts."""
        return [self.sparsity.stats] + ([self.experts.stats] if self.experts is not None else [])

    # -- counting only real tokens -------------------------------------------------------------
    @contextlib.contextmanager
    def _counting(self, mode: str) -> Iterator[None]:
        all_stats = self._all_stats()
        previous = [s.mode for s in all_stats]
        for s in all_stats:
            s.flush()
            s.mode = mode
        try:
            yield
        finally:
            for s, p in zip(all_stats, previous):
                s.flush()
                s.mode = p

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):  # noqa: ANN001
        with self._counting("rows"):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _select_cont_toks(self, logits, contlen=None, inplen=None):  # noqa: ANN001
        # Called once per batch row, in order, right after the forward: `inplen` real tokens.
        if inplen is not None:
            for s in self._all_stats():
                s.mark_row(inplen)
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):  # noqa: ANN001
        with self._counting("auto"):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _detect_batch_size(self, requests=None, pos: int = 0):  # noqa: ANN001
        all_stats = self._all_stats()
        for s in all_stats:
            s.flush()
            s.enabled = False
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            for s in all_stats:
                s.flush()
                s.enabled = True

    # -- reporting -----------------------------------------------------------------------------
    def sparsity_summary(self) -> dict:
        out = {**self._sparse_ffn_info, "sparsity": self.sparsity.stats.summary()}
        if self.experts is not None:
            out["expert_usage"] = self.experts.usage()
        return out

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "sparse_ffn": self.sparsity_summary()}
