import pytest
import torch

from sdsengine.masks import counted_sparsity, nm_mask, nm_violations, prune_lowest_mask, top_k_mask


def test_nm_mask_by_hand():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 5.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]


def test_nm_mask_ties_keep_lower_index():
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[True, True, False, False]]


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


def test_top_k_mask_by_hand_and_bad_counts():
    scores = torch.tensor([[1.0, 5.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert top_k_mask(scores, torch.tensor([2, 1])).tolist() == [[False, True, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 4\]"):
        top_k_mask(scores, torch.tensor([5, 1]))
