"""Compatibility path: `sparse_ffn.masking.sparsify_` is `sparse_ffn.core.masking.sparsify_`."""

from sparse_ffn.core.masking import STRATEGIES, SparsityConfig, SparsityHandle, SparsityStats, sparsify_

__all__ = ["STRATEGIES", "SparsityConfig", "SparsityHandle", "SparsityStats", "sparsify_"]
