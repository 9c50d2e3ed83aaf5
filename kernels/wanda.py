"""Fused Wanda (Sun et al. 2023): score S = |W| * ||X_j||_2 and select in one pass.

W and the norms are read once; the pruned weight and the keep mask are written once; scores live only in
registers, as int32 sort keys (kernels/_select.py), so masks equal reference.wanda_prune bit for bit.
"""
import torch
import triton
import triton.language as tl

from ._select import PAD_KEY, group_keep, group_tile, kth_key, sort_key

NM_TILE_ROWS = 8
NM_TILE_COLS = 256  # per program: 8 x 256 elements, 8 per thread at 8 warps (one 16-byte load at fp16)
NM_WARPS = 8
# unstructured: one program per row, warps = row length (padded to a power of two) / this, 1 to 16. Each search
# step is one reduction across the row's warps (kth_key): a row of one warp reduces by shuffles alone, no barrier.
# SASS (Triton 3.6, sm_90, fp16) for 4096 columns: 1 warp, 202 registers, 9 rows per SM, 488 instructions a step
# per row; at 1024 a warp it was 4 warps, 6 rows, 4 x 182 and 3 barriers. 11008 columns: 4 warps, 2 rows per SM,
# 4 x 496 (16 warps, 1 row, 16 x 184 before). The H100's sweep of 11-23 found fewer warps a row faster (1024 a warp
# 9% faster than 512, the most it tried); benchmarks/sweep_tiles.py times 512 to 4096.
ROW_ELEMS_PER_WARP = 4096
TIE_BLOCK = 1024  # unstructured rows whose threshold has ties to split are re-read in pieces of this size


@triton.jit
def _score(w, norm):
    return tl.abs(w.to(tl.float32)) * norm.to(tl.float32)  # the same fp32 product as the reference


@triton.jit
def _write(OUT, MASK, offs, w, keep, inside):
    """The pruned weight (+0.0 where dropped) and the int8 keep mask at offs."""
    tl.store(OUT + offs, tl.where(keep, w, tl.zeros_like(w)), mask=inside)
    tl.store(MASK + offs, keep.to(tl.int8), mask=inside)


@triton.jit
def _wanda_nm_kernel(W, NORM, OUT, MASK, rows, cols, N: tl.constexpr, M: tl.constexpr, PACK: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    # group_tile: whole groups per thread, loads and stores 16 bytes wide (pack_of). The 3-D (rows, groups, M)
    # tile before spread a group over lanes: the rank's sums took warp shuffles.
    offs, col, inside = group_tile(rows, cols, M, PACK, BLOCK_R, BLOCK_G)
    w = tl.load(W + offs, mask=inside, other=0.0)
    norm = tl.load(NORM + col, mask=col < cols, other=0.0)
    keep = group_keep(tl.reshape(_score(w, norm), (offs.shape[0], PACK, M)), N, M)
    _write(OUT, MASK, offs, w, tl.reshape(keep, offs.shape), inside)


def pack_of(m, element_size):
    """Groups of M a thread takes at once: as many as make 16 bytes of weight (one vector load), at least one."""
    return max(1, 16 // (m * element_size))


def nm_tile(m, element_size):
    """The tile constexprs of an N:M kernel on group_tile (this one, kernels/nm_select.py), for elements of
    element_size bytes."""
    block_g = max(1, NM_TILE_COLS // m)
    return {"PACK": min(block_g, pack_of(m, element_size)), "BLOCK_R": NM_TILE_ROWS, "BLOCK_G": block_g}


def nm_grid(rows, cols, tile, m):
    """The launch grid of an N:M kernel with nm_tile's `tile` on a (rows, cols) matrix."""
    return triton.cdiv(rows, tile["BLOCK_R"]), triton.cdiv(cols // m, tile["BLOCK_G"])


@triton.jit
def _wanda_row_kernel(W, NORM, OUT, MASK, cols, n_prune, BLOCK: tl.constexpr, TIE_BLOCK: tl.constexpr):
    # One program per row: the row's keys stay in registers while kth_key searches its threshold T.
    c = tl.arange(0, BLOCK)
    inside = c < cols
    row = tl.program_id(0).to(tl.int64) * cols
    w = tl.load(W + row + c, mask=inside, other=0.0)
    norm = tl.load(NORM + c, mask=inside, other=0.0)
    key = tl.where(inside, sort_key(_score(w, norm)), PAD_KEY)
    T, n_at_most = kth_key(key, n_prune, BLOCK)
    if n_at_most == n_prune:  # every tie at T goes: the usual case
        keep = key > T
        # w read again (from L2, where the row just was: .cg keeps the compiler from reusing the first load), so
        # that the search holds only the keys: under Triton 3.6, 4096 fp16 columns take 80 registers instead of
        # 96, and an SM holds 6 rows instead of 5 (fp32: 89 instead of 127, 5 rows instead of 4)
        w = tl.load(W + row + c, mask=inside, other=0.0, cache_modifier=".cg")
        _write(OUT, MASK, row + c, w, keep, inside)
    else:
        need = n_prune - tl.sum((key < T).to(tl.int32), axis=0)
        _prune_ties_in_order(W, NORM, OUT, MASK, row, cols, T, need, TIE_BLOCK)


@triton.jit
def _prune_ties_in_order(W, NORM, OUT, MASK, row, cols, T, need, TIE_BLOCK: tl.constexpr):
    # Only `need` of the ties at T go, lowest index first (a stable sort). Rare on real weights, so this
    # streams the row again in pieces instead of ranking the ties by a scan over the register-held row,
    # which costs every row registers and shared memory: compiled for sm_90 (fp16), 127 registers against
    # 103 at 16384 x 16 warps, and 75 against 55 at 4096 x 8, where an SM then holds 4 rows instead of 3.
    seen = need * 0
    for start in range(0, cols, TIE_BLOCK):
        c = start + tl.arange(0, TIE_BLOCK)
        inside = c < cols
        w = tl.load(W + row + c, mask=inside, other=0.0)
        key = sort_key(_score(w, tl.load(NORM + c, mask=inside, other=0.0)))
        ties = (key == T) & inside
        order = seen + tl.cumsum(ties.to(tl.int32), axis=0)
        keep = (key > T) | (ties & (order > need))
        _write(OUT, MASK, row + c, w, keep, inside)
        seen += tl.sum(ties.to(tl.int32), axis=0)


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
        tile = nm_tile(m, weight.element_size())
        _wanda_nm_kernel[nm_grid(rows, cols, tile, m)](weight, act_norm, out, mask, rows, cols, N=n, M=m, **tile,
                                                       num_warps=NM_WARPS)
    else:
        block, warps, tie_block = row_launch(cols)
        n_prune = int(cols * sparsity)  # the count prune_lowest_mask drops, computed the same way
        _wanda_row_kernel[(rows,)](weight, act_norm, out, mask, cols, n_prune, BLOCK=block, TIE_BLOCK=tie_block,
                                   num_warps=warps)


def row_launch(cols):
    """(BLOCK, warps, TIE_BLOCK) of the unstructured kernel for rows of this length."""
    block = triton.next_power_of_2(cols)
    return block, min(16, max(1, block // ROW_ELEMS_PER_WARP)), min(block, TIE_BLOCK)
