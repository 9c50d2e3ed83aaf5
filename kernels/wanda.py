"""Fused Wanda (Sun et al. 2023): score S = |W| * ||X_j||_2 and select in one pass.

W and the norms are read once; the pruned weight and the keep mask are written once; scores live only in
registers, as int32 sort keys (kernels/_select.py), so masks equal reference.wanda_prune bit for bit.
"""
import torch
import triton
import triton.language as tl

from ._select import PAD_KEY, lowest_k, nm_keep, sort_key

NM_TILE_ROWS = 16
NM_TILE_COLS = 256  # per program: 16 x 256 elements, 16 per thread at 8 warps
NM_WARPS = 8
ROW_ELEMS_PER_WARP = 512  # unstructured: one program per row, warps = row length / this, 4 to 16


@triton.jit
def _scores(w, norm):
    return sort_key(tl.abs(w.to(tl.float32)) * norm.to(tl.float32))  # same fp32 product as the reference


@triton.jit
def _wanda_nm_kernel(W, NORM, OUT, MASK, rows, cols, N: tl.constexpr, M: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    # The tile is (BLOCK_R * BLOCK_G groups, M): one group per tile row, so a thread holds whole groups and
    # the rank's masked sums stay in its registers. The 3-D (rows, groups, M) tile this replaced spread a
    # group over lanes: the sums took warp shuffles and the loads a trip through shared memory.
    i = tl.arange(0, BLOCK_R * BLOCK_G)[:, None]
    r = tl.program_id(0) * BLOCK_R + i // BLOCK_G
    pos = tl.arange(0, M)[None, :]
    col = (tl.program_id(1) * BLOCK_G + i % BLOCK_G) * M + pos
    inside = (r < rows) & (col < cols)
    offs = r.to(tl.int64) * cols + col
    w = tl.load(W + offs, mask=inside, other=0.0)
    norm = tl.load(NORM + col, mask=col < cols, other=0.0)
    keep = nm_keep(_scores(w, norm), pos, 1, N, M)
    tl.store(OUT + offs, tl.where(keep, w, tl.zeros_like(w)), mask=inside)
    tl.store(MASK + offs, keep.to(tl.int8), mask=inside)


@triton.jit
def _wanda_row_kernel(W, NORM, OUT, MASK, cols, n_prune, BLOCK: tl.constexpr):
    # One program per row: the row's keys stay in registers while lowest_k searches its threshold.
    c = tl.arange(0, BLOCK)
    inside = c < cols
    offs = tl.program_id(0).to(tl.int64) * cols + c
    w = tl.load(W + offs, mask=inside, other=0.0)
    norm = tl.load(NORM + c, mask=inside, other=0.0)
    key = tl.where(inside, _scores(w, norm), PAD_KEY)
    keep = ~lowest_k(key, n_prune, BLOCK)
    tl.store(OUT + offs, tl.where(keep, w, tl.zeros_like(w)), mask=inside)
    tl.store(MASK + offs, keep.to(tl.int8), mask=inside)


def wanda_prune(weight, act_norm, sparsity=0.5, nm=None):
    """(pruned weight, keep mask); inputs validated by sdsengine.kernels.wanda_prune."""
    weight, act_norm = weight.contiguous(), act_norm.contiguous()
    rows, cols = weight.shape
    out = torch.empty_like(weight)
    mask = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    if rows and cols:
        _launch(weight, act_norm, out, mask, sparsity, nm)
    return out, mask.view(torch.bool)


def _launch(weight, act_norm, out, mask, sparsity, nm):
    rows, cols = weight.shape
    if nm:
        n, m = nm
        block_g = max(1, NM_TILE_COLS // m)
        grid = (triton.cdiv(rows, NM_TILE_ROWS), triton.cdiv(cols // m, block_g))
        _wanda_nm_kernel[grid](weight, act_norm, out, mask, rows, cols, N=n, M=m,
                               BLOCK_R=NM_TILE_ROWS, BLOCK_G=block_g, num_warps=NM_WARPS)
    else:
        block = triton.next_power_of_2(cols)
        n_prune = int(cols * sparsity)  # the count prune_lowest_mask drops, computed the same way
        _wanda_row_kernel[(rows,)](weight, act_norm, out, mask, cols, n_prune, BLOCK=block,
                                   num_warps=min(16, max(4, block // ROW_ELEMS_PER_WARP)))
