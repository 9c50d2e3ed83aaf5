"""N:M keep mask of a score matrix in one pass: the scores are read once, the mask written once.

Ranks as sdsengine.masks.nm_mask does, bit for bit: each group's n highest scores are kept, ties to the lower
index (a stable descending sort), NaN above everything, -0.0 equal to 0.0. Scores are compared as sort keys
(_select.sort_key): int32 from fp16/bf16/fp32 (widened to fp32 exactly), int64 from fp64. The tile is the fused
Wanda N:M kernel's (group_tile), the score read as it is.
"""
import torch
import triton
import triton.language as tl

from ._select import columns_of_4, group_tile, join_of_4, keep_of_4, nm_keep, sort_key
from .wanda import NM_WARPS, nm_grid, nm_tile


@triton.jit
def _nm_mask_kernel(S, MASK, rows, cols, N: tl.constexpr, M: tl.constexpr, PACK: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    offs, col, inside = group_tile(rows, cols, M, PACK, BLOCK_R, BLOCK_G)
    score = tl.reshape(tl.load(S + offs, mask=inside, other=0.0), (offs.shape[0], PACK, M))
    if M == 4:  # compared as fp32 (fp64 as it is): widened exactly, and the interpreter compares bf16 as bits
        wide = score if score.dtype == tl.float64 else score.to(tl.float32)
        keep = join_of_4(*keep_of_4(*columns_of_4(wide), N))
    else:
        keep = nm_keep(sort_key(score), tl.arange(0, M)[None, None, :], 2, N, M)
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
