#!/usr/bin/env python
"""The Sparsing Law finding in miniature: ReLU's activation ratio falls with training, SiLU's does not.

Trains two tiny Llama-style models on Tiny Shakespeare (the first 90%) from the same seed and data order,
identical but for the FFN activation (relu vs silu), saving checkpoints; then runs the checkpoint sweep of
`sparse-ffn sweep` on each (PPL-1%: one CETT c per run, the largest whose mean PPL ratio over the last 5
checkpoints stays <= 1.01 on held-out text, the last 10%) and plots both activation-ratio curves in one PNG.

    python examples/sparsing_law_mini.py --out-dir runs/sparsing_law          # ~5 min on one CPU thread
    sparse-ffn sweep --checkpoints runs/sparsing_law/relu --target-ppl-ratio 1.01 \\
        --data runs/sparsing_law/heldout.txt --seq-len 128 --out-dir runs/relu_sweep   # the same, by hand

Writes into --out-dir: relu/ and silu/ (checkpoint-<step>/ model + tokenizer directories), heldout.txt,
<act>_sweep/ (sweep.csv, sweep.json, sweep.png), sparsing_law_mini.png (both curves) and
sparsing_law_mini.json; prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def log(msg: str) -> None:
    print(f"sparsing_law_mini: {msg}", file=sys.stderr, flush=True)


def build_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer (`vocab_size` tokens, <unk>/<s>/</s> = 0/1/2, no BOS added on encode)
    trained on `text`, as a PreTrainedTokenizerFast that save_pretrained/from_pretrained round-trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)


def train(act: str, ids: torch.Tensor, tokenizer, out_dir: Path, *, steps: int = 1000, save_every: int = 50,
          seed: int = 0, hidden: int = 64, layers: int = 2, d_ff: int = 256, heads: int = 4, seq_len: int = 128,
          batch: int = 16, lr: float = 3e-3, warmup: int = 20) -> list[Path]:
    """Train a Llama-style causal LM with FFN activation `act` on random windows of `ids` (LongTensor (n,))
    with AdamW (constant lr after a linear warm-up); save model + tokenizer to out_dir/checkpoint-<step>
    every `save_every` steps. The data order and the initialisation depend only on `seed`, so two runs
    differ only in `act`. Returns the checkpoint directories in order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=d_ff,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=seq_len, hidden_act=act, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    saved: list[Path] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=gen)
        x = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % save_every == 0 or step == steps:
            path = out_dir / f"checkpoint-{step}"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            saved.append(path)
            log(f"{act} step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return saved


def run(data: Path, out_dir: Path, *, steps: int = 1000, save_every: int = 50, seed: int = 0,
        target_ppl_ratio: float = 1.01, tokens: int = 8192, seq_len: int = 128, progress: bool = False,
        acts: tuple[str, ...] = ("relu", "silu"), **train_kwargs) -> dict:
    """Train one model per activation in `acts`, sweep each, write the per-run sweep outputs and the
    combined PNG/JSON; returns the summary (also written to sparsing_law_mini.json)."""
    from transformers import AutoModelForCausalLM

    from sparse_ffn.artifacts.atomic import atomic_write_bytes, atomic_write_json
    from sparse_ffn.calibrate.sweep import render_curves, resolve_checkpoints, sweep_checkpoints, write_outputs
    from sparse_ffn.artifacts.data import load_text, token_windows

    text, sha = load_text(str(data))
    cut = int(len(text) * 0.9)
    train_text, heldout = text[:cut], text[cut:]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "heldout.txt").write_text(heldout, encoding="utf-8")
    tokenizer = build_tokenizer(train_text)
    ids = torch.tensor(tokenizer(train_text, verbose=False)["input_ids"], dtype=torch.long)
    windows = token_windows(tokenizer, heldout, seq_len, tokens, where="held-out text")
    log(f"{ids.numel()} training tokens, {windows.shape[0]} x {seq_len} held-out tokens for the sweep")

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    results, timing = {}, {}
    for act in acts:
        start = time.perf_counter()
        train(act, ids, tokenizer, out_dir / act, steps=steps, save_every=save_every, seed=seed,
              seq_len=seq_len, **train_kwargs)
        timing[f"{act}_train_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        result = sweep_checkpoints(resolve_checkpoints([out_dir / act]), load, windows,
                                   target_ppl_ratio=target_ppl_ratio, progress=progress, log=log)
        timing[f"{act}_sweep_s"] = round(time.perf_counter() - start, 1)
        write_outputs(result, out_dir / f"{act}_sweep", {"data": {"path": str(out_dir / "heldout.txt"),
                                                                  "source_sha256": sha, "tokens": windows.numel(),
                                                                  "seq_len": seq_len}}, label=act)
        results[act] = result
    png = render_curves({act: r.rows for act, r in results.items()},
                        f"Tiny Shakespeare, PPL-{(target_ppl_ratio - 1) * 100:g}%: activation ratio vs training")
    summary = {
        "settings": {"steps": steps, "save_every": save_every, "seed": seed, "target_ppl_ratio": target_ppl_ratio,
                     "tokens": int(windows.numel()), "seq_len": seq_len, **train_kwargs},
        "data": {"path": str(data), "sha256": sha},
        "runs": {act: {"cett": r.c, "mean_ppl_ratio": r.mean_ppl_ratio,
                       "steps": [row.step for row in r.rows],
                       "activation_ratio": [row.activation_ratio for row in r.rows]} for act, r in results.items()},
        "timing": timing,
        "png": str((out_dir / "sparsing_law_mini.png").resolve()),
    }
    atomic_write_bytes(out_dir / "sparsing_law_mini.png", png)
    atomic_write_json(out_dir / "sparsing_law_mini.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Tiny Shakespeare input.txt (default: ../shared/data)")
    p.add_argument("--out-dir", default="runs/sparsing_law_mini")
    p.add_argument("--steps", type=int, default=1000, help="training steps per model (default 1000, ~90 s each)")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-ppl-ratio", type=float, default=1.01)
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens for the sweep")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"sparsing_law_mini: error: --data {args.data}: not found", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    summary = run(Path(args.data), Path(args.out_dir), steps=args.steps, save_every=args.save_every,
                  seed=args.seed, target_ppl_ratio=args.target_ppl_ratio, tokens=args.tokens)
    for act, r in summary["runs"].items():
        curve = ", ".join(f"{s}:{a:.3f}" for s, a in zip(r["steps"], r["activation_ratio"]))
        log(f"{act}: c={r['cett']:.4f}, activation ratio by step {curve}")
    print(json.dumps({act: {"cett": r["cett"], "first": r["activation_ratio"][0], "last": r["activation_ratio"][-1]}
                      for act, r in summary["runs"].items()} | {"png": summary["png"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
