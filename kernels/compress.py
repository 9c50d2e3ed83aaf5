"""2:4 select-and-compress and its inverse, in the layout of reference.compress_24 (see kernels/README.md).

A program owns a tile of (rows, pairs of groups); a thread holds whole pairs (8 columns), so each group's
select, its pair of values and the pair's byte of metadata are formed (compress) or read back (decompress) in
its registers, with no value crossing lanes. Every load and store is a contiguous run per row.
"""
import torch
import triton
import triton.language as tl

from ._select import columns_of_4, join_of_4, keep_of_4

TILE_ROWS = 16
TILE_CHUNKS = 4  # 16 rows x 128 columns per program
WARPS = 4


@triton.jit
def _pairs(BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, rows, cols):
    """This program's (rows, pairs) tile: which pairs are in the weight, and each pair's offsets: its first
    dense column (rows, pairs, 1), its 4 values (rows, pairs, 4) and its metadata byte (rows, pairs)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
    row = r.to(tl.int64)
    values = (row * (cols // 2) + p * 4)[:, :, None] + tl.arange(0, 4)[None, None, :]
    return (r < rows) & (p < cols // 8), (row * cols + p * 8)[:, :, None], values, row * (cols // 8) + p


@triton.jit
def _load_groups(PTR, first, inside):
    """The two groups of 4 columns from `first` (a (rows, pairs, 1) tile of offsets) as two (rows, pairs, 4)
    tensors, a thread holding both of its pair: one 16-byte load at 2 bytes an element; two at 4, where one
    load of 8 would leave half of each thread's pair to its neighbour lane and cost trips through shared
    memory to bring it back."""
    mask = inside[:, :, None]
    if PTR.dtype.element_ty.primitive_bitwidth == 32:
        return (tl.load(PTR + first + tl.arange(0, 4)[None, None, :], mask=mask, other=0.0),
                tl.load(PTR + first + 4 + tl.arange(0, 4)[None, None, :], mask=mask, other=0.0))
    both = tl.load(PTR + first + tl.arange(0, 8)[None, None, :], mask=mask, other=0.0)
    both = tl.reshape(both, (both.shape[0], both.shape[1], 2, 4))  # column 4 group + position
    return tl.split(tl.permute(both, (0, 1, 3, 2)))


@triton.jit
def _store_groups(PTR, first, inside, group_a, group_b):
    """_load_groups' inverse: two (rows, pairs, 4) groups stored from `first`, 16 bytes at a time."""
    mask = inside[:, :, None]
    if PTR.dtype.element_ty.primitive_bitwidth == 32:
        tl.store(PTR + first + tl.arange(0, 4)[None, None, :], group_a, mask=mask)
        tl.store(PTR + first + 4 + tl.arange(0, 4)[None, None, :], group_b, mask=mask)
    else:
        both = tl.permute(tl.join(group_a, group_b), (0, 1, 3, 2))  # [.., group, position]
        both = tl.reshape(both, (both.shape[0], both.shape[1], 8))
        tl.store(PTR + first + tl.arange(0, 8)[None, None, :], both, mask=mask)


@triton.jit
def _pick_2of4(score, w):
    """(first kept value, second kept value, nibble i0 | i1 << 2) of each group of (rows, pairs, 4) fp32 scores
    and weights: the 2 highest scores, ties to the lower index."""
    keep0, keep1, keep2, keep3 = keep_of_4(*columns_of_4(score), 2)
    w0, w1, w2, w3 = columns_of_4(w)
    # exactly two are kept: the first is 0, else 1, else 2; the second is 3, else 2, else 1
    i0 = tl.where(keep0, 0, tl.where(keep1, 1, 2))
    i1 = tl.where(keep3, 3, tl.where(keep2, 2, 1))
    v0 = tl.where(keep0, w0, tl.where(keep1, w1, w2))
    v1 = tl.where(keep3, w3, tl.where(keep2, w2, w1))
    return v0, v1, i0 | (i1 << 2)


@triton.jit
def _positive_zero(v):
    # -0.0 is written as +0.0; NaN != 0 passes through. Compared as fp32 (exact): the interpreter of Triton 3.9
    # compares bf16 as bits, which left -0.0 (a kept -0.0 beside NaNs that its group keeps) as it was
    return tl.where(v.to(tl.float32) == 0, tl.zeros_like(v), v)


@triton.jit
def _compress_kernel(W, S, VALUES, META_BYTES, rows, cols, HAS_SCORES: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # A thread owns whole pairs of groups (8 columns, one 16-byte load at fp16): both groups are selected in
    # its registers, and their two nibbles form one byte of the int32 meta (little-endian: byte j of a chunk's
    # word holds groups 2j and 2j + 1), so no value crosses lanes.
    inside, first, values_at, byte_at = _pairs(BLOCK_R, BLOCK_P, rows, cols)
    wa, wb = _load_groups(W, first, inside)
    if HAS_SCORES:  # compared as fp32: widened exactly (the interpreter compares bf16 as bits)
        sa, sb = _load_groups(S, first, inside)
        ka, kb = sa.to(tl.float32), sb.to(tl.float32)
    else:
        ka, kb = tl.abs(wa.to(tl.float32)), tl.abs(wb.to(tl.float32))
    a0, a1, nibble_a = _pick_2of4(ka, wa)
    b0, b1, nibble_b = _pick_2of4(kb, wb)
    values = _positive_zero(join_of_4(a0, a1, b0, b1))  # the pair's 4 values: columns 4p..4p + 3
    tl.store(VALUES + values_at, values, mask=inside[:, :, None])
    tl.store(META_BYTES + byte_at, (nibble_a | (nibble_b << 4)).to(tl.uint8), mask=inside)


@triton.jit
def _place_2of4(v0, v1, nibble):
    """A group's 4 columns, (rows, pairs, 4), from its kept pair and the nibble i0 | i1 << 2 that names their
    columns; values pass through bit for bit."""
    i0, i1 = nibble & 3, nibble >> 2
    zero = tl.zeros_like(v0)
    return join_of_4(tl.where(i0 == 0, v0, zero), tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero)),
                     tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero)), tl.where(i1 == 3, v1, zero))


@triton.jit
def _decompress_kernel(VALUES, META_BYTES, OUT, rows, cols, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # _compress_kernel's tile backwards: a thread reads its pair's 4 values and byte of metadata, writes 8 columns
    inside, first, values_at, byte_at = _pairs(BLOCK_R, BLOCK_P, rows, cols)
    a0, a1, b0, b1 = columns_of_4(tl.load(VALUES + values_at, mask=inside[:, :, None], other=0.0))
    # the pair's byte read beside each of its values, so that it lies where they do (one cached line; read once
    # as (rows, pairs), it took a trip through shared memory to meet them)
    bytes4 = tl.load(META_BYTES + byte_at[:, :, None] + values_at * 0, mask=inside[:, :, None], other=0)
    byte = columns_of_4(bytes4.to(tl.int32))[0]
    _store_groups(OUT, first, inside, _place_2of4(a0, a1, byte & 0xF), _place_2of4(b0, b1, (byte >> 4) & 0xF))


def compress_24(weight, scores=None):
    """(values, meta); inputs validated by sdsengine.kernels.compress_24."""
    weight = weight.contiguous()
    rows, cols = weight.shape
    values = torch.empty(rows, cols // 2, dtype=weight.dtype, device=weight.device)
    meta = torch.empty(rows, cols // 32, dtype=torch.int32, device=weight.device)
    if rows and cols:
        has_scores = scores is not None
        scores = scores.contiguous() if has_scores else weight  # unused pointer when HAS_SCORES is off
        _compress_kernel[_grid(rows, cols)](weight, scores, values, meta.view(torch.uint8), rows, cols,
                                            HAS_SCORES=has_scores, BLOCK_R=TILE_ROWS, BLOCK_P=TILE_CHUNKS * 4,
                                            num_warps=WARPS)
    return values, meta


def decompress_24(values, meta):
    """Dense (rows, K) weight with exact zeros; inputs validated by sdsengine.kernels.decompress_24."""
    values, meta = values.contiguous(), meta.contiguous()
    rows, cols = values.shape[0], values.shape[1] * 2
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    if rows and cols:
        _decompress_kernel[_grid(rows, cols)](values, meta.view(torch.uint8), out, rows, cols, BLOCK_R=TILE_ROWS,
                                              BLOCK_P=TILE_CHUNKS * 4, num_warps=WARPS)
    return out


def _grid(rows, cols):
    return triton.cdiv(rows, TILE_ROWS), triton.cdiv(cols // 32, TILE_CHUNKS)
