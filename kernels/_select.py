"""Selection helpers shared by the Triton kernels, with the exact tie rules of sdsengine.masks.

The order is torch.sort's: -0.0 equals 0.0, every NaN sorts above +inf and NaNs tie, equal entries keep their
index order. Groups of 4 (2:4, the patterns the 2:4 matmul takes) compare the floats themselves, each pair in
one compare with the NaN rule folded in (keep_of_4). Elsewhere scores are compared as int32 *sort keys*, which
order like the floats: M^2 compares per group of M (nm_keep), the unstructured threshold search (kth_key).
"""
import triton
import triton.language as tl

PAD_KEY = tl.constexpr(0x7FFFFFFF)  # above every real key (a NaN's is 0x7FC00000): padding is never selected as lowest


@triton.jit
def sort_key(x):
    """Integer key of float x, ordered like x (flip the magnitude bits of negatives): int64 for fp64, else int32
    (fp16/bf16 widened to fp32 exactly)."""
    if x.dtype.is_fp64():
        bits = x.to(tl.int64, bitcast=True)
        key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
        nan_key = 0x7FF8000000000000
    else:
        x = x.to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        nan_key = 0x7FC00000
    key = tl.where(x == 0, 0, key)  # -0.0 ties with 0.0, as in torch.sort
    return tl.where(x != x, nan_key, key)  # every NaN one key above +inf


@triton.jit
def group_tile(rows, cols, M: tl.constexpr, PACK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """This program's tile of an N:M kernel: (offsets, columns, inside) of BLOCK_R rows x BLOCK_G groups of M,
    addressed as (BLOCK_R * BLOCK_G / PACK, PACK * M): PACK whole groups per tile row, so a thread holds whole
    groups (its rank's masked sums stay in its registers) and loads them PACK * M elements at a time."""
    PACKS: tl.constexpr = BLOCK_G // PACK  # tile rows per matrix row
    i = tl.arange(0, BLOCK_R * PACKS)[:, None]
    r = tl.program_id(0) * BLOCK_R + i // PACKS
    col = (tl.program_id(1) * BLOCK_G + i % PACKS * PACK) * M + tl.arange(0, PACK * M)[None, :]
    return r.to(tl.int64) * cols + col, col, (r < rows) & (col < cols)


@triton.jit
def nm_keep(key, pos, AXIS: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
    """Keep mask of the N best keys in each group of M along AXIS (pos = index inside the group).

    An entry's rank is its place in a stable descending sort of its group (nm_mask): the entries with
    a higher key, plus the equal ones at a lower index. M is small, so each peer is pulled out of the
    group with a masked sum (in registers) and compared with every entry: M^2 integer compares.
    """
    rank = tl.zeros(key.shape, tl.int32)
    for j in tl.static_range(M):
        peer = tl.sum(tl.where(pos == j, key, 0), axis=AXIS, keep_dims=True)
        beats = tl.where(pos > j, peer >= key, peer > key)
        rank += beats.to(tl.int32)
    return rank < N


@triton.jit
def _ahead(a, b, a_is_nan):
    """a, at the lower index, sorts ahead of b in a stable descending sort: a >= b, or a is NaN. The float
    compare's own rules give sort_key's order: -0.0 equals 0.0, and a NaN b is never beaten but by a NaN a."""
    return (a >= b) | a_is_nan


@triton.jit
def _fewer_than(N: tl.constexpr, x, y, z):
    """Fewer than N of the three are true: one 3-input logic op on predicates (N = 0: none, N >= 4: all)."""
    if N <= 0:
        return x & ~x
    elif N == 1:
        return ~(x | y | z)
    elif N == 2:
        return ~((x & y) | (x & z) | (y & z))
    elif N == 3:
        return ~(x & y & z)
    else:
        return x | ~x


@triton.jit
def keep_of_4(s0, s1, s2, s3, N: tl.constexpr):
    """nm_keep for M = 4 on a group's 4 scores as 4 tensors (a thread's own registers; fp32 or fp64: the
    interpreter of Triton 3.9 compares bf16 as bits): an entry is kept when fewer than N entries are ahead of
    it. The 6 pairwise orders are one float compare each, with the lower index's NaN test folded in, and each
    entry's keep one logic op of the 3 orders that put others ahead of it. No sort keys and no sums: the fused
    Wanda 2:4 kernel takes 19 SASS instructions per element where sort keys and nm_keep's masked sums took 28
    (fp16; nm_mask 14 for 23.5, compress 18.5 for 24.5 with the keys' 6 compares; Triton 3.6 and 3.9)."""
    n0, n1, n2 = s0 != s0, s1 != s1, s2 != s2
    a01, a02, a03 = _ahead(s0, s1, n0), _ahead(s0, s2, n0), _ahead(s0, s3, n0)
    a12, a13, a23 = _ahead(s1, s2, n1), _ahead(s1, s3, n1), _ahead(s2, s3, n2)
    return (_fewer_than(N, ~a01, ~a02, ~a03), _fewer_than(N, a01, ~a12, ~a13), _fewer_than(N, a02, a12, ~a23),
            _fewer_than(N, a03, a13, a23))


@triton.jit
def group_keep(score, N: tl.constexpr, M: tl.constexpr):
    """Keep mask of the N best in each group of a (.., P, M) tile of fp32 or fp64 scores: groups of 4 by
    keep_of_4 on the floats, others by nm_keep on their sort keys."""
    if M == 4:
        return join_of_4(*keep_of_4(*columns_of_4(score), N))
    return nm_keep(sort_key(score), tl.arange(0, M)[None, None, :], 2, N, M)


@triton.jit
def columns_of_4(x):
    """A (.., 4) tensor's 4 columns as (..) tensors, in the registers that held them (a thread owns whole
    groups of 4)."""
    pairs = tl.reshape(x, x.shape[:-1] + (2, 2))  # column 2a + b at [a, b]
    b0, b1 = tl.split(pairs)
    x0, x2 = tl.split(b0)
    x1, x3 = tl.split(b1)
    return x0, x1, x2, x3


@triton.jit
def join_of_4(x0, x1, x2, x3):
    """columns_of_4's inverse: the (.., 4) tensor with these columns."""
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), x0.shape + (4,))  # column 2a + b at [a, b]


@triton.jit
def kth_key(key, k, SIZE: tl.constexpr):
    """(T, #(key <= T)): T the k-th smallest of the 1-D keys (the smallest for k == 0): a stable ascending sort
    puts the keys below T and the first k - #(key < T) ties at T into its first k places (prune_lowest_mask);
    the count tells whether ties at T straddle place k.

    Finds T by bracketing: lo < T <= hi with n_lo = #(key <= lo) < k <= n_hi = #(key <= hi). Each step counts
    the keys at or below one probe, its only reduction across the row, placed by interpolating the counts (keys
    are near log-scale, so the counts are smooth: about 8 steps on random rows of |N(0, 1)| x lognormal or
    uniform norms) or by bisection when a step did not halve the bracket (at most ~2 x 32 steps on adversarial
    rows). It ends when a count hits k (T is the largest key at or below hi), or k - 1 (T is the smallest key
    above lo), or the bracket is one key wide; one more reduction then names T. The ends were once snapped to
    real keys by a maximum and a minimum each step, 3 reductions a step where this takes 1, for 0.4-0.8 steps
    fewer (benchmarks/NOTES.md).
    """
    lo = tl.min(key, axis=0).to(tl.int64) - 1  # int64: the bracket's arithmetic must not wrap
    hi = tl.max(key, axis=0).to(tl.int64)
    n_lo = lo * 0
    n_hi = n_lo + SIZE
    k = n_lo + k
    bisect = n_lo != 0
    while (lo + 1 < hi) & (n_hi != k) & (n_lo != k - 1) & (k > 0):
        width = hi - lo
        frac = ((k - n_lo).to(tl.float32) - 0.5) / (n_hi - n_lo).to(tl.float32)
        guess = lo + (width.to(tl.float32) * frac).to(tl.int64)
        probe = tl.where(bisect, lo + width // 2, guess)
        probe = tl.minimum(tl.maximum(probe, lo + 1), hi - 1)
        n = tl.sum((key <= probe.to(tl.int32)).to(tl.int32), axis=0).to(tl.int64)
        hi, n_hi = tl.where(n >= k, probe, hi), tl.where(n >= k, n, n_hi)
        lo, n_lo = tl.where(n >= k, lo, probe), tl.where(n >= k, n_lo, n)
        bisect = (hi - lo) * 2 > width
    if (n_lo == k - 1) | (k == 0):  # k == 0 takes the smallest key: the first above lo = min - 1
        T = tl.min(tl.where(key > lo.to(tl.int32), key, PAD_KEY), axis=0)
        n_at_most = tl.sum((key <= T).to(tl.int32), axis=0)
    else:  # #(key <= hi) == k, or hi == lo + 1: the largest key at or below hi, with none in (T, hi]
        T = tl.max(tl.where(key <= hi.to(tl.int32), key, -PAD_KEY), axis=0)
        n_at_most = n_hi.to(tl.int32)
    return T, n_at_most
