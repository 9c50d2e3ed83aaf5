"""2:4 select-and-compress and its inverse, in the layout of reference.compress_24 (see kernels/README.md).

A program owns a tile of (rows, 32-column chunks); the tile is addressed as (rows, chunks, 8 groups, 4),
so each group's select, each chunk's int32 of metadata and each group's pair of values are plain
reductions and broadcasts in registers, and every load and store is a contiguous run per row.
"""
import torch
import triton
import triton.language as tl

from ._select import nm_keep, sort_key

TILE_ROWS = 16
TILE_CHUNKS = 4  # 16 rows x 128 columns per program
WARPS = 4


@triton.jit
def _tile(BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDTH: tl.constexpr):
    """Index pieces of a (rows, chunks, 8, WIDTH) tile; WIDTH = 4 for dense, 2 for values."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :, None, None]
    g = tl.arange(0, 8)[None, None, :, None]
    pos = tl.arange(0, WIDTH)[None, None, None, :]
    return r, c, g, pos


@triton.jit
def _compress_kernel(W, S, VALUES, META, rows, cols, HAS_SCORES: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, c, g, pos = _tile(BLOCK_R, BLOCK_C, 4)
    inside = (r < rows) & (c < cols // 32)
    offs = r.to(tl.int64) * cols + c * 32 + g * 4 + pos
    w = tl.load(W + offs, mask=inside, other=0.0)
    if HAS_SCORES:
        score = tl.load(S + offs, mask=inside, other=0.0).to(tl.float32)
    else:
        score = tl.abs(w.to(tl.float32))
    keep = nm_keep(sort_key(score), pos, 3, 2, 4)
    # the kept pair in increasing column order: i0 < i1
    i0 = tl.min(tl.where(keep, pos, 4), axis=3, keep_dims=True)
    i1 = tl.max(tl.where(keep, pos, -1), axis=3, keep_dims=True)
    wf = w.to(tl.float32)
    # sums of one value and zeros: exact, and -0.0 + 0.0 = +0.0 canonicalizes negative zero
    v0 = tl.sum(tl.where(pos == i0, wf, 0.0), axis=3, keep_dims=True) + 0.0
    v1 = tl.sum(tl.where(pos == i1, wf, 0.0), axis=3, keep_dims=True) + 0.0
    pair = tl.arange(0, 2)[None, None, None, :]
    values = tl.where(pair == 0, v0, v1)
    v_offs = r.to(tl.int64) * (cols // 2) + c * 16 + g * 2 + pair
    tl.store(VALUES + v_offs, values.to(VALUES.dtype.element_ty), mask=inside)
    # one int32 per chunk: group g's nibble i0 | i1 << 2 at bits 4g; summed in int64 (bit 31 is data)
    nibble = (i0 | (i1 << 2)).to(tl.int64) << (g * 4)
    meta = tl.sum(tl.sum(nibble, axis=3), axis=2).to(tl.int32)  # truncation keeps the 32 bits
    r2 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c2 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    tl.store(META + r2.to(tl.int64) * (cols // 32) + c2, meta, mask=(r2 < rows) & (c2 < cols // 32))


@triton.jit
def _decompress_kernel(VALUES, META, OUT, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, c, g, pos = _tile(BLOCK_R, BLOCK_C, 4)
    inside = (r < rows) & (c < cols // 32)
    meta = tl.load(META + r.to(tl.int64) * (cols // 32) + c, mask=inside, other=0)
    nibble = (meta >> (g * 4)) & 0xF  # arithmetic shift is fine: only the low 4 bits are kept
    i0, i1 = nibble & 3, nibble >> 2
    # the pair as two (.., 8, 1) loads of the same cache lines: values pass through bit for bit
    pairs = VALUES + r.to(tl.int64) * (cols // 2) + c * 16 + g * 2
    v0 = tl.load(pairs, mask=inside, other=0.0)
    v1 = tl.load(pairs + 1, mask=inside, other=0.0)
    dense = tl.where(pos == i0, v0, tl.where(pos == i1, v1, tl.zeros_like(v1)))
    tl.store(OUT + r.to(tl.int64) * cols + c * 32 + g * 4 + pos, dense.to(OUT.dtype.element_ty), mask=inside)


def compress_24(weight, scores=None):
    """(values, meta); inputs validated by sdsengine.kernels.compress_24."""
    weight = weight.contiguous()
    rows, cols = weight.shape
    values = torch.empty(rows, cols // 2, dtype=weight.dtype, device=weight.device)
    meta = torch.empty(rows, cols // 32, dtype=torch.int32, device=weight.device)
    if rows and cols:
        has_scores = scores is not None
        scores = scores.contiguous() if has_scores else weight  # unused pointer when HAS_SCORES is off
        _compress_kernel[_grid(rows, cols)](weight, scores, values, meta, rows, cols, HAS_SCORES=has_scores,
                                            BLOCK_R=TILE_ROWS, BLOCK_C=TILE_CHUNKS, num_warps=WARPS)
    return values, meta


def decompress_24(values, meta):
    """Dense (rows, K) weight with exact zeros; inputs validated by sdsengine.kernels.decompress_24."""
    values, meta = values.contiguous(), meta.contiguous()
    rows, cols = values.shape[0], values.shape[1] * 2
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    if rows and cols:
        _decompress_kernel[_grid(rows, cols)](values, meta, out, rows, cols, BLOCK_R=TILE_ROWS,
                                              BLOCK_C=TILE_CHUNKS, num_warps=WARPS)
    return out


def _grid(rows, cols):
    return triton.cdiv(rows, TILE_ROWS), triton.cdiv(cols // 32, TILE_CHUNKS)
