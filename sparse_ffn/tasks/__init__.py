"""Tasks to evaluate on.

- `local`: lm-eval configs that run stock tasks (piqa, arc_easy, wikitext, lambada_openai, hellaswag,
  winogrande, boolq, copa, social_iqa) on local data files (`sparse-ffn tasks write`); `wikitext_local`
  gives lm-eval's word/byte perplexity.
- `sparsing_law`: the Sparsing Law paper's zero-shot suite as lm-eval groups with unweighted mean `acc`
  (`configs/` over the stock tasks; `_local` groups written by `tasks write`).
- `paper_ppl`: paper-parity perplexity (non-overlapping windows, token-level NLL), the number the
  Sparse Expansion / SparseGPT papers report; `sparse-ffn ppl` on the command line.
"""
