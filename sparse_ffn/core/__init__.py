"""The torch-only core: FFN discovery (`ffn`), real-token counting (`counting`), activation masking with
its strategy registry (`masking`), routed experts (`router`, `experts`) and perplexity (`perplexity`).
No harness, no CLI."""
