import pytest
import torch

from sdsengine.masks import counted_sparsity, nm_mask, nm_violations, prune_lowest_mask


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
