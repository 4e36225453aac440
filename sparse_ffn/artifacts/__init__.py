"""Every file format and its provenance: atomic writes (`atomic`), data loading with hashes (`data`),
the threshold file (`thresholds`), the experts artifact (`expert_files`, `experts`), and `provenance`
(created_by, fingerprint and header checks, peak memory)."""
