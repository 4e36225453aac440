"""Analyses of sparse models and their runs: `inspect` (per-layer sparsity of one strategy), `neurons`
(Neuronal Disentanglement of one FFN linear) and the CI gate (`gate`, over `lm_eval_results`, with the
paired statistics of `paired` and the reports of `gate_report`)."""
