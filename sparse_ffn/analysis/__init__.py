"""Analyses of sparse FFNs (Neuronal Disentanglement: per-neuron output distributions, dense vs sparse)."""
