"""The `sparse_ffn` lm-eval model: HFLM with masked FFN activations and measured sparsity.

    lm_eval --model sparse_ffn --model_args thresholds=thr.json --tasks piqa
    lm_eval --model sparse_ffn --model_args pretrained=DIR,strategy=fat,prune_arg=0.01 --tasks piqa
    lm_eval --model sparse_ffn --model_args experts=EXPERTS_DIR --tasks piqa    # Sparse Expansion
    accelerate launch -m lm_eval --model sparse_ffn ...                          # several processes

Like lm-eval's own `hf_steered.SteeredModel`: pop our arguments, let HFLM load the model, then
install the masking hooks on `self.model`. Sparsity is counted over the tokens lm-eval scores: each
distinct model input of a loglikelihood(_rolling) call once (its real prefix, no padding; lm-eval's
Collator already runs an input shared by several requests once), the attention mask during
generation, never the auto-batch-size probes. It lands in the results JSON under `config.sparse_ffn`
(lm-eval merges `get_model_info()` there); with experts=DIR, so does the number of (real) tokens routed
to each expert, counted the same way (`expert_usage`).

With several processes (`accelerate launch`), every request method ends by summing the counts over the
ranks, so rank 0's results JSON reports the whole run, equal to a one-process run: the evaluator's
padding clones (copies of a rank's last request, so ranks run alike) are not run, HFLM's padding
windows of loglikelihood_rolling and inputs that two ranks both score are counted once.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from sparse_ffn.errors import UserError, install_excepthook
from sparse_ffn.core.names import FFN_ARGS
from sparse_ffn.model_adapters.lm_eval_run import log_run_end, name_results_after
from sparse_ffn.model_adapters.lm_eval_streaming import StreamedPass, make_stream, streamed_call
from sparse_ffn.model_adapters.sparsity_setup import resolve_sparsity


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
        experts_streaming: bool | str | None = None,
        experts_max_memory: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        install_excepthook()
        setup = resolve_sparsity(thresholds, strategy, prune_arg, pretrained=pretrained,
                                 ffn_args={k: kwargs.pop(k) for k in FFN_ARGS if k in kwargs}, experts=experts,
                                 experts_streaming=experts_streaming, experts_max_memory=experts_max_memory)
        name_results_after(setup.pretrained if pretrained is None else None)  # lm-eval's output folder
        super().__init__(pretrained=setup.pretrained, **kwargs)
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.num_processes > 1 and self.world_size == 1 and acc.device.type == "cpu":
            # HFLM splits the requests over `accelerate launch` processes only on GPUs; do it on CPU (gloo) too
            self._rank, self._world_size = acc.process_index, acc.num_processes
        self.applied = setup.apply(self.model)
        self.sparsity, self.experts = self.applied.masking, self.applied.experts
        self.stream = None  # layer-streamed evaluation (model_adapters.streaming), with experts_streaming
        if self.applied.streaming:
            self.stream = make_stream(self, setup.experts_max_memory)

    # -- construction from lm_eval's command line ---------------------------------------------------
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> "SparseFFNLM":
        """As HFLM's, except that `device=` in --model_args wins over lm_eval's --device: lm-eval passes
        its --device default (cuda:0) even when it was not given, and HFLM then fails with a TypeError
        ("multiple values for keyword argument 'device'") for `--model_args ...,device=cpu`."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        for key in set(arg_dict) & set(extra):
            extra.pop(key)  # --model_args is the more specific place
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> "SparseFFNLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _all_stats(self) -> list:
        """The counters that follow the real-token protocol: sparsity, and expert usage with experts."""
        return self.applied.counters()

    # -- request methods: no evaluator padding, counts summed over ranks -------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
        return self._request(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
        return self._request(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
        if self.stream is not None:
            raise UserError("generate_until: experts_streaming=True (or experts_max_memory below the experts' size) "
                            "scores loglikelihood requests only; run generation tasks in the in-memory mode "
                            "(experts_streaming=False, no experts_max_memory)")
        return self._request(super().generate_until, requests, disable_tqdm)

    def _request(self, method: Callable, requests: list, disable_tqdm: bool) -> list:
        """Run `method` on `requests` less the evaluator's padding clones (their answers are copies of
        the last real one); then, with several ranks, sum what every rank counted (a collective: lm-eval
        has every rank call every request method, as HFLM's own collectives need)."""
        if self._scope is not None:  # a request method called from another one
            return method(requests, disable_tqdm=disable_tqdm)
        pad = padding_clones(requests) if self.world_size > 1 else 0
        all_stats = self._all_stats()
        since = [s.checkpoint() for s in all_stats]
        with self._request_scope():
            if self.stream is not None:
                res = streamed_call(self, method, requests[:len(requests) - pad], disable_tqdm)
            else:
                res = method(requests[:len(requests) - pad], disable_tqdm=disable_tqdm)
        if self.world_size > 1:
            for s, saved in zip(all_stats, since):
                s.sum_across_ranks(saved, self._sum_over_ranks)
        return list(res) + list(res[-1:]) * pad

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.accelerator.device)
        torch.distributed.all_reduce(t)
        return t.cpu()

    # -- counting only real tokens, each distinct input once -----------------------------------
    _scope: _Scope | None = None

    @contextlib.contextmanager
    def _request_scope(self) -> Iterator[_Scope]:
        if self._scope is not None:
            yield self._scope
            return
        self._scope = _Scope()
        try:
            yield self._scope
        finally:
            self._scope = None

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
        # One call per loglikelihood request, one per batch of windows in loglikelihood_rolling (where
        # HFLM pads every rank to the same number of batches): the same number of calls on every rank.
        with self._request_scope() as scope, self._counting("rows"):
            if self.backend == "causal":  # the model input of each request, as HFLM builds it
                self._claim(scope, [input_key((ctx + cont)[-(self.max_length + 1):][:-1])
                                    for _, ctx, cont in requests])
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _claim(self, scope: _Scope, keys: list[bytes]) -> None:
        """Decide which of this call's inputs this rank counts: those no earlier call and no lower rank
        has (a collective with several ranks)."""
        local = set(keys)
        earlier: set[bytes] = set()
        everyone = local
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, sorted(local))
            earlier = set().union(*map(set, gathered[:torch.distributed.get_rank()]))
            everyone = set().union(*map(set, gathered))
        scope.owned |= local - scope.seen - earlier
        scope.seen |= everyone

    streamed_pass: StreamedPass | None = None  # the pass of a layer-streamed request method call

    def _model_call(self, inps, attn_mask=None, labels=None):  # noqa: ANN001
        self._batch_ids, self._batch_row = inps, 0  # the rows `_select_cont_toks` then names in order
        self._batch_cpu = None  # its CPU copy, made at the first row
        if self.streamed_pass is not None:
            return self.streamed_pass.model_call(inps)
        return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _select_cont_toks(self, logits, contlen=None, inplen=None):  # noqa: ANN001
        # Called once per batch row, in order, right after the forward: `inplen` real tokens.
        if inplen is not None:
            counted = True
            scope = self._scope
            if scope is not None and self.backend == "causal":
                if self._batch_cpu is None:
                    self._batch_cpu = self._batch_ids.cpu()  # one copy per batch
                key = input_key(self._batch_cpu[self._batch_row, :inplen].numpy())
                counted = key in scope.owned or key not in scope.seen
                scope.owned.discard(key)
                scope.seen.add(key)
            self._batch_row += 1
            if self.streamed_pass is not None and self.streamed_pass.recording:
                self.streamed_pass.mark_row(inplen, counted)
            else:
                for s in self._all_stats():
                    s.mark_row(inplen, counted)
        if self.streamed_pass is not None and self.streamed_pass.recording:
            return self.streamed_pass.placeholder(contlen)
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):  # noqa: ANN001
        with self._counting("auto"):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _detect_batch_size(self, requests=None, pos: int = 0):  # noqa: ANN001
        if self.stream is not None:
            raise UserError("batch_size=auto: not with experts_streaming (the streamed layers run every input "
                            "anyway); give a number, e.g. batch_size=8")
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
        out = {**self.applied.info, "sparsity": self.sparsity.stats.summary()}
        if self.experts is not None:
            out["expert_usage"] = self.experts.usage()
        return out

    def get_model_info(self) -> dict:
        """HFLM's model info plus `sparse_ffn`; lm-eval calls it once per run, on rank 0, when it
        assembles the results: the end of the run, so the one-line summary is logged here."""
        summary = self.sparsity_summary()
        log_run_end(summary, getattr(self.model, "name_or_path", None))
        return {**super().get_model_info(), "sparse_ffn": summary}


@dataclass
class _Scope:
    """Inputs of one request method call (16-byte digests of their token ids): `seen` by any rank so
    far, `owned` = claimed by this rank and not yet counted."""

    seen: set[bytes] = field(default_factory=set)
    owned: set[bytes] = field(default_factory=set)


def input_key(tokens: list[int] | np.ndarray) -> bytes:
    """A 16-byte digest of a token sequence (the identity of a model input)."""
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def padding_clones(requests: list) -> int:
    """How many trailing entries of `requests` are lm-eval's padding: the evaluator makes ranks run as
    many requests by appending copies of the last request object; each request appears `repeats`
    times otherwise."""
    if not requests:
        return 0
    last, n = requests[-1], 0
    for r in reversed(requests):
        if r is not last:
            break
        n += 1
    return max(0, n - max(1, int(getattr(last, "repeats", 1) or 1)))
