"""Statistics and reports over finished evaluation runs (no model code)."""
