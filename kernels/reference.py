"""Plain-PyTorch twins of every Triton kernel in sdsengine.kernels.

These are the definitions the kernels are tested against, and the path the engine takes on CPU.
Masks follow sdsengine.masks: True = keep, ties broken by lower index first.
"""
import torch

from sdsengine.masks import nm_mask_torch, prune_lowest_mask


def wanda_prune(weight, act_norm, sparsity=0.5, nm=None):
    """Wanda (Sun et al. 2023): score S_ij = |W_ij| * ||X_j||_2, compared per output row
    (unstructured) or per group of M inputs (N:M). Returns (pruned weight, keep mask)."""
    scores = weight.abs().float() * act_norm.float().reshape(1, -1)
    mask = nm_mask_torch(scores, *nm) if nm else prune_lowest_mask(scores, sparsity, dim=-1)
    # where, not weight * mask: pruned entries are +0.0 even for -x, inf and NaN weights, as Wanda's W[~M] = 0
    return torch.where(mask, weight, torch.zeros_like(weight)), mask


def sparsegpt_block(w_block, hinv_block, sparsity=0.5, nm=None):
    """One SparseGPT block (Frantar & Alistarh 2023), fp32.

    w_block: (rows, B) weights of the block, already updated by earlier blocks.
    hinv_block: (B, B) block of the upper Cholesky factor of H^-1.
    Selects the mask (per block for unstructured, per group of M for N:M) by w^2 / [H^-1]_jj^2, then
    quantizes column by column, spreading each column's error over the later columns of the block.
    Returns (pruned block Q, scaled errors E for the trailing update W[:, end:] -= E @ Hinv[blk, end:],
    per-row loss).
    """
    w = w_block.clone().float()
    rows, width = w.shape
    q = torch.zeros_like(w)
    err = torch.zeros_like(w)
    losses = torch.zeros(rows, device=w.device)
    diag = torch.diagonal(hinv_block)
    keep = None if nm else prune_lowest_mask(w ** 2 / diag.reshape(1, -1) ** 2, sparsity, dim=None)
    for i in range(width):
        if nm and i % nm[1] == 0:
            group = slice(i, i + nm[1])
            keep_group = nm_mask_torch(w[:, group] ** 2 / diag[group].reshape(1, -1) ** 2, *nm)
            keep = keep_group if i == 0 else torch.cat([keep, keep_group], dim=1)
        col = w[:, i]
        q[:, i] = col * keep[:, i]
        e = (col - q[:, i]) / hinv_block[i, i]
        losses += (col - q[:, i]) ** 2 / hinv_block[i, i] ** 2 / 2
        w[:, i:] -= e.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
        err[:, i] = e
    return q, err, losses


def compress_24(weight, scores=None):
    """Select 2 of every 4 along the input dim (by |weight| or `scores`) and compress.

    Layout (shared with csrc/): values (rows, K/2) in weight's dtype, the kept pair of each group in
    increasing column order; meta int32 (rows, K/32): group g of a 32-column chunk occupies bits
    [4*(g%8), 4*(g%8)+4) as i0 | i1 << 2 with i0 < i1. -0.0 is written as 0. Needs K % 32 == 0.
    """
    rows, cols = weight.shape
    if cols % 32:
        raise ValueError(f"2:4 compression needs in_features divisible by 32, got {cols}")
    keep = nm_mask_torch((weight.abs() if scores is None else scores).float(), 2, 4).reshape(rows, cols // 4, 4)
    idx = torch.arange(4, device=weight.device).expand_as(keep)
    kept_idx = torch.sort(torch.where(keep, idx, 4), dim=-1).values[..., :2]  # ascending column order
    groups = weight.reshape(rows, cols // 4, 4)
    values = torch.gather(groups, -1, kept_idx) + 0  # + 0 turns -0.0 into 0
    nibbles = (kept_idx[..., 0] | (kept_idx[..., 1] << 2)).to(torch.int64).reshape(rows, cols // 32, 8)
    shifts = torch.arange(0, 32, 4, device=weight.device, dtype=torch.int64)
    meta = (nibbles << shifts).sum(-1)
    meta = torch.where(meta >= 2 ** 31, meta - 2 ** 32, meta).to(torch.int32)
    return values.reshape(rows, cols // 2), meta


def meta_nibbles(meta):
    """(rows, K/4) int64: each group's 4-bit entry of the int32 meta, i0 | i1 << 2 for kept columns i0 < i1."""
    shifts = torch.arange(0, 32, 4, device=meta.device, dtype=torch.int64)
    return ((meta.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).reshape(meta.shape[0], meta.shape[1] * 8)


def decompress_24(values, meta):
    """Inverse of compress_24: the dense (rows, K) weight with exact zeros."""
    rows, half = values.shape
    cols = half * 2
    nibbles = meta_nibbles(meta)
    kept_idx = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
    dense = torch.zeros(rows, cols // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, kept_idx, values.reshape(rows, cols // 4, 2))
    return dense.reshape(rows, cols)


def nm_mask(scores, n, m):
    """Keep mask of the n highest scores in every group of m along the last dim (sdsengine.masks.nm_mask)."""
    return nm_mask_torch(scores, n, m)
