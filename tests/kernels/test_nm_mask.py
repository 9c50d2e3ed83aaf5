"""The N:M mask of a score matrix (kernels/nm_select.py) against reference.nm_mask (sdsengine.masks' sort and
compares), exactly: every pattern the kernels cover, every float dtype, NaN of either sign, +-inf, +-0 and
ties; and sdsengine.masks.nm_mask handing CUDA tensors to it."""
import itertools

import pytest
import torch

from sdsengine import kernels, masks
from sdsengine.kernels import nm_mask, use_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PATTERNS = ((2, 4), (1, 4), (3, 4), (0, 4), (4, 4), (4, 8), (2, 8), (8, 16), (16, 32))
SHAPES = ((1, 32), (3, 96), (17, 288), (16, 256), (33, 1056))  # partial, whole and several tiles of 16 x 256


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(both_backends, assert_exact, device, dtype, shape):
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    fast, ref = both_backends(lambda: nm_mask(scores, 2, 4))
    assert_exact(fast, ref, f"2:4 mask {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
def test_every_pattern(both_backends, assert_exact, device, dtype, pattern):
    scores = torch.randn(5, 96, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    fast, ref = both_backends(lambda: nm_mask(scores, *pattern))
    assert_exact(fast, ref, f"{pattern} mask {dtype}")
    assert (fast.reshape(5, -1, pattern[1]).sum(-1) == pattern[0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_and_ties(both_backends, assert_exact, device, dtype):
    """Every 4-combination (with repeats) of NaN of either sign, +-inf, +-0, 1 and -1, one per row: the
    kernel's keys must rank them as the stable sort does (NaNs tie, lower index first; -0.0 ties 0.0)."""
    nan = float("nan")
    special = [nan, -nan, float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0]
    scores = torch.tensor(list(itertools.product(special, repeat=4)), dtype=torch.float64).to(dtype).to(device)
    for n in (1, 2, 3):
        fast, ref = both_backends(lambda: nm_mask(scores, n, 4))
        assert_exact(fast, ref, f"{n}:4 mask of special values, {dtype}")


def test_any_leading_shape_and_a_view(both_backends, assert_exact, device):
    scores = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)).to(device)
    fast, ref = both_backends(lambda: nm_mask(scores, 2, 4))
    assert_exact(fast, ref, "3-D scores")
    view = torch.randn(64, 40, generator=torch.Generator().manual_seed(3)).to(device).T  # not contiguous
    fast, ref = both_backends(lambda: nm_mask(view, 2, 4))
    assert_exact(fast, ref, "a transposed view")


def test_empty_and_uncovered_inputs(device):
    with use_backend("triton"):
        assert nm_mask(torch.empty(0, 8, device=device), 2, 4).shape == (0, 8)
        ints = torch.arange(8, device=device).reshape(1, 8)  # not a float: the reference serves it
        assert nm_mask(ints, 2, 4).tolist() == [[False, False, True, True, False, False, True, True]]


def test_bad_patterns_are_named(device):
    scores = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="not divisible by M=3"):
        nm_mask(scores, 1, 3)
    with pytest.raises(ValueError, match="0 <= N <= M"):
        nm_mask(scores, 5, 4)


def test_masks_hand_cuda_tensors_to_the_kernels(monkeypatch):
    """sdsengine.masks.nm_mask keeps CPU tensors on its own path and sends CUDA ones through the kernels'
    switch (a stand-in tensor type that says it is on CUDA)."""
    seen = []
    monkeypatch.setattr(kernels, "nm_mask", lambda s, n, m: seen.append((n, m)) or "from the kernels")
    scores = torch.randn(2, 8)
    assert masks.nm_mask(scores, 2, 4).dtype == torch.bool and not seen

    class OnCuda(torch.Tensor):
        is_cuda = True
    assert masks.nm_mask(scores.as_subclass(OnCuda), 2, 4) == "from the kernels" and seen == [(2, 4)]


def test_the_function_outlives_its_kernel_modules_import(device):
    """Importing a submodule binds it on the package: a kernel module named like its function would replace
    the function after the first Triton call (masks.nm_mask looks it up at every call)."""
    with use_backend("triton"):
        kernels.nm_mask(torch.randn(2, 8, device=device), 2, 4)
    assert callable(kernels.nm_mask) and kernels.nm_mask.__module__ == "sdsengine.kernels"
