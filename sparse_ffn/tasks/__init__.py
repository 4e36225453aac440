"""Tasks to evaluate on.

- `local`: lm-eval configs that run stock tasks (piqa, arc_easy, wikitext, lambada_openai, hellaswag,
  winogrande, boolq, copa, social_iqa) on local data files (`sparse-ffn tasks write`); `wikitext_local`
  gives lm-eval's word/byte perplexity.
- `paper_ppl`: paper-parity perplexity (non-overlapping windows, token-level NLL), the number the
  Sparse Expansion / SparseGPT papers report; `sparse-ffn ppl` on the command line.
"""
