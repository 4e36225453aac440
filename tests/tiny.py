"""Tiny random Hugging Face causal LMs and a tiny local tokenizer for unit tests (fully offline).

`make_tiny_model(arch, out_dir)` writes a float32 safetensors model with a byte-level BPE tokenizer
trained here on a built-in English text, loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)``
and by lm-eval's ``hf`` model. Everything is deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHS: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "opt", "gpt2", "phi",
)

VOCAB_SIZE = 384
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn a little about the world.
The sun rises in the east and sets in the west. Water boils at one hundred degrees at sea level.
Paris is the capital of France, Berlin is the capital of Germany, and Rome is the capital of Italy.
She put the cup on the table, poured some tea, and read the morning paper by the window.
To open a jar that is stuck, run the lid under hot water for a minute and then twist it again.
If you want to keep bread fresh, store it in a cool, dry place and wrap it in a clean cloth.
The children walked to school along the river, counting the boats and the birds on the water.
Question: Which of these is a source of light? Answer: The sun gives off its own light.
Question: What do plants need to grow? Answer: Plants need water, air, light and soil.
In 1874 a ship was built in England; it sailed to Australia more than twenty times.
Numbers such as 1, 2, 3, 10, 42 and 2024 appear in text, as do words like "yes", "no" and "maybe".
Good morning! How are you today? I am fine, thank you. Let us meet at noon near the old bridge.
"""

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=512)
_GQA = dict(_COMMON, num_key_value_heads=2)
_GEMMA = dict(_GQA, head_dim=16)

# arch -> config kwargs (names as each config class spells them)
_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _GQA,
    "mistral": dict(_GQA, sliding_window=256),
    "qwen2": _GQA,
    "qwen3": dict(_GQA, head_dim=16),
    "gemma": _GEMMA,
    "gemma2": dict(_GEMMA, query_pre_attn_scalar=16, sliding_window=256),
    "gemma3_text": dict(_GEMMA, query_pre_attn_scalar=16, sliding_window=256),
    "phi3": _GQA,
    "gpt_neox": dict(_COMMON, rotary_pct=0.25),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=512),
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=3, n_head=4, n_positions=512),
    "phi": dict(_COMMON, partial_rotary_factor=0.5),
}


def make_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (~384 tokens) on `CORPUS`, save it into `out_dir` and return it.

    Special tokens: ``<unk>``=0, ``<s>``=1 (bos), ``</s>``=2 (eos), ``<pad>``=3. No BOS is added on encode,
    and decoding gives back the exact input text.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512, clean_up_tokenization_spaces=False)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random float32 `arch` causal LM (3 layers, hidden 64, FFN 128) plus tokenizer to `out_dir`.

    `overrides` go to the config on top of the defaults (e.g. ``hidden_act="relu"``, ``num_hidden_layers=2``).
    """
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    out_dir = Path(out_dir)
    tok = make_tokenizer(out_dir)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(arch, **{**ids, **_CONFIGS[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


def make_tiny_experts(model_dir: Path, out: Path, num_clusters: int = 2) -> Path:
    """Calibrate a Sparse Expansion experts directory (50% sparse, `num_clusters` experts per linear) for a
    tiny model on 6 windows of 32 tokens of `CORPUS` (about a second); returns its path."""
    from transformers import AutoTokenizer

    from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts
    from sparse_ffn.artifacts.data import token_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    windows = token_windows(tok, CORPUS * 8, 32, 6 * 32)
    settings = ExpertsSettings(num_clusters=num_clusters, sparsity=0.5, kmeans_restarts=2)
    return calibrate_experts(model, windows, settings, out, batch_size=4, progress=False,
                             model_info={"name_or_path": str(model_dir)}).path
