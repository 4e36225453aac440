"""sparse-ffn: evaluate LLMs whose feed-forward blocks are made sparse."""

__version__ = "0.1.0"
