"""Calibration: the artifacts the adapters read (CETT threshold files, Sparse Expansion experts).

- thresholds: `cett_kernels` (CETT definitions), `layer_search` (per-layer threshold search),
  `activations` (dense activations by hooks), `calibrator` (one model's calibration state),
  `ppl_search` (the PPL-k% search on c), `thresholds` (the orchestration), `reference` (the reference
  procedure: an oracle for tests and benchmarks), `sweep` (checkpoint sweeps);
- experts: `router_fit` (PCA, k-means), `sparsegpt`, `layer_runner` (decoder layers one at a time),
  `experts` (Sparse Expansion calibration).
"""
