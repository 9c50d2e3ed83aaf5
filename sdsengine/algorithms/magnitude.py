"""Magnitude pruning: drop the smallest |W|, per layer for a fraction, per group of M for N:M.

No calibration statistics are needed.
"""
from sdsengine.masks import nm_mask, prune_lowest_mask

STATS = None


def prune(weight, stats, config):
    pattern = config.sparsity
    scores = weight.abs().float()
    mask = nm_mask(scores, *pattern.nm) if pattern.nm else prune_lowest_mask(scores, pattern.sparsity, dim=None)
    return weight * mask
