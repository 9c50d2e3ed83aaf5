"""The one mask convention of sdsengine: a mask is a bool tensor, True = keep.

Selection helpers work on *scores* (higher = more important) and break ties by position, lower index
first, so every backend can reproduce a mask exactly.
"""
import torch


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring entries of every group of m consecutive entries along the last dim. CUDA
    tensors go to sdsengine.kernels.nm_mask (one Triton pass, under the kernels' switch): a stable sort of
    groups of 4 gives each group a warp's 128-wide merge sort there. Either path checks the pattern."""
    if scores.is_cuda:
        from sdsengine import kernels  # not at import: the kernels' reference imports this module
        return kernels.nm_mask(scores, n, m)
    return nm_mask_torch(scores, n, m)


def check_nm(scores, n, m):
    """Raise, naming the problem, unless n:m is a pattern and the last dim of scores holds whole groups."""
    if not (0 <= n <= m and m >= 1):  # a negative n would slice from the end
        raise ValueError(f"an N:M pattern needs 0 <= N <= M and M >= 1, got {n}:{m}")
    if scores.shape[-1] % m:
        raise ValueError(f"last dimension {scores.shape[-1]} is not divisible by M={m} for an {n}:{m} pattern")


def nm_mask_torch(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """nm_mask in plain PyTorch on any device (sdsengine.kernels' reference): by compares for M = 4 on the
    CPU, else a stable sort of each group."""
    check_nm(scores, n, m)
    if m == 4 and scores.is_floating_point() and scores.device.type == "cpu":
        return _keep_of_4(scores, n)
    groups = scores.reshape(-1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, :n], True)
    return mask.reshape(scores.shape)


def _keep_of_4(scores, n):
    """nm_mask for M = 4 by 6 compares per group: an entry is kept when fewer than n entries are ahead of it
    (a higher key, or an equal one at a lower index), as in the stable descending sort, on sort keys so that
    NaN and -0.0 rank as the sort ranks them. On the CPU at SmolLM2's shapes (576 x 576, 1536 x 576), 0.43 and
    0.95 ms on magnitudes (sort_key's 2-pass case) against the sort's 4.1 and 11.3; 1.4 and 3.4 on signed scores.
    The CPU's only: a GPU takes the Triton kernel (sdsengine.kernels.nm_mask), one pass where these compares
    would be ~20."""
    k0, k1, k2, k3 = sort_key(scores).reshape(-1, 4).unbind(1)
    a01, a02, a03, a12, a13, a23 = k0 >= k1, k0 >= k2, k0 >= k3, k1 >= k2, k1 >= k3, k2 >= k3  # i ahead of j
    u8 = lambda b: b.view(torch.uint8)  # bools counted as bytes, in place: no conversion pass per term
    keep0 = u8(~a01) + u8(~a02) + u8(~a03) < n
    keep1 = u8(a01) + u8(~a12) + u8(~a13) < n
    keep3 = u8(a03) + u8(a13) + u8(a23) < n
    keep2 = u8(keep0) + u8(keep1) + u8(keep3) < n  # exactly n are kept
    return torch.stack([u8(keep0), u8(keep1), u8(keep2), u8(keep3)], dim=1).view(torch.bool).reshape(scores.shape)


def sort_key(scores):
    """Integer keys that order like the floats in torch.sort: the magnitude bits of negatives flipped, -0.0
    equal to 0.0, every NaN one key above +inf (float64 in int64; other floats, widened exactly, in int32)."""
    wide = scores.dtype == torch.float64
    if scores.numel() and not (scores.min() >= 0):  # negatives or NaN (a NaN minimum compares False)
        return _signed_key(scores, wide)
    # a non-negative score's bits order like it once -0.0 is +0.0 (adding 0.0 does that): magnitudes, Wanda's
    # scores, gains; 2 passes instead of 8
    return (scores + 0.0).view(torch.int64) if wide else (scores.float() + 0.0).view(torch.int32)


def _signed_key(scores, wide):
    bits = scores.view(torch.int64) if wide else scores.float().view(torch.int32)
    magnitude = 0x7FFFFFFFFFFFFFFF if wide else 0x7FFFFFFF
    keys = bits ^ ((bits >> (63 if wide else 31)) & magnitude)
    keys = torch.where(scores == 0, 0, keys)
    nan_key = 0x7FF8000000000000 if wide else 0x7FC00000
    return torch.where(scores != scores, nan_key, keys)


def prune_lowest_mask(scores: torch.Tensor, sparsity: float, dim: int | None = -1) -> torch.Tensor:
    """Drop exactly int(size * sparsity) lowest scores along `dim` (None: over the whole tensor)."""
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    flat = scores.reshape(1, -1) if dim is None else scores.movedim(dim, -1)
    k = int(flat.shape[-1] * sparsity)
    order = torch.sort(flat, dim=-1, stable=True).indices
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask.scatter_(-1, order[..., :k], False)
    return mask.reshape(scores.shape) if dim is None else mask.movedim(-1, dim)


def top_k_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k[r] highest scores of row r of a 2-D tensor (k: one count per row).

    A selection, not a sort: each row's threshold is its k-th highest score (torch.kthvalue, linear time;
    a sort for a few rows on CUDA, see kth_smallest), and among scores equal to it the lowest indices fill
    the count. SDS's adjustment re-selects a mask
    every step, where a full sort per step dominated its time on unstructured patterns.
    """
    rows, cols = scores.shape
    k = torch.as_tensor(k, device=scores.device).reshape(-1).expand(rows)
    if bool(((k < 0) | (k > cols)).any()):
        raise ValueError(f"top_k_mask: counts must lie in [0, {cols}], got {k.min().item()}..{k.max().item()}")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    has_nan = bool(scores.isnan().any())  # rare: its handling is kept off the usual path (SDS: every step)
    for count in torch.unique(k).tolist():  # one selection per distinct count (BESA's rows differ)
        if count == 0:
            continue
        rows_k = (k == count).nonzero().reshape(-1)
        part = scores[rows_k]
        threshold = kth_smallest(part, cols - count + 1)
        above, ties = part > threshold, part == threshold
        if has_nan:  # NaN ranks highest, as everywhere in the library (kthvalue orders it last), but compares false
            nan, nan_threshold = part.isnan(), threshold.isnan()
            above |= nan & ~nan_threshold
            ties |= nan & nan_threshold
        room = count - above.sum(dim=1, keepdim=True)  # ties to keep, lowest index first
        mask[rows_k] = above | (ties & (ties.cumsum(dim=1) <= room))
    return mask


SORT_BELOW_ROWS = 64  # on CUDA, fewer rows than this take their k-th value from a sort (kth_smallest)


def kth_smallest(part: torch.Tensor, k: int, by_sort: bool | None = None) -> torch.Tensor:
    """Each row's k-th smallest value (rows x 1), NaN ordered last, as torch.kthvalue gives it.

    On CUDA kthvalue runs one thread block per row: a single row of a whole weight (SDS's per-layer
    projector, every adjustment step) left the rest of the GPU idle. A sort of few rows spreads over the
    device, at the cost of its values and indices (12 B an entry) for the step. by_sort: None chooses.
    """
    if not 1 <= k <= part.shape[1]:
        raise ValueError(f"kth_smallest: k must lie in [1, {part.shape[1]}] (the row length), got {k}")
    if by_sort is None:
        by_sort = part.is_cuda and part.shape[0] < SORT_BELOW_ROWS
    if by_sort:
        return torch.sort(part, dim=1).values[:, k - 1:k].clone()  # a view would keep the whole sort alive
    return torch.kthvalue(part, k, dim=1, keepdim=True).values


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of m that hold more than n nonzeros (0 means the pattern holds exactly)."""
    if weight.shape[-1] % m:
        return weight.numel() // max(weight.shape[-1], 1)
    # a million groups at a time: the count over a whole weight took an int64 per value (5x a bf16 weight's bytes)
    return sum(int(((part != 0).sum(dim=-1) > n).sum()) for part in weight.reshape(-1, m).split(1 << 20))


def counted_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros, counted."""
    return float((weight == 0).sum()) / weight.numel()
