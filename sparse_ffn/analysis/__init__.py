"""Analyses of sparse models and their runs: `inspect` (per-layer sparsity of one strategy) and `gate`
(the CI quality gate over lm-eval results)."""
