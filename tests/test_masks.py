import pytest
import torch

from sdsengine import masks
from sdsengine.masks import counted_sparsity, nm_mask, nm_violations, prune_lowest_mask, top_k_mask


def test_nm_mask_by_hand():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 5.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]


def test_nm_mask_ties_keep_lower_index():
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[True, True, False, False]]


def _nm_by_stable_sort(scores, n, m):
    order = torch.sort(scores.reshape(-1, m), dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(order, dtype=torch.bool).scatter_(1, order[:, :n], True).reshape(scores.shape)


SPECIAL = torch.tensor([0.0, -0.0, 1.0, -1.0, float("nan"), -float("nan"), float("inf"), float("-inf"), 2.0, 1e-40])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", range(5))
def test_groups_of_4_rank_as_the_stable_sort(dtype, n):
    """M = 4 is ranked by compares, not a sort: every group of 4 special values (NaN of either sign above
    inf, -0.0 tied with 0.0, ties to the lower index) and random rows give the sort's mask."""
    every_group = SPECIAL[torch.cartesian_prod(*[torch.arange(len(SPECIAL))] * 4)].reshape(1, -1).to(dtype)
    signless = SPECIAL[SPECIAL >= 0]  # 0.0, -0.0 and positives, no NaN: keyed by their bits
    every_signless_group = signless[torch.cartesian_prod(*[torch.arange(len(signless))] * 4)].reshape(1, -1).to(dtype)
    rows = torch.randn(30, 64, generator=torch.Generator().manual_seed(n), dtype=torch.float64).to(dtype)
    for scores in (every_group, every_signless_group, rows, rows.abs(), rows.T.contiguous().T):
        assert torch.equal(nm_mask(scores, n, 4), _nm_by_stable_sort(scores, n, 4))


def test_prune_lowest_per_row_and_whole():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0], [9.0, 8.0, 7.0, 6.0]])
    assert prune_lowest_mask(scores, 0.5).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert prune_lowest_mask(scores, 0.5, dim=None).tolist() == [[False, False, False, False], [True] * 4]


def test_nm_requires_divisible_columns():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_counting():
    w = torch.tensor([[1.0, 0.0, 2.0, 3.0]])
    assert nm_violations(w, 2, 4) == 1 and nm_violations(w * torch.tensor([1, 0, 1, 0]), 2, 4) == 0
    assert counted_sparsity(w) == 0.25


def test_negative_weights_count_as_nonzeros():
    """A group of negative weights breaks 2:4 as much as a positive one (SparseLinear.from_dense relies on it)."""
    w = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, 0.0, 2.0, 0.0]])
    assert nm_violations(w, 2, 4) == 1
    assert counted_sparsity(w) == 0.375
    assert nm_violations(torch.ones(2, 6), 2, 4) == 2  # columns not divisible by M: every row breaks it


def _top_k_by_sort(scores, k):
    """The definition: a stable descending sort, the first k[r] positions of row r kept."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks_kept = torch.arange(scores.shape[1]).reshape(1, -1) < k.reshape(-1, 1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, ranks_kept)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (16, 64), (1, 4096)])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_mask_equals_the_sorted_selection(rows, cols, ties):
    """Per-row counts, 0 and all included; with many ties the lowest indices fill the count."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    scores = torch.randn(rows, cols, generator=gen)
    if ties:
        scores = torch.randint(0, 3, (rows, cols), generator=gen).float()
    k = torch.randint(0, cols + 1, (rows,), generator=gen)
    k[0] = cols // 2
    mask = top_k_mask(scores, k)
    assert torch.equal(mask, _top_k_by_sort(scores, k))
    assert mask.sum(dim=1).tolist() == k.tolist()
    uniform = torch.full((rows,), cols // 2)
    assert torch.equal(top_k_mask(scores, uniform), _top_k_by_sort(scores, uniform))


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 4096), (5, 300)])
def test_kth_smallest_by_sort_is_kthvalue(rows, cols, monkeypatch):
    """The sort branch (taken on CUDA for few rows) gives kthvalue's value, NaN last, with ties and ±inf;
    top_k_mask through it gives the same masks."""
    gen = torch.Generator().manual_seed(cols)
    scores = torch.randint(0, 4, (rows, cols), generator=gen).float()
    scores[:, 1::7] = float("nan")
    scores[:, 2::5] = float("inf")
    scores[:, 3::11] = -float("inf")
    for k in sorted({1, (cols + 1) // 2, cols}):
        by_sort = masks.kth_smallest(scores, k, by_sort=True)
        expected = torch.kthvalue(scores, k, dim=1, keepdim=True).values
        torch.testing.assert_close(by_sort, expected, rtol=0, atol=0, equal_nan=True)
    counts = torch.randint(0, cols + 1, (rows,), generator=gen)
    expected = top_k_mask(scores, counts), top_k_mask(scores.reshape(1, -1), counts[:1] * rows)
    kth_smallest = masks.kth_smallest
    monkeypatch.setattr(masks, "kth_smallest", lambda part, k: kth_smallest(part, k, by_sort=True))
    assert torch.equal(top_k_mask(scores, counts), expected[0])
    assert torch.equal(top_k_mask(scores.reshape(1, -1), counts[:1] * rows), expected[1])


def test_top_k_mask_by_hand_and_bad_counts():
    scores = torch.tensor([[1.0, 5.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert top_k_mask(scores, torch.tensor([2, 1])).tolist() == [[False, True, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 4\]"):
        top_k_mask(scores, torch.tensor([5, 1]))


@pytest.mark.parametrize("by_sort", [False, True])
def test_top_k_mask_ranks_nan_highest_and_keeps_k(by_sort, monkeypatch):
    """NaN ranks above +inf, as nm_mask, prune_lowest_mask and the kernels rank it: a row holding NaN kept
    fewer than k (NaN compares false against a NaN threshold and every threshold)."""
    real = masks.kth_smallest
    monkeypatch.setattr(masks, "kth_smallest", lambda part, k: real(part, k, by_sort))  # both branches
    row = torch.tensor([[float("nan"), float("nan"), 1.0, 2.0]])
    kept = [top_k_mask(row, torch.tensor([k]))[0].tolist() for k in (1, 2, 3, 4)]
    assert kept == [[True, False, False, False], [True, True, False, False], [True, True, False, True],
                    [True, True, True, True]]


def test_mask_arguments_out_of_range_are_refused():
    scores = torch.randn(2, 8)
    for n, m in ((-1, 4), (5, 4), (2, 0)):
        with pytest.raises(ValueError, match="an N:M pattern needs 0 <= N <= M and M >= 1"):
            nm_mask(scores, n, m)
    for sparsity in (-0.25, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity must lie in \\[0, 1\\]"):
            prune_lowest_mask(scores, sparsity)
    for k in (0, 9):
        for by_sort in (False, True):
            with pytest.raises(ValueError, match="kth_smallest: k must lie in \\[1, 8\\]"):
                masks.kth_smallest(scores, k, by_sort)
