"""Generation for the UltraEval server with vLLM's SamplingParams semantics (`GenerationParams`).

- greedy (temperature 0) or sampling (temperature, top_p, top_k, min_p, seed); `best_of` candidates per
  prompt, answered the best `n` by cumulative log-probability of the sampled tokens under the
  processed distribution (vLLM's `cumulative_logprob`; sorted even when best_of == n, as vLLM does);
- beam search (`use_beam_search`, width `best_of`, `length_penalty`, `early_stopping` True / False /
  "never": Hugging Face's beam search, whose scoring vLLM's follows), the best `n` beams;
- `presence_penalty` / `frequency_penalty` over the generated tokens (vLLM: logits -= frequency *
  count + presence * (count > 0)), after `repetition_penalty` (prompt and output tokens) and before
  temperature, as vLLM orders them;
- stops: EOS (unless `ignore_eos`), `stop_token_ids` (always), `stop` strings (cut before them unless
  `include_stop_str_in_output`), none of them before `min_tokens` new tokens.

Prompts run left-padded in batches of `max_batch`. The answer per prompt is a string (n == 1) or a list
of n strings (n > 1; vLLM's `outputs`, best first). Imports torch and transformers: the server
imports this module only when it generates.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, \
    StoppingCriteriaList

from sparse_ffn.model_adapters.ultraeval_protocol import GenerationParams, chunks


def generate(server: Any, ids: list[list[int]], p: GenerationParams) -> list[str | list[str]]:
    """Continuations of the token lists `ids`. `server` gives model, pad_id, eos_ids, context_length,
    max_batch, device, decode(tokens, skip) and decode_new(prompt, new, skip)."""
    eos = tuple(dict.fromkeys((() if p.ignore_eos else server.eos_ids) + p.stop_token_ids))
    outputs: list[Any] = [""] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    with torch.inference_mode():
        for batch in chunks(order, server.max_batch):
            width = max(len(ids[i]) for i in batch)
            room = server.context_length - width
            max_new = room if p.max_tokens is None else min(p.max_tokens, room)
            if max_new <= 0:
                for i in batch:
                    outputs[i] = "" if p.n == 1 else [""] * p.n
                continue
            tokens = torch.full((len(batch), width), server.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding
                tokens[row, width - len(ids[i]):] = torch.tensor(ids[i], dtype=torch.long)
                mask[row, width - len(ids[i]):] = 1
            if p.seed is not None:
                torch.manual_seed(p.seed)
            texts = _generate_batch(server, [ids[i] for i in batch], tokens, mask, p, eos, max_new)
            for i, answers in zip(batch, texts):
                outputs[i] = answers[0] if p.n == 1 else answers
    return outputs


def _generate_batch(server: Any, prompts: list[list[int]], tokens: Any, mask: Any, p: GenerationParams,
                    eos: tuple[int, ...], max_new: int) -> list[list[str]]:
    """The best `p.n` answers of each row of one left-padded batch."""
    width, k = tokens.shape[1], p.candidates
    sampling: dict[str, Any] = {"do_sample": False}
    if not p.greedy and not p.use_beam_search:
        sampling = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p,
                        top_k=p.top_k if p.top_k > 0 else 0, min_p=p.min_p if p.min_p > 0 else None)
    beams = dict(num_beams=k, length_penalty=p.length_penalty, early_stopping=p.early_stopping) \
        if p.use_beam_search else dict(num_beams=1)
    ranked = k > 1 and not p.use_beam_search  # best_of sampling: rank by cumulative log-probability
    config = GenerationConfig(
        max_new_tokens=max_new, min_new_tokens=min(p.min_tokens, max_new) if eos else 0,
        num_return_sequences=k if not p.use_beam_search else p.n, **sampling, **beams,
        repetition_penalty=p.repetition_penalty, pad_token_id=server.pad_id,
        eos_token_id=list(eos) if eos else None, bos_token_id=server.model.generation_config.bos_token_id,
        output_scores=ranked, return_dict_in_generate=True)
    processors = LogitsProcessorList([OutputPenalties(width, p.presence_penalty, p.frequency_penalty)]
                                     if p.presence_penalty or p.frequency_penalty else [])
    criteria = StoppingCriteriaList([StopStrings(server, width, p)] if p.stop and not p.use_beam_search else [])
    out = server.model.generate(input_ids=tokens.to(server.device), attention_mask=mask.to(server.device),
                                generation_config=config, logits_processor=processors,
                                stopping_criteria=criteria)
    sequences = out.sequences
    per_prompt = sequences.shape[0] // len(prompts)
    new_rows = [_until_eos(row, eos) for row in sequences[:, width:].tolist()]
    if ranked:
        scores = server.model.compute_transition_scores(sequences, out.scores, normalize_logits=True)
        cumulative = [float(scores[r, :len(new_rows[r])].float().sum()) for r in range(len(new_rows))]
    answers = []
    for b, prompt in enumerate(prompts):
        rows = list(range(b * per_prompt, (b + 1) * per_prompt))
        if ranked:
            rows = sorted(rows, key=lambda r: cumulative[r], reverse=True)  # stable: ties keep their order
        answers.append([_finish(server, prompt, new_rows[r], p) for r in rows[:p.n]])
    return answers


def _until_eos(new: list[int], eos: tuple[int, ...]) -> list[int]:
    for j, tok in enumerate(new):
        if tok in eos:
            return new[:j]
    return new


def _finish(server: Any, prompt: list[int], new: list[int], p: GenerationParams) -> str:
    """The text of `new`, cut at the first stop string found after the first `min_tokens` tokens."""
    text = server.decode_new(prompt, new, p.skip_special_tokens)
    if not p.stop:
        return text
    start = len(server.decode_new(prompt, new[:p.min_tokens], p.skip_special_tokens)) if p.min_tokens else 0
    cuts = [(text.find(s, start), s) for s in p.stop if text.find(s, start) >= 0]
    if not cuts:
        return text
    at, stop = min(cuts)
    return text[:at + len(stop)] if p.include_stop_str_in_output else text[:at]


class OutputPenalties(LogitsProcessor):
    """vLLM's presence and frequency penalties over the tokens generated so far (after `width`)."""

    def __init__(self, width: int, presence: float, frequency: float) -> None:
        self.width, self.presence, self.frequency = width, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[:, self.width:]
        if new.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class StopStrings(StoppingCriteria):
    """A row is done once its new text holds a stop string (decoding only the recent tail), never before
    `min_tokens` new tokens."""

    def __init__(self, server: Any, width: int, p: GenerationParams) -> None:
        self.server, self.width, self.p = server, width, p
        self.tail = 4 * max(len(s) for s in p.stop) + 8

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.width:].tolist():
            if len(row) < max(self.p.min_tokens, 1):
                done.append(False)
                continue
            text = self.server.decode(row[-self.tail:], self.p.skip_special_tokens)
            done.append(any(s in text for s in self.p.stop))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
