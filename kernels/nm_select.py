"""N:M keep mask of a score matrix in one pass: the scores are read once, the mask written once.

Ranks as sdsengine.masks.nm_mask does, bit for bit: each group's n highest scores are kept, ties to the lower
index (a stable descending sort), NaN above everything, -0.0 equal to 0.0 (_select.group_keep: groups of 4 by
float compares, others by sort keys; fp16/bf16 widened to fp32 exactly, fp64 as it is). The tile is the fused
Wanda N:M kernel's (group_tile), the score read as it is.
"""
import torch
import triton
import triton.language as tl

from ._select import group_keep, group_tile
from .wanda import NM_WARPS, nm_grid, nm_tile


@triton.jit
def _nm_mask_kernel(S, MASK, rows, cols, N: tl.constexpr, M: tl.constexpr, PACK: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    offs, col, inside = group_tile(rows, cols, M, PACK, BLOCK_R, BLOCK_G)
    score = tl.reshape(tl.load(S + offs, mask=inside, other=0.0), (offs.shape[0], PACK, M))
    # compared as fp32 (fp64 as it is): widened exactly, and the interpreter of Triton 3.9 compares bf16 as bits
    keep = group_keep(score if score.dtype == tl.float64 else score.to(tl.float32), N, M)
    tl.store(MASK + offs, tl.reshape(keep, offs.shape).to(tl.int8), mask=inside)


def nm_mask(scores, n, m):
    """The bool keep mask, scores' shape; inputs validated by sdsengine.kernels.nm_mask."""
    cols = scores.shape[-1]
    flat = scores.contiguous().reshape(-1, cols)
    mask = torch.empty(flat.shape, dtype=torch.int8, device=scores.device)
    if flat.numel():
        tile = nm_tile(m, scores.element_size())
        _nm_mask_kernel[nm_grid(flat.shape[0], cols, tile, m)](flat, mask, flat.shape[0], cols, N=n, M=m, **tile,
                                                               num_warps=NM_WARPS)
    return mask.view(torch.bool).reshape(scores.shape)
