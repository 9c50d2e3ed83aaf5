"""One SparseGPT block (Frantar & Alistarh 2023) in one launch: mask selection and the column-by-column
OBS update of reference.sparsegpt_block, fp32, rows independent.

Each program holds a tile of rows x the whole block (B <= 1024 columns) in registers and walks the B
columns: column i is quantized (w * keep), its error e = (w - q) / Hinv_ii is spread over the later
columns, w_j -= e * Hinv_ij. The unstructured mask ranks w^2 / Hinv_jj^2 over the whole block (all rows),
so it is chosen in torch before the launch, by the reference's own prune_lowest_mask; N:M masks are chosen
in the kernel at the start of each group, from the updated weights, like the reference.

Arithmetic mirrors the reference op for op (IEEE division via div_rn, and enable_fp_fusion=False so no
multiply-add is fused), so N:M masks chosen from updated weights see the reference's exact values; on CPU
under the interpreter the outputs are bit-identical, and the tests allow rtol 1e-5 / atol 1e-6.
"""
import torch
import triton
import triton.language as tl

from sdsengine.masks import prune_lowest_mask

from ._select import sort_key

TILE = 1024      # rows x block columns per program: 8 x 128 at the default blocksize


@triton.jit
def _group_keep(w, diag, c, start, N: tl.constexpr, M: tl.constexpr):
    """Keep (int32) for columns [start, start + M) of the tile: the N best w^2 / d^2 of each row's group,
    ties to the lower column (nm_mask). Other columns hold junk; only the group's are read."""
    key = sort_key(tl.math.div_rn(w * w, diag * diag))
    rank = tl.zeros(key.shape, tl.int32)
    for j in tl.static_range(M):
        peer = tl.sum(tl.where(c == start + j, key, 0), axis=1, keep_dims=True)
        rank += tl.where(c > start + j, peer >= key, peer > key).to(tl.int32)
    return (rank < N).to(tl.int32)


@triton.jit
def _sparsegpt_block_kernel(W, stride_w, HINV, stride_h, KEEP, Q, ERR, LOSS, rows, width,
                            N: tl.constexpr, GROUP: tl.constexpr, NM: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.arange(0, BLOCK_B)[None, :]
    inside = (r < rows) & (c < width)
    w = tl.load(W + r.to(tl.int64) * stride_w + c, mask=inside, other=0.0).to(tl.float32)
    diag = tl.load(HINV + c * (stride_h + 1), mask=c < width, other=1.0).to(tl.float32)
    if NM:
        keep = tl.zeros((BLOCK_R, BLOCK_B), tl.int32)
    else:
        keep = tl.load(KEEP + r.to(tl.int64) * width + c, mask=inside, other=0).to(tl.int32)
    err = tl.zeros((BLOCK_R, BLOCK_B), tl.float32)
    loss = tl.zeros((BLOCK_R, 1), tl.float32)
    # GROUP is M for N:M (a fresh mask per group) and 1 for unstructured
    for g in range(0, width // GROUP):
        if NM:
            keep = _group_keep(w, diag, c, g * GROUP, N, GROUP)
        for j in tl.static_range(GROUP):
            i = g * GROUP + j
            at_i = c == i
            # column i out of registers (a masked row sum; exact, one term is nonzero)
            col = tl.sum(tl.where(at_i, w, 0.0), axis=1, keep_dims=True)
            q = col * tl.sum(tl.where(at_i, keep, 0), axis=1, keep_dims=True).to(tl.float32)
            d = tl.load(HINV + i * stride_h + i).to(tl.float32)
            h = tl.load(HINV + i * stride_h + c, mask=(c > i) & (c < width), other=0.0).to(tl.float32)
            e = tl.math.div_rn(col - q, d)
            loss += tl.math.div_rn((col - q) * (col - q), d * d) * 0.5
            # later columns take the error; column i keeps q, so w ends as the pruned block
            w = tl.where(c > i, w - e * h, tl.where(at_i, q, w))
            err = tl.where(at_i, e, err)
    out = r.to(tl.int64) * width + c
    tl.store(Q + out, w, mask=inside)
    tl.store(ERR + out, err, mask=inside)
    tl.store(LOSS + r, loss, mask=r < rows)


def sparsegpt_block(w_block, hinv_block, sparsity=0.5, nm=None):
    """(Q, E, losses) like reference.sparsegpt_block; inputs validated by sdsengine.kernels."""
    rows, width = w_block.shape
    w_block, hinv_block = _unit_stride(w_block), _unit_stride(hinv_block)
    q = torch.empty(rows, width, dtype=torch.float32, device=w_block.device)
    # losses zeroed: a block of no columns launches nothing, and its rows lose nothing
    err, losses = torch.empty_like(q), torch.zeros(rows, dtype=torch.float32, device=w_block.device)
    keep = None
    if not nm:  # global over the block: the reference's own selection, bit for bit
        diag = torch.diagonal(hinv_block)
        keep = prune_lowest_mask(w_block.float() ** 2 / diag.reshape(1, -1) ** 2, sparsity, dim=None)
        keep = keep.view(torch.int8)
    if rows and width:
        block = triton.next_power_of_2(width)
        tile_rows = rows_per_program(block)
        n, group = nm if nm else (0, 1)
        _sparsegpt_block_kernel[(triton.cdiv(rows, tile_rows),)](
            w_block, w_block.stride(0), hinv_block, hinv_block.stride(0), keep if keep is not None else q,
            q, err, losses, rows, width, N=n, GROUP=group, NM=bool(nm), BLOCK_R=tile_rows, BLOCK_B=block,
            enable_fp_fusion=False)  # no FMA: keep the reference's rounding (masks depend on it)
    return q, err, losses


def rows_per_program(block):
    """Rows a program holds beside a block of this (power-of-2) width: TILE elements, 1 to 32 rows."""
    return max(1, min(32, TILE // block))


def _unit_stride(t):
    """Row-strided views (w[:, start:end], Hinv blocks) pass as they are; anything else is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()
