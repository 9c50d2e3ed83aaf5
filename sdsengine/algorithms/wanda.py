"""Wanda (Sun, Liu, Bair, Kolter 2023, arXiv 2306.11695): prune by S_ij = |W_ij| * ||X_j||_2,
compared within each output row (unstructured) or within each group of M inputs (N:M)."""
from sdsengine import kernels

from .stats import InputNorms

STATS = InputNorms


def prune(weight, stats, config):
    pattern = config.sparsity
    pruned, _ = kernels.wanda_prune(weight, stats.norms(), pattern.sparsity, pattern.nm)
    return pruned
