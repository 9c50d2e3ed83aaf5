"""Fused Wanda kernel (kernels/wanda.py) against reference.wanda_prune: masks and pruned weights exact."""
import pytest
import torch

from sdsengine.algorithms import wanda
from sdsengine.algorithms.stats import InputNorms
from sdsengine.config import WandaConfig
from sdsengine.kernels import use_backend, wanda_prune
from sdsengine.kernels.wanda import TIE_BLOCK

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1, 32), (3, 96), (17, 160), (64, 128))  # one row, odd rows, a partial column tile, 4 row tiles


def _inputs(rows, cols, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen).to(dtype), torch.rand(cols, generator=gen) + 0.1


def _check(both_backends, assert_exact, device, weight, norm, sparsity, nm):
    weight, norm = weight.to(device), norm.to(device)
    (out, mask), (ref_out, ref_mask) = both_backends(lambda: wanda_prune(weight, norm, sparsity, nm))
    assert_exact(mask, ref_mask, "mask")
    assert_exact(out, ref_out, "pruned weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_matches_reference(both_backends, assert_exact, device, dtype, shape, nm):
    _check(both_backends, assert_exact, device, *_inputs(*shape, dtype), 0.5, nm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_unstructured_matches_reference(both_backends, assert_exact, device, dtype, shape):
    _check(both_backends, assert_exact, device, *_inputs(*shape, dtype), 0.5, None)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.73, 0.99])
def test_unstructured_counts(both_backends, assert_exact, device, sparsity):
    """Exactly int(cols * sparsity) pruned per row, at sparsities whose count is not cols / 2."""
    _check(both_backends, assert_exact, device, *_inputs(5, 200, torch.float32), sparsity, None)


@pytest.mark.parametrize("nm", [(1, 4), (3, 8), (2, 2), (8, 16)])
def test_other_nm(both_backends, assert_exact, device, nm):
    _check(both_backends, assert_exact, device, *_inputs(4, 64, torch.float16), 0.5, nm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", [(2, 4), (1, 2), (3, 4)])
@pytest.mark.parametrize("cols", [4, 36, 260])
def test_nm_odd_group_counts(both_backends, assert_exact, device, dtype, nm, cols):
    """A thread takes groups in packs (two of 4 at 2 bytes an element): an odd number of groups per row leaves
    the last pack half outside the row."""
    _check(both_backends, assert_exact, device, *_inputs(5, cols, dtype), 0.5, nm)


def _tied(kind, rows=5, cols=64):
    """Weights and norms full of exact ties, signed zeros and non-finite values."""
    gen = torch.Generator().manual_seed(1)
    weight, norm = torch.randn(rows, cols, generator=gen), torch.rand(cols, generator=gen) + 0.1
    if kind == "all_equal":
        weight, norm = torch.ones(rows, cols), torch.ones(cols)
    elif kind == "integers":
        weight = torch.randint(-2, 3, (rows, cols), generator=gen).float()
    elif kind == "signed_zeros":
        weight[:, ::3], weight[:, 1::5] = 0.0, -0.0
    elif kind == "nan_inf":
        weight[0, 1] = weight[0, 5] = float("nan")
        weight[-1, 2] = float("inf")
    elif kind == "negative_norms":  # not a real norm, but the kernel must order negative scores too
        norm = torch.randn(cols, generator=gen)
        norm[::4] = 0.0
    elif kind == "negative_zero_scores":  # a zero weight on a negative norm scores -0.0: it must tie with +0.0
        weight[:, 1::4] = weight[:, 2::4] = 0.0
        norm[1::2] = -norm[1::2]
    return weight, norm


@pytest.mark.parametrize("kind", ["all_equal", "integers", "signed_zeros", "nan_inf", "negative_norms",
                                  "negative_zero_scores"])
@pytest.mark.parametrize("pattern", [(2, 4), (3, 8), 0.5, 0.3])
def test_ties_match_reference(both_backends, assert_exact, device, kind, pattern):
    nm, sparsity = (pattern, 0.5) if isinstance(pattern, tuple) else (None, pattern)
    _check(both_backends, assert_exact, device, *_tied(kind), sparsity, nm)


@pytest.mark.parametrize("pattern", [(2, 4), 0.5])
def test_pruned_entries_are_positive_zero(both_backends, assert_exact, device, pattern):
    """Whatever was pruned, -x, inf or NaN (more non-finite weights than a group keeps), both backends
    write +0.0 there, so the result holds the pattern."""
    nm, sparsity = (pattern, 0.5) if isinstance(pattern, tuple) else (None, pattern)
    weight = -torch.rand(2, 8) - 1
    weight[0, :4] = torch.tensor([float("nan"), float("nan"), float("inf"), 1.0])
    weight, norm = weight.to(device), torch.ones(8, device=device)
    (out, mask), (ref_out, ref_mask) = both_backends(lambda: wanda_prune(weight, norm, sparsity, nm))
    assert_exact(out, ref_out, "pruned weight")
    pruned = ref_out[~ref_mask]
    assert (pruned == 0).all() and not torch.signbit(pruned).any()


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_ties_across_pieces(both_backends, assert_exact, device, sparsity):
    """A row whose threshold ties must be split is re-read in pieces of TIE_BLOCK: the lowest-index ties go,
    counted across piece boundaries (2500 columns: three pieces, the last partial)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randint(-3, 4, (3, TIE_BLOCK * 2 + 452), generator=gen).to(torch.float16)
    _check(both_backends, assert_exact, device, weight, torch.ones(weight.shape[1]), sparsity, None)


def test_all_equal_by_hand(device):
    """Ties go to the lower index: N:M keeps the first n of a group; unstructured prunes the first k."""
    with use_backend("triton"):
        ones = torch.ones(1, 8, device=device)
        _, nm_keep = wanda_prune(ones, ones[0], nm=(2, 4))
        _, row_keep = wanda_prune(ones, ones[0], sparsity=0.25)
    assert nm_keep.tolist() == [[True, True, False, False] * 2]
    assert row_keep.tolist() == [[False, False] + [True] * 6]


@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_algorithm_same_under_both_backends(both_backends, assert_exact, device, pattern):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 96, generator=gen).to(device, torch.bfloat16)
    stats = InputNorms(96, device)
    stats.add_batch(torch.randn(40, 96, generator=gen).to(device))
    fast, ref = both_backends(lambda: wanda.prune(weight, stats, WandaConfig(sparsity=pattern)))
    assert_exact(fast != 0, ref != 0, "mask")
    assert_exact(fast, ref, "pruned weight")


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), None])
def test_the_reference_path_in_blocks_of_rows_is_the_reference(monkeypatch, nm):
    """Where the reference runs (the CPU), Wanda goes a block of rows at a time (its scores and indices held 2x an
    fp32 weight): blocks of one row, and of rows that do not divide the weight's, give the whole reference's pruned
    weight and mask."""
    import sdsengine.kernels as kernels
    from sdsengine.kernels import reference
    weight, norm = _inputs(33, 96, torch.float32, seed=4)
    whole, whole_mask = reference.wanda_prune(weight, norm, 0.5, nm)
    for block in (96, 3 * 96):  # one row; three rows
        monkeypatch.setattr(kernels, "_REFERENCE_BLOCK", block)
        with use_backend("torch"):
            pruned, mask = wanda_prune(weight, norm, 0.5, nm)
        assert torch.equal(pruned, whole) and torch.equal(mask, whole_mask)
